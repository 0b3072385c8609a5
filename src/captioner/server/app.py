"""`captioner serve`: a web page and a REST API over one loaded model (and a photo library).

    GET  /                  the page: drop photos to caption them; search the library
    POST /api/caption       multipart field `file`, repeatable -> captions, alternatives, seconds
    GET  /api/search?q=     photos of the library for some words, best first (&mode=keyword|model|hybrid)
    POST /api/search/like   multipart field `file`: photos of the library that look like it
    GET  /api/search/like/{id}  photos of the library that look like its photo `id`
    GET  /api/thumb/{id}    a JPEG of a photo *in the library* (by id: no paths from clients), re-encoded
    GET  /health            model and library status
    GET  /openapi.json      the API schema (answers and errors typed: see server/schema.py)
    GET  /docs              the schema as a page (served from here, no CDN)

Errors are JSON ``{"detail": "..."}`` with a 4xx status: 413 for uploads over the byte or pixel
limits (bytes are counted as they arrive, chunked uploads included), 415 for files that are not
images, 404 for unknown photos or when no library is loaded, 503 (with Retry-After) when the model
or the image decoders are busy for longer than the queue timeout or more than 64 connections are
open, 400 for a Host header the server does not answer to. Only the host names it was started for
are served (DNS rebinding: a web page elsewhere must not read the library through a browser).
Everything the page needs is served from here: it works with no network at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import ipaddress
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import torch
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from captioner import __version__
from captioner.data.images import ImageError, open_rgb
from captioner.errors import ConfigError, LibraryError
from captioner.library import photo_path, search, similar
from captioner.names import DEFAULT_SEARCH_MODE, SEARCH_MODES
from captioner.server.batcher import Batcher
from captioner.server.schema import CaptionResponse, Health, SearchResponse, errors

STATIC = Path(__file__).parent / "static"


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def create_app(captioner, db: Path | None = None, *, max_upload_mb: float = 20.0, max_pixels: int = 40_000_000,
               max_files: int = 16, queue_timeout: float = 30.0, allowed_hosts: Sequence[str] = LOCAL_HOSTS,
               max_request_pixels: int = 200_000_000, batch_wait_ms: float = 5.0, max_batch: int = 16) -> FastAPI:
    """The app, around a loaded `Captioner` (loaded once, shared by every request). A caption
    request that waits more than `queue_timeout` seconds for the model gets a 503 with
    Retry-After rather than an ever longer queue.

    `allowed_hosts`: the names the Host header may give ("*": any). An upload may decode to at most
    `max_pixels`, all the files of one request together to `max_request_pixels`, and all requests
    together hold at most `max_pixels` decoded pixels at once (the others wait, then get 503), so
    memory stays bounded however many requests arrive.

    Caption requests that are ready together are captioned in one model call of at most `max_batch`
    images, waiting at most `batch_wait_ms` for requests still reading their uploads
    (server/batcher.py); 0 captions each request on its own."""
    app = FastAPI(title="captioner", version=__version__, docs_url=None, redoc_url=None,  # theirs need a CDN
                  description="Caption photos with a CNN + LSTM model, and search a captioned photo library. "
                              "Every error is JSON {\"detail\": \"...\"}.")
    lock = threading.Lock()  # one inference at a time: the CPU's threads are already all in use
    max_bytes = int(max_upload_mb * 1024 * 1024)
    db = Path(db) if db else None

    pixels = _PixelPool(max_pixels)  # decoded pixels held at once, over all requests: bounded memory

    def caption_batch(x: torch.Tensor) -> list[dict]:
        with lock, torch.no_grad():  # the model is shared with search; no_grad: see model_turn
            return captioner.caption_tensor(x)

    batcher = Batcher(caption_batch, max_images=max_batch, wait_s=batch_wait_ms / 1000) if batch_wait_ms > 0 else None

    @contextlib.contextmanager
    def model_turn():
        if not lock.acquire(timeout=queue_timeout):
            raise HTTPException(503, f"busy: no turn at the model within {queue_timeout:g} s; try again",
                                headers={"Retry-After": "5"})
        try:  # no_grad rather than inference_mode: under inference_mode bf16 autocast re-cast the weights at
            with torch.no_grad():  # every step (one photo, bf16, Zen 4: 34 ms against 27; batches and fp32 alike)
                yield
        finally:
            lock.release()

    # outermost (added last): checks the Host header and counts body bytes before anything reads them
    app.add_middleware(_Guard, hosts={h.lower().strip("[]") for h in allowed_hosts if h},
                       limit=max_bytes * max_files + 65_536)  # + room for the multipart framing

    @app.get("/health", response_model=Health)
    def health() -> dict:
        return {"status": "ok", "model": captioner.source, "decoder": captioner.model.cfg.decoder,
                "library": str(db) if db else None}

    @app.post("/api/caption", response_model=CaptionResponse, response_model_exclude_none=True,
              responses=errors(413, 415, 422, 503))
    def caption(file: Annotated[list[UploadFile], File(description="one or more images")]) -> dict:
        """Caption the uploaded images. A file that cannot be read gets an `error` in its result and
        the others are still captioned; only when no file can be read does the request fail."""
        if len(file) > max_files:
            raise HTTPException(413, f"{len(file)} files: at most {max_files} per request")
        t0 = time.perf_counter()
        with batcher.arriving() if batcher else contextlib.nullcontext():
            images, results = _read_uploads(file)
        if not images:  # nothing usable: the request as a whole fails, with the first reason
            first = results[0]
            raise HTTPException(first["status"], first["error"])
        if batcher:  # captioned together with the other requests ready now (server/batcher.py)
            try:
                out = batcher.submit([x for _, x in images], queue_timeout)
            except TimeoutError:
                raise HTTPException(503, f"busy: no turn at the model within {queue_timeout:g} s; try again",
                                    headers={"Retry-After": "5"}) from None
        else:
            with model_turn():
                out = captioner.caption_tensor(torch.stack([x for _, x in images]))
        for (i, _), r in zip(images, out):
            results[i].update(caption=r["caption"], logprob=r["logprob"], score=r["score"],
                              alternatives=r["alternatives"])
        for r in results:
            r.pop("status", None)
        return {"results": results, "seconds": round(time.perf_counter() - t0, 3)}

    def _read_uploads(files: list[UploadFile]) -> tuple[list, list[dict]]:
        """Decode and preprocess each upload in turn (one decoded image held at a time), within the
        request's pixel budget. -> [(result index, tensor)], [result per file]."""
        images, results, budget = [], [], max_request_pixels
        for up in files:
            name = up.filename or "upload"
            data = up.file.read(max_bytes + 1)
            if len(data) > max_bytes:
                results.append({"filename": name, "status": 413, "error": f"{name}: larger than {max_upload_mb:g} MB"})
                continue
            limit = min(max_pixels, budget)
            try:
                with pixels.hold(min(_declared_pixels(data), limit), queue_timeout):
                    img = open_rgb(data, limit, name=name, min_size=captioner.draft_size)
                    budget -= img.width * img.height
                    images.append((len(results), captioner.transform(img)))
                    del img
                results.append({"filename": name})
            except ImageError as e:
                too_big = "pixels" in str(e)
                if too_big and limit < max_pixels:
                    e = ImageError(f"{name}: over what is left of this request's budget of {max_request_pixels:,} "
                                   "decoded pixels; send it in another request")
                results.append({"filename": name, "status": 413 if too_big else 415, "error": str(e)})
            finally:
                del data
        return images, results

    def answer(query: str, found) -> dict:
        return {"query": query, "mode": found.mode, "total": found.total, "note": found.note,
                "results": [h | {"thumb": f"/api/thumb/{h['id']}"} for h in found.hits]}

    def library_db() -> Path:
        if db is None:
            raise HTTPException(404, "no photo library is loaded (start the server with --db FILE)")
        return db

    @app.get("/api/search", response_model=SearchResponse, responses=errors(404, 422, 503))
    def search_photos(q: Annotated[str, Query(min_length=1, max_length=200)],
                      limit: Annotated[int, Query(ge=1, le=200)] = 20,
                      mode: Annotated[Literal[SEARCH_MODES], Query(
                          description="keyword: the words of the captions; model: how well the captioning "
                                      "model says the words describe each photo; hybrid: both")] = DEFAULT_SEARCH_MODE
                      ) -> dict:
        """Photos of the library for the words of `q`, best first."""
        where = library_db()
        try:
            if mode == "keyword":
                return answer(q, search(where, q, limit))
            with model_turn():
                return answer(q, search(where, q, limit, mode=mode, captioner=captioner))
        except LibraryError as e:
            raise HTTPException(404, str(e)) from None

    @app.get("/api/search/like/{photo_id}", response_model=SearchResponse, responses=errors(404, 422, 503))
    def search_like_photo(photo_id: int, limit: Annotated[int, Query(ge=1, le=200)] = 20) -> dict:
        """Photos of the library that look like its photo `photo_id`, best first (itself first)."""
        where = library_db()
        try:
            return answer(str(photo_id), similar(where, None, limit, captioner=captioner, photo_id=photo_id))
        except LibraryError as e:
            raise HTTPException(404, str(e)) from None

    @app.post("/api/search/like", response_model=SearchResponse, responses=errors(404, 413, 415, 422, 503))
    def search_like(file: Annotated[UploadFile, File(description="an example photo")],
                    limit: Annotated[int, Query(ge=1, le=200)] = 20) -> dict:
        """Photos of the library that look like the uploaded one, best first."""
        where = library_db()
        name = file.filename or "upload"
        data = file.file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"{name}: larger than {max_upload_mb:g} MB")
        try:
            with pixels.hold(min(_declared_pixels(data), max_pixels), queue_timeout):
                img = open_rgb(data, max_pixels, name=name, min_size=captioner.draft_size)
                with model_turn():
                    return answer(name, similar(where, img, limit, captioner=captioner))
        except ImageError as e:
            raise HTTPException(413 if "pixels" in str(e) else 415, str(e)) from None
        except LibraryError as e:
            raise HTTPException(404, str(e)) from None

    @app.get("/api/thumb/{photo_id}", response_class=Response, responses={
        200: {"content": {"image/jpeg": {}}, "description": "the photo as a JPEG, at most `size` pixels a side"},
        **errors(404, 422)})
    def thumbnail(photo_id: int, size: Annotated[int, Query(ge=32, le=2048)] = 256) -> Response:
        try:
            path = photo_path(db, photo_id) if db else None
        except LibraryError as e:
            raise HTTPException(404, str(e)) from None
        if path is None:
            raise HTTPException(404, f"no photo {photo_id} in the library")
        try:
            img = open_rgb(path)
        except ImageError as e:
            raise HTTPException(404, str(e)) from None
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        return Response(buf.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> FileResponse:
        return FileResponse(STATIC / "docs.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _declared_pixels(data: bytes) -> int:
    """Width x height from an image's header, without decoding it (0 when there is no header to read:
    open_rgb then says what is wrong)."""
    from PIL import Image

    from captioner.data.images import allowed_formats

    try:
        with Image.open(io.BytesIO(data), formats=allowed_formats()) as im:
            return im.width * im.height
    except Exception:
        return 0


TRIM_ABOVE = 4_000_000  # decoded pixels after which freed memory is handed back to the system


class _PixelPool:
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
                _give_back_freed_memory()
            with self.cond:
                self.used -= n
                self.cond.notify_all()


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _give_back_freed_memory() -> None:
    """Return the memory of a decoded image to the system. glibc keeps freed memory in per-thread
    arenas, and the server decodes in many threads: without this, each thread would keep the
    largest image it ever decoded (16 parallel 40-megapixel uploads left 5 GB held)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _hostname(host: str) -> str:
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


class _Guard:
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
        host = _hostname(headers.get("host", ""))
        if "*" not in self.hosts and host not in self.hosts and not _is_ip(host):
            return await _json_error(400, f"this server does not answer to host {host!r} (start it with "
                                          f"--allowed-host {host or 'NAME'} to allow it)")(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return await _json_error(413, f"request of {int(length):,} bytes is over the limit")(scope, receive, send)
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
                await _json_error(413, e.detail)(scope, receive, send)


def _json_error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def serve(captioner, db: Path | None, host: str = "127.0.0.1", port: int = 8000, *,
          allowed_hosts: Sequence[str] = (), header_timeout: float = 10.0, max_upload_mb: float = 20.0,
          batch_wait_ms: float = 5.0) -> None:
    """Run the app with uvicorn until interrupted. It answers to this machine's names, the address
    it listens on, IP addresses, and `allowed_hosts`."""
    import socket

    import uvicorn

    if db is not None and not Path(db).is_file():
        raise LibraryError(f"{db}: no such database (make one with: captioner index FOLDER --db {db})")
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be 1 to 65535, not {port}")
    hosts = [*LOCAL_HOSTS, *allowed_hosts, host, socket.gethostname(), socket.getfqdn()]
    # bounded: at most 64 connections at once (more get 503), idle keep-alive connections closed after
    # 5 s, and a connection that has not sent a request's headers within `header_timeout` s is closed
    app = create_app(captioner, db, allowed_hosts=hosts, max_upload_mb=max_upload_mb, batch_wait_ms=batch_wait_ms)
    uvicorn.run(app, host=host, port=port, log_level="info", limit_concurrency=64, timeout_keep_alive=5,
                http=_protocol(header_timeout))


def _protocol(header_timeout: float):
    """uvicorn's HTTP/1.1 protocol, closing connections that are slow to send their headers (so that
    connections which never finish a request cannot hold every slot: slowloris)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _deadline = None
        _waiting_for = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._waiting_for = self.cycle  # until a new request cycle starts, its headers are awaited
            self._deadline = self.loop.call_later(header_timeout, self._too_slow)

        def handle_events(self) -> None:
            super().handle_events()
            if self._deadline is not None and self.cycle is not self._waiting_for:  # headers complete
                self._deadline.cancel()
                self._deadline = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def _too_slow(self) -> None:
            self._deadline = None
            if self.cycle is self._waiting_for and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

    return Protocol
