"""What a run leaves behind: `checkpoint.pt`, `metrics.csv`, `curves.png`, and where the run stands.

`checkpoint.pt` holds the decoder (and a trained encoder), optimizer, scheduler, the run's config,
vocabulary and model config, `RunState` (epoch, history, best score and epoch) and, once the last
epoch is done, the decoding chosen on val; `space.pt`, while the search space trains after the
decoder, its members so far. Tensors and plain data only, read back with ``weights_only=True``,
so `--resume` continues exactly where the run stopped and a planted pickle is refused, never run.
"""

from __future__ import annotations

import contextlib
import csv
import math
import pickle
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from captioner.errors import ConfigError, DataError
from captioner.files import atomic_write, locked

CHECKPOINT = "checkpoint.pt"
SPACE_CHECKPOINT = "space.pt"  # the search space's training, after each epoch (train/embedding.py add_space)
RUN_KEYS = {"epoch", "optimizer", "scheduler", "history", "best", "best_epoch"}
METRICS_COLUMNS = ["epoch", "train_loss", "reward", "val_loss", "BLEU-4", "CIDEr", "lr", "seconds"]


@dataclass
class RunState:
    """Where a run stands: the last finished epoch, one history row per epoch, the best val CIDEr-D
    and its epoch. It writes itself into the checkpoint and reads itself back. A run started from
    another model (--init) begins with that model's val CIDEr-D as `start` and as the best: an
    epoch must beat it to replace best/ (best_epoch 0: best/ is the start model)."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: float = -math.inf
    best_epoch: int = 0
    start: float = math.nan

    def record(self, row: dict, score: float) -> bool:
        """Add epoch `row["epoch"]`'s row; `score` is its val CIDEr-D. True when it is the best yet."""
        self.epoch = row["epoch"]
        self.history.append(row)
        if score > self.best:
            self.best, self.best_epoch = score, self.epoch
            return True
        return False

    def epochs_without_improvement(self) -> int:
        return self.epoch - self.best_epoch

    def to_checkpoint(self) -> dict:
        return {"epoch": self.epoch, "history": self.history, "best": self.best, "best_epoch": self.best_epoch,
                "start": self.start}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> RunState:
        return cls(int(ckpt["epoch"]), list(ckpt["history"]), float(ckpt["best"]), int(ckpt["best_epoch"]),
                   float(ckpt.get("start", math.nan)))


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash never leaves half a checkpoint."""
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: Path, needed: set[str] = RUN_KEYS) -> dict:
    """Read a checkpoint with ``weights_only=True``: tensors and plain data, never code. Anything
    else (a pickle from elsewhere, a damaged file, one without the keys `needed`) is refused in one line."""
    try:
        with warnings.catch_warnings():  # torch's note on a foreign file's pickle protocol: refused below anyway
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(f"{path}: holds objects other than tensors and plain data; captioner refuses to "
                        "unpickle it, because unpickling can run arbitrary code") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:200]})") from None
    missing = needed - set(state) if isinstance(state, dict) else needed
    if missing:
        raise DataError(f"{path}: not a captioner checkpoint (it lacks {', '.join(sorted(missing))})")
    return state


def write_metrics(out: Path, history: list[dict]) -> None:
    """metrics.csv: one row per epoch."""
    with atomic_write(out / "metrics.csv", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRICS_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)


def log_to_tensorboard(folder: Path, row: dict) -> None:
    """One epoch's row of metrics.csv as TensorBoard scalars in `folder` (`--tensorboard`), each at
    step = its epoch. A writer an epoch: a resumed run adds to the same curves."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(folder)) as board:
        for key in METRICS_COLUMNS[1:]:
            if isinstance(row.get(key), (int, float)):
                board.add_scalar(key, row[key], row["epoch"])


RUN_FILES = (CHECKPOINT, SPACE_CHECKPOINT, "metrics.csv", "curves.png")
RUN_FOLDERS = ("best", "last")


def holds_a_run(out: Path) -> bool:
    return any((out / f).is_file() for f in RUN_FILES) or any((out / d / "config.json").is_file()
                                                                  for d in RUN_FOLDERS)


@contextlib.contextmanager
def run_folder(out: Path, resume: bool, overwrite: bool) -> Iterator[None]:
    """Claim the run folder `out` for this training while the block runs: locked against a second
    training, and never silently written over. A folder that already holds a run is continued
    (`resume`), replaced (`overwrite`: its run files are removed first), or refused."""
    out.mkdir(parents=True, exist_ok=True)
    with locked(out, "training"):
        for name in RUN_FOLDERS:  # saving a model replaces these folders whole: never a folder of the user's
            folder = out / name
            if folder.exists() and not (folder / "config.json").is_file() and (
                    not folder.is_dir() or any(folder.iterdir())):
                raise ConfigError(f"{folder}: holds files captioner did not write (it is not a model folder), and "
                                  "training would replace it; choose another --out")
        if holds_a_run(out) and not resume:
            if not overwrite:
                epochs = saved_epoch(out)
                what = f"a training run ({epochs} epochs saved)" if epochs else "a training run"
                raise ConfigError(f"{out} already holds {what}; add --resume to continue it, --overwrite to "
                                  "replace it, or choose another --out")
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            for name in RUN_FOLDERS:
                if (out / name / "config.json").is_file():
                    shutil.rmtree(out / name)
        yield


def saved_epoch(out: Path) -> int:
    """The last epoch whose checkpoint is in `out` (0: none, or not readable). Memory-mapped: the
    weights are not read, however large they are."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        return 0
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:  # a damaged or foreign file: say nothing is saved rather than fail on the way out
        return 0
