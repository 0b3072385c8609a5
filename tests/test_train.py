"""Training for real on synthetic shapes: the model must learn to see, and a run must resume exactly."""

import csv
import json

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from captioner import Captioner
from captioner.cli import main
from captioner.data.records import load_records
from captioner.data.synthetic import COLOURS, SHAPES
from captioner.inference.plan import InferencePlan

FP32_CPU = InferencePlan(torch.device("cpu"), "fp32")  # how these tests run the model


def test_tiny_model_learns_to_caption_held_out_images(trained, shapes):
    cap = Captioner.load(trained / "best", device="cpu")
    val = [r for r in load_records(shapes) if r.split == "val"]
    texts = cap.caption([r.image for r in val])
    right = 0
    for r, text in zip(val, texts):
        colour, shape, background = r.image.stem.split("_")[:3]
        words = text.split()
        right += (words[:3] == ["a", colour, shape] and f"{background} background" in text)
    # 36 held-out images drawn at unseen places and sizes; chance is 1 in 108
    assert right / len(val) >= 0.8, list(zip([r.image.name for r in val], texts))


def test_run_folder_contents(trained):
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("best", "last"):
        assert (trained / name).stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700 (issue 30, item 10)
        assert sorted(p.name for p in (trained / name).iterdir()) == [
            "config.json", "decoding.json", "embedding.json", "embedding.safetensors", "model.safetensors",
            "naming.json", "vocab.json"]
    assert not (trained / "space.pt").exists()  # the space's own checkpoint goes once the space is saved
    rows = list(csv.DictReader((trained / "metrics.csv").open()))
    assert len(rows) == 15 and float(rows[-1]["CIDEr"]) > float(rows[0]["CIDEr"])
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert (trained / "curves.png").stat().st_size > 1000
    cfg = json.loads((trained / "best" / "config.json").read_text())
    assert cfg["encoder_weights"] == "default"  # frozen offline encoder: decoder weights only
    assert all(k.startswith("decoder.") for k in load_file(trained / "best" / "model.safetensors"))


@pytest.mark.slow
def test_a_run_killed_while_its_space_trains_resumes_without_choosing_the_decoding_again(tmp_path, shapes, capsys,
                                                                                        monkeypatch):
    """The decoding chosen after the last epoch is kept in the checkpoint: a run stopped while its
    search space trains goes on with the space (space.pt) and never runs the choice again."""
    import captioner.train.embedding as training
    import captioner.train.run as run

    common = ["train", "--data", str(shapes), "--max-images", "40", "--epochs", "2", "--space-epochs", "2",
              "--out", str(tmp_path / "run"), *TINY]
    real = training.save_checkpoint

    def killed(path, state):
        real(path, state)
        raise KeyboardInterrupt  # after the space's first epoch

    monkeypatch.setattr(training, "save_checkpoint", killed)
    assert main(common) == 130
    first = capsys.readouterr()
    chosen = first.out.split("decoding of the best model on val: ")[1].splitlines()[0]
    assert "the checkpoint after epoch 2 is in" in first.err and "search space's training so far" in first.err
    monkeypatch.setattr(training, "save_checkpoint", real)
    monkeypatch.setattr(run, "choose_decoding", lambda *a, **k: pytest.fail("the decoding was chosen again"))
    assert main([*common, "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"decoding of the best model on val, chosen before the run was stopped: {chosen}\n" in out
    assert "0 of 2 members finished, member 1 after epoch 1 of 2" in out
    assert not (tmp_path / "run" / "space.pt").exists()
    assert Captioner.load(tmp_path / "run" / "best", device="cpu").space is not None


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, shapes, capsys):
    common = ["train", "--data", str(shapes), "--max-images", "40", *TINY]
    assert main([*common, "--out", str(tmp_path / "a"), "--epochs", "3"]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--epochs", "2"]) == 0
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "b"), "--epochs", "3", "--resume"]) == 0
    a, b = (load_file(tmp_path / x / "last" / "model.safetensors") for x in "ab")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # the decoding chosen after epoch 2 (kept in the checkpoint) is chosen again after epoch 3
    decodings = [(tmp_path / x / "best" / "decoding.json").read_text() for x in "ab"]
    assert decodings[0] == decodings[1] and "decoding of the best model on val: " in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "b" / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]


@pytest.mark.slow
def test_fine_tune_encoder_stores_it_in_the_folder(tmp_path, shapes):
    out = tmp_path / "ft"
    assert main(["train", "--data", str(shapes), "--out", str(out), "--epochs", "1", "--max-images", "12",
                 "--val-images", "4", "--fine-tune-encoder", "--encoder-lr", "1e-5", *TINY]) == 0
    state = load_file(out / "last" / "model.safetensors")
    assert any(k.startswith("encoder.") for k in state)
    assert json.loads((out / "last" / "config.json").read_text())["encoder_weights"] == "folder"
    cap = Captioner.load(out / "last", device="cpu")
    assert isinstance(cap.caption(next(shapes.parent.glob("*.png"))), str)


