"""A photo library: the caption of every photo under some folders, in SQLite, searchable by words.

One file, readable with the ``sqlite3`` shell:

    photos(id, path, sha1, size, mtime, caption, alternatives, model, indexed_at)
        one row per captioned photo; `alternatives` is JSON [{"caption", "logprob", "score"}, ...]
    photos_fts(caption, alternatives)       FTS5 full-text index, rowid = photos.id,
        Porter stemming so "dogs" finds "dog" and "running" finds "runs"
    failures(path, size, mtime, error)      files that could not be read, and why
    meta(key, value)                        schema version

Indexing is incremental: a file whose size and modification time are unchanged is skipped, one
whose bytes are unchanged (same SHA-1) only has its time updated, a changed one is captioned
again, and photos whose files are gone are dropped. Every batch is written in one transaction,
so an interrupted run leaves a consistent database and the next run finishes the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from captioner.data.images import list_images
from captioner.data.vocab import tokenize
from captioner.errors import LibraryError
from captioner.files import path_text, readable_digest

if TYPE_CHECKING:
    from captioner.decode import Decoding

SCHEMA_VERSION = "1"
SCHEMA = """
CREATE TABLE IF NOT EXISTS photos (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    sha1 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    caption TEXT NOT NULL,
    alternatives TEXT NOT NULL DEFAULT '[]',
    model TEXT NOT NULL,
    indexed_at REAL NOT NULL
);
CREATE VIRTUAL TABLE IF NOT EXISTS photos_fts USING fts5(caption, alternatives, tokenize = 'porter unicode61');
CREATE TABLE IF NOT EXISTS failures (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    error TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
MAX_LIMIT = 100_000  # photos one search returns at most
# Words too common in captions to say anything about a photo; dropped from queries.
STOPWORDS = frozenset("a an the of on in at to and or with is are be by for from its it this that there".split())


def connect(db: Path, create: bool = True) -> sqlite3.Connection:
    """Open a library database: with `create`, for indexing (made when missing or empty), else
    read-only, for searching (it works on read-only storage too).

    A database captioner did not make is refused, never changed (no tables added, no journal mode
    switched), and so is one made by another schema version."""
    db = Path(db)
    exists = db.is_file() and db.stat().st_size > 0
    if not create and not exists:
        raise LibraryError(f"{db}: no such database (make one with: captioner index FOLDER --db {db})")
    if db.exists() and not db.is_file():
        raise LibraryError(f"{db}: not a file")
    try:
        if exists:
            with db.open("rb") as f:  # before SQLite reads it, which would only say "file is not a database"
                if f.read(16) != b"SQLite format 3\x00":
                    raise LibraryError(f"{db}: not an SQLite database; choose another --db")
            ro = _open_read_only(db)
            try:
                _check_ours(db, ro)
            except BaseException:
                ro.close()
                raise
            if not create:
                return ro  # searching: the connection the check was made on
            ro.close()
        con = sqlite3.connect(db, timeout=30)
        con.execute("PRAGMA journal_mode=WAL")  # readers (the web page) never block the indexer
        con.execute("PRAGMA synchronous=NORMAL")
        con.executescript(SCHEMA)
        con.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        con.commit()
        return con
    except sqlite3.DatabaseError as e:
        raise LibraryError(f"{db}: not a usable SQLite database ({e})") from None


def _check_ours(db: Path, con: sqlite3.Connection) -> None:
    """Refuse (without writing to it) a database that is not a photo library of this schema; `con`
    is a read-only connection to it."""
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
    version = (con.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
               if {"meta", "photos"} <= tables else None)
    if version is None:
        shown = ", ".join(sorted(tables)[:5]) or "no tables"
        raise LibraryError(f"{db}: not a captioner photo database (it holds {shown}); it is left as it is: "
                           "choose another --db")
    if version[0] != SCHEMA_VERSION:
        raise LibraryError(f"{db}: made by another version of captioner (schema {version[0]}, this one reads "
                           f"{SCHEMA_VERSION}); index into a new --db")


def _open_read_only(db: Path) -> sqlite3.Connection:
    uri = db.resolve().as_uri()
    try:
        con = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30)
        con.execute("SELECT 1 FROM sqlite_master").fetchone()
        return con
    except sqlite3.OperationalError:  # read-only storage: a WAL database cannot make its -shm file
        return sqlite3.connect(f"{uri}?immutable=1", uri=True)


