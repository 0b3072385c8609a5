"""Encoder features on disk, computed once per (encoder, weights, preprocessing, image contents).

A frozen encoder gives the same features every epoch, so training runs it once per image and
then reads a memory-mapped ``.npy``. The cache key hashes the encoder's weight identity, the
preprocessing, the feature kind and the bytes of every image, so an edited photo, another
backbone or another image size can never be served stale features. Files are written under a
temporary name and renamed when complete: an interrupted extraction is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from captioner.data.images import image_batches
from captioner.distributed import Dist
from captioner.errors import CaptionerWarning, DataError
from captioner.files import atomic_write, readable_digest
from captioner.inference.plan import InferencePlan

CACHE_VERSION = 3  # 2: entries carry a checksum of their features; 3: big JPEGs decoded at a reduced scale
# (images.draft_size) and, on the CPU, the encoder's convolutions packed (inference/packed.py: fp32 rounds differently)


def default_cache_dir() -> Path:
    """$CAPTIONER_CACHE, else $XDG_CACHE_HOME/captioner, else ~/.cache/captioner."""
    if os.environ.get("CAPTIONER_CACHE"):
        return Path(os.environ["CAPTIONER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "captioner"


@torch.no_grad()
def extract_features(model, paths: Sequence[Path], plan: InferencePlan, *, batch_size: int = 32, workers: int = 1,
                     out: np.ndarray | None = None, progress: bool = True, encoder: torch.nn.Module | None = None,
                     flip: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Run the model's encoder over images as `plan` runs it (InferencePlan.encode). Returns
    (features fp16 (N, ...), ok mask (N,), errors). Where the plan says so (CUDA), the device decodes
    the plain JPEGs (see data/images.image_batches). `encoder`: the copy the plan made already
    (InferencePlan.encoder_for; a loaded Captioner's), else one is made here. `flip`: of the images
    mirrored left to right (a second view of each training photo for the search space)."""
    cfg = model.cfg
    paths = list(paths)
    loader = image_batches(paths, cfg.image_size, cfg.mean, cfg.std, plan.device, batch_size=batch_size,
                           workers=workers, jpegs_on_device=plan.jpegs_on_device)
    ok = np.zeros(len(paths), dtype=bool)
    errors: list[str] = []
    encoder = encoder or plan.encoder_for(model)  # a faster copy; the model's own encoder is left as it came
    bar = tqdm(total=len(paths), desc="features", unit="img", disable=not progress, leave=False)
    for idx, x, _, errs in loader:
        errors += errs
        if x is not None:
            f = plan.encode(model, x.flip(-1) if flip else x, encoder).float().cpu().numpy().astype(np.float16)
            if out is None:
                out = np.zeros((len(paths), *f.shape[1:]), dtype=np.float16)
            out[idx] = f
            ok[idx] = True
        bar.update(len(idx) + len(errs))
    bar.close()
    if out is None:  # nothing could be read
        out = np.zeros((len(paths), 1), dtype=np.float16)
    return out, ok, errors


