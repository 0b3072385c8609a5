"""How a model runs when it captions: one value, resolved once from (device, precision), that every
caller hands on (the Python API, evaluation, feature extraction, training's validation, the photo
library, the server and the benchmarks).

It owns every rule that depends on the machine rather than on the model: the precision of the
encoder and of the decoder, the fast layers swapped in (packed weights on the CPU, int8), batch
and chunk sizes, how often a search asks the device whether it is done, and whether JPEGs are
decoded on the device. A benchmark that wants the old way of doing one of these says so with a
field (`InferencePlan(..., pack=False)`), never by patching a module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
from torch import nn

from captioner.inference.int8 import int8_decoder
from captioner.inference.packed import packed_decoder, packed_encoder
from captioner.model.encoder import fold_batchnorm
from captioner.runtime import autocast, cpu_has_fast_bf16, loader_workers, pick_device, resolve_precision
from captioner.threads import fit_threads


@dataclass(frozen=True)
class InferencePlan:
    """How captioning runs on one device at one precision. Build it with `resolve`; each field left
    as None is filled by the device's rule (the measurements are in each rule's docstring)."""

    device: torch.device
    precision: str  # resolved: fp32, bf16, fp16, or int8 (a CPU's decoder weights in 8 bits)
    pack: bool = True  # on the CPU, weights packed once for oneDNN (inference/packed.py); False: plain layers
    drop_finished: bool = True  # a search drops an image once its captions have ended (decode.py)
    batch_size: int | None = None  # images per batch when captioning files: see _batch_size
    encoder_chunk: int | None = None  # images per encoder call (0: the whole batch): see _encoder_chunk
    check_every: int | None = None  # steps between a search's "has every caption ended?": see _check_every
    jpegs_on_device: bool | None = None  # decode plain JPEGs on the device: see _jpegs_on_device

    def __post_init__(self):
        for name, rule in (("batch_size", _batch_size), ("encoder_chunk", _encoder_chunk),
                           ("check_every", _check_every), ("jpegs_on_device", _jpegs_on_device)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, rule(self.device))

    @classmethod
    def resolve(cls, device: str | torch.device = "auto", precision: str = "auto", *, training: bool = False,
                **switches) -> InferencePlan:
        """The plan for `device` ('auto', 'cpu', 'cuda', 'cuda:N') at `precision` ('auto', 'fp32',
        'bf16', 'fp16', and except for `training` 'int8'), each resolved here and nowhere else;
        `switches` set any other field. A device or precision this machine lacks is a one-line ConfigError."""
        dev = device if isinstance(device, torch.device) else pick_device(device)
        if dev.type == "cpu":
            fit_threads(force=True)  # as many threads as other processes leave cores free (threads.py)
        return cls(dev, resolve_precision(precision, dev, inference=not training), **switches)

    def replace(self, **changes) -> InferencePlan:
        return replace(self, **changes)

    # -- precision ---------------------------------------------------------------------------------

    @property
    def encoder_precision(self) -> str:
        """The encoder's precision. int8 puts the decoder's weights in 8 bits only; its encoder runs
        in bf16 where the CPU has native bf16, else fp32 (Zen 4, shipped model, beam 5: one photo
        28.4 -> 24.6 ms, batches of 32 21.0 -> 15.5 ms a photo)."""
        if self.precision == "int8":
            return "bf16" if cpu_has_fast_bf16() else "fp32"
        return self.precision

    def decoder_precision(self, images: int) -> str:
        """The decoder's precision for a search over `images` images, measured on each kind of CPU:

        - Intel Xeon with AMX: with the decoder's weights packed, bf16 ties fp32 for one image and
          wins from two on (shipped model, beam 5, 2026-12-05: one image 30-31 ms in both, two 34-36
          against 38-40 ms, 64 images 1.6x). Before packing, one image took 27 ms in bf16 against
          20 in fp32 (beam 3), and small batches decoded in fp32 there.
        - AMD EPYC with AVX512-BF16 and no AMX (Zen 4): bf16 pays from one image on (one image, beam
          5: 15.5 ms against 30.5 ms fp32) and gives one image the caption it gets in a batch (200
          of 200, against 188 in fp32). With the decoder's weights packed, bf16 still wins: 21.8
          against 27.0 ms a photo.
        - Without native bf16, auto precision is fp32; an explicit bf16 decodes small batches in fp32.
        """
        if self.device.type == "cpu" and images < 4 and not cpu_has_fast_bf16():
            return "fp32"
        return self.precision

    def autocast(self):
        """The autocast context at the plan's own precision: a training run's steps."""
        return autocast(self.device, self.precision)

    def encoder_autocast(self):
        """The autocast context the encoder runs in."""
        return autocast(self.device, self.encoder_precision)

    def decoder_autocast(self, images: int):
        """The autocast context a search over `images` images runs in (see decoder_precision)."""
        return autocast(self.device, self.decoder_precision(images))

    # -- the model as captioning runs it -------------------------------------------------------------

    def encoder_for(self, model) -> nn.Module:
        """A copy of `model`'s encoder that gives the same features faster, for captioning and feature
        extraction: BatchNorm folded into the convolutions (encoder.fold_batchnorm), laid out
        channels-last (faster on the CPU, fp32 and bf16), and on the CPU with `pack` its convolutions'
        weights packed once for oneDNN (inference/packed.py). The model's own encoder stays as it
        is: fine-tuning lays its weights out as its images (runtime.encoder_memory_format).

        In bf16 the copy holds its weights in bf16 and runs under bf16 autocast (encode): autocast
        would otherwise cast every weight again at every call. The same bits; on the Zen 4 one photo
        9.9 -> 8.9 ms, batches of 32 8.1 -> 7.0 ms a photo."""
        encoder = fold_batchnorm(model.encoder).to(self.device, memory_format=torch.channels_last)
        if self.encoder_precision == "bf16":
            encoder = encoder.to(torch.bfloat16)
        if self.pack and self.device.type == "cpu":
            encoder = packed_encoder(encoder)
        return encoder

    def prepare(self, model) -> nn.Module:
        """Make `model` (loaded to caption, never to train) the one captioning runs, and return the
        encoder copy to run (encoder_for). The decoder is swapped in place: at int8 for a copy with
        8-bit weights (inference/int8.py); on the CPU with `pack` for its layers with their weights
        packed for oneDNN (inference/packed.py: the same results, faster); else it stays as it is.
        The parameters keep their names, so model folders and fingerprints do not change."""
        if self.precision == "int8":
            model.decoder = int8_decoder(model.decoder)
        elif self.pack and self.device.type == "cpu":
            model.decoder = packed_decoder(model.decoder)
        return self.encoder_for(model)

    @torch.no_grad()
    def encode(self, model, images: torch.Tensor, encoder: nn.Module | None = None) -> torch.Tensor:
        """Preprocessed images (B, 3, S, S) -> what the decoder takes (CaptionModel.features): moved
        to the device channels-last (from pinned memory, overlapping), run `encoder_chunk` at a time
        by `encoder` (encoder_for's copy; else the model's own) in the encoder's precision."""
        x = images.to(self.device, memory_format=torch.channels_last, non_blocking=True)
        with self.encoder_autocast():
            return model.features(x, chunk=self.encoder_chunk, encoder=encoder)

    def workers(self, items: int, batch_size: int) -> int:
        """Loader processes when captioning `items` files. On a CPU of two cores or fewer, none: the
        model's threads already use both cores, and a loader process only takes turns with them
        (2-core Zen 4, bf16, 1,000 photos, in turns: 95.1 against 87.7 images/s at batch 64, 87.9
        against 79.2 at 32; on the 2-core AMD in fp32 it made no difference, 24.3 against 24.6).
        Elsewhere, and on a GPU above all, runtime.loader_workers."""
        if self.device.type == "cpu" and (os.cpu_count() or 1) <= 2:
            return 0
        return loader_workers(items, batch_size)


