"""Crashes mid-run lose nothing: a training run killed with SIGKILL in the middle of an epoch
resumes to exactly the run that was never killed; an interrupted feature extraction is never used
and a re-run completes it."""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from captioner.inference import features as features_module
from captioner.inference.plan import InferencePlan

FP32_CPU = InferencePlan(torch.device("cpu"), "fp32")  # how these tests run the model

pytestmark = pytest.mark.slow


def start(out, *extra):
    return subprocess.Popen([sys.executable, "-m", "captioner", "train", "--out", str(out), *map(str, extra)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def history(out):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader((out / "metrics.csv").open())]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, shapes):
    args = ["--data", shapes, *TINY, "--max-images", "120", "--val-images", "8", "--batch-size", "4", "--epochs", "4",
            "--workers", "0"]
    whole = start(tmp_path / "whole", *args)
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-2000:]

    killed = tmp_path / "killed"
    proc = start(killed, *args)
    deadline = time.time() + 600
    while not ((killed / "metrics.csv").is_file() and len(history(killed)) >= 2):  # epoch 3 has begun
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.5)  # well into epoch 3 (an epoch here takes several seconds)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(history(killed)) == 2  # killed during epoch 3: its results were never written

    resumed = start(killed, *args, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]
    assert history(killed) == history(tmp_path / "whole")
    for folder in ("last", "best"):
        a = load_file(tmp_path / "whole" / folder / "model.safetensors")
        b = load_file(killed / folder / "model.safetensors")
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6), (folder, k)


def test_interrupted_feature_extraction_is_never_used(tmp_path, shapes, monkeypatch):
    from captioner.data.records import load_records
    from captioner.model.network import CaptionModel, ModelConfig

    paths = [r.image for r in load_records(shapes)][:20]
    cfg = ModelConfig.for_encoder("tf_efficientnet_lite0", 10, image_size=64)
    model = CaptionModel.create(cfg).eval()
    real = features_module.extract_features

    def dies_half_way(model, paths, plan, **kw):
        real(model, paths[: len(paths) // 2], plan, **kw)
        raise KeyboardInterrupt  # Ctrl-C, or the machine going down, in the middle

    monkeypatch.setattr(features_module, "extract_features", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        features_module.cached_features(model, paths, FP32_CPU, tmp_path, progress=False)
    assert not list((tmp_path / "features").glob("*.npy")) and not list((tmp_path / "features").glob("*.json"))
    # a crash while writing leaves at most a file named .partial, which is never read
    (tmp_path / "features" / "junk.123.partial.npy").write_bytes(b"half a file")

    monkeypatch.setattr(features_module, "extract_features", real)
    f, ok, errors = features_module.cached_features(model, paths, FP32_CPU, tmp_path, progress=False)
    assert ok.all() and not errors and f.shape[0] == len(paths)
    again, _, _ = features_module.cached_features(model, paths, FP32_CPU, tmp_path, progress=False)
    assert isinstance(again, np.memmap) and np.array_equal(np.asarray(again), np.asarray(f))


def test_a_killed_writers_temporary_is_cleared_at_the_next_write(tmp_path):
    """Issue 32, item 16: a killed checkpoint write left `.checkpoint.pt.<pid>.tmp` behind for good."""
    from captioner.files import atomic_write

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that has ended
    stale = tmp_path / f".checkpoint.pt.{dead}.tmp"
    live = tmp_path / f".checkpoint.pt.{os.getppid()}.tmp"  # a writer still running
    other = tmp_path / f".metrics.csv.{dead}.tmp"  # another file's: not this write's business
    for f in (stale, live, other):
        f.write_bytes(b"half a checkpoint")
    with atomic_write(tmp_path / "checkpoint.pt", "wb") as f:
        f.write(b"whole")
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"whole"
    assert not stale.exists() and live.exists() and other.exists()
