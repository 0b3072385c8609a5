"""captioner export: the ONNX graphs, run by onnxruntime without torch, and the TorchScript ones
give the same greedy captions as the PyTorch model."""

from pathlib import Path

import pytest
import torch
from conftest import TINY

from captioner import Captioner
from captioner.cli import main
from captioner.data.images import open_rgb

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
    assert onnx.caption([x.numpy() for x in xs]) == expected  # batch of 6
    assert onnx.caption([xs[0].numpy()]) == expected[:1]  # and of 1: the batch axis is dynamic
    assert all(expected)


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
