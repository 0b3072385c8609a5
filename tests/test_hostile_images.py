"""Every kind of hostile or unusual image file: captioned as RGB, or refused in one clear line.

docs/RELIABILITY.md lists these cases and what happens to each."""

import io

import numpy as np
import pytest
from PIL import Image

from captioner.data.images import ImageError, open_rgb


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def make(path, kind):
    """Write a file of `kind` at `path`."""
    if kind == "cmyk_jpeg":
        Image.new("CMYK", (32, 24), (0, 255, 255, 0)).save(path, "JPEG")  # pure red in CMYK
    elif kind == "palette_png":
        Image.new("RGB", (32, 24), (0, 0, 255)).convert("P").save(path)
    elif kind == "palette_png_transparent":
        img = Image.new("P", (32, 24), 0)
        img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
        img.save(path, transparency=0)
    elif kind == "grey_jpeg":
        Image.new("L", (32, 24), 128).save(path, "JPEG")
    elif kind == "grey16_png":
        arr = np.full((24, 32, 3), 40000, dtype=np.uint16)
        Image.fromarray(arr[..., 0]).save(path)  # 16-bit grey (mode I;16)
    elif kind == "animated_gif":
        frames = [Image.new("RGB", (32, 24), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    elif kind == "la_png":
        Image.new("LA", (32, 24), (0, 0)).save(path)
    elif kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 8  # rotate 270 on display
        Image.new("RGB", (40, 20), (10, 10, 10)).save(path, exif=exif)
    elif kind == "webp":
        Image.new("RGB", (32, 24), (1, 2, 3)).save(path, "WEBP")
    elif kind == "bmp":
        Image.new("RGB", (32, 24), (1, 2, 3)).save(path, "BMP")
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("kind,name,size,pixel", [
    ("cmyk_jpeg", "cmyk.jpg", (32, 24), lambda p: p[0] > 200 and p[1] < 60 and p[2] < 60),
    ("palette_png", "pal.png", (32, 24), lambda p: p[2] > 200 and p[0] < 30),
    ("palette_png_transparent", "palt.png", (32, 24), lambda p: p == (255, 255, 255)),
    ("grey_jpeg", "grey.jpg", (32, 24), lambda p: abs(p[0] - 128) < 4 and p[0] == p[1] == p[2]),
    ("grey16_png", "deep.png", (32, 24), lambda p: p == (255, 255, 255)),
    ("animated_gif", "anim.gif", (32, 24), lambda p: p[0] > 200 and p[1] < 30),  # the first frame
    ("la_png", "la.png", (32, 24), lambda p: p == (255, 255, 255)),
    ("exif_rotated", "rot.jpg", (20, 40), lambda p: max(p) < 30),
    ("webp", "x.webp", (32, 24), lambda p: max(p) < 10),
    ("bmp", "x.bmp", (32, 24), lambda p: p == (1, 2, 3)),
])
def test_unusual_images_become_rgb(tmp_path, kind, name, size, pixel):
    make(tmp_path / name, kind)
    img = open_rgb(tmp_path / name)
    assert img.mode == "RGB" and img.size == size
    assert pixel(img.getpixel((5, 5))), img.getpixel((5, 5))


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    Image.new("1", (20_000, 20_000)).save(tmp_path / "bomb.png")  # 400 megapixels in a few KB
    assert (tmp_path / "bomb.png").stat().st_size < 200_000
    with pytest.raises(ImageError, match="bomb.png: .*(decompression bomb|more than)"):
        open_rgb(tmp_path / "bomb.png")


def test_declared_size_over_the_limit(tmp_path):
    Image.new("L", (4000, 4000)).save(tmp_path / "wide.png")
    with pytest.raises(ImageError, match=r"wide.png: 4000x4000 is more than 1,000,000 pixels"):
        open_rgb(tmp_path / "wide.png", max_pixels=1_000_000)


@pytest.mark.parametrize("name,content,reason", [
    ("zero.jpg", b"", "empty file"),
    ("text.jpg", b"hello, I am a text file with a .jpg name\n", "not a readable image"),
    ("html.png", b"<!doctype html><html><body>404</body></html>", "not a readable image"),
    ("header_only.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "broken image"),
    ("header_only.png", b"\x89PNG\r\n\x1a\n", "image"),
])
def test_garbage_is_one_clear_line(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError) as e:
        open_rgb(tmp_path / name)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / name)) and reason in msg and "\n" not in msg and len(msg) < 300


def test_truncated_jpeg_in_the_middle_of_the_scan(tmp_path):
    data = jpeg_bytes(Image.effect_noise((256, 256), 60).convert("RGB"), quality=95)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageError, match="cut.jpg: broken image"):
        open_rgb(tmp_path / "cut.jpg")


