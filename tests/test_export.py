"""captioner export: the ONNX graphs, run by onnxruntime without torch, and the TorchScript ones
give the same greedy captions as the PyTorch model."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY

from captioner import Captioner
from captioner.cli import main
from captioner.data.images import open_rgb

UMASK = os.umask(0o022)
os.umask(UMASK)

onnxruntime = pytest.importorskip("onnxruntime", reason="pip install -e '.[test]' installs onnxruntime")


def images(shapes, n=6):
    return sorted(Path(shapes).parent.glob("*_4.png"))[:n]  # held-out val images


@pytest.fixture(scope="module")
def attention_gru(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("att_gru")
    assert main(["train", "--data", str(shapes), "--out", str(out), "--epochs", "2", "--max-images", "40",
                 "--val-images", "6", "--decoder", "attention", "--rnn", "gru", *TINY]) == 0
    return out / "last"


@pytest.mark.parametrize("which", ["show_tell_lstm", "attention_gru"])
def test_onnx_export_captions_like_pytorch(trained, attention_gru, shapes, tmp_path, which):
    from captioner.export import OnnxCaptioner

    model = trained / "best" if which == "show_tell_lstm" else attention_gru
    assert main(["export", "--model", str(model), "--format", "onnx", "--out", str(tmp_path / "x")]) == 0
    assert {p.name for p in (tmp_path / "x").iterdir()} == {"start.onnx", "step.onnx", "vocab.json", "export.json"}
    cap = Captioner.load(model, device="cpu", precision="fp32")
    xs = [cap.transform(open_rgb(p)) for p in images(shapes)]
    expected = [r["caption"] for r in cap.caption_tensor(torch.stack(xs), cap.decoding.replace(beam_size=1))]
    onnx = OnnxCaptioner(tmp_path / "x")
    assert onnx.caption_arrays(np.stack([x.numpy() for x in xs])) == expected  # batch of 6
    assert onnx.caption_arrays(xs[0].numpy()[None]) == expected[:1]  # and of 1: the batch axis is dynamic
    assert all(expected)
    # from files, like Captioner: its own preprocessing (Pillow's resize) gives the same captions here
    assert onnx.caption(images(shapes), batch_size=4) == expected
    assert onnx.caption(str(images(shapes)[0])) == expected[0]
    # issue 30, item 10: says how it decodes and how the model does; no path of this machine; a
    # folder others may read (mkdtemp's 0700 was kept)
    meta = json.loads((tmp_path / "x" / "export.json").read_text())
    assert onnx.decoding == meta["decoding"] == "greedy" and meta["model_decoding"] == cap.decoding.saved()
    assert "/" not in meta["source"] and meta["source"].startswith(model.name + " (weights ")
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o777 & ~UMASK


def test_torchscript_export_captions_like_pytorch(trained, shapes, tmp_path):
    assert main(["export", "--model", str(trained / "best"), "--format", "torchscript", "--out", str(tmp_path)]) == 0
    start, step = torch.jit.load(str(tmp_path / "start.pt")), torch.jit.load(str(tmp_path / "step.pt"))
    cap = Captioner.load(trained / "best", device="cpu", precision="fp32")
    x = torch.stack([cap.transform(open_rgb(p)) for p in images(shapes)])
    expected = [r["caption"] for r in cap.caption_tensor(x, cap.decoding.replace(beam_size=1))]
    v = cap.vocab
    with torch.no_grad():
        state = start(x)
        tokens, words, done = torch.full((len(x),), v.start), [[] for _ in x], torch.zeros(len(x), dtype=torch.bool)
        for _ in range(cap.model.cfg.max_len):
            logits, *state = step(tokens, *state)
            logits[:, v.unk] = float("-inf")
            tokens = logits.argmax(dim=1)
            for b, t in enumerate(tokens.tolist()):
                if not done[b] and t != v.end:
                    words[b].append(v.itos[t])
            done |= tokens == v.end
            if done.all():
                break
    assert [" ".join(w) for w in words] == expected


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "not a model folder" in capsys.readouterr().err


def test_onnx_captioner_needs_no_torch(trained, shapes, tmp_path):
    import subprocess
    import sys

    assert main(["export", "--model", str(trained / "best"), "--out", str(tmp_path / "x")]) == 0
    photo = images(shapes)[0]
    want = Captioner.load(trained / "best", device="cpu", precision="fp32").caption(photo, beam_size=1)
    probe = ("import sys; sys.modules['torch'] = None  # any import of torch now fails\n"
             "from captioner.export import OnnxCaptioner\n"
             "print(OnnxCaptioner(sys.argv[1]).caption(sys.argv[2]))")
    r = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "x"), str(photo)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    r = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "x"), str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and "bad.jpg: not a readable image" in r.stderr


@pytest.fixture(scope="module")
def onnx_export(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "x"
    assert main(["export", "--model", str(trained / "best"), "--format", "onnx", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("file, edit, message", [
    ("export.json", {"image_size": 0}, "image_size must be a whole number from 16 to 1024, not 0"),
    ("export.json", {"image_size": 100_000}, "image_size must be a whole number from 16 to 1024"),
    ("export.json", {"start": 10**6}, "start must be a whole number from 0 to"),
    ("export.json", {"std": [1e-30, 1, 1]}, "std must be 3 numbers from 1e-06 to 1000"),
    ("export.json", {"banned": [-1]}, "banned must be word ids below"),
    ("export.json", {"max_len": "20"}, "max_len must be a whole number"),
    ("vocab.json", {"itos": ["<pad>", "<start>", "<end>", "<unk>"]}, "vocab.json has 4 words and step.onnx scores"),
    ("vocab.json", {"itos": "dog"}, "'itos' must be a list of at least 4 different words"),
    ("export.json", None, "export.json: not readable JSON"),
])
def test_an_edited_or_damaged_onnx_export_is_one_line(onnx_export, tmp_path, file, edit, message):
    """OnnxCaptioner trusted export.json and vocab.json: ids out of range, image_size 0 or 100,000 and a
    short vocabulary ended in IndexError, ValueError or MemoryError. Now each is an ExportError naming it."""
    import json
    import shutil

    from captioner.errors import ExportError
    from captioner.export import OnnxCaptioner

    folder = tmp_path / "x"
    shutil.copytree(onnx_export, folder)
    path = folder / file
    if edit is None:
        path.write_text('{"format": "onnx", ')
    else:
        path.write_text(json.dumps(json.loads(path.read_text()) | edit))
    with pytest.raises(ExportError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        OnnxCaptioner(folder)
    assert "\n" not in str(e.value)


def test_an_export_of_the_shipped_model_names_it_so():
    from captioner.export import _source_name
    from captioner.names import shipped_model_dir

    assert _source_name(shipped_model_dir()) == "shipped"