# -- each device's rules (the defaults of the fields left as None) ----------------------------------


def _batch_size(device: torch.device) -> int:
    """Images per batch when captioning files (caption, index, the API), unless the caller says.
    On a CPU 64: ended images leave a search's batch (decode.py), so a batch does not wait for its
    slowest image, and 64 beat 32 and 128 (1,000 photos, 2-core Zen 4, bf16: 95.1, 87.9 and 80.6
    images/s). A GPU wants large batches (H100, from files: 277 images/s at 32, 337 at 256)."""
    return 256 if device.type == "cuda" else 64


def _encoder_chunk(device: torch.device) -> int:
    """Images per encoder call. On a CPU, activations of a few images stay in cache: measured on 2
    cores, EfficientNet-Lite0 ran 1.3-1.5x faster per image in calls of 8 than of 32 or 64 (bf16 and
    fp32). A GPU wants the whole batch at once (0 = no chunking)."""
    return 8 if device.type == "cpu" else 0


def _check_every(device: torch.device) -> int:
    """How often greedy and beam search ask whether every caption has ended. On a CPU, every step:
    asking costs nothing. On a GPU each question waits for the step to finish (a host sync), so every
    4th step; the steps between change no caption (tests/test_decode.py). Not yet timed on a GPU."""
    return 1 if device.type == "cpu" else 4


def _jpegs_on_device(device: torch.device) -> bool:
    """Whether captioning files decodes JPEGs on the device (data/jpeg.py): on CUDA, where one CPU
    thread of Pillow decoding (634 photos/s measured on an H100 machine) is what the model waits for,
    and where this torchvision can. Not on a CPU: there Pillow in loader processes is the same
    decoder, beside the model."""
    if device.type != "cuda":
        return False
    from captioner.data import jpeg  # only here: the CPU's road never reads it

    return jpeg.available()

