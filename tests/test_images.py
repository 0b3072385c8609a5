"""Opening whatever users throw at it: orientation, transparency, 16-bit, broken files."""

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
