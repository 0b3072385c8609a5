"""torch.distributed on the CPU: two gloo processes train one model, and resume."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def train(*args):
    return subprocess.run([sys.executable, "-m", "captioner", "train", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_two_processes_train_and_resume(tmp_path, shapes):
    out = tmp_path / "ddp"
    common = ["--data", shapes, "--out", out, "--nproc", "2", *TINY]
    r = train(*common, "--epochs", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes" in r.stdout and r.stdout.count("epoch 3 of 3:") == 1  # rank 0 alone reports
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
    assert "self-critical" in r.stdout and "epoch 1 of 1: reward" in r.stdout


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, shapes):
    """2 gloo processes x batch 16 == 1 process accumulating 2 batches of 16, weight for weight.
    No dropout (each process would draw its own masks) and the MLP head (no BatchNorm statistics,
    which every process keeps for its own batches)."""
    same = ["--data", shapes, *TINY, "--batch-size", "16", "--epochs", "2", "--dropout", "0", "--head", "mlp",
            "--precision", "fp32", "--max-images", "60", "--val-images", "8"]
    # each run extracts its own features (the shared test cache may hold bf16 ones of other tests)
    r1 = train(*same, "--out", tmp_path / "one", "--accum", "2", "--cache-dir", tmp_path / "cache1")
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = train(*same, "--out", tmp_path / "two", "--nproc", "2", "--cache-dir", tmp_path / "cache2")
    assert r2.returncode == 0, r2.stderr[-3000:]
    # its features were extracted in two shares and merged: the same as one process's (train and val;
    # the third entry, the training photos mirrored for the search space, process 0 extracts after training)
    entries = sorted((tmp_path / "cache2" / "features").glob("*.npy"))
    assert len(entries) == 3 and not list((tmp_path / "cache2" / "features").glob("*.shares"))
    for entry in entries:
        one = np.load(tmp_path / "cache1" / "features" / entry.name)
        assert np.allclose(np.load(entry).astype(np.float32), one.astype(np.float32), atol=2e-3)
    w1 = load_file(tmp_path / "one" / "last" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "last" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k].float(), w2[k].float(), rtol=1e-3, atol=2e-4), k  # features: 1 fp16 ulp apart
    # and the comparison can tell: one process without accumulation takes other steps
    r3 = train(*same, "--out", tmp_path / "plain", "--cache-dir", tmp_path / "cache1")
    assert r3.returncode == 0, r3.stderr[-3000:]
    w3 = load_file(tmp_path / "plain" / "last" / "model.safetensors")
    assert not all(torch.allclose(w1[k].float(), w3[k].float(), rtol=1e-3, atol=2e-4) for k in w1)


def test_two_processes_caption_every_image_exactly_once(trained, shapes, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    images = sorted(Path(shapes).parent.glob("*.png"))[:13]
    for img in images:
        (folder / img.name).write_bytes(img.read_bytes())
    (folder / "broken.png").write_bytes(b"not a picture")
    model = trained / "best"

    def caption(out, *extra):
        return subprocess.run([sys.executable, "-m", "captioner", "caption", folder, "--model", model, "--out", out,
                               "--quiet", "--batch-size", "4", *map(str, extra)],
                              capture_output=True, text=True, timeout=600)

    r = caption(tmp_path / "one.jsonl")
    assert r.returncode == 0, r.stderr[-3000:]
    r = caption(tmp_path / "two.jsonl", "--nproc", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "13 captioned" in r.stderr and "2 processes" in r.stderr and "broken.png" in r.stderr
    one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [e["image"] for e in two] == [str(folder / i.name) for i in images]  # each once, in order
    assert [e["caption"] for e in two] == [e["caption"] for e in one]
    assert not list(tmp_path.glob("two.jsonl.part*"))
    # a re-run finds them all done
    r = caption(tmp_path / "two.jsonl", "--nproc", "2")
    assert r.returncode == 0 and "0 captioned, 13 already" in r.stderr, r.stderr[-3000:]
