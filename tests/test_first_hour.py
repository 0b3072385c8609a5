"""What a new user meets in their first hour: a first training run that does not crash, an earlier
run that is never silently lost, one bad file that never stops a job, one-line device errors."""

from __future__ import annotations

import inspect
import io
import json
import random
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TINY
from PIL import Image

import captioner.train.run as run_module
from captioner.cli import main
from captioner.data.images import open_rgb
from captioner.errors import ConfigError, ImageError
from captioner.files import locked
from captioner.model.encoder import BatchNorm
from captioner.model.show_tell import ShowTellDecoder
from captioner.train import TrainConfig, fit

SMALL = dict(image_size=64, embed_dim=16, hidden_dim=32, min_count=1, batch_size=32, workers=0, quiet=True,
             max_images=30, val_images=4)


def test_batchnorm_head_trains_on_a_batch_of_one():
    dec = ShowTellDecoder(vocab_size=9, feat_dim=8, embed_dim=6, hidden_dim=10).train()
    bn = dec.head[1]
    assert isinstance(bn, BatchNorm)
    before = bn.running_mean.clone()
    logits, _ = dec(torch.randn(1, 8), torch.tensor([[1, 4, 5]]))
    logits.sum().backward()
    assert torch.equal(bn.running_mean, before)  # one sample says nothing about the statistics
    dec(torch.randn(4, 8), torch.tensor([[1, 4, 5]] * 4))
    assert not torch.equal(bn.running_mean, before)


def test_a_caption_alone_in_its_length_bucket_trains(tmp_path, shapes):
    """The first run a user tried crashed: a length bucket left a one-caption batch and the
    default Linear+BatchNorm head could not train on it."""
    lines = shapes.read_text().splitlines()
    first = json.loads(lines[0])
    lonely = {"image": first["image"], "caption": "a very long and quite unusual caption that no other caption "
              "in this tiny synthetic set has the length of", "split": "train"}
    data = tmp_path / "captions.jsonl"
    data.write_text("\n".join(lines + [json.dumps(lonely)]) + "\n")
    for p in shapes.parent.glob("*.png"):
        (tmp_path / p.name).symlink_to(p)
    result = fit(TrainConfig(data=data, out=tmp_path / "run", epochs=1, max_len=30, **SMALL))
    assert len(result["history"]) == 1


@pytest.mark.slow
def test_an_earlier_run_is_never_silently_replaced(tmp_path, shapes, capsys):
    args = ["train", "--data", str(shapes), "--out", str(tmp_path / "run"), "--epochs", "1", "--max-images", "20",
            "--val-images", "4", *TINY]
    assert main(args) == 0
    # the closing line scores the model as it will caption: with the decoding chosen on val
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    chosen = max(json.loads((tmp_path / "run" / "best" / "config.json").read_text())["extra"]["decoding_on_val"],
                 key=lambda r: r["CIDEr"])
    assert closing.startswith(f"best epoch 1: val CIDEr-D {chosen['CIDEr']:.3f} with its decoding (")
    assert "greedy, which picked the epoch); model folders in" in closing
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a training run (1 epochs saved); add --resume to continue it, --overwrite" in err
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 2  # untouched
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 3
    assert main([*args, "--overwrite"]) == 0
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 2


def test_two_trainings_never_write_one_folder(tmp_path, shapes):
    out = tmp_path / "run"
    out.mkdir()
    with locked(out, "training"):
        with pytest.raises(ConfigError, match="another training is writing to it"):
            fit(TrainConfig(data=shapes, out=out, epochs=1, **SMALL))
    assert not (out / "metrics.csv").exists()


@pytest.mark.slow
def test_ctrl_c_says_what_is_saved_and_how_to_continue(tmp_path, shapes, monkeypatch, capsys):
    real = run_module.train_epoch
    at = list(inspect.signature(real).parameters).index("epoch")

    def interrupted_in_epoch_2(*args):
        if args[at] == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(run_module, "train_epoch", interrupted_in_epoch_2)
    args = ["train", "--data", str(shapes), "--out", str(tmp_path / "run"), "--epochs", "3", "--max-images", "20",
            "--val-images", "4", *TINY]
    assert main(args) == 130
    err = capsys.readouterr().err.splitlines()
    saved = tmp_path / "run" / "checkpoint.pt"
    assert err[0] == f"captioner: interrupted; the checkpoint after epoch 1 is in {saved}. Continue with:"
    command = err[1].split()
    assert command[:2] == ["captioner", "train"] and command[-1] == "--resume"
    monkeypatch.setattr(run_module, "train_epoch", real)
    assert main(command[1:]) == 0
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 4


