"""Start `captioner serve` in a child process and wait until it answers: for tests, benchmarks and
scripts that talk to a real server (the load test, the screenshots, the browser test). Not used
by the server itself."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    pid: int  # the server's process


@contextlib.contextmanager
def serve_in_background(*args: str, timeout: float = 120.0) -> Iterator[Served]:
    """`captioner serve ARGS...` in a child process on a free local port; yields its URL and
    process id once /health answers, and stops it afterwards (for tests and scripts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "captioner", "serve", *args, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"captioner serve {' '.join(args)} did not start") from None
                time.sleep(0.25)
        yield Served(url, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
