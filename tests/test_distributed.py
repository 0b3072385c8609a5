"""torch.distributed on the CPU: two gloo processes train one model, and resume."""

import csv
import subprocess
import sys

import torch
from conftest import TINY
from safetensors.torch import load_file


def train(*args):
    return subprocess.run([sys.executable, "-m", "captioner", "train", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_two_processes_train_and_resume(tmp_path, shapes):
    out = tmp_path / "ddp"
    common = ["--data", shapes, "--out", out, "--nproc", "2", *TINY]
    r = train(*common, "--epochs", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes" in r.stdout and r.stdout.count("epoch 3:") == 1  # rank 0 alone reports
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [x["epoch"] for x in rows] == ["1", "2", "3"]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[-1]["CIDEr"]) > float(rows[0]["CIDEr"])

    r = train(*common, "--epochs", "4", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert [x["epoch"] for x in csv.DictReader((out / "metrics.csv").open())] == ["1", "2", "3", "4"]
    w = load_file(out / "last" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values())


def test_two_processes_scst(tmp_path, shapes):
    xe = tmp_path / "xe"
    assert train("--data", shapes, "--out", xe, "--epochs", "1", "--max-images", "30", "--val-images", "6",
                 *TINY).returncode == 0
    r = train("--data", shapes, "--out", tmp_path / "sc", "--scst", "--init", xe / "best", "--nproc", "2",
              "--epochs", "1", "--max-images", "31", "--val-images", "6", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "self-critical" in r.stdout and "epoch 1: reward" in r.stdout
