"""Opening whatever users throw at it: orientation, transparency, 16-bit, broken files."""

import re

import numpy as np
import pytest
from PIL import Image

from captioner.data.images import ImageError, eval_transform, list_images, open_rgb


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert open_rgb(tmp_path / "rot.jpg").size == (20, 40)


def test_transparent_png_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    out = open_rgb(tmp_path / "clear.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.full((4, 4), 1000, dtype=np.uint16)
    arr[0, 0] = 4000
    Image.fromarray(arr).save(tmp_path / "g16.png")
    out = open_rgb(tmp_path / "g16.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    assert 50 < out.getpixel((1, 1))[0] < 80


@pytest.mark.parametrize("content,reason", [(b"", "empty file"), (b"not an image at all", "not a readable image"),
                                            (None, "no such file")])
def test_bad_files_give_one_clear_line(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError) as e:
        open_rgb(path)
    assert str(path) in str(e.value) and reason in str(e.value) and "\n" not in str(e.value)


def test_truncated_jpeg(tmp_path):
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg"):
        open_rgb(tmp_path / "cut.jpg")


def test_too_many_pixels(tmp_path):
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="more than"):
        open_rgb(tmp_path / "big.png", max_pixels=10_000)


def test_transform_shape_and_range(tmp_path):
    x = eval_transform(64, (0.5,) * 3, (0.5,) * 3)(Image.new("RGB", (100, 50), (255, 255, 255)))
    assert x.shape == (3, 64, 64) and float(x.max()) == pytest.approx(1.0)


def test_list_images_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    for p in ("a.jpg", "b.PNG", "notes.txt", "sub/c.jpeg"):
        (tmp_path / p).write_bytes(b"x")
    assert [p.name for p in list_images([tmp_path])] == ["a.jpg", "b.PNG", "c.jpeg"]
    assert [p.name for p in list_images([tmp_path], recursive=False)] == ["a.jpg", "b.PNG"]


def _photo(w: int, h: int) -> Image.Image:
    """A smooth, photo-like picture (gradients and a few soft shapes), so JPEG keeps it faithfully."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 128 + 100 * np.sin(x / w * 6.0) * np.cos(y / h * 4.0)
    g = 255 * x / w
    b = 255 * (1 - y / h) * (0.5 + 0.5 * np.cos((x + y) / (w + h) * 9.0))
    return Image.fromarray(np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8))


def test_big_jpegs_decode_at_a_reduced_scale_with_the_same_model_input(tmp_path):
    """With min_size (draft_size: twice the model's input) a big JPEG is decoded at 1/2..1/8 scale
    while both sides stay at least min_size, and what the model gets is within a grey level or two of
    the full decode's; orientation is kept; smaller JPEGs and other formats decode exactly as before."""
    from captioner.data.images import draft_size

    _photo(2400, 1600).save(tmp_path / "big.jpg", quality=92)
    full, small = open_rgb(tmp_path / "big.jpg"), open_rgb(tmp_path / "big.jpg", min_size=draft_size(112))
    assert full.size == (2400, 1600) and small.size == (600, 400)  # 1/4: 1/8 would leave a side under 224
    to_input = eval_transform(112, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # pixels in [0, 1]
    assert (to_input(small) - to_input(full)).abs().max() <= 3 / 255
    assert (to_input(small) - to_input(full)).abs().mean() <= 0.5 / 255

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    _photo(2400, 1600).save(tmp_path / "rot.jpg", quality=92, exif=exif)
    assert open_rgb(tmp_path / "rot.jpg", min_size=224).size == (400, 600)
    _photo(2400, 1600).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=92)
    assert open_rgb(tmp_path / "cmyk.jpg", min_size=224).mode == "RGB"

    for name in ("mid.jpg", "big.png"):  # under twice the input, or not a JPEG: exactly the full decode
        _photo(400, 300 if name == "mid.jpg" else 900).save(tmp_path / name)
        a, b = open_rgb(tmp_path / name), open_rgb(tmp_path / name, min_size=224)
        assert a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_captioning_and_training_decode_big_jpegs_at_the_reduced_scale(tmp_path, monkeypatch, trained):
    """Every road from a file to the encoder asks for the reduced scale: the API (one photo and a
    list), the loader of caption --out / index / evaluate (Pillow), and fine-tuning's dataset."""
    from types import SimpleNamespace

    import torch

    from captioner import Captioner, api
    from captioner.data import images, jpeg
    from captioner.data.records import Record
    from captioner.train import data as train_data

    cap = Captioner.load(trained / "best", device="cpu")
    cfg = cap.model.cfg
    want = images.draft_size(cfg.image_size)
    asked, real = [], images.open_rgb

    def spy(source, *args, min_size: int = 0, **kw):
        asked.append(min_size)
        return real(source, *args, min_size=min_size, **kw)

    for module in (api, images, jpeg, train_data):
        monkeypatch.setattr(module, "open_rgb", spy, raising=False)
    path = tmp_path / "a.jpg"
    _photo(1200, 800).save(path, quality=90)
    assert isinstance(cap.caption(path), str) and len(cap.caption([path, path])) == 2
    batches = list(images.image_batches([path], cfg.image_size, cfg.mean, cfg.std, torch.device("cpu"), batch_size=1,
                                        workers=0, jpegs_on_device=False))
    assert batches[0][1].shape == (1, 3, cfg.image_size, cfg.image_size)
    views = train_data.ImageCaptions([Record(path, ["a photo"])], SimpleNamespace(image=torch.tensor([0])), cfg)
    assert views[0][0].shape == (3, cfg.image_size, cfg.image_size)
    assert asked == [want] * 5


def test_an_unreadable_file_lists_heic_only_when_it_can_be_read(monkeypatch, tmp_path):
    """Issue 30, item 16: without pillow-heif the error does not call HEIC readable."""
    from captioner.data import images

    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"not an image at all")
    for installed, said in ((False, "AVIF (HEIC with pip install pillow-heif)"), (True, "AVIF and HEIC")):
        monkeypatch.setattr(images, "_register_heif", lambda installed=installed: installed)
        with pytest.raises(ImageError, match=rf"notes.jpg: not a readable image \(.*{re.escape(said)};"):
            images.open_rgb(bad)
