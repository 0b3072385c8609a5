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
    points(model, first, ids, data)         the photos' points in the model's search space (model/embedding.py),
        float16, unit length: stage 1 of every search by meaning. Up to POINT_BLOCK photos a row (`ids`
        int64, `data` (n, D) float16, both ascending by id; `first` <= every id of the row, above every
        id of the model's rows before it): a million photos are a thousand rows, read in a fraction
        of a second, where a row a photo took seconds of Python for the rows alone. None for a model
        without a space.
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

import numpy as np

from captioner.data import wordcounts
from captioner.errors import LibraryError

SCHEMA_VERSION = "5"
# 1: before model search (no vectors), 2: before tags (no terms), 3: before the search space (no points),
# 4: a point a row (space(id, data)); opened for indexing, each becomes 5 (4's points moved into blocks)
READABLE_SCHEMAS = ("1", "2", "3", "4", "5")
POINT_BLOCK = 1024  # points a row of `points` holds: 2 MB of 1024-d float16 (two 512-d members)
PAGE_SIZE = 65536  # SQLite page of a new library (a million photos: 2,000 MB of points read a query)
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
CREATE TABLE IF NOT EXISTS points (
    model TEXT NOT NULL,
    first INTEGER NOT NULL,
    ids BLOB NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (model, first)
);
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
        if not exists:  # a search reads every 2 MB row of points: in 64 KB pages it follows 16x fewer
            con.execute(f"PRAGMA page_size={PAGE_SIZE}")  # overflow pages (2 GB read in 0.25 s, not 0.6)
        con.execute("PRAGMA journal_mode=WAL")  # readers (the web page) never block the indexer
        con.execute("PRAGMA synchronous=NORMAL")
        con.executescript(SCHEMA)
        with con:  # the tables added above, schema 4's points moved: all or nothing
            _move_schema_4_points(con)
            con.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        return con
    except sqlite3.DatabaseError as e:  # past the header check: an SQLite file damaged inside
        if exists:
            raise LibraryError(f"{db}: damaged database ({e}); index into a new --db") from None
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
    new_points: list[tuple[int, bytes]] = []
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
                new_points.append((cur.lastrowid, point))
            con.executemany("INSERT INTO terms (word, id, score) VALUES (?, ?, ?)",
                            [(w, cur.lastrowid, score) for w, score in result.get("terms", {}).items()])
            con.execute("DELETE FROM failures WHERE path = ?", (path,))
        if new_points:  # after the batch's deletions: every new id is above the model's stored ones
            _add_points(con, model, [i for i, _ in new_points], [p for _, p in new_points])
        for path, st, error in failures:
            con.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?)", (path, st.st_size, st.st_mtime, error))


def delete_photo(con: sqlite3.Connection, pid: int) -> None:
    con.execute("DELETE FROM photos_fts WHERE rowid = ?", (pid,))
    model = con.execute("SELECT model FROM vectors WHERE id = ?", (pid,)).fetchone()
    if model:
        _remove_point(con, model[0], pid)
    for table in ("vectors", "pooled", "features", "terms"):
        con.execute(f"DELETE FROM {table} WHERE id = ?", (pid,))
    con.execute("DELETE FROM photos WHERE id = ?", (pid,))


