"""The server's limits and guards: what keeps one client from taking the machine.

    Guard        plain ASGI, before the app: 400 to a Host header the server does not answer to
                 (DNS rebinding), 413 to a body over the limit, declared or counted as it arrives
    PixelPool    at most so many decoded pixels held at once by all requests together
    busy()       the 503 with Retry-After that every wait past its time-out answers
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import threading
from pathlib import Path

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from captioner.runtime import give_back_freed_memory

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
TRIM_ABOVE = 4_000_000  # decoded pixels after which freed memory is handed back to the system


def busy(what: str, timeout: float) -> HTTPException:
    """503: no turn at `what` within `timeout` seconds (the client should come back in a while)."""
    return HTTPException(503, f"busy: no turn at {what} within {timeout:g} s; try again", headers={"Retry-After": "5"})


def declared_pixels(data: bytes | Path, min_size: int = 0) -> int:
    """Width x height an image (its bytes, or a file) will be decoded at, from its header, without
    decoding it: a JPEG at the reduced scale `min_size` allows (as open_rgb decodes it), anything
    else whole. 0 when there is no header to read: open_rgb then says what is wrong."""
    from PIL import Image

    from captioner.data.images import allowed_formats

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data, formats=allowed_formats()) as im:
            if min_size and im.format in ("JPEG", "MPO"):
                im.draft(im.mode, (min_size, min_size))  # the scale only: nothing is decoded
            return im.width * im.height
    except Exception:
        return 0


class PixelPool:
    """At most `capacity` decoded pixels held at once by all requests together (one image larger than
    that waits until it is alone). A wait longer than the timeout is a 503 with Retry-After."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int, timeout: float):
        with self.cond:
            if not self.cond.wait_for(lambda: self.used == 0 or self.used + n <= self.capacity, timeout):
                raise HTTPException(503, f"busy: no room at the image decoders within {timeout:g} s; try again",
                                    headers={"Retry-After": "5"})
            self.used += n
        try:
            yield
        finally:
            if n >= TRIM_ABOVE:  # small images reuse what is freed; trimming after each costs ~6% throughput
                give_back_freed_memory()
            with self.cond:
                self.used -= n
                self.cond.notify_all()


def hostname(host: str) -> str:
    """The name in a Host header: 'localhost:8000' -> 'localhost', '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(host: str) -> bool:
    """An IP address as Host is no DNS rebinding: the page's origin is then that address itself."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class _TooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over the limit of {limit:,} bytes")


class Guard:
    """Before the app sees a request: answer 400 to a Host that is not ours (DNS rebinding) and 413
    to a body over `limit` bytes, declared (Content-Length) or counted as it arrives (a chunked
    upload has no Content-Length, and must not be read or spooled to disk whole). Plain ASGI, so
    that the count happens as the bytes are read."""

    def __init__(self, app, hosts: set[str], limit: int):
        self.app, self.hosts, self.limit = app, hosts, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = hostname(headers.get("host", ""))
        if "*" not in self.hosts and host not in self.hosts and not _is_ip(host):
            return await json_error(400, f"this server does not answer to host {host!r} (start it with "
                                         f"--allowed-host {host or 'NAME'} to allow it)")(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return await json_error(413, f"request of {int(length):,} bytes is over the limit")(scope, receive, send)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge(self.limit)  # FastAPI answers it as a 413
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge as e:  # raised where no handler turned it into an answer
            if not started:
                await json_error(413, e.detail)(scope, receive, send)


def json_error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)
