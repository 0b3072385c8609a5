"""The library's database: its schema, opening it (refusing a database captioner did not make), the
one transaction that writes a batch of captioned photos, and the reads every search shares.

One file, readable with the ``sqlite3`` shell:

    photos(id, path, sha1, size, mtime, caption, alternatives, model, indexed_at)
        one row per captioned photo; `alternatives` is JSON [{"caption", "logprob", "score"}, ...]
    photos_fts(caption, alternatives)       FTS5 full-text index, rowid = photos.id,
        Porter stemming so "dogs" finds "dog" and "running" finds "runs"
    vectors(id, model, words)               per photo (id = photos.id), the model's expected word
        counts (see retrieval.py), read for every photo at every model search; `model` is the
        fingerprint of the model that made them, so two models' numbers are never mixed
    pooled(id, data)                        its pooled feature, unit length (search by example photo
                                            with a model that has no search space; none with one)
    space(id, data)                         its point in the model's search space (model/embedding.py),
                                            float16, unit length: stage 1 of every search by meaning,
                                            read in blocks; none for a model without a space
    features(id, data)                      the encoder's output, 8-bit (read for the photos re-ranked;
                                            none with index --no-features)
        (three tables, so that a scan of the small rows never walks the large ones' pages)
    terms(word, id, score)                  what the encoder's ImageNet classifier recognises in photo `id`
        (tags.py): each tag word and hypernym ("cat", "feline", "animal") and its plural, with its
        score; keyword search adds them to the captions' BM25
    failures(path, size, mtime, error)      files that could not be read, and why
    meta(key, value)                        schema version
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from captioner.errors import LibraryError

SCHEMA_VERSION = "4"
# 1: before model search (no vectors), 2: before tags (no terms), 3: before the search space (no space);
# opened for indexing, each becomes 4
READABLE_SCHEMAS = ("1", "2", "3", "4")
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
CREATE TABLE IF NOT EXISTS vectors (id INTEGER PRIMARY KEY, model TEXT NOT NULL, words BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS pooled (id INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS features (id INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS space (id INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS terms (word TEXT NOT NULL, id INTEGER NOT NULL, score REAL NOT NULL);
CREATE INDEX IF NOT EXISTS terms_by_word ON terms (word);
CREATE INDEX IF NOT EXISTS terms_by_id ON terms (id);
CREATE TABLE IF NOT EXISTS failures (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    error TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
MAX_LIMIT = 100_000  # photos one search returns at most


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
        con.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))  # tables added above
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
    if version[0] not in READABLE_SCHEMAS:
        raise LibraryError(f"{db}: made by another version of captioner (schema {version[0]}, this one reads "
                           f"{', '.join(READABLE_SCHEMAS)}); index into a new --db")


def _open_read_only(db: Path) -> sqlite3.Connection:
    uri = db.resolve().as_uri()
    try:
        con = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30)
        con.execute("SELECT 1 FROM sqlite_master").fetchone()
        return con
    except sqlite3.OperationalError:  # read-only storage: a WAL database cannot make its -shm file
        return sqlite3.connect(f"{uri}?immutable=1", uri=True)


@contextlib.contextmanager
def reading(db: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection; a database damaged inside (bad pages, a broken index) is a one-line
    LibraryError, never a traceback or a server's 500."""
    con = connect(db, create=False)
    try:
        yield con
    except sqlite3.DatabaseError as e:
        raise LibraryError(f"{db}: damaged database ({e}); index into a new --db") from None
    finally:
        con.close()


def write_batch(con: sqlite3.Connection, rows: list[tuple], failures: list[tuple], source: str,
                 vectors: list[tuple[bytes | None, bytes | None, bytes, bytes | None]], model: str) -> None:
    """One transaction: upsert captioned photos (their full-text rows and vectors, made by the model
    with fingerprint `model`, loaded from `source`) and failures."""
    now = time.time()
    with con:
        for (path, st, sha1, result), (features, pooled, words, point) in zip(rows, vectors, strict=True):
            alts = result.get("alternatives", [])[1:]
            prev = con.execute("SELECT id FROM photos WHERE path = ?", (path,)).fetchone()
            if prev:
                delete_photo(con, prev[0])
            cur = con.execute(
                "INSERT INTO photos (path, sha1, size, mtime, caption, alternatives, model, indexed_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (path, sha1, st.st_size, st.st_mtime, result["caption"], json.dumps(alts), source, now))
            con.execute("INSERT INTO photos_fts (rowid, caption, alternatives) VALUES (?, ?, ?)",
                        (cur.lastrowid, result["caption"], "\n".join(a["caption"] for a in alts)))
            con.execute("INSERT INTO vectors (id, model, words) VALUES (?, ?, ?)", (cur.lastrowid, model, words))
            if pooled is not None:  # None: the model has a search space, which --like goes through
                con.execute("INSERT INTO pooled (id, data) VALUES (?, ?)", (cur.lastrowid, pooled))
            if features is not None:  # None: indexed with --no-features
                con.execute("INSERT INTO features (id, data) VALUES (?, ?)", (cur.lastrowid, features))
            if point is not None:
                con.execute("INSERT INTO space (id, data) VALUES (?, ?)", (cur.lastrowid, point))
            con.executemany("INSERT INTO terms (word, id, score) VALUES (?, ?, ?)",
                            [(w, cur.lastrowid, score) for w, score in result.get("terms", {}).items()])
            con.execute("DELETE FROM failures WHERE path = ?", (path,))
        for path, st, error in failures:
            con.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?)", (path, st.st_size, st.st_mtime, error))


def delete_photo(con: sqlite3.Connection, pid: int) -> None:
    con.execute("DELETE FROM photos_fts WHERE rowid = ?", (pid,))
    for table in ("vectors", "pooled", "features", "space", "terms"):
        con.execute(f"DELETE FROM {table} WHERE id = ?", (pid,))
    con.execute("DELETE FROM photos WHERE id = ?", (pid,))


def table_rows(con: sqlite3.Connection, sql: str, args: tuple = ()) -> list:
    try:
        return con.execute(sql, args).fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):  # schema 1 or 2: made before model search or tags
            return []
        raise


def by_id(con: sqlite3.Connection, sql: str, ids) -> dict[int, tuple]:
    """Rows of `sql` (which selects id first and ends in "WHERE id IN ({})") for `ids`, by id, a
    bounded number of parameters at a time."""
    out = {}
    ids = [int(i) for i in ids]
    for start in range(0, len(ids), 500):
        part = ids[start:start + 500]
        out.update({r[0]: r[1:] for r in con.execute(sql.format(",".join("?" * len(part))), part)})
    return out


def indexed_by(db: Path) -> tuple[str | None, bool]:
    """The model (a folder, or "shipped") that captioned most of the photos in `db`, and whether any
    photo has what model search needs (none has in a library made before it, or an empty one)."""
    with reading(db) as con:
        row = con.execute("SELECT model FROM photos GROUP BY model ORDER BY count(*) DESC LIMIT 1").fetchone()
        vectors = bool(table_rows(con, "SELECT 1 FROM vectors LIMIT 1"))
    return (row[0] if row else None), vectors


def photo_path(db: Path, photo_id: int) -> Path | None:
    """The file of photo `photo_id`, or None when the database has no such photo."""
    if not 0 < photo_id < 2**63:
        return None
    with reading(db) as con:
        row = con.execute("SELECT path FROM photos WHERE id = ?", (photo_id,)).fetchone()
    return Path(row[0]) if row else None
