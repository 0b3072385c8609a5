"""Shared fixtures: a synthetic dataset and one tiny model trained on it (once per session)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from captioner.cli import main  # noqa: E402
from captioner.data.synthetic import make_dataset  # noqa: E402

# Small and fast: 96 px images, a 128-unit LSTM. Lite0 keeps its real ImageNet weights.
TINY = ["--image-size", "96", "--embed-dim", "64", "--hidden-dim", "128", "--dropout", "0.1",
        "--min-count", "1", "--batch-size", "32", "--lr", "3e-3", "--workers", "0", "--quiet"]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    """Never write into the user's feature cache."""
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


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
