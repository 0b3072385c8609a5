"""Safe image opening and the transforms that turn images into encoder input.

Opening and listing images needs only Pillow and NumPy (torch is imported by the transforms and
the batch collation that need it), so that torch-free code can share them: `search` and the
ONNX captioner (export.OnnxCaptioner) open and check images exactly as the rest does.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from captioner.data.urls import fetch, is_url
from captioner.errors import CaptionerWarning, ImageError, ImageTooLarge

if TYPE_CHECKING:
    import torch
    from torchvision.transforms import v2 as T

# what a folder's photos are found by; HEIC/HEIF (iPhone photos) need the optional pillow-heif
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".avif",
                  ".heic", ".heif"}
# The only decoders Pillow may use: raster photo formats. Never EPS/PS/PDF (handed to Ghostscript),
# nor the dozens of rarer formats Pillow would otherwise try on any file, whatever its name.
FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")
HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
MAX_PIXELS = 60_000_000  # refuse decompression bombs well before Pillow's own hard limit
MAX_FETCH_BYTES = 50_000_000  # an image fetched by address (urls.py): a phone's photo is 3-15 MB


def draft_size(image_size: int) -> int:
    """The least a JPEG's sides may be decoded at for a model taking `image_size` x `image_size`
    inputs: twice that. libjpeg decodes at 1/2, 1/4 or 1/8 scale far faster than at full size (a
    12-megapixel photo 104-123 -> 14-15 ms; bench.py bigjpeg), and the resize to image_size then averages at least 2x2
    decoded pixels into each input pixel: within one grey level of the full decode's input. Photos
    already under twice the size (Flickr8k's) decode at full size."""
    return 2 * image_size


def open_rgb(source: str | Path | bytes | Image.Image | np.ndarray, max_pixels: int = MAX_PIXELS,
             name: str | None = None, min_size: int = 0) -> Image.Image:
    """Open an image (a path or an http(s) address, the bytes of a file, a PIL image, or an array of
    uint8 pixels: HxWx3 RGB, HxWx4 RGBA or HxW grey) as RGB with EXIF orientation applied, or raise
    ImageError with one clear line naming it (`name`, else the path). With `min_size` (see
    draft_size) a JPEG file is decoded at the smallest scale that keeps both its sides at least
    that, and `max_pixels` bounds the pixels decoded at that scale."""
    if isinstance(source, np.ndarray):
        img = _from_array(source, name or "array", max_pixels)
    elif isinstance(source, Image.Image):
        img = source
    elif not isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        raise ImageError(f"{name or 'image'}: {_what(source)} is not an image ({ACCEPTED})")
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = bytes(source)
            name = name or "<upload>"
            if not source:
                raise ImageError(f"{name}: empty file")
            stream = io.BytesIO(source)
        elif is_url(source):  # fetched whole (at most MAX_FETCH_BYTES), then read as the bytes of a file
            name = name or source
            source = fetch(source, MAX_FETCH_BYTES)
            if not source:
                raise ImageError(f"{name}: empty file")
            stream = io.BytesIO(source)
        else:
            name = name or str(source)
            path = Path(source)
            if not path.is_file():  # never opened: a named pipe would block the read forever
                raise ImageError(f"{name}: {'not a regular file' if path.exists() else 'no such file'}")
            if path.stat().st_size == 0:
                raise ImageError(f"{name}: empty file")
            stream = path
        _register_heif()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(stream, formats=allowed_formats())
                declared = img.size
                if min_size and img.format in ("JPEG", "MPO"):
                    img.draft(img.mode, (min_size, min_size))  # a scale, never a colour conversion
                if img.width * img.height > max_pixels:  # what is decoded counts: a 48 MP JPEG at 1/8 is 0.75 MP
                    at = f" (decoded at {img.width}x{img.height})" if img.size != declared else ""
                    raise ImageTooLarge(f"{name}: {declared[0]}x{declared[1]}{at} is more than {max_pixels:,} pixels")
                img.load()
        except ImageError:
            raise
        except (PermissionError, IsADirectoryError) as e:
            raise ImageError(f"{name}: cannot be read ({e.strerror.lower()})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLarge(f"{name}: declares more pixels than {max_pixels:,} (a decompression bomb?)") from None
        except UnidentifiedImageError as e:
            if _is_heif(source) and not _register_heif():
                raise ImageError(f"{name}: a HEIC/HEIF photo; reading these needs pillow-heif "
                                 "(pip install pillow-heif)") from None
            heic = "and HEIC" if _register_heif() else "(HEIC with pip install pillow-heif)"
            raise ImageError(f"{name}: not a readable image (captioner reads JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF "
                             f"{heic}; {type(e).__name__})") from None
        except Exception as e:  # any decoder's failure (OSError, SyntaxError, AVIF's RuntimeError ...) is this file's
            raise ImageError(f"{name}: broken image ({_first_line(e)})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not cost the picture
        pass
    try:
        return _to_rgb(img)
    except Exception as e:
        raise ImageError(f"{name or 'image'}: broken image ({_first_line(e)})") from None


def one_or_many(images) -> tuple[bool, list]:
    """What the captioning functions take: one image (a path, bytes, a PIL image, an HxW(xC)
    array) or many (a list or tuple of them, or an NxHxWxC array) -> (was it one, the list)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return False, list(images)
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray)):
        return True, [images]
    is_tensor = type(images).__module__.startswith("torch")  # iterable, but by rows of pixels, not images
    if hasattr(images, "__iter__") and not isinstance(images, (dict, set)) and not is_tensor:
        return False, list(images)
    raise TypeError(f"{_what(images)} is not an image or a list of images ({ACCEPTED})")


ACCEPTED = ("expected a path or http(s) address, the bytes of a file, a PIL image or a numpy array of uint8 pixels; "
            "Captioner.caption_tensor takes preprocessed tensors")


def _what(x) -> str:
    """How an error names a value that is not an image: 'None', 'a value of type float', 'a
    value of type torch.Tensor'."""
    if x is None:
        return "None"
    kind = type(x)
    module = "" if kind.__module__ == "builtins" else kind.__module__.split(".")[0] + "."
    return f"a value of type {module}{kind.__name__}"


def image_name(image, i: int, single: bool) -> str:
    """How an error names an image: its path, else its place in the list."""
    if isinstance(image, (str, Path)):
        return str(image)
    return "image" if single else f"image {i}"


def _from_array(a: np.ndarray, name: str, max_pixels: int) -> Image.Image:
    """Pixels as numpy gives them (imageio, or OpenCV after BGR -> RGB) -> a PIL image."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(f"{name}: an array of shape {a.shape} and dtype {a.dtype}; expected uint8 pixels "
                         "HxWx3 (RGB), HxWx4 (RGBA) or HxW (grey)")
    if not 0 < a.shape[0] * a.shape[1] <= max_pixels:
        raise ImageError(f"{name}: {a.shape[1]}x{a.shape[0]} pixels is not a usable image size")
    return Image.fromarray(np.ascontiguousarray(a))  # L, RGB or RGBA from the shape


def allowed_formats() -> list[str]:
    """FORMATS that this Pillow can open (AVIF and HEIF depend on how it was built and on plugins)."""
    Image.init()
    return [f for f in FORMATS if f in Image.OPEN]


@functools.cache
def _register_heif() -> bool:
    """Teach Pillow HEIC/HEIF when the optional pillow-heif is installed; say whether it is."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _is_heif(source: Path | bytes) -> bool:
    """Whether a file is HEIC/HEIF by its first bytes (an ISO box 'ftyp' with a HEIF brand)."""
    if isinstance(source, bytes):
        head = source[:12]
    else:
        try:
            with open(source, "rb") as f:
                head = f.read(12)
        except OSError:
            return False
    return head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0][:200] if text else type(e).__name__)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB: transparency onto white, 16-bit grey scaled to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # 16/32-bit grey: scale to 8 bits rather than let convert() clip (floats in 0..1, as scientific
        # and HDR tools write them, would all come out black)
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        hi = float(arr.max())
        scale = 255.0 if img.mode == "F" and float(arr.min()) >= 0 and hi <= 1 else 255.0 / (hi or 1.0)
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8))
    return img.convert("RGB")