@pytest.mark.slow
def test_same_seed_same_model(tmp_path, shapes):
    args = ["train", "--data", str(shapes), "--max-images", "20", "--val-images", "4", "--epochs", "1", *TINY]
    for name in ("x", "y"):
        assert main([*args, "--out", str(tmp_path / name)]) == 0
    x, y = (load_file(tmp_path / n / "last" / "model.safetensors") for n in "xy")
    assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("colour", list(COLOURS)[:1])
def test_synthetic_vocabulary_has_the_words(trained, colour):
    itos = json.loads((trained / "best" / "vocab.json").read_text())["itos"]
    assert colour in itos and all(s in itos for s in SHAPES)


@pytest.mark.slow
@pytest.mark.parametrize("precision,decoder", [("fp32", "show_tell"), ("fp16", "attention")])
def test_other_precisions_train(tmp_path, shapes, precision, decoder):
    """fp32, and fp16 autocast with a gradient scaler (the CUDA path on GPUs without bf16; on the
    CPU only the attention decoder's LSTMCell has an fp16 kernel)."""
    out = tmp_path / precision
    assert main(["train", "--data", str(shapes), "--out", str(out), "--epochs", "2", "--max-images", "30",
                 "--val-images", "6", "--precision", precision, "--decoder", decoder, *TINY]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])


@pytest.mark.slow
def test_validation_with_beam_search(tmp_path, shapes):
    out = tmp_path / "vb"
    assert main(["train", "--data", str(shapes), "--out", str(out), "--epochs", "1", "--max-images", "20",
                 "--val-images", "6", "--val-beam-size", "3", *TINY]) == 0
    assert json.loads((out / "best" / "config.json").read_text())["extra"]["val"]["decode"].startswith("beam 3")


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["show_tell", "attention"])
def test_gru_decoders_train_save_and_load(tmp_path, shapes, decoder):
    out = tmp_path / decoder
    assert main(["train", "--data", str(shapes), "--out", str(out), "--epochs", "3", "--max-images", "40",
                 "--val-images", "6", "--decoder", decoder, "--rnn", "gru", *TINY]) == 0
    cfg = json.loads((out / "last" / "config.json").read_text())
    assert cfg["rnn"] == "gru"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    weights = load_file(out / "last" / "model.safetensors")
    assert not any("init_c" in k for k in weights)  # no cell state to initialise
    cap = Captioner.load(out / "last", device="cpu")
    img = sorted(shapes.parent.glob("*.png"))[0]
    assert cap.caption(img, beam_size=3) and cap.caption(img, beam_size=1)  # beams reorder a GRU state too