def _broken_avif() -> bytes:
    """An AVIF file whose header reads but whose decoding fails with RuntimeError inside Pillow."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "AVIF")
    rng = random.Random(0)
    for _ in range(2000):
        d = bytearray(buf.getvalue())
        for _ in range(3):
            d[rng.randrange(len(d))] = rng.randrange(256)
        try:
            Image.open(io.BytesIO(bytes(d))).load()
        except RuntimeError:
            return bytes(d)
        except Exception:
            continue
    pytest.skip("no mutation of this AVIF made Pillow raise RuntimeError")


@pytest.fixture(scope="module")
def broken_avif() -> bytes:
    try:
        Image.new("RGB", (8, 8)).save(io.BytesIO(), "AVIF")
    except (KeyError, OSError):
        pytest.skip("this Pillow has no AVIF support")
    return _broken_avif()


def test_a_decoder_failure_is_one_files_error(broken_avif, tmp_path, trained, shapes, capsys):
    bad = tmp_path / "photos" / "holiday.jpg"  # an AVIF named .jpg
    bad.parent.mkdir()
    bad.write_bytes(broken_avif)
    shutil.copy(sorted(shapes.parent.glob("*.png"))[0], bad.parent / "good.png")
    with pytest.raises(ImageError, match="holiday.jpg: broken image"):
        open_rgb(bad)
    with pytest.raises(ImageError, match="upload: broken image"):
        open_rgb(broken_avif, name="upload")
    assert main(["caption", str(bad.parent), "--model", str(trained / "best"), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "good.png" in out and "holiday.jpg" not in out and "skipped" in err and "holiday.jpg" in err
    assert main(["caption", str(bad.parent), "--model", str(trained / "best"), "--out", str(tmp_path / "c.jsonl"),
                 "--quiet"]) == 0
    assert main(["index", str(bad.parent), "--db", str(tmp_path / "lib.sqlite"), "--model", str(trained / "best"),
                 "--quiet"]) == 0


def test_server_answers_json_for_a_broken_upload(broken_avif, trained, shapes):
    from fastapi.testclient import TestClient

    from captioner import Captioner
    from captioner.server.app import create_app

    client = TestClient(create_app(Captioner.load(trained / "best", device="cpu")), raise_server_exceptions=False,
                        base_url="http://127.0.0.1:8000")
    good = sorted(shapes.parent.glob("*.png"))[0].read_bytes()
    r = client.post("/api/caption", files=[("file", ("holiday.avif", broken_avif)), ("file", ("good.png", good))])
    assert r.status_code == 200
    first, second = r.json()["results"]
    assert "broken image" in first["error"] and second["caption"]
    r = client.post("/api/caption", files=[("file", ("holiday.avif", broken_avif))])
    assert r.status_code == 415 and "holiday.avif: broken image" in r.json()["detail"]


@pytest.mark.slow  # starts a Python process per case
@pytest.mark.parametrize("device,message", [("cuda", "no CUDA GPU is usable here"), ("gpu", "unknown device 'gpu'"),
                                            ("cuda:7", "device 'cuda:7'")])
def test_a_missing_device_is_one_line(device, message, tmp_path):
    if torch.cuda.is_available() and device != "gpu":
        pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, "-m", "captioner", "caption", "examples/coffee.jpg", "--device", device],
                       capture_output=True, text=True, cwd=str(__import__("pathlib").Path(__file__).parent.parent))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line, = r.stderr.strip().splitlines()
    assert message in line and "this machine has: auto, cpu" in line
    with pytest.raises(ConfigError, match=message):
        from captioner import Captioner

        Captioner.load(device=device)


def test_help_version_search_and_argument_errors_do_not_wait_for_torch(tmp_path):
    from captioner import __version__
    from captioner.library import connect

    connect(tmp_path / "photos.db").close()
    probe = ("import sys; from captioner.cli import main\n"
             "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
             "print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr); sys.exit(code)")
    db, no_db = str(tmp_path / "photos.db"), str(tmp_path / "none.db")
    for argv, code in [(["--help"], 0), (["--version"], 0), (["caption", "--help"], 0), (["train"], 2),
                       (["caption", "x.jpg", "--precision", "fp8"], 2), (["search", "dog", "--db", db], 0),
                       (["search", "dog", "--db", no_db], 2),
                       # issue 30, item 4: a path that is not there is said before torch or a model loads
                       (["index", str(tmp_path / "nofolder"), "--db", db], 2),
                       (["index", str(tmp_path), "--db", db, "--model", str(tmp_path / "nomodel")], 2),
                       (["serve", "--db", no_db], 2), (["serve", "--model", str(tmp_path / "nomodel")], 2),
                       (["evaluate", "--data", str(tmp_path / "nodata")], 2),
                       (["train", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "run")], 2),
                       (["train", "--data", db, "--out", str(tmp_path / "run"), "--init", str(tmp_path / "no")], 2),
                       (["embeddings", "--out", str(tmp_path / "w.png"), "--model", str(tmp_path / "nomodel")], 2),
                       (["export", "--model", str(tmp_path / "nomodel"), "--out", str(tmp_path / "e")], 2)]:
        r = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True)
        assert r.returncode == code, (argv, r.stderr)
        assert r.stderr.strip().splitlines()[-1] == "no torch", (argv, r.stderr)
        if code == 2 and "--help" not in argv:
            said = r.stderr.strip().splitlines()[:-1]  # one line (argparse's usage errors: usage and the error)
            assert said[-1].startswith("captioner") and ("no such" in said[-1] or "error:" in said[-1]), said
    r = subprocess.run([sys.executable, "-m", "captioner", "--version"], capture_output=True, text=True)
    assert r.stdout.strip() == f"captioner {__version__}"
    import importlib.metadata

    assert importlib.metadata.version("captioner") == __version__


def test_only_our_warnings_are_labelled_ours(monkeypatch):
    import warnings

    from captioner.cli import _one_line_warnings
    from captioner.errors import CaptionerWarning

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    _one_line_warnings()
    assert warnings.formatwarning("3 malformed lines skipped", CaptionerWarning, "records.py", 9) == \
        "captioner: warning: 3 malformed lines skipped\n"
    theirs = warnings.formatwarning("TypedStorage is deprecated", UserWarning, "torch/storage.py", 12)
    assert "captioner" not in theirs and "torch/storage.py:12: UserWarning: TypedStorage" in theirs


def test_caption_and_index_find_the_same_photos_and_report_heic(tmp_path, trained, shapes, capsys, monkeypatch):
    import captioner.data.images as images

    monkeypatch.setattr(images, "_register_heif", lambda: False)  # as on a machine without pillow-heif
    photos = tmp_path / "photos"
    (photos / "2024").mkdir(parents=True)
    pngs = sorted(shapes.parent.glob("*.png"))
    shutil.copy(pngs[0], photos / "top.png")
    shutil.copy(pngs[1], photos / "2024" / "deep.png")
    (photos / "2024" / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64))
    (photos / "notes.txt").write_text("not a photo")
    model = ["--model", str(trained / "best"), "--quiet"]
    assert main(["caption", str(photos), *model, "--json"]) == 0
    out, err = capsys.readouterr()
    assert sorted(json.loads(line)["image"].rsplit("/", 1)[1] for line in out.splitlines()) == ["deep.png", "top.png"]
    assert "IMG_0001.HEIC: a HEIC/HEIF photo; reading these needs pillow-heif (pip install pillow-heif)" in err
    assert "notes.txt" not in err
    assert main(["caption", str(photos), *model, "--no-recursive"]) == 0
    assert [line.split("\t")[0].rsplit("/", 1)[1] for line in capsys.readouterr().out.splitlines()] == ["top.png"]
    assert main(["index", str(photos), "--db", str(tmp_path / "lib.sqlite"), *model]) == 0
    err = capsys.readouterr().err
    assert "2 captioned" in err and "1 unreadable" in err and "IMG_0001.HEIC: a HEIC/HEIF photo" in err


@pytest.mark.slow
def test_init_shipped_fine_tunes_the_shipped_model(tmp_path, shapes, capsys):
    from captioner.names import shipped_model_dir

    out = tmp_path / "mine"
    assert main(["train", "--data", str(shapes), "--out", str(out), "--init", "shipped", "--epochs", "1",
                 "--max-images", "12", "--val-images", "4", "--batch-size", "16", "--workers", "0", "--quiet"]) == 0
    assert (out / "best" / "vocab.json").read_text() == (shipped_model_dir() / "vocab.json").read_text()
    assert main(["caption", str(next(shapes.parent.glob("*.png"))), "--model", "shipped"]) == 0


def test_licence_model_card_and_example_credits_are_there(capsys):
    from pathlib import Path

    from captioner.names import shipped_model_dir

    root = Path(__file__).resolve().parent.parent
    assert "MIT License" in (root / "LICENSE").read_text()
    card = shipped_model_dir() / "MODEL_CARD.md"
    text = card.read_text()
    assert "Flickr8k" in text and "research use" in text and "cannot do" in text
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    assert f"  {card}\n" in capsys.readouterr().out  # whole, on its own line (argparse would wrap at "site-")
    credits = (root / "examples" / "LICENSE.md").read_text()
    for photo in (root / "examples").glob("*.jpg"):
        assert f"`{photo.name}`" in credits and f"`{photo.name}`" in text, photo.name  # credited and shown


def test_the_suite_leaves_no_process_behind():
    """Issue 30, item 15: what a stopped suite runs last (conftest's pytest_unconfigure) kills the
    processes tests started and theirs (torchrun's workers are a training's children); here the
    same walk below a shell, so that this suite's other processes live on."""
    import os
    import time
    from pathlib import Path

    from conftest import descendants, stop_descendants

    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here to find a process's children in")

    def running(pid: int) -> bool:  # a killed process lingers as a zombie until its parent reaps it
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    shell = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60 & wait"])
    deadline = time.monotonic() + 10
    while len(descendants(shell.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchildren = descendants(shell.pid)
    assert len(grandchildren) == 2 and all(map(running, grandchildren))
    assert set(stop_descendants(shell.pid)) == set(grandchildren)  # (the suite's own: stop_descendants())
    shell.wait(timeout=10)  # bash's `wait` ends with its children
    deadline = time.monotonic() + 10
    while any(map(running, grandchildren)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(running, grandchildren))
