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
    """64 images a batch on a CPU, 256 on a GPU, unless the caller says: for lists, files,
    caption --out and index alike."""
    import torch

    from captioner.inference.plan import InferencePlan

    assert cap.batch_size == 64 and InferencePlan(torch.device("cuda"), "bf16").batch_size == 256
    paths = sorted(shapes.parent.glob("*.png"))[:5]
    sizes = []
    real = cap.caption_tensor
    monkeypatch.setattr(cap, "caption_tensor", lambda x, d=None, f=False: sizes.append(len(x)) or real(x, d, f))
    monkeypatch.setattr(cap, "batch_size", 2)
    cap.caption(paths)
    list(cap.caption_files(paths, workers=0))
    assert sizes == [2, 2, 1] * 2


def test_loader_processes_for_captioning_by_device_and_cores(monkeypatch):
    """Two cores or fewer on a CPU: no loader process (it only takes turns with the model's threads);
    more cores, or a GPU: the general rule, none for two batches or fewer."""
    import torch

    from captioner.inference.plan import InferencePlan
    from captioner.runtime import loader_workers

    cpu, gpu = InferencePlan(torch.device("cpu"), "fp32"), InferencePlan(torch.device("cuda"), "bf16")
    for cores, want_cpu, want_gpu in [(1, 0, 1), (2, 0, 1), (4, 3, 3), (16, 8, 8)]:
        monkeypatch.setattr("os.cpu_count", lambda c=cores: c)
        assert cpu.workers(1000, 64) == want_cpu
        assert gpu.workers(1000, 64) == want_gpu == loader_workers(1000, 64)
        assert gpu.workers(128, 64) == 0


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
    assert set(d) == {"caption", "logprob", "score", "alternatives", "tags"} and len(d["alternatives"]) == 3
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


def _jpegs(shapes, folder) -> dict[str, object]:
    """The first shapes photos as JPEGs of every kind the device decoder takes or leaves to Pillow."""
    src = [Image.open(p).convert("RGB") for p in sorted(shapes.parent.glob("*.png"))[:8]]
    files = {}
    for k, img in enumerate(src[:4]):
        files[f"plain{k}.jpg"] = img
    files["grey.jpg"] = src[4].convert("L")
    files["cmyk.jpg"] = src[5].convert("CMYK")
    files["progressive.jpg"] = (src[6], {"progressive": True})
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: Pillow turns it upright, a device decoder would not
    files["rotated.jpg"] = (src[7], {"exif": exif.tobytes()})
    paths = {}
    for name, spec in files.items():
        img, kw = spec if isinstance(spec, tuple) else (spec, {})
        img.save(folder / name, "JPEG", quality=95, **kw)
        paths[name] = folder / name
    return paths


def test_which_jpegs_go_to_the_device_decoder(shapes, tmp_path):
    from captioner.data.jpeg import read_for_device

    paths = _jpegs(shapes, tmp_path)
    taken = {name for name, p in paths.items() if read_for_device(p) is not None}
    assert taken == {"plain0.jpg", "plain1.jpg", "plain2.jpg", "plain3.jpg", "grey.jpg"}
    png = tmp_path / "photo.png"
    Image.open(paths["plain0.jpg"]).save(png)
    assert read_for_device(png) is None and read_for_device(tmp_path / "missing.jpg") is None
    assert read_for_device(paths["plain0.jpg"], max_pixels=100) is None  # Pillow refuses it, as ever
    assert read_for_device(paths["plain0.jpg"], max_bytes=100) is None  # not read whole in one go
    import torch

    from captioner.data import jpeg
    from captioner.inference.plan import InferencePlan

    assert jpeg.available()  # this torchvision decodes JPEGs: the rule below is the device's alone
    assert InferencePlan(torch.device("cuda"), "bf16").jpegs_on_device
    assert not InferencePlan(torch.device("cpu"), "fp32").jpegs_on_device


def test_jpegs_decoded_on_the_device_give_the_same_captions_and_bad_files_are_still_skipped(cap, shapes, tmp_path):
    """The device path (checked here on the CPU, where torchvision's decoder and Pillow give the same
    pixels) captions every photo as Pillow's path does, in order, and reports the same bad files."""
    paths = _jpegs(shapes, tmp_path)
    whole = paths["plain0.jpg"].read_bytes()
    bad = {"truncated.jpg": whole[: len(whole) // 2], "header-only.jpg": b"\xff\xd8\xff\xe0 not a jpeg at all",
           "empty.jpg": b"", "notes.jpg": b"not an image"}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    order = [paths["plain0.jpg"], tmp_path / "truncated.jpg", paths["cmyk.jpg"], paths["plain1.jpg"],
             tmp_path / "header-only.jpg", paths["rotated.jpg"], paths["grey.jpg"], tmp_path / "empty.jpg",
             paths["progressive.jpg"], paths["plain2.jpg"], tmp_path / "notes.jpg", paths["plain3.jpg"]]
    runs = {(dev, w): list(cap.caption_files(order, batch_size=4, workers=w, jpegs_on_device=dev))
            for dev in (False, True) for w in (0, 2)}
    want = runs[False, 0]
    assert {p.name for p, r, e in want if e} == set(bad)
    for key, got in runs.items():
        assert [(p, r and r["caption"], e) for p, r, e in got] == [(p, r and r["caption"], e) for p, r, e in want], key


def test_a_device_decoder_that_fails_hands_its_jpegs_to_pillow(cap, shapes, tmp_path, monkeypatch):
    import captioner.data.jpeg as jpeg

    paths = list(_jpegs(shapes, tmp_path).values())
    want = [r["caption"] for _, r, _ in cap.caption_files(paths, batch_size=4, workers=0, jpegs_on_device=False)]
    calls = []

    def broken(data, **kw):
        calls.append(kw["device"])
        raise RuntimeError("nvjpeg: not supported here")

    monkeypatch.setattr(jpeg, "decode_jpeg", broken)
    with pytest.warns(CaptionerWarning, match="Pillow decodes them from now on"):
        got = list(cap.caption_files(paths, batch_size=4, workers=0, jpegs_on_device=True))
    assert [r["caption"] for _, r, _ in got] == want and not any(e for _, _, e in got)
    assert len(calls) == 1 + 4  # the first batch's 4 JPEGs (one call, then each), then never again


def test_the_device_decodes_a_bounded_number_of_pixels_at_a_time(cap, shapes, tmp_path, monkeypatch):
    """Full-size photos are decoded a few at a time and resized before the next call, so a batch of
    large photos never holds all of its pixels on the device at once."""
    import torch

    import captioner.data.jpeg as jpeg
    from captioner.data.images import tensor_transform

    paths = [p for name, p in _jpegs(shapes, tmp_path).items() if name.startswith("plain")]
    items = [jpeg.JpegDataset(paths, cap.transform)[i] for i in range(len(paths))]
    one = items[0][1].pixels
    calls, real = [], jpeg.decode_jpeg
    monkeypatch.setattr(jpeg, "decode_jpeg", lambda data, **kw: calls.append(len(data)) or real(data, **kw))
    cfg = cap.model.cfg
    finish = jpeg.DeviceDecoder(paths, cap.transform, tensor_transform(cfg.image_size, cfg.mean, cfg.std),
                                torch.device("cpu"), max_pixels=int(2.5 * one))
    idx, x, err_idx, errors = finish(items)
    assert calls == [2, 2] and idx == [0, 1, 2, 3] and not err_idx
    assert torch.equal(x, torch.stack([cap.transform(Image.open(p).convert("RGB")) for p in paths]))
