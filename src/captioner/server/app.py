"""`captioner serve`: a web page and a REST API over one loaded model (and a photo library).

    GET  /                  the page: drop photos to caption them; search the library
    POST /api/caption       multipart field `file`, repeatable -> captions, alternatives, tags, seconds
    GET  /api/search?q=     photos of the library for some words, best first (&mode=keyword|embedding|model|hybrid)
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
import functools
import hashlib
import io
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import torch
from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from captioner import __version__
from captioner.data.images import MAX_PIXELS, open_rgb
from captioner.data.urls import fetch
from captioner.decoding import MAX_BEAM, MAX_LENGTH_NORM, MAX_RARITY_PENALTY, MAX_SPACE_RERANK, Decoding
from captioner.errors import ConfigError, ImageError, ImageTooLarge, LibraryError
from captioner.library import photo_path, search, similar
from captioner.names import DEFAULT_SEARCH_MODE, SEARCH_MODES
from captioner.server.batcher import Batcher
from captioner.server.guards import LOCAL_HOSTS, Guard, PixelPool, busy, declared_pixels
from captioner.server.schema import CaptionResponse, Health, SearchResponse, errors

STATIC = Path(__file__).parent / "static"
LIMIT = Annotated[int, Query(ge=1, le=200)]  # photos one search answers with
# decoding settings a caption request may change (default: the model's own decoding, decoding.json)
BEAM = Annotated[int | None, Query(ge=1, le=MAX_BEAM, description="1: greedy; default: the model's own decoding")]
LENGTH_NORM = Annotated[float | None, Query(ge=0, le=MAX_LENGTH_NORM, description="rank finished beams by logprob / "
                                                                                  "length^this")]
SPACE_RERANK = Annotated[float | None, Query(ge=0, le=MAX_SPACE_RERANK, description="order the beams by score + "
                                             "this x their match with the photo in the search space; 0: by score")]
RARITY_PENALTY = Annotated[float | None, Query(ge=0, le=MAX_RARITY_PENALTY, description="... minus this x how rare "
                                               "their words are in the vocabulary; 0: off")]
MODE = Annotated[Literal[SEARCH_MODES], Query(description="keyword: the words of the captions; embedding: the "
                                              "words and each photo compared in the model's search space; model: how "
                                              "well the captioning model says the words describe each photo; hybrid: "
                                              "all of them added up")]


def create_app(captioner, db: Path | None = None, *, max_upload_mb: float = 20.0, max_pixels: int = 40_000_000,
               max_files: int = 16, queue_timeout: float = 30.0, allowed_hosts: Sequence[str] = LOCAL_HOSTS,
               max_request_pixels: int = 200_000_000, batch_wait_ms: float = 5.0, max_batch: int = 16,
               allow_private_urls: bool = False) -> FastAPI:
    """The app, around a loaded `Captioner` (loaded once, shared by every request). A caption
    request that waits more than `queue_timeout` seconds for the model gets a 503 with
    Retry-After rather than an ever longer queue.

    `allowed_hosts`: the names the Host header may give ("*": any). An upload may decode to at most
    `max_pixels`, all the files of one request together to `max_request_pixels`, and all requests
    together hold at most `max_pixels` decoded pixels at once (the others wait, then get 503), so
    memory stays bounded however many requests arrive.

    Caption requests that are ready together are captioned in one model call of at most `max_batch`
    images, waiting at most `batch_wait_ms` for requests still reading their uploads
    (server/batcher.py); 0 captions each request on its own.

    Images given by address (`url`) are fetched from public addresses only (data/urls.py), unless
    `allow_private_urls`: the server would otherwise fetch from its own network for anyone."""
    _check_settings(max_upload_mb=(max_upload_mb, 0, 1000), queue_timeout=(queue_timeout, 0, 3600),
                    batch_wait_ms=(batch_wait_ms, -1e-9, 1000), max_pixels=(max_pixels, 0, 1e10),
                    max_request_pixels=(max_request_pixels, 0, 1e11), max_files=(max_files, 0, 10_000),
                    max_batch=(max_batch, 0, 10_000))
    app = FastAPI(title="captioner", version=__version__, docs_url=None, redoc_url=None,  # theirs need a CDN
                  description="Caption photos with a CNN + LSTM model, and search a captioned photo library. "
                              "Every error is JSON {\"detail\": \"...\"}.")
    work = _Service(captioner, Path(db) if db else None, max_upload_mb, max_pixels, max_files, queue_timeout,
                    max_request_pixels, batch_wait_ms, max_batch, allow_private_urls)
    # outermost (added last): checks the Host header and counts body bytes before anything reads them
    app.add_middleware(Guard, hosts={h.lower().strip("[]") for h in allowed_hosts if h},
                       limit=work.max_bytes * max_files + 65_536)  # + room for the multipart framing

    @app.get("/health", response_model=Health)
    def health() -> dict:
        return {"status": "ok", "model": captioner.source, "decoder": captioner.model.cfg.decoder,
                "library": str(work.db) if work.db else None}

    @app.post("/api/caption", response_model=CaptionResponse, response_model_exclude_none=True,
              responses=errors(413, 415, 422, 503))
    def caption(file: Annotated[list[UploadFile] | None, File(description="one or more images")] = None,
                url: Annotated[list[str] | None, Form(description="http(s) addresses of images, fetched by the "
                                                      "server (public addresses only, unless its operator "
                                                      "allows others)")] = None,
                beam_size: BEAM = None, length_norm: LENGTH_NORM = None,
                block_trigrams: Annotated[bool | None, Query(description="never repeat a word trigram")] = None,
                tags: Annotated[bool | None, Query(description="false: leave the encoder's tags out of the "
                                                   "search (they are still reported)")] = None,
                space_rerank: SPACE_RERANK = None, rarity_penalty: RARITY_PENALTY = None,
                alternatives: Annotated[int | None, Query(ge=0, le=MAX_BEAM, description="at most this many "
                                                          "alternatives (beams) a result; default: all")] = None,
                ) -> dict:
        """Caption the uploaded images (`file`) and the images at the addresses `url`, with the
        model's own decoding unless the query changes it (the settings and checks of `captioner
        caption`). A file that cannot be read or fetched gets an `error` in its result and the
        others are still captioned; only when no file can be read does the request fail."""
        if not file and not url:
            raise HTTPException(422, "send images in the multipart field 'file', or addresses in 'url'")
        try:
            decoding = captioner.decoding.changed(beam_size=beam_size, length_norm=length_norm,
                                                  block_trigrams=block_trigrams,
                                                  tag_threshold=0.0 if tags is False else None,
                                                  space_rerank=space_rerank, rarity_penalty=rarity_penalty)
        except ConfigError as e:
            raise HTTPException(422, str(e)) from None
        return work.caption(file or [], decoding, alternatives, url or [])

    @app.get("/api/search", response_model=SearchResponse, responses=errors(404, 422, 503))
    def search_photos(q: Annotated[str, Query(min_length=1, max_length=200)], limit: LIMIT = 20,
                      mode: MODE = DEFAULT_SEARCH_MODE) -> dict:
        """Photos of the library for the words of `q`, best first."""
        return work.search(q, limit, mode)

    @app.get("/api/search/like/{photo_id}", response_model=SearchResponse, responses=errors(404, 422, 503))
    def search_like_photo(photo_id: int, limit: LIMIT = 20) -> dict:
        """Photos of the library that look like its photo `photo_id`, best first (itself left out)."""
        return work.like(str(photo_id), None, limit, photo_id)

    @app.post("/api/search/like", response_model=SearchResponse, responses=errors(404, 413, 415, 422, 503))
    def search_like(file: Annotated[UploadFile, File(description="an example photo")], limit: LIMIT = 20) -> dict:
        """Photos of the library that look like the uploaded one, best first."""
        return work.like_upload(file, limit)

    @app.get("/api/thumb/{photo_id}", response_class=Response, responses={
        200: {"content": {"image/jpeg": {}}, "description": "the photo as a JPEG, at most `size` pixels a side"},
        **errors(404, 422)})
    def thumbnail(photo_id: int, size: Annotated[int, Query(ge=32, le=2048)] = 256) -> Response:
        return work.thumbnail(photo_id, size)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> FileResponse:
        return FileResponse(STATIC / "docs.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _check_settings(**settings: tuple[float, float, float]) -> None:
    """Each setting (value, low, high) a finite number above low and at most high, else a one-line
    ConfigError: an infinite batch wait once killed the batcher thread, 0 MB refused every upload."""
    for name, (value, low, high) in settings.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and low < value <= high):
            least = "from 0" if low < 0 else f"above {low:g}"
            raise ConfigError(f"{name} must be a number {least} and at most {high:g}, not {value!r}")


class _Service:
    """What the routes do, around the one loaded model: captioning uploads (batched across requests,
    within the pixel budgets), searching the library, thumbnails. Errors are HTTPExceptions."""

    def __init__(self, captioner, db: Path | None, max_upload_mb: float, max_pixels: int, max_files: int,
                 queue_timeout: float, max_request_pixels: int, batch_wait_ms: float, max_batch: int,
                 allow_private_urls: bool = False):
        self.captioner, self.db, self.max_files = captioner, db, max_files
        self.allow_private_urls = allow_private_urls
        self.max_upload_mb, self.max_bytes = max_upload_mb, int(max_upload_mb * 1024 * 1024)
        self.max_pixels, self.max_request_pixels, self.queue_timeout = max_pixels, max_request_pixels, queue_timeout
        self.lock = threading.Lock()  # one inference at a time: the CPU's threads are already all in use
        self.pixels = PixelPool(max_pixels)  # decoded pixels held at once, over all requests: bounded memory
        self.batcher = (Batcher(self._caption_batch, max_images=max_batch, wait_s=batch_wait_ms / 1000)
                        if batch_wait_ms > 0 else None)

    def _caption_batch(self, x: torch.Tensor) -> list[dict]:
        with self.lock, torch.no_grad():  # the model is shared with search; no_grad: see model_turn
            return self.captioner.caption_tensor(x)

    @contextlib.contextmanager
    def model_turn(self):
        if not self.lock.acquire(timeout=self.queue_timeout):
            raise busy("the model", self.queue_timeout)
        try:  # no_grad rather than inference_mode: under inference_mode bf16 autocast re-cast the weights at
            with torch.no_grad():  # every step (one photo, bf16, Zen 4: 34 ms against 27; batches and fp32 alike)
                yield
        finally:
            self.lock.release()

    def caption(self, files: list[UploadFile], decoding: Decoding | None = None, alternatives: int | None = None,
                urls: Sequence[str] = ()) -> dict:
        """Caption `files` and the images at `urls` with `decoding` (the model's own when None),
        each result with at most `alternatives` beams (all when None)."""
        decoding = decoding or self.captioner.decoding
        if len(files) + len(urls) > self.max_files:
            raise HTTPException(413, f"{len(files) + len(urls)} files: at most {self.max_files} per request")
        t0 = time.perf_counter()
        # fetched before the batcher waits for this request (a slow site would hold every batch)
        fetched = [(u, self._fetch(u)) for u in urls]
        with self.batcher.arriving() if self.batcher else contextlib.nullcontext():
            sources = [(up.filename or "upload", functools.partial(up.file.read, self.max_bytes + 1))
                       for up in files] + [(u, functools.partial(lambda got: got, got)) for u, got in fetched]
            images, results = self._read_uploads(sources)
        if not images:  # nothing usable: the request as a whole fails, with the first reason
            first = results[0]
            raise HTTPException(first["status"], first["error"])
        if self.batcher and decoding == self.captioner.decoding:  # with the other requests ready now (batcher.py)
            try:
                out = self.batcher.submit([x for _, x in images], self.queue_timeout)
            except TimeoutError:
                raise busy("the model", self.queue_timeout) from None
        else:
            with self.model_turn():  # a decoding of its own: the batcher's batches share the model's
                out = self.captioner.caption_tensor(torch.stack([x for _, x in images]), decoding=decoding)
        for (i, _), r in zip(images, out):
            results[i].update(caption=r["caption"], logprob=r["logprob"], score=r["score"],
                              alternatives=r["alternatives"][:alternatives],
                              **{k: r[k] for k in ("tags", "disagrees") if k in r})
        for r in results:
            r.pop("status", None)
        return {"results": results, "seconds": round(time.perf_counter() - t0, 3)}

    def _fetch(self, url: str) -> bytes | dict:
        """The bytes at `url` (data/urls.py), or its result: {"filename", "status", "error"}."""
        try:
            return fetch(url, self.max_bytes, timeout=min(self.queue_timeout, 20.0),
                         public_only=not self.allow_private_urls)
        except ImageTooLarge as e:
            return {"filename": url, "status": 413, "error": str(e)}
        except ImageError as e:
            return {"filename": url, "status": 422, "error": str(e)}

    def _read_uploads(self, sources: list) -> tuple[list, list[dict]]:
        """Decode and preprocess each upload in turn (one decoded image held at a time), within the
        request's pixel budget. `sources`: [(name, a function that reads its bytes, or gives the
        result of a fetch that failed)]. -> [(result index, tensor)], [result per file]."""
        images, results, budget = [], [], self.max_request_pixels
        for name, read in sources:
            data = read()
            if isinstance(data, dict):  # an address that could not be fetched
                results.append(data)
                continue
            if len(data) > self.max_bytes:
                results.append({"filename": name, "status": 413,
                                "error": f"{name}: larger than {self.max_upload_mb:g} MB"})
                continue
            limit = min(self.max_pixels, budget)
            try:
                with self.pixels.hold(min(declared_pixels(data, self.captioner.draft_size), limit), self.queue_timeout):
                    img = open_rgb(data, limit, name=name, min_size=self.captioner.draft_size)
                    budget -= img.width * img.height
                    images.append((len(results), self.captioner.transform(img)))
                    del img
                results.append({"filename": name})
            except ImageTooLarge as e:
                error = str(e) if limit == self.max_pixels else (
                    f"{name}: over what is left of this request's budget of {self.max_request_pixels:,} decoded "
                    "pixels; send it in another request")
                results.append({"filename": name, "status": 413, "error": error})
            except ImageError as e:
                results.append({"filename": name, "status": 415, "error": str(e)})
            finally:
                del data
        return images, results

    def library(self) -> Path:
        if self.db is None:
            raise HTTPException(404, "no photo library is loaded (start the server with --db FILE)")
        return self.db

    def search(self, q: str, limit: int, mode: str) -> dict:
        where = self.library()
        try:
            if mode == "keyword":
                return _answer(q, search(where, q, limit))
            with self.model_turn():
                return _answer(q, search(where, q, limit, mode=mode, captioner=self.captioner))
        except LibraryError as e:
            raise HTTPException(404, str(e)) from None

    def like(self, query: str, image, limit: int, photo_id: int | None = None, digest: str | None = None) -> dict:
        """Photos like `image` (whose file's SHA-1 is `digest`), or like the library's photo
        `photo_id`, the photo itself left out (a model turn is the caller's)."""
        try:
            return _answer(query, similar(self.library(), image, limit, captioner=self.captioner, photo_id=photo_id,
                                          digest=digest))
        except LibraryError as e:
            raise HTTPException(404, str(e)) from None

    def like_upload(self, file: UploadFile, limit: int) -> dict:
        self.library()
        name = file.filename or "upload"
        data = file.file.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise HTTPException(413, f"{name}: larger than {self.max_upload_mb:g} MB")
        try:
            with self.pixels.hold(min(declared_pixels(data, self.captioner.draft_size), self.max_pixels),
                                  self.queue_timeout):
                img = open_rgb(data, self.max_pixels, name=name, min_size=self.captioner.draft_size)
                with self.model_turn():
                    return self.like(name, img, limit, digest=hashlib.sha1(data).hexdigest())
        except ImageTooLarge as e:
            raise HTTPException(413, str(e)) from None
        except ImageError as e:
            raise HTTPException(415, str(e)) from None

    def thumbnail(self, photo_id: int, size: int) -> Response:
        try:
            path = photo_path(self.db, photo_id) if self.db else None
        except LibraryError as e:
            raise HTTPException(404, str(e)) from None
        if path is None:
            raise HTTPException(404, f"no photo {photo_id} in the library")
        # decoded within the same pixel budget as uploads, a JPEG at the smallest scale the size allows
        # (32 thumbnails of 48 MP photos at once took the server from 0.8 GB to 12.6 GB, whole-size decodes)
        try:
            with self.pixels.hold(min(declared_pixels(path, size), self.max_pixels), self.queue_timeout):
                img = open_rgb(path, max(self.max_pixels, MAX_PIXELS), min_size=size)
                img.thumbnail((size, size))
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=85)
                del img
        except ImageError as e:
            raise HTTPException(404, str(e)) from None
        return Response(buf.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


def _answer(query: str, found) -> dict:
    return {"query": query, "mode": found.mode, "total": found.total, "note": found.note,
            "results": [h | {"thumb": f"/api/thumb/{h['id']}"} for h in found.hits]}
