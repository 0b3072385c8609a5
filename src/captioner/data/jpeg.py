"""JPEGs decoded on the device: the GPU reads a batch of photos in one call (nvJPEG on CUDA).

On a GPU the model captions thousands of photos a second, and one CPU thread decoding JPEGs with
Pillow (about 600 a second) is what it waits for. So when captioning files on CUDA:

    loader processes   read each file and check it as Pillow would (format, pixel limit, EXIF
                       orientation) without decoding it: JpegDataset
    the main process   decodes the JPEGs of a batch on the device in one call, then resizes and
                       normalises them there with the same transform steps as the CPU: DeviceDecoder

A file the device decoder should not take (PNG and other formats, CMYK, progressive, rotated by
EXIF, over the pixel limit, unreadable) goes the usual way: Pillow opens it in the loader process,
and reports it with the usual one-line error when it cannot. So does a JPEG the device decoder
fails on: it is opened again with Pillow, captioned if Pillow can read it, reported if not.

On the CPU (device "cpu") torchvision's decoder gives the same pixels as Pillow (both are
libjpeg-turbo), which is how the tests check this path; it is only the default on CUDA
(the inference plan's `jpegs_on_device`). torchvision 0.29 deprecated its image decoders in favour of
TorchCodec; where a later torchvision no longer has decode_jpeg, `available()` is False and Pillow
decodes everything, as on the CPU.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # a torchvision without its image decoders
    decode_jpeg = None

from captioner.data.images import MAX_PIXELS, ImageDataset, open_rgb
from captioner.errors import CaptionerWarning, ImageError

EXIF_ORIENTATION = 0x0112
MAX_BYTES = 100 * 2**20  # a 60-megapixel JPEG at high quality is about 30 MB


def available() -> bool:
    """Whether this torchvision can decode JPEGs (on the device)."""
    return decode_jpeg is not None


@dataclass
class JpegBytes:
    """A JPEG file's bytes, for the device to decode."""

    data: torch.Tensor  # (n_bytes,) uint8
    pixels: int  # width x height, from the header


def read_for_device(path: str | Path, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES
                    ) -> JpegBytes | None:
    """`path`'s bytes when a device decoder gives what Pillow would: a baseline JPEG in RGB or grey,
    not rotated by EXIF, within the pixel limit. Anything else -> None (Pillow's turn). A file over
    `max_bytes` is never read whole here: Pillow reads its header first, as for any file."""
    try:
        path = Path(path)
        if path.stat().st_size > max_bytes:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a decompression bomb: Pillow's turn, which refuses it
            img = Image.open(io.BytesIO(data), formats=["JPEG"])  # reads the header, decodes nothing
            if (img.format != "JPEG" or img.mode not in ("RGB", "L") or img.info.get("progressive")
                    or img.width * img.height > max_pixels or img.getexif().get(EXIF_ORIENTATION, 1) != 1):
                return None
    except Exception:  # any header Pillow cannot read: Pillow's turn, which reports it
        return None
    return JpegBytes(torch.frombuffer(bytearray(data), dtype=torch.uint8), img.width * img.height)


class JpegDataset(ImageDataset):
    """ImageDataset that hands plain JPEGs over undecoded: (index, JpegBytes), else as ImageDataset
    ((index, tensor) or (index, error message))."""

    def __getitem__(self, i: int):
        jpeg = read_for_device(self.paths[i])
        return (i, jpeg) if jpeg is not None else super().__getitem__(i)


def as_list(batch: list) -> list:
    """The DataLoader's collate for JpegDataset: the batch as it is (DeviceDecoder finishes it)."""
    return batch


class DeviceDecoder:
    """Finishes a JpegDataset batch on `device`: -> (indices of good images, images (B, 3, S, S) on
    the device or None, indices of bad ones, their error messages), in the batch's order.

    `transform` is the CPU's whole transform (PIL image -> tensor), `tensor_transform` its steps
    after the image became a uint8 tensor (images.tensor_transform). If the device decoder fails on
    every JPEG of a batch it is taken as not working here (a warning says so) and Pillow decodes
    the rest of the run.

    Full-size photos are decoded at most `max_pixels` at a time (all of a call's photos together)
    and resized before the next call: 256 twelve-megapixel photos at once would hold 9 GB of pixels
    on the device."""

    def __init__(self, paths: Sequence[Path], transform, tensor_transform, device: torch.device,
                 max_pixels: int = 100_000_000, min_size: int = 0):
        self.paths, self.transform, self.tensor_transform, self.device = paths, transform, tensor_transform, device
        self.max_pixels = max_pixels
        self.min_size = min_size  # Pillow's decoding of what the device could not: see images.open_rgb
        self.working = True

    def __call__(self, batch: list) -> tuple[list[int], torch.Tensor | None, list[int], list[str]]:
        resized: dict[int, torch.Tensor | None] = {}  # index -> (3, S, S) on the device; None: not decoded
        for part in self._calls([(i, item) for i, item in batch if isinstance(item, JpegBytes)]):
            for (i, _), img in zip(part, self._decode([jpeg.data for _, jpeg in part])):
                resized[i] = None if img is None else self.tensor_transform(img)
        idx, images, err_idx, errors = [], [], [], []
        for i, item in batch:
            if isinstance(item, JpegBytes):
                item = resized[i]
                if item is None:  # the device could not: Pillow, as for any other file
                    try:
                        item = self.transform(open_rgb(self.paths[i], min_size=self.min_size))
                    except ImageError as e:
                        item = str(e)
            if isinstance(item, str):
                err_idx.append(i)
                errors.append(item)
            else:
                idx.append(i)
                images.append(item.to(self.device, non_blocking=True))
        return idx, (torch.stack(images) if images else None), err_idx, errors

    def _calls(self, jpegs: list[tuple[int, JpegBytes]]) -> list[list[tuple[int, JpegBytes]]]:
        """The JPEGs in runs of at most max_pixels together (a larger photo alone)."""
        calls: list[list[tuple[int, JpegBytes]]] = []
        pixels = 0
        for i, jpeg in jpegs:
            if not calls or pixels + jpeg.pixels > self.max_pixels:
                calls.append([])
                pixels = 0
            calls[-1].append((i, jpeg))
            pixels += jpeg.pixels
        return calls

    def _decode(self, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Each JPEG as (3, H, W) uint8 on the device, or None where the decoder failed on it."""
        if not datas or not self.working:
            return [None] * len(datas)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29's, on every call
            try:
                return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device))  # one call for all
            except RuntimeError:  # one bad file fails the batch: find it
                pass
            out = []
            for d in datas:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
        if len(datas) > 1 and all(o is None for o in out):
            self.working = False
            warnings.warn(f"decoding JPEGs on {self.device} failed for a whole batch; Pillow decodes them from "
                          "now on", CaptionerWarning, stacklevel=2)
        return out
