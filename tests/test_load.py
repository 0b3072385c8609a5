"""A bounded load test on loopback: 8 concurrent clients, 500 requests to a real `captioner serve`
(photos, non-images, health checks), zero failures and flat server memory. The same script,
run on the shipped model, gives the README's reliability figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_500_requests_from_8_clients_none_fail_memory_flat(trained, shapes):
    photo = sorted(Path(shapes).parent.glob("*.png"))[0]
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load.py"), "--model", str(trained / "best"),
                        "--clients", "8", "--requests", "500", "--photo", str(photo), "--no-record", "--json",
                        "--batch-wait-ms", "5"],
                       capture_output=True, text=True, timeout=600)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and result["failed"] == 0, result["first_failures"]
    assert result["requests"] == 500
    assert result["rss_last_mb"] - result["rss_first_mb"] < 60, result  # no leak per request