@dataclass
class IndexReport:
    captioned: int = 0
    unchanged: int = 0
    touched: int = 0  # same bytes, new modification time
    removed: int = 0
    failed: list[str] = field(default_factory=list)  # one line per unreadable file
    seconds: float = 0.0


def _plan(con: sqlite3.Connection, files: list[Path], report: IndexReport
          ) -> tuple[list[tuple[Path, os.stat_result, str]], list[tuple[str, os.stat_result, str]]]:
    """Which files need captions: new or changed ones. Unchanged files are counted and skipped;
    files that cannot be read are returned as failures [(path, stat, error)]."""
    known = {p: (s, m, h) for p, s, m, h in con.execute("SELECT path, size, mtime, sha1 FROM photos")}
    bad = {p: (s, m) for p, s, m in con.execute("SELECT path, size, mtime FROM failures")}
    todo, unreadable = [], []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue  # vanished while we looked
        key = path_text(f)
        if key in known and known[key][:2] == (st.st_size, st.st_mtime):
            report.unchanged += 1
            continue
        if key in bad and bad[key] == (st.st_size, st.st_mtime):
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


def _remove_missing(con: sqlite3.Connection, roots: Sequence[Path], present: set[str]) -> int:
    """Drop photos (and failure records) under `roots` whose files are gone. Returns how many photos."""

    def gone(path: str) -> bool:
        return path not in present and any(Path(path).is_relative_to(r) for r in roots) and not Path(path).exists()

    photos = [pid for pid, path in con.execute("SELECT id, path FROM photos") if gone(path)]
    bad = [path for (path,) in con.execute("SELECT path FROM failures") if gone(path)]
    with con:
        for pid in photos:
            con.execute("DELETE FROM photos_fts WHERE rowid = ?", (pid,))
            con.execute("DELETE FROM photos WHERE id = ?", (pid,))
        con.executemany("DELETE FROM failures WHERE path = ?", [(p,) for p in bad])
    return len(photos)


def _write_batch(con: sqlite3.Connection, rows: list[tuple], failures: list[tuple], model: str) -> None:
    """One transaction: upsert captioned photos (and their full-text rows) and failures."""
    now = time.time()
    with con:
        for path, st, sha1, result in rows:
            alts = result.get("alternatives", [])[1:]
            prev = con.execute("SELECT id FROM photos WHERE path = ?", (path,)).fetchone()
            if prev:
                con.execute("DELETE FROM photos_fts WHERE rowid = ?", prev)
                con.execute("DELETE FROM photos WHERE id = ?", prev)
            cur = con.execute(
                "INSERT INTO photos (path, sha1, size, mtime, caption, alternatives, model, indexed_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (path, sha1, st.st_size, st.st_mtime, result["caption"], json.dumps(alts), model, now))
            con.execute("INSERT INTO photos_fts (rowid, caption, alternatives) VALUES (?, ?, ?)",
                        (cur.lastrowid, result["caption"], "\n".join(a["caption"] for a in alts)))
            con.execute("DELETE FROM failures WHERE path = ?", (path,))
        for path, st, error in failures:
            con.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?)", (path, st.st_size, st.st_mtime, error))


def index_folders(captioner, roots: Sequence[Path], db: Path, *, batch_size: int = 32, progress: bool = True,
                  decoding: Decoding | None = None) -> IndexReport:
    """Caption every image under `roots` into the database at `db` with `decoding` (else the
    model's own; see the module docstring)."""
    t0 = time.perf_counter()
    roots = [Path(os.path.abspath(r)) for r in roots]  # not resolved: a photo is known by the path it is found at
    for r in roots:
        if not r.exists():
            raise FileNotFoundError(f"{r}: no such folder")
    con = connect(db)
    try:
        return _index(captioner, roots, con, batch_size, progress, decoding, t0)
    except sqlite3.DatabaseError as e:  # disk full, read-only: each batch was one transaction, so all done is kept
        raise LibraryError(f"{db}: {e}; the photos indexed so far are kept: run again to finish") from None
    finally:
        con.close()


