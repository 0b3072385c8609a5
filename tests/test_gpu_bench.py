"""benchmarks/gpu.sh, the script a lent GPU runs first, works before a GPU minute is spent on it:
its CPU mode (small sizes) runs every section and writes every table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_script_runs_every_section_on_the_cpu(trained, shapes, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu", "--data", str(shapes),
                          "--model", str(trained / "best"), "--files", "20"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = (tmp_path / "out" / "gpu.md").read_text()
    for table in ("Model alone", "Files to captions", "One photo", "Training", "Server"):
        assert f"### {table}" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| precision")]
    assert len(rows) >= 15
    assert "| fp32 | " in text and "| bf16 | " in text
    assert "(reference)" in text and " of 20 |" in text  # captions compared with fp32's
    server = text.split("### Server")[1]
    failed = [line.split("|")[3].strip() for line in server.splitlines() if line.startswith("| o")]
    assert failed == ["0", "0"]
    assert (tmp_path / "out" / "gpu.log").is_file()
    assert "Uvicorn running" in (tmp_path / "out" / "serve-wait5.log").read_text()  # the server's own output


def test_a_server_that_does_not_start_says_what_it_printed(tmp_path):
    """The GPU run's server section once failed as "did not start" with its output thrown away."""
    from captioner.server.background import serve_in_background

    log = tmp_path / "serve.log"
    with pytest.raises(RuntimeError, match=r"exited with code 2\); it printed:\n.*not a model folder"):
        with serve_in_background("--model", str(tmp_path / "missing"), timeout=60, log=log):
            pass
    assert "not a model folder" in log.read_text()
