"""Shared fixtures: a synthetic dataset and one tiny model trained on it (once per session)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from captioner.cli import main  # noqa: E402
from captioner.data.synthetic import make_dataset  # noqa: E402

_TORCH_THREADS = torch.get_num_threads()  # torch's own default, before captioner changes it

# Small and fast: 96 px images, a 128-unit LSTM. Lite0 keeps its real ImageNet weights.
TINY = ["--image-size", "96", "--embed-dim", "64", "--hidden-dim", "128", "--dropout", "0.1",
        "--min-count", "1", "--batch-size", "32", "--lr", "3e-3", "--workers", "0", "--quiet"]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    """Never write into the user's feature cache."""
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True, scope="session")
def _threads_fixed():
    """One number of threads for the whole suite: results compared across runs (a resumed training
    against an uninterrupted one) are the same bits only at the same number, and by default it
    follows the machine's load (threads.py; test_threads.py tests that). Session-wide, so that the
    models the session and module fixtures train (`trained`) are the same on a busy machine: one
    trained on one thread there failed test_fine_tune's 80% of right captions (28 of 36)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAPTIONER_THREADS", str(_TORCH_THREADS))
        yield


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """captions.jsonl of the synthetic shapes dataset (train + val)."""
    return make_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture
def photos(tmp_path, shapes) -> Path:
    """12 val photos of the synthetic shapes set, each a different combination (search tests)."""
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted(p for p in shapes.parent.glob("*.png") if p.stem.endswith("_4"))[:12]:
        Image.open(p).save(folder / p.name)
    return folder


@pytest.fixture(scope="session")
def trained(tmp_path_factory, shapes) -> Path:
    """The run folder of a tiny model trained on `shapes` for a few epochs."""
    base = tmp_path_factory.getbasetemp()
    out = base / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("CAPTIONER_CACHE", str(base / "cache"))
    try:
        assert main(["train", "--data", str(shapes), "--out", str(out), "--epochs", "15", *TINY]) == 0
    finally:
        mp.undo()
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, theirs, ...), from /proc; empty where there is none."""
    from captioner.threads import process_stats

    parents: dict[int, list[int]] = {}
    for child, fields in process_stats():
        parents.setdefault(int(fields[1]), []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_descendants(pid: int | None = None) -> list[int]:
    """Kill every process below `pid` (default: this one): the ones it started, and theirs.
    Returns their ids."""
    import os
    import signal

    found = descendants(os.getpid() if pid is None else pid)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return found


def pytest_unconfigure(config):
    """Ctrl-C in a test that started processes (a training, a server, torchrun's workers) must
    not leave them running: once one was found training on after the suite had stopped."""
    stop_descendants()
