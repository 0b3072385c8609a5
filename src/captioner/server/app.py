"""`captioner serve`: a web page and a REST API over one loaded model (and a photo library).

    GET  /                  the page: drop photos to caption them; search the library
    POST /api/caption       multipart field `file`, repeatable -> captions, alternatives, seconds
    GET  /api/search?q=     photos of the library whose captions match, best first, and how many match
    GET  /api/thumb/{id}    a JPEG of a photo *in the library* (by id: no paths from clients), re-encoded
    GET  /health            model and library status
    GET  /openapi.json      the API schema (answers and errors typed: see server/schema.py)
    GET  /docs              the schema as a page (served from here, no CDN)

Errors are JSON ``{"detail": "..."}`` with a 4xx status: 413 for uploads over the byte or pixel
limits, 415 for files that are not images, 404 for unknown photos or when no library is loaded,
503 (with Retry-After) when the model is busy for longer than the queue timeout or more than 64
connections are open.
Everything the page needs is served from here: it works with no network at all.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Annotated

import torch
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from captioner import __version__
from captioner.data.images import ImageError, open_rgb
from captioner.library import LibraryError, count_matches, photo_path, search
from captioner.server.schema import CaptionResponse, Health, SearchResponse, errors

STATIC = Path(__file__).parent / "static"


def create_app(captioner, db: Path | None = None, *, max_upload_mb: float = 20.0, max_pixels: int = 40_000_000,
               max_files: int = 16, queue_timeout: float = 30.0) -> FastAPI:
    """The app, around a loaded `Captioner` (loaded once, shared by every request). A caption
    request that waits more than `queue_timeout` seconds for the model gets a 503 with
    Retry-After rather than an ever longer queue."""
    app = FastAPI(title="captioner", version=__version__, docs_url=None, redoc_url=None,  # theirs need a CDN
                  description="Caption photos with a CNN + LSTM model, and search a captioned photo library. "
                              "Every error is JSON {\"detail\": \"...\"}.")
    lock = threading.Lock()  # one inference at a time: the CPU's threads are already all in use
    max_bytes = int(max_upload_mb * 1024 * 1024)
    db = Path(db) if db else None

    @app.middleware("http")
    async def limit_request_size(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_bytes * max_files:
            return _json_error(413, f"request of {int(length):,} bytes is over the limit")
        return await call_next(request)

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
        images, results = [], []
        for up in file:
            name = up.filename or "upload"
            data = up.file.read(max_bytes + 1)
            if len(data) > max_bytes:
                results.append({"filename": name, "status": 413, "error": f"{name}: larger than {max_upload_mb:g} MB"})
                continue
            try:
                images.append((len(results), captioner.transform(open_rgb(data, max_pixels, name=name))))
                results.append({"filename": name})
            except ImageError as e:
                status = 413 if "pixels" in str(e) else 415
                results.append({"filename": name, "status": status, "error": str(e)})
        if not images:  # nothing usable: the request as a whole fails, with the first reason
            first = results[0]
            raise HTTPException(first["status"], first["error"])
        if not lock.acquire(timeout=queue_timeout):
            raise HTTPException(503, f"busy: no turn at the model within {queue_timeout:g} s; try again",
                                headers={"Retry-After": "5"})
        try:
            with torch.inference_mode():
                out = captioner.caption_tensor(torch.stack([x for _, x in images]))
        finally:
            lock.release()
        for (i, _), r in zip(images, out):
            results[i].update(caption=r["caption"], logprob=r["logprob"], score=r["score"],
                              alternatives=r["alternatives"])
        for r in results:
            r.pop("status", None)
        return {"results": results, "seconds": round(time.perf_counter() - t0, 3)}

    @app.get("/api/search", response_model=SearchResponse, responses=errors(404, 422))
    def search_photos(q: Annotated[str, Query(min_length=1, max_length=200)],
                      limit: Annotated[int, Query(ge=1, le=200)] = 20) -> dict:
        """Photos of the library whose captions match the words of `q`, best first."""
        if db is None:
            raise HTTPException(404, "no photo library is loaded (start the server with --db FILE)")
        try:
            hits = search(db, q, limit)
            total = count_matches(db, q)
        except LibraryError as e:
            raise HTTPException(404, str(e)) from None
        return {"query": q, "total": total, "results": [h | {"thumb": f"/api/thumb/{h['id']}"} for h in hits]}

    @app.get("/api/thumb/{photo_id}", response_class=Response, responses={
        200: {"content": {"image/jpeg": {}}, "description": "the photo as a JPEG, at most `size` pixels a side"},
        **errors(404, 422)})
    def thumbnail(photo_id: int, size: Annotated[int, Query(ge=32, le=2048)] = 256) -> Response:
        path = photo_path(db, photo_id) if db else None
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


def _json_error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def serve(captioner, db: Path | None, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    if db is not None and not Path(db).is_file():
        raise LibraryError(f"{db}: no such database (make one with: captioner index FOLDER --db {db})")
    # bounded: at most 64 connections at once (more get 503), idle keep-alive connections closed after 5 s
    uvicorn.run(create_app(captioner, db), host=host, port=port, log_level="info", limit_concurrency=64,
                timeout_keep_alive=5)