def _index(captioner, roots: list[Path], con: sqlite3.Connection, batch_size: int, progress: bool,
           decoding: Decoding | None, t0: float) -> IndexReport:
    report = IndexReport()
    # the paths as found (symlinks kept): a link that is removed takes its photo out of the library
    files = [Path(os.path.abspath(f)) for f in list_images(roots, recursive=True)]
    report.removed = _remove_missing(con, roots, {path_text(f) for f in files})
    todo, failures = _plan(con, files, report)
    report.failed += [error for _, _, error in failures]
    model = captioner.source
    by_path = {f: (st, sha1) for f, st, sha1 in todo}
    rows = []
    bar = tqdm(total=len(todo), desc="indexing", unit="img", disable=not progress)
    for path, result, error in captioner.caption_files([f for f, _, _ in todo], batch_size=batch_size,
                                                        decoding=decoding):
        st, sha1 = by_path[path]
        if error:
            failures.append((path_text(path), st, error))
            report.failed.append(error)
        else:
            rows.append((path_text(path), st, sha1, result))
            report.captioned += 1
        bar.update(1)
        if len(rows) + len(failures) >= batch_size:
            _write_batch(con, rows, failures, model)
            rows, failures = [], []
    _write_batch(con, rows, failures, model)
    bar.close()
    report.seconds = time.perf_counter() - t0
    return report


def fts_query(text: str) -> str:
    """User words -> an FTS5 query: every word may match (OR), BM25 ranks photos that match more
    and rarer words first. Common words are dropped unless nothing else is left."""
    words = tokenize(text)
    kept = [w for w in words if w not in STOPWORDS] or words
    return " OR ".join(f'"{w}"' for w in dict.fromkeys(kept))


@contextlib.contextmanager
def _reading(db: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection; a database damaged inside (bad pages, a broken index) is a one-line
    LibraryError, never a traceback or a server's 500."""
    con = connect(db, create=False)
    try:
        yield con
    except sqlite3.DatabaseError as e:
        raise LibraryError(f"{db}: damaged database ({e}); index into a new --db") from None
    finally:
        con.close()


def search(db: Path, text: str, limit: int = 20) -> list[dict]:
    """Photos whose captions match `text`, best first: [{"id", "path", "caption", "score"}]."""
    if not 1 <= limit <= MAX_LIMIT:
        raise LibraryError(f"the limit must be 1 to {MAX_LIMIT:,}, not {limit}")
    query = fts_query(text)
    if not query:
        return []
    with _reading(db) as con:
        rows = con.execute(
            "SELECT p.id, p.path, p.caption, -bm25(photos_fts, 1.0, 0.3) AS score"
            " FROM photos_fts JOIN photos p ON p.id = photos_fts.rowid"
            " WHERE photos_fts MATCH ? ORDER BY bm25(photos_fts, 1.0, 0.3) LIMIT ?", (query, limit)).fetchall()
    return [{"id": i, "path": p, "caption": c, "score": round(s, 4)} for i, p, c, s in rows]


def count_matches(db: Path, text: str) -> int:
    """How many photos `search` would find for `text` without a limit."""
    query = fts_query(text)
    if not query:
        return 0
    with _reading(db) as con:
        return con.execute("SELECT count(*) FROM photos_fts WHERE photos_fts MATCH ?", (query,)).fetchone()[0]


def photo_path(db: Path, photo_id: int) -> Path | None:
    """The file of photo `photo_id`, or None when the database has no such photo."""
    if not 0 < photo_id < 2**63:
        return None
    with _reading(db) as con:
        row = con.execute("SELECT path FROM photos WHERE id = ?", (photo_id,)).fetchone()
    return Path(row[0]) if row else None