def point_blocks(con: sqlite3.Connection, model: str, damaged: list[int] | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The points of the photos model `model` indexed, a block at a time, ascending by id:
    (ids (n,) int64, points (n, D) float16). A row of `points` that is damaged (`sound_block`) is
    left out, and the number of photos it held appended to `damaged`. A schema-4 library (a row a
    point) opened read-only is read as it is, in blocks of POINT_BLOCK rows, and so is one whose
    move into blocks was cut short."""
    if _has_table(con, "space"):  # until indexing has moved them (`points` may be there, empty)
        yield from _schema_4_points(con, model)
    elif _has_table(con, "points"):
        yield from _blocks(con, model, damaged)


def _blocks(con: sqlite3.Connection, model: str, damaged: list[int] | None = None
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for first, ids, data in con.execute("SELECT first, ids, data FROM points WHERE model = ? ORDER BY first",
                                        (model,)):
        block = sound_block(first, ids, data)
        if block is not None:
            yield block
        elif damaged is not None:
            damaged.append(max(1, len(ids) // 8))


def sound_block(first: int, ids: bytes, data: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """A row of `points` -> (ids (n,) int64, points (n, D) float16), or None when it is damaged
    (SQLite's pages sound, a byte of the row changed): ids not whole int64s, not rising from
    `first`, or data not n points of one size. A point's values are checked where they are used
    (a cosine past 1: search.py; its length: `damaged_photos`)."""
    ids_ = _sound_ids(first, ids)
    if ids_ is None or not isinstance(data, bytes) or not data or len(data) % (2 * len(ids_)):
        return None
    return ids_, np.frombuffer(data, np.float16).reshape(len(ids_), -1)


def _sound_ids(first: int, ids: bytes) -> np.ndarray | None:
    """A row's ids (n,) int64, or None unless they are whole int64s rising from `first`."""
    if not isinstance(ids, bytes) or not ids or len(ids) % 8:
        return None
    ids_ = np.frombuffer(ids, np.int64)
    return ids_ if ids_[0] >= first and (ids_[1:] > ids_[:-1]).all() else None


def point_ids(con: sqlite3.Connection, model: str, damaged: list[int] | None = None) -> np.ndarray | None:
    """The ids of the photos model `model` has points for, ascending, from the blocks' ids alone
    (damaged rows left out and counted in `damaged`, as `point_blocks` does); None for a library
    without blocks (schema 4 or before)."""
    if _has_table(con, "space") or not _has_table(con, "points"):
        return None
    parts = []
    for first, ids in con.execute("SELECT first, ids FROM points WHERE model = ? ORDER BY first", (model,)):
        ids_ = _sound_ids(first, ids)
        if ids_ is not None:
            parts.append(ids_)
        elif damaged is not None:
            damaged.append(max(1, len(ids) // 8) if isinstance(ids, bytes) else 1)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def damaged_photos(con: sqlite3.Connection, model: str, vocab_size: int, max_len: int, remove: bool = True
                   ) -> list[int]:
    """The photos of model `model` whose stored search data is damaged, found and (with `remove`)
    taken out of the library, so that indexing captions them afresh, -> their ids: every photo of a
    `points` row that is not sound, a point that is not of unit length, word counts that are not
    finite counts. One pass over the points (2 KB a photo) and the word counts (384 bytes); the
    features (63 KB) are checked where a search reads them."""
    bad: set[int] = set()
    if _has_table(con, "points") and not _has_table(con, "space"):
        rows = con.execute("SELECT first, ids, data FROM points WHERE model = ? ORDER BY first", (model,)).fetchall()
        for k, (first, ids, data) in enumerate(rows):
            block = sound_block(first, ids, data)
            if block is None:  # the photos it held: every one of this model from its first id to the next row's
                end = rows[k + 1][0] if k + 1 < len(rows) else None
                if remove:
                    con.execute("DELETE FROM points WHERE model = ? AND first = ?", (model, first))
                bad.update(r[0] for r in con.execute(
                    "SELECT id FROM vectors WHERE model = ? AND id >= ? AND (? IS NULL OR id < ?)",
                    (model, first, end, end)))
                continue
            length = np.linalg.norm(block[1].astype(np.float32), axis=1)
            bad.update(block[0][~(np.abs(length - 1) < 0.01)].tolist())  # NaN too
    rows = con.execute("SELECT id, words FROM vectors WHERE model = ?", (model,)).fetchall()
    damaged = wordcounts.read_words([r[1] for r in rows], vocab_size, max_len)[2]
    bad.update(r[0] for r, d in zip(rows, damaged) if d)
    for pid in sorted(bad) if remove else ():
        delete_photo(con, pid)
    return sorted(bad)


def remembered_model(con: sqlite3.Connection, files: str | None) -> str | None:
    """The fingerprint of the model whose folder's files had the digest `files` when it last
    indexed into this library (index.model_files_digest), or None."""
    if files is None or not _has_table(con, "meta"):
        return None
    row = con.execute("SELECT value FROM meta WHERE key = ?", (f"model files {files}",)).fetchone()
    return row[0] if row else None


def remember_model(con: sqlite3.Connection, files: str | None, fingerprint: str) -> None:
    """Keep which model fingerprint the model files with digest `files` have (see remembered_model)."""
    if files is not None:
        with con:
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"model files {files}", fingerprint))


def _schema_4_points(con: sqlite3.Connection, model: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    yield from row_blocks(con.execute("SELECT s.id, s.data FROM space s JOIN vectors v ON v.id = s.id "
                                      "WHERE v.model = ? ORDER BY s.id", (model,)), POINT_BLOCK)


def row_blocks(cur: sqlite3.Cursor, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rows of (id, float16 vector blob) from `cur`, `size` at a time -> (ids (n,) int64, (n, D) float16)."""
    while rows := cur.fetchmany(size):
        yield (np.fromiter((r[0] for r in rows), np.int64, len(rows)),
               np.frombuffer(b"".join(r[1] for r in rows), np.float16).reshape(len(rows), -1))


def point_of(con: sqlite3.Connection, model: str, pid: int) -> np.ndarray | None:
    """Photo `pid`'s point (D,) float16 as model `model` stored it, or None."""
    if _has_table(con, "points") and not _has_table(con, "space"):
        row = con.execute("SELECT first, ids, data FROM points WHERE model = ? AND first <= ? ORDER BY first DESC "
                          "LIMIT 1", (model, pid)).fetchone()
        block = sound_block(*row) if row else None
        if block is None:  # none, or damaged
            return None
        ids, data = block
        at = np.searchsorted(ids, pid)
        return data[at] if at < len(ids) and ids[at] == pid else None
    for ids, points in point_blocks(con, model):  # schema 4
        if pid in ids:
            return points[int(np.searchsorted(ids, pid))]
    return None


def _block_of(con: sqlite3.Connection, model: str, pid: int) -> tuple[int, np.ndarray, bytes] | None:
    """The row of `points` that holds (or would hold) `pid`: (first, ids, data), or None (none, or
    damaged: indexing takes damaged rows out first, `damaged_photos`)."""
    row = con.execute("SELECT first, ids, data FROM points WHERE model = ? AND first <= ? ORDER BY first DESC "
                      "LIMIT 1", (model, pid)).fetchone()
    return (row[0], np.frombuffer(row[1], np.int64), row[2]) if row and sound_block(*row) is not None else None


def _add_points(con: sqlite3.Connection, model: str, ids: list[int], points: list[bytes]) -> None:
    """Append points of photos `ids` (ascending, above every id the model has stored) to the model's
    last block while it has room, then to new blocks."""
    last = con.execute("SELECT first, ids, data FROM points WHERE model = ? ORDER BY first DESC LIMIT 1",
                       (model,)).fetchone()
    if last and ids and min(ids) <= int(np.frombuffer(last[1], np.int64).max(initial=last[0])):
        _rewrite_points(con, model, ids, points)  # not expected (SQLite gives a new photo the highest id)
        return
    start = 0
    if last and len(last[1]) // 8 < POINT_BLOCK:
        start = POINT_BLOCK - len(last[1]) // 8
        con.execute("UPDATE points SET ids = ?, data = ? WHERE model = ? AND first = ?",
                    (last[1] + np.asarray(ids[:start], np.int64).tobytes(), last[2] + b"".join(points[:start]),
                     model, last[0]))
    for i in range(start, len(ids), POINT_BLOCK):
        con.execute("INSERT INTO points (model, first, ids, data) VALUES (?, ?, ?, ?)",
                    (model, ids[i], np.asarray(ids[i:i + POINT_BLOCK], np.int64).tobytes(),
                     b"".join(points[i:i + POINT_BLOCK])))


def _rewrite_points(con: sqlite3.Connection, model: str, ids: list[int], points: list[bytes]) -> None:
    """The model's points and these, sorted by id into new blocks: what keeps the blocks' order if
    an id ever arrives below the stored ones."""
    new = {int(i): row.tobytes() for ids_, block in _blocks(con, model) for i, row in zip(ids_, block)}
    new.update(zip(map(int, ids), points))
    con.execute("DELETE FROM points WHERE model = ?", (model,))
    order = sorted(new)
    _add_points(con, model, order, [new[i] for i in order])


def _remove_point(con: sqlite3.Connection, model: str, pid: int) -> None:
    if not _has_table(con, "points"):
        return
    block = _block_of(con, model, pid)
    if block is None or pid not in block[1]:
        return
    first, ids, data = block
    keep = ids != pid
    if not keep.any():
        con.execute("DELETE FROM points WHERE model = ? AND first = ?", (model, first))
        return
    points = np.frombuffer(data, np.float16).reshape(len(ids), -1)[keep]
    con.execute("UPDATE points SET ids = ?, data = ? WHERE model = ? AND first = ?",
                (ids[keep].tobytes(), points.tobytes(), model, first))


def _move_schema_4_points(con: sqlite3.Connection) -> None:
    """A schema-4 library's points, a row each in `space`, into blocks of `points` (then dropped)."""
    if not _has_table(con, "space"):
        return
    for (model,) in con.execute("SELECT DISTINCT v.model FROM space s JOIN vectors v ON v.id = s.id").fetchall():
        for ids, points in _schema_4_points(con, model):
            _add_points(con, model, ids.tolist(), [p.tobytes() for p in points])
    con.execute("DROP TABLE space")


def _has_table(con: sqlite3.Connection, name: str) -> bool:
    return con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


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
