"""Search by example: the photos of a library that look like a photo, by their points in the
model's search space (or, for a model without one, their mean encoder features); and `find`, what
`captioner search` runs: words go to search.py, an example photo to `similar`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from captioner.errors import LibraryError
from captioner.files import readable_digest
from captioner.library.search import DEFAULT_MODE, Found, _best, _check, _hits, search
from captioner.library.store import indexed_by, point_blocks, point_of, reading, row_blocks, table_rows
from captioner.library.view import Cosines, _note


def similar(db: Path, image, limit: int = 20, *, captioner, photo_id: int | None = None,
            digest: str | None = None) -> Found:
    """Photos that look like `image` (a path, bytes, PIL image or array), or like the library's
    photo `photo_id`, best first: the cosine of their points in the model's search space and its
    own, or, for a model without one, of their mean encoder features. The query photo itself is
    left out: photo `photo_id`, and a library photo with the same bytes as `image` (a path or bytes;
    `digest`: their SHA-1, for an `image` already decoded)."""
    from captioner import retrieval

    _check(limit, "model")
    table = "space" if captioner.space is not None else "pooled"
    with reading(db) as con:
        ranked = table_rows(con, "SELECT count(*) FROM vectors WHERE model = ?", (captioner.fingerprint,))
        ranked = ranked[0][0] if ranked else 0
        left_out = con.execute("SELECT count(*) FROM photos").fetchone()[0] - ranked
        if left_out and not ranked:
            raise LibraryError(f"{db}: no photo in it was indexed by this model ({captioner.source}): run captioner "
                               "index again with it to search by example photo")
        if photo_id is not None:
            if not 0 < photo_id < 2**63:  # past SQLite's integers: no such photo, not an OverflowError
                raise LibraryError(f"no photo {photo_id} in the library")
            if table == "space":
                own = point_of(con, captioner.fingerprint, photo_id)
            else:
                own = con.execute("SELECT p.data FROM pooled p JOIN vectors v ON v.id = p.id WHERE p.id = ? AND "
                                  "v.model = ?", (photo_id, captioner.fingerprint)).fetchone()
                own = np.frombuffer(own[0], np.float16) if own else None
            if own is None:
                raise LibraryError(f"no photo {photo_id} in the library indexed by this model")
            query = own.astype(np.float32)
            if not abs(np.linalg.norm(query) - 1) < 0.01:  # stored unit length: a byte of it changed (NaN too)
                raise LibraryError(f"damaged library: photo {photo_id}'s stored point is damaged; captioner index "
                                   "over its folder captions it afresh")
        else:
            feats = captioner.features(captioner.read(image)[None].to(captioner.device))
            query = (captioner.embed_features(feats)[0] if table == "space"
                     else retrieval.pooled_vectors(feats).astype(np.float32)[0])  # (D,)
        same = {photo_id} if photo_id is not None else set()
        digest = digest or (readable_digest(image) if isinstance(image, (str, Path)) else
                  hashlib.sha1(bytes(image)).hexdigest() if isinstance(image, (bytes, bytearray, memoryview)) else None)
        if digest:
            same |= {r[0] for r in con.execute("SELECT id FROM photos WHERE sha1 = ?", (digest,))}
        ids, sims, lost = [], [], []  # lost: photos of damaged rows of points (store.point_blocks)
        blocks = (point_blocks(con, captioner.fingerprint, lost) if table == "space" else row_blocks(con.execute(
            "SELECT p.id, p.data FROM pooled p JOIN vectors v ON v.id = p.id WHERE v.model = ?",
            (captioner.fingerprint,)), 10_000))
        scan = Cosines(query, limit + len(same))  # exact for the photos that can be shown
        for block_ids, block in blocks:  # a block at a time: memory stays flat however large the library
            if block.shape[1] != len(scan.query):  # a damaged row of another size
                lost.append(len(block_ids))
                continue
            ids.append(block_ids)
            sims.append(scan(block))
        ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        sims = np.concatenate(sims) if sims else np.zeros(0, np.float32)
        sound = np.abs(sims) <= 1.01  # unit vectors: a cosine past 1 (or NaN) is a damaged point
        lost.append(int((~sound).sum()))
        keep = sound & ~np.isin(ids, list(same))
        ids, sims = ids[keep], sims[keep]
        best = _best(sims, limit)
        damage = (f"damaged library: the stored points of {sum(lost)} photos are damaged and were left out: captioner "
                  "index over their folders captions them afresh") if sum(lost) else None
        notes = [n for n in (damage, _note([], left_out, len(ids), captioner.source)) if n]
        return Found(_hits(con, [(int(ids[i]), float(sims[i])) for i in best]), "like", len(ids),
                     "; ".join(notes) or None)


def find(db: Path, text: str | None = None, like=None, *, mode: str = DEFAULT_MODE, limit: int = 20,
         load: Callable[[str | None], object]) -> Found:
    """What `captioner search` runs: photos for the words `text` (by `mode`), or like the photo `like`.
    The model is loaded (`load(source)`, source: the model named in the library) only when the search
    needs it, and before anything of torch for a database that is missing or not a library. A library
    indexed before search by meaning has nothing for the model to rank: it is searched by keywords,
    and the note says why."""
    source, vectors = indexed_by(db)
    note = None
    if like is None and mode != "keyword" and not vectors:  # empty, or made before model search
        mode = "keyword"
        if source:
            note = "this library was indexed before search by meaning: run captioner index again to use the model"
    captioner = load(source) if like is not None or mode != "keyword" else None
    found = (similar(db, like, limit, captioner=captioner) if like is not None
             else search(db, text, limit, mode=mode, captioner=captioner))
    found.note = found.note or note
    return found
