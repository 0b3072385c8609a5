"""Start `captioner serve` in a child process and wait until it answers: for tests, benchmarks and
scripts that talk to a real server (the load test, the screenshots, the browser test). Not used
by the server itself."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    pid: int  # the server's process


@contextlib.contextmanager
def serve_in_background(*args: str, timeout: float = 120.0, log: Path | None = None) -> Iterator[Served]:
    """`captioner serve ARGS...` in a child process on a free local port; yields its URL and
    process id once /health answers, and stops it afterwards (for tests and scripts). Its output
    goes to `log` (kept) or a temporary file: a server that does not start is a RuntimeError
    ending in the last lines it printed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with contextlib.ExitStack() as stack:
        if log is None:
            log = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "serve.log"
        output = stack.enter_context(open(log, "wb"))
        proc = subprocess.Popen([sys.executable, "-m", "captioner", "serve", *args, "--port", str(port)],
                                stdout=output, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    urllib.request.urlopen(url + "/health", timeout=1)
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        why = (f"exited with code {proc.returncode}" if proc.returncode is not None
                               else f"no answer from /health within {timeout:g} s")
                        said = Path(log).read_bytes()[-3000:].decode("utf-8", "replace").strip()
                        raise RuntimeError(f"captioner serve {' '.join(args)} did not start ({why}); it printed:\n"
                                           f"{said or '(nothing)'}") from None
                    time.sleep(0.25)
            yield Served(url, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
