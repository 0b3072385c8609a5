"""Device and precision choices, in one place so no other module sprinkles `.cuda()`."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform

import torch

from captioner.errors import ConfigError
from captioner.names import INFERENCE_PRECISIONS, PRECISIONS


def available_devices() -> list[str]:
    """The devices this machine has, as --device takes them."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(gpus)] if gpus else [])


def pick_device(name: str = "auto") -> torch.device:
    """'auto' (a GPU when there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'; a device this
    machine lacks is a ConfigError naming the ones it has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    have = ", ".join(["auto", *available_devices()])
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"unknown device {name!r}; this machine has: {have}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"device {name!r} is not supported; this machine has: {have}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA GPU is usable here (torch {torch.__version__}, "
                          f"CUDA build: {torch.version.cuda or 'none'}); this machine has: {have}")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: there are only {torch.cuda.device_count()} GPUs; this machine has: {have}")
    return device


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """bf16 autocast only pays on CPUs with native bf16 (AVX512-BF16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_has_amx() -> bool:
    """Intel's matrix tiles (AMX), which run bf16 products on Sapphire Rapids and later Xeons."""
    return "amx_bf16" in cpu_flags()


def resolve_precision(precision: str, device: torch.device, inference: bool = False) -> str:
    """'auto' -> bf16 on a CPU with native bf16, fp16 (or bf16) on CUDA, fp32 otherwise. With
    `inference`, also 'int8' on a CPU (see model/int8.py; autocast treats it as fp32)."""
    allowed = INFERENCE_PRECISIONS if inference else PRECISIONS
    if precision not in allowed:
        raise ConfigError(f"precision must be one of {allowed}, not {precision!r}")
    if precision == "int8" and device.type != "cpu":
        raise ConfigError(f"precision int8 is for the CPU; on {device} use auto, bf16 or fp16")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


def encoder_chunk(device: torch.device) -> int:
    """Images per encoder call at inference. On a CPU, activations of a few images stay in cache:
    measured on 2 cores, EfficientNet-Lite0 ran 1.3-1.5x faster per image in calls of 8 than of
    32 or 64 (bf16 and fp32). A GPU wants the whole batch at once (0 = no chunking)."""
    return 8 if device.type == "cpu" else 0


def caption_batch_size(device: torch.device) -> int:
    """Images per batch when captioning files (caption, index, the API), unless the caller says.
    On a CPU 64: since ended images leave a search's batch (decode.py), a batch no longer waits
    for its slowest image, and 64 beat 32 and 128 (1,000 photos, 2-core Zen 4, bf16: 95.1, 87.9
    and 80.6 images/s; before that change the 2-core AMD in fp32 gave 24.6 at 32, 24.3 at 64).
    A GPU wants large batches (H100, from files: 277 images/s at 32, 337 at 256)."""
    return 256 if device.type == "cuda" else 64


def decode_jpegs_on_device(device: torch.device) -> bool:
    """Whether captioning files decodes JPEGs on the device (data/jpeg.py): on CUDA, where one CPU
    thread of Pillow decoding (634 photos/s measured on an H100 machine) is what the model waits for.
    Not on a CPU: there Pillow in loader processes is the same decoder, beside the model. (Where
    torchvision has no JPEG decoder, data/jpeg.available() says so and Pillow decodes anyway.)"""
    return device.type == "cuda"


def loader_workers(items: int, batch_size: int) -> int:
    """Processes decoding images while the model captions `items` files: none for two batches or
    fewer (starting one costs more than it saves), else one per core beside the main process's,
    at most 8. Measured in benchmarks/RESULTS.md ("Files to captions")."""
    if items <= 2 * batch_size:
        return 0
    return max(1, min(8, (os.cpu_count() or 1) - 1))


def caption_workers(device: torch.device, items: int, batch_size: int) -> int:
    """Loader processes when captioning `items` files. On a CPU of two cores or fewer, none: the
    model's threads already use both cores, and a loader process only takes turns with them (2-core
    Zen 4, bf16, 1,000 photos, in turns: 95.1 against 87.7 images/s at batch 64, 87.9 against 79.2
    at 32; on the 2-core AMD in fp32 it made no difference, 24.3 against 24.6). Elsewhere, and on a
    GPU above all, as `loader_workers`."""
    if device.type == "cpu" and (os.cpu_count() or 1) <= 2:
        return 0
    return loader_workers(items, batch_size)


def encoder_memory_format(device: torch.device) -> torch.memory_format:
    """How a fine-tuned encoder's weights and images are laid out in training: both the same way,
    always (channels-last weights with contiguous images made H100 steps 20-40x slower). On the
    CPU channels-last: fine-tuning ran at 8.4 images/s against 6.4 contiguous on the 2-core AMD
    (benchmarks/RESULTS.md, "Fine-tuning the encoder"). On CUDA contiguous, the layout the issue
    measured fast there (119 ms per step, fp32, H100); channels-last there is unmeasured."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def keep_freed_memory() -> bool:
    """Ask the C allocator (glibc) to keep memory a tensor frees for the next tensor, rather than
    handing it back to the system. A training step on the CPU allocates activations of tens of MB
    (26 images' 96x112x112 maps are 125 MB); glibc gives each its own fresh mapping and unmaps it
    when freed, so every step pays the kernel to zero the same memory again. Keeping it: fine-tuning
    on the 2-core AMD ran at 10.5 images/s against 8.8 (fresh processes in turns, benchmarks/
    RESULTS.md, "Fine-tuning the encoder"), its system time down by a third; the process's memory
    stays near its peak (about 10% above the default's) instead of falling between steps. For
    training, not for a long-lived server. Returns whether it took effect (False where the C
    library is not glibc: macOS, Windows, musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    # never return the top of the heap to the system; serve every size from the heap, not mmap
    return bool(libc.mallopt(m_trim_threshold, 2**31 - 1)) and bool(libc.mallopt(m_mmap_max, 0))


@contextlib.contextmanager
def one_thread():
    """Run torch on one intra-op thread inside, as many as before after. Image transforms are
    small ops: on 2 threads they ran 1.8x slower than on 1 on the 2-core AMD (13x on another
    machine). Switching costs milliseconds, so use it around a batch, not an image."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def decoder_precision(precision: str, device: torch.device, images: int) -> str:
    """The decoder's precision for `images` images, measured on each kind of CPU:

    - Intel Xeon with AMX: for fewer than 4 images bf16 autocast's costs outweigh its gain (one
      image, beam 3: 27 ms bf16 against 20 ms fp32; 64 images: 1.4x faster in bf16), so small
      batches decode in fp32 there. (Measured before the weights were packed, which removed a
      cast of every weight to bf16 per search; not measured again on an AMX Xeon since.)
    - AMD EPYC with AVX512-BF16 and no AMX (Zen 4): bf16 pays from one image on (one image, beam 5:
      15.5 ms against 30.5 ms fp32; 200 val photos one at a time, tensor to caption: 55 -> 34 ms)
      and gives one image the caption it gets in a batch (200 of 200, against 188 in fp32). With
      the decoder's weights packed (model/packed.py), bf16 still wins: 21.8 against 27.0 ms a photo.
    - Without native bf16, auto precision is fp32; an explicit bf16 decodes small batches in fp32.
    """
    if device.type == "cpu" and images < 4 and (cpu_has_amx() or not cpu_has_fast_bf16()):
        return "fp32"
    return precision


def search_check_every(device: torch.device) -> int:
    """How often greedy and beam search ask whether every caption has ended. On a CPU, every step:
    asking costs nothing. On a GPU each question waits for the step to finish (a host sync, which
    the issue measured as what one photo spends its time on), so every 4th step, the steps between
    changing no caption (tests/test_decode.py). Not yet timed on a GPU: `bench.py latency` there
    times both."""
    return 1 if device.type == "cpu" else 4


def encoder_precision(precision: str) -> str:
    """The encoder's precision when captioning at `precision`. int8 puts the decoder's weights in 8
    bits only; its encoder runs in bf16 where the CPU has native bf16, else fp32 (Zen 4, shipped
    model, beam 5: one photo 28.4 -> 24.6 ms, batches of 32 21.0 -> 15.5 ms a photo)."""
    if precision == "int8":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """Autocast context for a resolved precision ('fp32' and 'int8' give a no-op context: int8
    decoding computes in fp32 around its int8 products; its encoder: see encoder_precision)."""
    if precision in ("fp32", "int8"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
