"""A photo library: the caption of every photo under some folders, in SQLite, searchable by words
and by meaning.

One file, readable with the ``sqlite3`` shell:

    photos(id, path, sha1, size, mtime, caption, alternatives, model, indexed_at)
        one row per captioned photo; `alternatives` is JSON [{"caption", "logprob", "score"}, ...]
    photos_fts(caption, alternatives)       FTS5 full-text index, rowid = photos.id,
        Porter stemming so "dogs" finds "dog" and "running" finds "runs"
    vectors(id, model, words)               per photo (id = photos.id), the model's expected word
        counts (see retrieval.py), read for every photo at every model search; `model` is the
        fingerprint of the model that made them, so two models' numbers are never mixed
    pooled(id, data)                        its pooled feature, unit length (search by example photo)
    features(id, data)                      the encoder's output, 8-bit (read for the photos re-ranked)
        (three tables, so that a scan of the small rows never walks the large ones' pages)
    failures(path, size, mtime, error)      files that could not be read, and why
    meta(key, value)                        schema version

Indexing is incremental: a file whose size and modification time are unchanged (and that was
indexed by the same model) is skipped, one whose bytes are unchanged (same SHA-1) only has its time
updated, a changed one, or one indexed by another model, is captioned again, and photos whose files
are gone are dropped. Every batch is written in one transaction, so an interrupted run leaves a
consistent database and the next run finishes the job.

Search has three modes (`MODES`): "keyword" matches the words of the captions (BM25, instant,
exact for names and rare words); "model" ranks by the captioning model itself (retrieval.py);
"hybrid" adds the keyword score to the model's. Measured on Flickr8k val (README), hybrid ranks
best and is the default of the command line, the API and the page.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from captioner.data.images import list_images
from captioner.data.vocab import tokenize
from captioner.errors import LibraryError
from captioner.files import path_text, readable_digest
from captioner.names import DEFAULT_SEARCH_MODE, SEARCH_MODES, SHIPPED

if TYPE_CHECKING:
    from captioner.decoding import Decoding

SCHEMA_VERSION = "2"
READABLE_SCHEMAS = ("1", "2")  # 1: before model search (no vectors); opened for indexing, it becomes 2
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
        con.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))  # 1 -> 2: vectors added
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


@dataclass
class IndexReport:
    captioned: int = 0
    unchanged: int = 0
    touched: int = 0  # same bytes, new modification time
    removed: int = 0
    failed: list[str] = field(default_factory=list)  # one line per unreadable file
    seconds: float = 0.0


def _plan(con: sqlite3.Connection, files: list[Path], report: IndexReport, model: str
          ) -> tuple[list[tuple[Path, os.stat_result, str]], list[tuple[str, os.stat_result, str]]]:
    """Which files need captions: new or changed ones, and those indexed by another model than
    `model` (a fingerprint). Unchanged files are counted and skipped; files that cannot be read are
    returned as failures [(path, stat, error)]."""
    known = {p: (s, m, h) for p, s, m, h, by in con.execute(
        "SELECT p.path, p.size, p.mtime, p.sha1, v.model FROM photos p LEFT JOIN vectors v ON v.id = p.id")
        if by == model}  # a photo of another model (or of schema 1, without vectors) is captioned again
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
            _delete_photo(con, pid)
        con.executemany("DELETE FROM failures WHERE path = ?", [(p,) for p in bad])
    return len(photos)


def _delete_photo(con: sqlite3.Connection, pid: int) -> None:
    con.execute("DELETE FROM photos_fts WHERE rowid = ?", (pid,))
    for table in ("vectors", "pooled", "features"):
        con.execute(f"DELETE FROM {table} WHERE id = ?", (pid,))
    con.execute("DELETE FROM photos WHERE id = ?", (pid,))


def _vectors(captioner, rows: list[tuple]) -> list[tuple[bytes, bytes, bytes]]:
    """(features, pooled, words) blobs for each captioned photo of a batch (see retrieval.py)."""
    if not rows:
        return []
    import torch

    from captioner import retrieval

    feats = torch.stack([result["features"] for *_, result in rows])
    ids, counts = retrieval.expected_words(captioner.model.decoder, feats.to(captioner.device), captioner.vocab,
                                           max_len=captioner.model.cfg.max_len)
    return list(zip(retrieval.pack_features(feats), [p.tobytes() for p in retrieval.pooled_vectors(feats)],
                    retrieval.pack_words(ids, counts)))


def _write_batch(con: sqlite3.Connection, rows: list[tuple], failures: list[tuple], source: str,
                 vectors: list[tuple[bytes, bytes, bytes]], model: str) -> None:
    """One transaction: upsert captioned photos (their full-text rows and vectors, made by the model
    with fingerprint `model`, loaded from `source`) and failures."""
    now = time.time()
    with con:
        for (path, st, sha1, result), (features, pooled, words) in zip(rows, vectors, strict=True):
            alts = result.get("alternatives", [])[1:]
            prev = con.execute("SELECT id FROM photos WHERE path = ?", (path,)).fetchone()
            if prev:
                _delete_photo(con, prev[0])
            cur = con.execute(
                "INSERT INTO photos (path, sha1, size, mtime, caption, alternatives, model, indexed_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (path, sha1, st.st_size, st.st_mtime, result["caption"], json.dumps(alts), source, now))
            con.execute("INSERT INTO photos_fts (rowid, caption, alternatives) VALUES (?, ?, ?)",
                        (cur.lastrowid, result["caption"], "\n".join(a["caption"] for a in alts)))
            con.execute("INSERT INTO vectors (id, model, words) VALUES (?, ?, ?)", (cur.lastrowid, model, words))
            con.execute("INSERT INTO pooled (id, data) VALUES (?, ?)", (cur.lastrowid, pooled))
            con.execute("INSERT INTO features (id, data) VALUES (?, ?)", (cur.lastrowid, features))
            con.execute("DELETE FROM failures WHERE path = ?", (path,))
        for path, st, error in failures:
            con.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?)", (path, st.st_size, st.st_mtime, error))


def index_folders(captioner, roots: Sequence[Path], db: Path, *, batch_size: int | None = None, progress: bool = True,
                  decoding: Decoding | None = None, files: Sequence[Path] | None = None) -> IndexReport:
    """Caption every image under `roots` into the database at `db` with `decoding` (else the
    model's own; see the module docstring). With `files`, those images instead (and no `roots`:
    nothing is removed)."""
    t0 = time.perf_counter()
    roots = [Path(os.path.abspath(r)) for r in roots]  # not resolved: a photo is known by the path it is found at
    for r in roots:
        if not r.exists():
            raise FileNotFoundError(f"{r}: no such folder")
    con = connect(db)
    try:
        return _index(captioner, roots, con, batch_size or captioner.batch_size, progress, decoding, t0, files)
    except sqlite3.DatabaseError as e:  # disk full, read-only: each batch was one transaction, so all done is kept
        raise LibraryError(f"{db}: {e}; the photos indexed so far are kept: run again to finish") from None
    finally:
        con.close()


def _index(captioner, roots: list[Path], con: sqlite3.Connection, batch_size: int, progress: bool,
           decoding: Decoding | None, t0: float, files: Sequence[Path] | None = None) -> IndexReport:
    report = IndexReport()
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
            _write_batch(con, rows, failures, source, _vectors(captioner, rows), captioner.fingerprint)
            rows, failures = [], []
    _write_batch(con, rows, failures, source, _vectors(captioner, rows), captioner.fingerprint)
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


MODES, DEFAULT_MODE = SEARCH_MODES, DEFAULT_SEARCH_MODE  # hybrid ranked best on Flickr8k val (README)
# How the scores are added up (see `rank`), chosen on Flickr8k val (docs/EXPERIMENTS.md): the weight
# of the stage-1 word score beside log p(query | photo), and, in hybrid, of the BM25 score in stage 1
# (beside the word score) and in stage 2.
WORDS_WEIGHT = 0.4
KEYWORD_WEIGHT_FIRST = 1.0
KEYWORD_WEIGHT = 0.2


@dataclass
class Found:
    """What a search found: `hits` best first, [{"id", "path", "caption", "score"}]; the `mode` that
    ranked them (keyword where a model search had nothing to go on); `total`, how many photos
    match the keywords or were ranked by the model; a `note` for the user, or None."""

    hits: list[dict]
    mode: str
    total: int
    note: str | None = None


def search(db: Path, text: str, limit: int = 20, *, mode: str = "keyword", captioner=None) -> Found:
    """Photos for the words `text`, best first, ranked by `mode` (see MODES and the module
    docstring). "model" and "hybrid" need the `captioner` that indexed the library."""
    _check(limit, mode)
    with reading(db) as con:
        if mode == "keyword":
            return _keyword(con, text, limit)
        if captioner is None:
            raise LibraryError(f"{mode} search needs the model that indexed the library")
        view = ModelView(con, captioner)
        tokens, unknown = view.query(text)
        if len(view.ids) and any(t != captioner.vocab.unk for t in tokens[1:-1]):
            ranked = rank(con, view, text, (mode,), limit)[mode]
            return Found(_hits(con, ranked[:limit]), mode, len(view.ids), view.note(unknown))
        found = _keyword(con, text, limit)  # nothing this model can rank, or no word it knows: the keywords can
        if not len(view.ids):
            found.note = view.note([])
        elif unknown:
            found.note = (f"the model knows none of the words {', '.join(map(repr, unknown))}: "
                          "searched the captions' words instead")
        return found


def similar(db: Path, image, limit: int = 20, *, captioner, photo_id: int | None = None) -> Found:
    """Photos that look like `image` (a path, bytes, PIL image or array), or like the library's
    photo `photo_id`: the cosine similarity of their stored pooled features to its own, best first
    (the photo itself, if it is in the library, comes first)."""
    from captioner import retrieval

    _check(limit, "model")
    with reading(db) as con:
        ranked = _rows(con, "SELECT count(*) FROM vectors WHERE model = ?", (captioner.fingerprint,))
        ranked = ranked[0][0] if ranked else 0
        left_out = con.execute("SELECT count(*) FROM photos").fetchone()[0] - ranked
        if left_out and not ranked:
            raise LibraryError(f"{db}: no photo in it was indexed by this model ({captioner.source}): run captioner "
                               "index again with it to search by example photo")
        if photo_id is not None:
            own = con.execute("SELECT p.data FROM pooled p JOIN vectors v ON v.id = p.id WHERE p.id = ? AND "
                              "v.model = ?", (photo_id, captioner.fingerprint)).fetchone()
            if not own:
                raise LibraryError(f"no photo {photo_id} in the library indexed by this model")
            query = np.frombuffer(own[0], np.float16).astype(np.float32)
        else:
            x = captioner.read(image)[None]
            query = retrieval.pooled_vectors(captioner.features(x)).astype(np.float32)[0]  # (C,)
        ids, sims = [], []
        cur = con.execute("SELECT p.id, p.data FROM pooled p JOIN vectors v ON v.id = p.id WHERE v.model = ?",
                          (captioner.fingerprint,))
        while rows := cur.fetchmany(10_000):  # a block at a time: memory stays flat however large the library
            ids.append(np.fromiter((r[0] for r in rows), np.int64, len(rows)))
            block = np.frombuffer(b"".join(r[1] for r in rows), np.float16).reshape(len(rows), -1)
            sims.append(block.astype(np.float32) @ query)
        ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        sims = np.concatenate(sims) if sims else np.zeros(0, np.float32)
        best = np.argsort(-sims, kind="stable")[:limit]
        return Found(_hits(con, [(int(ids[i]), float(sims[i])) for i in best]), "like", len(ids),
                     _note([], left_out, len(ids), captioner.source))


def _check(limit: int, mode: str) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise LibraryError(f"the limit must be 1 to {MAX_LIMIT:,}, not {limit}")
    if mode not in MODES:
        raise LibraryError(f"unknown search mode {mode!r}; choose from {', '.join(MODES)}")


def _rows(con: sqlite3.Connection, sql: str, args: tuple = ()) -> list:
    try:
        return con.execute(sql, args).fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):  # schema 1: made before model search
            return []
        raise


def _keyword(con: sqlite3.Connection, text: str, limit: int) -> Found:
    scores = keyword_scores(con, text)
    best = heapq.nlargest(limit, scores.items(), key=lambda item: item[1])
    return Found(_hits(con, best), "keyword", len(scores))


def keyword_scores(con: sqlite3.Connection, text: str) -> dict[int, float]:
    """BM25 score of every photo the words of `text` match (higher is better), by photo id."""
    query = fts_query(text)
    if not query:
        return {}
    return dict(con.execute("SELECT rowid, -bm25(photos_fts, 1.0, 0.3) FROM photos_fts WHERE photos_fts MATCH ?",
                            (query,)))


def _by_id(con: sqlite3.Connection, sql: str, ids) -> dict[int, tuple]:
    """Rows of `sql` (which selects id first and ends in "WHERE id IN ({})") for `ids`, by id, a
    bounded number of parameters at a time."""
    out = {}
    ids = [int(i) for i in ids]
    for start in range(0, len(ids), 500):
        part = ids[start:start + 500]
        out.update({r[0]: r[1:] for r in con.execute(sql.format(",".join("?" * len(part))), part)})
    return out


def _hits(con: sqlite3.Connection, ranked: list[tuple[int, float]]) -> list[dict]:
    info = _by_id(con, "SELECT id, path, caption FROM photos WHERE id IN ({})", [i for i, _ in ranked])
    return [{"id": i, "path": info[i][0], "caption": info[i][1], "score": round(s, 4)} for i, s in ranked if i in info]


class ModelView:
    """The photos of a library as one model indexed them, for model search: their expected word
    counts held in memory (stage 1: 384 bytes a photo), their features read on demand (stage 2)."""

    def __init__(self, con: sqlite3.Connection, captioner):
        from captioner import retrieval

        self.con, self.captioner = con, captioner
        rows = _rows(con, "SELECT id, words FROM vectors WHERE model = ? ORDER BY id", (captioner.fingerprint,))
        photos = con.execute("SELECT count(*) FROM photos").fetchone()[0]
        self.source = captioner.source
        self.ids = np.array([r[0] for r in rows], np.int64)  # sorted
        self.word_ids, self.counts = retrieval.unpack_words([r[1] for r in rows])
        self.left_out = photos - len(rows)  # indexed by another model (or before model search)

    def query(self, text: str) -> tuple[list[int], list[str]]:
        """`text` -> tokens [<start>, w1 .. wn, <end>] (unknown words as <unk>) and the unknown words."""
        vocab = self.captioner.vocab
        words = tokenize(text)[: self.captioner.model.cfg.max_len]
        return vocab.encode(" ".join(words)), [w for w in dict.fromkeys(words) if w not in vocab.stoi]

    def note(self, unknown: list[str]) -> str | None:
        return _note(unknown, self.left_out, len(self.ids), self.source)

    def features(self, ids: np.ndarray):
        """The stored features of photos `ids` (in that order) -> a float tensor (M, ...)."""
        from captioner import retrieval

        rows = _by_id(self.con, "SELECT id, data FROM features WHERE id IN ({})", ids)
        blobs = {i: row[0] for i, row in rows.items()}
        cfg = self.captioner.model.cfg
        cells = (len(next(iter(blobs.values()))) - 8) // cfg.feat_dim if blobs else 1
        shape = (cfg.feat_dim,) if self.captioner.model.decoder.feature_kind == "pooled" else (cells, cfg.feat_dim)
        return retrieval.unpack_features([blobs[int(i)] for i in ids], shape)


def _note(unknown: list[str], left_out: int, ranked: int, source: str) -> str | None:
    """What the user should know about a model search: unknown words, photos it could not rank."""
    notes = []
    if unknown:
        notes.append(f"words the model does not know, read as <unk>: {', '.join(map(repr, unknown))}")
    if left_out and not ranked:
        notes.append(f"no photo was indexed by this model ({source}), so only the words of the captions were "
                     "searched: run captioner index again with it to search by meaning")
    elif left_out:
        notes.append(f"{left_out} photos indexed by another model (or by an older captioner) are left out: run "
                     "captioner index again")
    return "; ".join(notes) or None


def rank(con: sqlite3.Connection, view: ModelView, text: str, modes: Sequence[str] = ("hybrid",),
         limit: int = 1) -> dict[str, list[tuple[int, float]]]:
    """Every photo of `view` for the query `text`, best first, as (id, score), for each of `modes`
    ("model", "hybrid"). Stage 1 (retrieval.word_scores, plus KEYWORD_WEIGHT_FIRST * BM25 in hybrid)
    picks the best max(RERANK, limit); those are ordered by

        log p(query | photo) + WORDS_WEIGHT * stage-1 word score  [+ KEYWORD_WEIGHT * BM25 in hybrid]

    divided by the query's length (a score per word, for people to read), and the other photos follow
    in stage-1 order with their stage-1 score. The decoder scores each photo once for all the modes."""
    from captioner import retrieval

    cap = view.captioner
    tokens, _ = view.query(text)
    content = [w for w in tokenize(text) if w not in STOPWORDS and w in cap.vocab.stoi]
    words = retrieval.word_scores(view.word_ids, view.counts, list(dict.fromkeys(cap.vocab.stoi[w] for w in content)))
    bm = np.zeros(len(view.ids), np.float32)
    if "hybrid" in modes:
        for pid, score in keyword_scores(con, text).items():
            at = np.searchsorted(view.ids, pid)
            if at < len(view.ids) and view.ids[at] == pid:
                bm[at] = score
    stage1, chosen = {}, {}
    for mode in modes:
        stage1[mode] = words + KEYWORD_WEIGHT_FIRST * bm if mode == "hybrid" else words
        chosen[mode] = np.argsort(-stage1[mode], kind="stable")
    take = max(retrieval.RERANK, limit)
    scored = np.unique(np.concatenate([chosen[m][:take] for m in modes]))  # positions in view.ids
    logp = retrieval.query_logprob(cap.model.decoder, view.features(view.ids[scored]).to(cap.device), tokens)
    logp = dict(zip(scored.tolist(), logp.cpu().numpy().tolist()))
    length = len(tokens) - 1  # the words and <end>
    out = {}
    for mode in modes:
        top = chosen[mode][:take]
        final = np.array([logp[i] for i in top]) + WORDS_WEIGHT * words[top]
        if mode == "hybrid":
            final += KEYWORD_WEIGHT * bm[top]
        best = np.argsort(-final, kind="stable")
        out[mode] = ([(int(view.ids[top[i]]), float(final[i] / length)) for i in best]
                     + [(int(view.ids[i]), float(stage1[mode][i])) for i in chosen[mode][take:]])
    return out


def indexed_by(db: Path) -> tuple[str | None, bool]:
    """The model (a folder, or "shipped") that captioned most of the photos in `db`, and whether any
    photo has what model search needs (none has in a library made before it, or an empty one)."""
    with reading(db) as con:
        row = con.execute("SELECT model FROM photos GROUP BY model ORDER BY count(*) DESC LIMIT 1").fetchone()
        vectors = bool(_rows(con, "SELECT 1 FROM vectors LIMIT 1"))
    return (row[0] if row else None), vectors


def photo_path(db: Path, photo_id: int) -> Path | None:
    """The file of photo `photo_id`, or None when the database has no such photo."""
    if not 0 < photo_id < 2**63:
        return None
    with reading(db) as con:
        row = con.execute("SELECT path FROM photos WHERE id = ?", (photo_id,)).fetchone()
    return Path(row[0]) if row else None