def test_fine_tuned_validation_reads_features_of_the_current_encoder(shapes):
    from captioner.model.network import CaptionModel, ModelConfig
    from captioner.train import TrainConfig
    from captioner.train.data import val_features

    val = [r for r in load_records(shapes) if r.split == "val"][:3]
    cfg = TrainConfig(data=str(shapes), out="unused", workers=0)
    model = CaptionModel.create(ModelConfig.for_encoder("tf_efficientnet_lite0", vocab_size=10, image_size=64),
                                encoder_weights="none")
    before = val_features(model, val, cfg, FP32_CPU)[:]
    with torch.no_grad():  # a training step, as far as the features can tell
        for p in model.encoder.parameters():
            p.mul_(1.1)
    after = val_features(model, val, cfg, FP32_CPU)[:]
    assert before.shape == after.shape == (3, 1280) and not torch.allclose(before, after, atol=1e-3)


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_freeze_bn_keeps_the_encoders_statistics_while_it_learns(freeze_bn):
    from captioner.model.network import CaptionModel, ModelConfig
    from captioner.train.data import ImageBatch
    from captioner.train.epoch import train_one_epoch

    torch.manual_seed(0)
    model = CaptionModel.create(ModelConfig.for_encoder("tf_efficientnet_lite0", vocab_size=12, image_size=64,
                                                        embed_dim=16, hidden_dim=16), encoder_weights="none")
    bns = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    stats = [m.running_mean.clone() for m in bns]
    weights = [m.weight.detach().clone() for m in bns]
    batches = [ImageBatch(torch.randn(2, 3, 64, 64), torch.tensor([0, 0, 1, 1]), torch.randint(4, 12, (4, 5)),
                          torch.tensor([4, 4, 4, 4]), []) for _ in range(2)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_one_epoch(model, batches, opt, FP32_CPU, 5.0, 1, 0, images=True, progress=False,
                    freeze_bn=freeze_bn)
    same_stats = all(torch.equal(a, m.running_mean) for a, m in zip(stats, bns))
    assert same_stats == freeze_bn
    assert not all(torch.equal(a, m.weight) for a, m in zip(weights, bns))  # scale and shift learn either way


@pytest.mark.slow
def test_tensorboard_gets_each_epochs_numbers_and_is_asked_for_by_name(shapes, tmp_path, monkeypatch, capsys):
    """Issue 30, item 13: `--tensorboard DIR` logs the numbers of metrics.csv, one step an epoch
    (here through a stand-in for torch.utils.tensorboard, which needs the tensorboard package)."""
    import sys
    import types

    logged: list[tuple[str, float, int, str]] = []

    class Writer:
        def __init__(self, folder):
            self.folder = folder

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def add_scalar(self, key, value, step):
            logged.append((key, value, step, self.folder))

    board = tmp_path / "board"
    args = ["train", "--data", str(shapes), "--epochs", "2", "--space-epochs", "0", "--max-images", "24",
            "--val-images", "6", "--tensorboard", str(board), *TINY]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "--tensorboard needs the tensorboard package: pip install tensorboard" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    said = capsys.readouterr().out  # the epoch total and the time left (issue 30, item 1)
    assert "epoch 1 of 2:" in said and "left for epochs 2-2" in said and "epoch 2 of 2:" in said
    rows = list(csv.DictReader((tmp_path / "b" / "metrics.csv").open()))
    for row in rows:
        for key in ("train_loss", "val_loss", "CIDEr"):
            assert (key, pytest.approx(float(row[key]), abs=1e-3), int(row["epoch"]), str(board)) in logged
    assert sorted({step for _, _, step, _ in logged}) == [1, 2]


def test_clearly_better_is_a_paired_bootstrap():
    from captioner.train.epoch import clearly_better

    base = [0.5 + 0.01 * (i % 7) for i in range(60)]
    assert clearly_better([x + 0.1 for x in base], base) == 1.0
    assert clearly_better(base, base) == 0.0
    assert clearly_better(base, [x + 0.1 for x in base]) == 0.0
    mixed = [x + (0.2 if i % 2 else -0.19) for i, x in enumerate(base)]  # as often worse as better
    assert 0.2 < clearly_better(mixed, base) < 0.95
    assert clearly_better([], []) == 0.0


def test_choose_decoding_keeps_a_start_models_own_on_a_small_val(tmp_path, trained, shapes):
    """Issue 30, item 2: a model fine-tuned from another keeps that model's decoding (and its tag
    guidance) unless val clearly says otherwise; 18 val photos once traded beam 5 with blocked
    trigrams for beam 3 without, and captions repeated themselves."""
    import shutil

    from captioner import metrics
    from captioner.inference.features import extract_features
    from captioner.model.network import load_model
    from captioner.train.data import FeatureRows
    from captioner.train.epoch import DECODING_CANDIDATES, choose_decoding

    folder = tmp_path / "model"
    shutil.copytree(trained / "best", folder)
    own = {"beam_size": 2, "length_norm": 0.7, "block_trigrams": True, "tag_threshold": 0.9, "tag_words": 1,
           "tag_borrow": False}  # not among the candidates
    (folder / "decoding.json").write_text(json.dumps(own))
    val = [r for r in load_records(shapes) if r.split == "val"]
    plan = FP32_CPU
    feats, ok, _ = extract_features(load_model(folder)[0], [r.image for r in val], plan, progress=False)
    assert ok.all()
    feats = FeatureRows(feats, list(range(len(val))))
    scorer = metrics.Scorer({i: r.captions for i, r in enumerate(val)}, use_java=False)

    rows = choose_decoding(folder, feats, scorer, plan, keep=True)
    assert len(rows) == len(DECODING_CANDIDATES) + 1 and sum(bool(r.get("chosen")) for r in rows) == 1
    assert rows[-1].get("chosen") and json.loads((folder / "decoding.json").read_text()) == own

    rows = choose_decoding(folder, feats, scorer, plan)  # a model trained afresh: val's best, tags kept
    best = max(rows, key=lambda r: r["CIDEr"])
    assert best.get("chosen") and len(rows) == len(DECODING_CANDIDATES)
    assert json.loads((folder / "decoding.json").read_text()) == {
        **own, "beam_size": best["beam_size"], "length_norm": best["length_norm"],
        "block_trigrams": best["block_trigrams"]}


def test_fine_tuning_that_scores_below_its_start_keeps_the_start_model(tmp_path, trained, shapes, capsys):
    """Issue 30, item 2: the model fine-tuning starts from is scored on val first and stays as best/
    unless an epoch beats it (here a learning rate that wrecks the model)."""
    out = tmp_path / "ruined"
    assert main(["train", "--data", str(shapes), "--init", str(trained / "best"), "--out", str(out), "--epochs", "1",
                 "--space-epochs", "0", *TINY, "--lr", "0.05"]) == 0
    said = capsys.readouterr().out
    assert "the start model (" in said and "on val: CIDEr-D" in said
    assert "no epoch beat the model it started from on val" in said.strip().splitlines()[-1]
    for name in ("model.safetensors", "vocab.json", "decoding.json", "embedding.safetensors"):
        assert (out / "best" / name).read_bytes() == (trained / "best" / name).read_bytes(), name
    assert (out / "last" / "model.safetensors").read_bytes() != (trained / "best" / "model.safetensors").read_bytes()
