"""The Python API takes images as users hold them: paths, bytes, PIL images, numpy arrays; long
lists in batches; unreadable images skipped on request; alternatives and scores on request."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from captioner import Captioner
from captioner.errors import CaptionerWarning, ConfigError, ImageError


@pytest.fixture(scope="module")
def cap(trained) -> Captioner:
    return Captioner.load(trained / "best", device="cpu")


@pytest.fixture(scope="module")
def photo(shapes):
    return sorted(shapes.parent.glob("*.png"))[0]


def test_every_form_of_one_image_gets_the_same_caption(cap, photo):
    pil = Image.open(photo).convert("RGB")
    want = cap.caption(photo)
    assert isinstance(want, str) and want
    assert cap.caption(str(photo)) == want
    assert cap.caption(photo.read_bytes()) == want
    assert cap.caption(pil) == want
    assert cap.caption(np.asarray(pil)) == want  # HxWx3 uint8
    assert cap.caption(np.asarray(pil.convert("RGBA"))) == want  # opaque RGBA
    assert cap.caption(np.asarray(pil)[None]) == [want]  # a 4-D array is a list of images
    assert cap.caption([]) == []
    assert cap.caption((photo, pil)) == [want, want]


def test_arrays_that_are_not_pixels_are_one_line_errors(cap, photo):
    with pytest.raises(ImageError, match=r"image: an array of shape \(8, 8, 3\) and dtype float32; expected uint8"):
        cap.caption(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ImageError, match=r"image 1: an array of shape \(8, 8, 2\)"):
        cap.caption([photo, np.zeros((8, 8, 2), np.uint8)])
    with pytest.raises(ImageError, match="0x0 pixels"):
        cap.caption(np.zeros((0, 0, 3), np.uint8))


def test_long_lists_are_captioned_in_batches_in_order(cap, shapes, monkeypatch):
    paths = sorted(shapes.parent.glob("*.png"))[:7]
    one_by_one = [cap.caption(p) for p in paths]
    sizes = []
    real = cap.caption_tensor
    monkeypatch.setattr(cap, "caption_tensor", lambda x, d=None: sizes.append(len(x)) or real(x, d))
    assert cap.caption(paths, batch_size=3) == one_by_one
    assert sizes == [3, 3, 1]
    with pytest.raises(ConfigError):
        cap.caption(paths, batch_size=0)


def test_the_default_batch_size_is_the_devices(cap, shapes, monkeypatch):
    """32 images a batch on a CPU, 256 on a GPU, unless the caller says: for lists, files,
    caption --out and index alike."""
    import torch

    from captioner.runtime import caption_batch_size

    assert cap.batch_size == 32 and caption_batch_size(torch.device("cuda")) == 256
    paths = sorted(shapes.parent.glob("*.png"))[:5]
    sizes = []
    real = cap.caption_tensor
    monkeypatch.setattr(cap, "caption_tensor", lambda x, d=None, f=False: sizes.append(len(x)) or real(x, d, f))
    monkeypatch.setattr(cap, "batch_size", 2)
    cap.caption(paths)
    list(cap.caption_files(paths, workers=0))
    assert sizes == [2, 2, 1] * 2


def test_errors_skip_gives_none_in_place_with_a_warning(cap, photo, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(ImageError, match="broken.jpg"):
        cap.caption([photo, bad])
    with pytest.warns(CaptionerWarning, match="broken.jpg"):
        out = cap.caption([photo, bad, b"", photo], errors="skip")
    assert out[0] == out[3] == cap.caption(photo) and out[1] is None and out[2] is None
    with pytest.warns(CaptionerWarning):
        detailed = cap.caption([bad, photo], errors="skip", details=True)
    assert detailed[0]["caption"] is None and "broken.jpg" in detailed[0]["error"]
    assert detailed[1]["caption"] == out[0]
    with pytest.raises(ConfigError, match="errors must be"):
        cap.caption(photo, errors="ignore")


def test_details_give_the_alternatives_and_scores(cap, photo):
    d = cap.caption(photo, beam_size=3, details=True)
    assert d["caption"] == cap.caption(photo, beam_size=3)
    assert set(d) == {"caption", "logprob", "score", "alternatives"} and len(d["alternatives"]) == 3
    assert d["alternatives"][0] == {k: d[k] for k in ("caption", "logprob", "score")}
    assert [a["score"] for a in d["alternatives"]] == sorted((a["score"] for a in d["alternatives"]), reverse=True)
    buf = io.BytesIO()
    Image.open(photo).save(buf, "JPEG")
    assert cap.caption([buf.getvalue()], details=True)[0]["caption"]


def test_parallel_loading_gives_the_same_captions_in_order_and_skips_bad_files(cap, shapes, tmp_path):
    good = sorted(shapes.parent.glob("*.png"))[:9]
    bad = [tmp_path / "corrupt.jpg", tmp_path / "empty.png", tmp_path / "notes.jpg"]
    bad[0].write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    bad[1].write_bytes(b"")
    bad[2].write_text("not an image")
    paths = good[:3] + [bad[0]] + good[3:6] + [bad[1], bad[2]] + good[6:]
    runs = {w: list(cap.caption_files(paths, batch_size=4, workers=w)) for w in (0, 2)}
    for w in (0, 2):
        assert sorted(map(str, (p for p, _, _ in runs[w]))) == sorted(map(str, paths))
        errors = {p for p, r, e in runs[w] if e}
        assert errors == set(bad)
    same = [(p, r["caption"]) for p, r, _ in runs[0] if r]
    assert same == [(p, r["caption"]) for p, r, _ in runs[2] if r]
    assert [p for p, _ in same] == good  # the good ones in their order
