"""The machine: which devices it has, which precisions pay on its CPU, autocast, one-thread sections
and the C allocator, in one place so no other module sprinkles `.cuda()` (how many threads torch
uses: threads.py). How captioning runs on a device
(batch sizes, fast layers, the decoder's precision by batch) is inference/plan.py's."""

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
    `inference`, also 'int8' on a CPU (see inference/int8.py; autocast treats it as fp32)."""
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


def loader_workers(items: int, batch_size: int) -> int:
    """Processes decoding images while the model captions `items` files: none for two batches or
    fewer (starting one costs more than it saves), else one per core beside the main process's,
    at most 8. Measured in benchmarks/RESULTS.md ("Files to captions")."""
    if items <= 2 * batch_size:
        return 0
    return max(1, min(8, (os.cpu_count() or 1) - 1))


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


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def give_back_freed_memory() -> None:
    """Return freed memory to the system now (glibc's malloc_trim; nothing elsewhere). glibc keeps
    freed memory in per-thread arenas, and a server decodes in many threads: without this, each
    thread would keep the largest image it ever decoded (16 parallel 40-megapixel uploads left 5 GB
    held). For a long-lived server, after a big image; the opposite of keep_freed_memory."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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


def autocast(device: torch.device, precision: str):
    """Autocast context for a resolved precision ('fp32' and 'int8' give a no-op context: int8
    decoding computes in fp32 around its int8 products; its encoder: InferencePlan.encoder_precision)."""
    if precision in ("fp32", "int8"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