def cached_features(model, paths: Sequence[Path], plan: InferencePlan, cache_dir: Path | None = None,
                    dist: Dist | None = None, **kw) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features for `paths` from the cache, extracting (and storing) them as `plan` runs the encoder
    when absent (`kw`: extract_features's batch_size, workers, progress, flip).

    Returns (memory-mapped fp16 features, ok mask, error messages of unreadable images).
    With `dist` (several processes), a missing entry is extracted in shares: process r runs the
    encoder on every N-th image from the r-th and saves them to a part file; process 0 merges the
    parts into the cache entry, and every process then reads it (with several machines, the
    cache folder must be one they all share).
    """
    dist = dist or Dist()
    cache_dir = _writable(Path(cache_dir or default_cache_dir()) / "features")
    cfg = model.cfg
    h = hashlib.sha256(json.dumps({
        "version": CACHE_VERSION, "encoder": model.encoder.identity, "size": cfg.image_size,
        "mean": list(cfg.mean), "std": list(cfg.std), "kind": model.decoder.feature_kind,
        "precision": plan.encoder_precision,  # bf16 and fp32 features differ slightly: never mixed
        **({"jpegs": "device"} if plan.jpegs_on_device else {}),  # nor do nvJPEG's and Pillow's pixels
        **({"flip": True} if kw.get("flip") else {}),  # the mirrored photos' features, an entry of their own
    }, sort_keys=True).encode())
    for p in tqdm(paths, desc="hashing images", unit="img", leave=False,
                  disable=not (kw.get("progress", True) and dist.main)):
        h.update((readable_digest(p) or "unreadable").encode())
    key = h.hexdigest()[:32]
    entry = cache_dir / key
    if dist.broadcast(_has_entry(entry) and _sound(entry, len(paths))):  # process 0's view decides for everyone
        return _read_entry(entry)

    if dist.world == 1:
        feats, ok, errors = extract_features(model, paths, plan, **kw)
    else:
        feats, ok, errors = _extract_in_shares(model, paths, plan, cache_dir / f"{key}.shares", dist, **kw)
    if dist.main:
        _write_entry(entry, feats, ok, errors, encoder=model.encoder.identity)
    dist.barrier()
    if not _has_entry(entry):
        raise DataError(f"{entry}.npy: not there after process 0 wrote it; with several machines, --cache-dir "
                        "must be a folder they all share")
    return _read_entry(entry)


def _has_entry(entry: Path) -> bool:
    return entry.with_suffix(".npy").is_file() and entry.with_suffix(".json").is_file()


def _checksum(feats: np.ndarray) -> str:
    return hashlib.sha1(memoryview(np.ascontiguousarray(feats)).cast("B")).hexdigest()


def _sound(entry: Path, count: int) -> bool:
    """Whether an entry reads back as written: a damaged one (a disk error, a partial copy, bytes
    changed by hand) would train a model on garbage, so it is reported and extracted again."""
    try:
        info = json.loads(entry.with_suffix(".json").read_text())
        feats = np.load(entry.with_suffix(".npy"), mmap_mode="r")
        if info.get("count") == count == len(feats) == len(info.get("ok", ())) and \
                info.get("sha1") == _checksum(feats):
            return True
        problem = "its features do not match their checksum"
    except Exception as e:  # whatever a damaged file makes its readers raise: numpy's header parser, for
        # one, raises its tokenizer's tokenize.TokenError or SyntaxError; any of them means "extract again"
        problem = f"it cannot be read ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
    warnings.warn(f"{entry}.npy: damaged feature cache entry ({problem}); extracting the features again",
                  CaptionerWarning, stacklevel=3)
    return False


def _writable(folder: Path) -> Path:
    """`folder`, made if need be; or, where it cannot be written (read-only, full, not ours), a cache
    in the temporary folder for this run, with a warning."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test."):
            pass
        return folder
    except OSError as e:
        fallback = Path(tempfile.gettempdir()) / f"captioner-cache-{os.getuid() if hasattr(os, 'getuid') else 0}"
        warnings.warn(f"{folder}: the feature cache cannot be written there ({e.strerror}); using {fallback} "
                      "(set --cache-dir or CAPTIONER_CACHE to a writable folder)", CaptionerWarning, stacklevel=3)
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def _write_entry(entry: Path, feats: np.ndarray, ok: np.ndarray, errors: list[str], **info) -> None:
    """ENTRY.npy (features) and ENTRY.json (ok mask, errors, `info`), each written atomically: an
    interrupted write never leaves an entry to be read. The .json comes last, and an entry counts
    only when both are there."""
    with atomic_write(entry.with_suffix(".npy"), "wb") as f:
        np.save(f, feats)
    with atomic_write(entry.with_suffix(".json")) as f:
        f.write(json.dumps({"ok": ok.tolist(), "errors": errors, "count": len(ok), "sha1": _checksum(feats), **info}))


def _read_entry(entry: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(memory-mapped features, ok mask, errors) of an entry `_write_entry` wrote."""
    info = json.loads(entry.with_suffix(".json").read_text())
    return np.load(entry.with_suffix(".npy"), mmap_mode="r"), np.array(info["ok"], dtype=bool), info["errors"]


def _extract_in_shares(model, paths: Sequence[Path], plan: InferencePlan, folder: Path, dist: Dist, **kw
                       ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Each process extracts paths[rank::world] into folder/R.npy; process 0 gathers them."""
    folder.mkdir(parents=True, exist_ok=True)
    f, ok, errors = extract_features(model, [paths[i] for i in range(dist.rank, len(paths), dist.world)], plan, **kw)
    _write_entry(folder / str(dist.rank), f, ok, errors)
    dist.barrier()
    if not dist.main:
        return f, ok, errors  # only process 0 assembles the whole
    parts = []
    for rank in range(dist.world):
        if not _has_entry(folder / str(rank)):
            raise DataError(f"{folder}: process {rank}'s features are not there; with several machines, "
                            "--cache-dir must be a folder they all share")
        parts.append((range(rank, len(paths), dist.world), *_read_entry(folder / str(rank))))
    shape = next((part.shape[1:] for _, part, part_ok, _ in parts if part_ok.any()), (1,))
    out, ok_all, errors_all = np.zeros((len(paths), *shape), dtype=np.float16), np.zeros(len(paths), bool), []
    for idx, part, part_ok, part_errors in parts:
        if part_ok.any():
            out[list(idx)] = part
        ok_all[list(idx)] = part_ok
        errors_all += part_errors
    for file in folder.iterdir():
        file.unlink()
    folder.rmdir()
    return out, ok_all, errors_all