def eval_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> T.Compose:
    """Resize to size x size (the aspect ratio is not kept, like the training data), normalise."""
    from torchvision.transforms import v2 as T

    return T.Compose([T.PILToTensor(), *tensor_transform(size, mean, std).transforms])


def tensor_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> T.Compose:
    """eval_transform's steps once the image is a uint8 tensor (3, H, W), on whatever device it is
    (JPEGs decoded on the GPU take these: see data/jpeg.py)."""
    import torch
    from torchvision.transforms import v2 as T

    return T.Compose([
        T.Resize((size, size), antialias=True),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean, std),
    ])


def train_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> T.Compose:
    """Augmentations for fine-tuning the encoder: random resized crop, flip, colour jitter, rotation."""
    import torch
    from torchvision.transforms import v2 as T

    return T.Compose([
        T.PILToTensor(),
        T.RandomResizedCrop((size, size), scale=(0.6, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.2, 0.2, 0.2, 0.02),
        T.RandomRotation(10),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean, std),
    ])


def list_images(paths: list[str | Path], recursive: bool = True) -> list[Path]:
    """Files named directly, plus image files found inside named folders (sorted). A sub-folder
    that cannot be read is named in a CaptionerWarning and skipped, never the end of the job."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in _files_under(p, recursive) if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


def _files_under(folder: Path, recursive: bool) -> Iterator[Path]:
    """The regular files in `folder` (and its sub-folders, followed through links, each once), walked
    with a list rather than recursion: a tree 1,200 levels deep ended in a RecursionError."""
    stack, seen = [folder], set()
    while stack:
        here = stack.pop()
        try:
            st = here.stat()
            key = (st.st_dev, st.st_ino)
            if key in seen:  # a link back up the tree
                continue
            seen.add(key)
            with os.scandir(here) as it:
                entries = list(it)
        except OSError as e:
            warnings.warn(f"{here}: cannot be read ({e.strerror or e}); its photos are left out",
                          CaptionerWarning, stacklevel=3)
            continue
        for entry in entries:
            try:
                if entry.is_dir():
                    if recursive:
                        stack.append(Path(entry.path))
                elif entry.is_file():
                    yield Path(entry.path)
            except OSError:
                continue  # vanished, or a link that cannot be followed


class ImageDataset:
    """Paths -> (index, tensor), or (index, error message) for an image that cannot be read: a bad
    file is one item's error, never the loader's. (A map-style dataset for torch's DataLoader.)"""

    def __init__(self, paths: Sequence[Path], transform, min_size: int = 0):
        self.paths = list(paths)
        self.transform = transform
        self.min_size = min_size  # see open_rgb

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(open_rgb(self.paths[i], min_size=self.min_size))
        except ImageError as e:
            return i, str(e)


def collate_images(batch):
    """-> (indices of good images, stacked tensors or None, indices of bad ones, their error messages)."""
    import torch

    good = [(i, x) for i, x in batch if isinstance(x, torch.Tensor)]
    bad = [(i, x) for i, x in batch if isinstance(x, str)]
    return ([i for i, _ in good], torch.stack([x for _, x in good]) if good else None,
            [i for i, _ in bad], [e for _, e in bad])


def image_batches(paths: Sequence[Path], size: int, mean: tuple[float, ...], std: tuple[float, ...],
                  device: torch.device, *, batch_size: int, workers: int, jpegs_on_device: bool):
    """The files as encoder input, `batch_size` at a time, in their order: (indices of good images,
    images (B, 3, S, S) or None, indices of bad ones, their error messages) a batch. `workers`
    loader processes read them and Pillow decodes them there (images on the CPU), unless
    `jpegs_on_device` (the inference plan's rule: on CUDA) and this torchvision can decode JPEGs:
    then the device decodes the plain JPEGs of a batch in one call (data/jpeg.py)."""
    from torch.utils.data import DataLoader

    transform = eval_transform(size, mean, std)
    jpeg = None  # the device decoder's module, when it decodes
    if jpegs_on_device:
        from captioner.data import jpeg

        jpeg = jpeg if jpeg.available() else None
    ds = (jpeg.JpegDataset if jpeg else ImageDataset)(paths, transform, draft_size(size))
    collate = jpeg.as_list if jpeg else collate_images
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None)
    if jpeg is None:
        return loader
    return map(jpeg.DeviceDecoder(ds.paths, transform, tensor_transform(size, mean, std), device,
                                  min_size=ds.min_size), loader)