def test_uploaded_bytes_are_named(tmp_path):
    with pytest.raises(ImageError, match="holiday.jpg: not a readable image"):
        open_rgb(b"GIF89a but not really", name="holiday.jpg")


def test_a_batch_job_carries_on_and_reports_every_bad_file(trained, tmp_path):
    from captioner import Captioner
    from captioner.batch import caption_to_file

    folder = tmp_path / "mixed"
    folder.mkdir()
    good = ["cmyk.jpg", "pal.png", "anim.gif", "rot.jpg", "grey.jpg"]
    for name, kind in zip(good, ("cmyk_jpeg", "palette_png", "animated_gif", "exif_rotated", "grey_jpeg")):
        make(folder / name, kind)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    Image.new("1", (20_000, 20_000)).save(folder / "bomb.png")
    data = jpeg_bytes(Image.effect_noise((128, 128), 60).convert("RGB"))
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    cap = Captioner.load(trained / "best")
    paths = sorted(folder.iterdir())
    report = caption_to_file(cap, paths, tmp_path / "out.jsonl", progress=False)
    assert report.captioned == len(good)
    assert sorted(e.split(":")[0].rsplit("/", 1)[-1] for e in report.failed) == ["bomb.png", "cut.jpg", "text.jpg",
                                                                                 "zero.jpg"]


def test_a_tree_1200_folders_deep_and_an_unreadable_folder_are_walked(tmp_path, monkeypatch):
    """Issue 32, items 11 and 12: a RecursionError, and [Errno 13] ending `index`."""
    import os

    from captioner.data.images import list_images
    from captioner.errors import CaptionerWarning

    deep = tmp_path / "deep"
    levels = [deep]
    deep.mkdir()
    for _ in range(1200):  # one level at a time: Path.mkdir(parents=True) recurses too
        levels.append(levels[-1] / "d")
        os.mkdir(levels[-1])
    try:
        Image.new("RGB", (8, 8)).save(levels[-1] / "bottom.png")
        Image.new("RGB", (8, 8)).save(deep / "top.png")
        assert [p.name for p in list_images([deep])] == ["bottom.png", "top.png"]
        assert [p.name for p in list_images([deep], recursive=False)] == ["top.png"]
    finally:  # removed here, level by level: pytest's later clean-up (shutil.rmtree) would recurse 1,200 deep
        for level in reversed(levels):
            for f in level.iterdir():
                if f.is_file():
                    f.unlink()
            level.rmdir()

    locked = tmp_path / "mixed" / "locked"
    locked.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(locked / "hidden.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "open.png")
    real = os.scandir

    def scandir(path):  # the tests run as root, for whom chmod 000 locks nothing
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.warns(CaptionerWarning, match="locked: cannot be read .Permission denied."):
        found = list_images([tmp_path / "mixed"])
    assert [p.name for p in found] == ["open.png"]


def test_a_named_pipe_is_skipped_never_waited_on(tmp_path):
    """Issue 32, item 13: `caption --out` of a FIFO by name hung for ever."""
    import os
    import subprocess
    import sys

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    with pytest.raises(ImageError, match="pipe.jpg: not a regular file"):
        open_rgb(fifo)
    from captioner.files import readable_digest

    assert readable_digest(fifo) is None
    from captioner.data.images import list_images

    assert [p.name for p in list_images([tmp_path])] == ["ok.png"]  # inside a folder: not an image file
    run = subprocess.run([sys.executable, "-m", "captioner", "caption", str(fifo), "--out", str(tmp_path / "c.jsonl"),
                          "--quiet"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "not a regular file" in run.stderr, run.stderr[-2000:]
