"""--precision int8: the decoder's big layers with 8-bit weights compute what they did in fp32, the
captions stay those of fp32 on a model that is sure of them, and it is refused where it cannot run."""

import pytest
import torch
from torch import nn

from captioner import Captioner
from captioner.cli import main
from captioner.data.records import load_records
from captioner.errors import ConfigError
from captioner.evaluate import evaluate
from captioner.inference import int8
from captioner.inference.int8 import Int8GRUCell, Int8Linear, Int8LSTMCell, int8_available, int8_decoder
from captioner.model.attention import AttentionDecoder
from captioner.runtime import resolve_precision

pytestmark = pytest.mark.skipif(int8_available() is not None, reason=str(int8_available()))


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 0.04) -> bool:
    """Within `tol` of the largest value: what 8-bit weights and 7-bit inputs allow."""
    return bool((got - want).abs().max() <= tol * want.abs().max())


@torch.no_grad()
def test_int8_layers_compute_what_the_fp32_layers_do():
    torch.manual_seed(0)
    x, h, c = torch.randn(7, 300), torch.randn(7, 128), torch.randn(7, 128)
    lin = nn.Linear(300, 500)
    assert close(Int8Linear(lin)(x), lin(x))
    assert Int8Linear(lin)(x.view(7, 1, 300)).shape == (7, 1, 500)
    lstm = nn.LSTMCell(300, 128)
    for got, want in zip(Int8LSTMCell(lstm)(x, (h, c)), lstm(x, (h, c))):
        assert close(got, want)
    gru = nn.GRUCell(300, 128)
    assert close(Int8GRUCell(gru)(x, h), gru(x, h))
    assert not close(Int8Linear(nn.Linear(300, 500))(x), lin(x))  # the check itself can fail


@torch.no_grad()
def test_the_big_layers_go_int8_and_the_original_stays_as_it_was():
    torch.manual_seed(0)
    dec = AttentionDecoder(vocab_size=300, feat_dim=512, embed_dim=256, hidden_dim=256, attention_dim=128).eval()
    q = int8_decoder(dec)
    assert isinstance(q.cell, Int8LSTMCell) and isinstance(q.out, Int8Linear) and isinstance(q.proj[0], Int8Linear)
    assert type(q.att_score) is nn.Linear  # 128 weights: nothing to gain
    assert type(dec.cell) is nn.LSTMCell and type(dec.out) is nn.Linear
    feats, tokens = torch.randn(3, 9, 512), torch.randint(3, 300, (3, 8))
    assert close(q.teacher_forced(feats, tokens)[0], dec.teacher_forced(feats, tokens)[0], 0.08)


def test_int8_captions_are_the_fp32_captions_of_a_sure_model(trained, shapes, monkeypatch):
    monkeypatch.setattr(int8, "MIN_WEIGHTS", 0)  # the tiny model's layers are all small: take every one
    fp32 = Captioner.load(trained / "best", device="cpu", precision="fp32")
    q = Captioner.load(trained / "best", device="cpu", precision="int8")
    assert q.precision == "int8" and isinstance(q.model.decoder.out, Int8Linear)
    assert not isinstance(fp32.model.decoder.out, Int8Linear)
    images = [r.image for r in load_records(shapes) if r.split == "val"][:24]
    want, got = fp32.caption(images), q.caption(images)
    assert sum(a == b for a, b in zip(want, got)) >= 0.9 * len(images)


def test_int8_evaluation_scores_like_fp32(trained, shapes):
    kw = dict(batch_size=16, device="cpu", meteor=False, progress=False)
    a = evaluate(trained / "best", shapes, precision="fp32", **kw)
    b = evaluate(trained / "best", shapes, precision="int8", **kw)
    assert a["images"] == b["images"] > 0 and abs(a["CIDEr"] - b["CIDEr"]) < 0.1 * a["CIDEr"]


def test_int8_is_for_captioning_on_a_cpu(shapes, tmp_path, capsys):
    assert resolve_precision("int8", torch.device("cpu"), inference=True) == "int8"
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolve_precision("int8", torch.device("cpu"))  # training
    with pytest.raises(ConfigError, match="for the CPU"):
        resolve_precision("int8", torch.device("cuda"), inference=True)
    with pytest.raises(SystemExit):
        main(["train", "--data", str(shapes), "--out", str(tmp_path / "r"), "--precision", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_a_library_indexed_at_int8_is_the_same_models_at_any_precision(trained, shapes, tmp_path, monkeypatch):
    """int8 swaps in other decoder weights, and the fingerprint changed with them: a library indexed
    at int8 fell back to keywords at fp32 ("no photo was indexed by this model") and switching
    precision captioned every photo again. The fingerprint is of the weights as saved."""
    from captioner.library import index_folders, search

    monkeypatch.setattr(int8, "MIN_WEIGHTS", 0)
    fp32 = Captioner.load(trained / "best", device="cpu", precision="fp32")
    q = Captioner.load(trained / "best", device="cpu", precision="int8")
    assert isinstance(q.model.decoder.out, Int8Linear) and q.fingerprint == fp32.fingerprint
    folder = tmp_path / "photos"
    folder.mkdir()
    for r in [r for r in load_records(shapes) if r.split == "val"][:4]:
        (folder / r.image.name).write_bytes(r.image.read_bytes())
    db = tmp_path / "lib.sqlite"
    assert index_folders(q, [folder], db, progress=False).captioned == 4
    assert index_folders(fp32, [folder], db, progress=False).unchanged == 4
    found = search(db, "a red circle", 4, mode="hybrid", captioner=fp32)
    assert found.mode == "hybrid" and len(found.hits) == 4
    assert not found.note or "indexed by this model" not in found.note
