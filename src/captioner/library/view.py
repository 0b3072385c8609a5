"""The photos of a library as one model indexed them (`ModelView`): what the model modes of search
read, and how a damaged row is left out; the words of a query as captions hold them; the cosine of
stored points and a query."""

from __future__ import annotations

import functools
import sqlite3
import warnings

import numpy as np

from captioner.data import wordcounts
from captioner.data.vocab import tokenize
from captioner.library.store import by_id, point_blocks, point_ids, table_rows


def query_words(text: str) -> list[str]:
    """The words of a query as captions hold them: tokenized, a possessive's "'s" dropped ("dog's"
    -> "dog": captions say "a dog 's ball" or "the dog", and FTS5 would read "dog's" as "dog s")."""
    return [w[:-2] if w.endswith("'s") else w for w in tokenize(text)]


class ModelView:
    """The photos of a library as one model indexed them, for model search: their ids; their
    expected word counts, read into memory when a mode needs them (stage 1 of model and hybrid: 384
    bytes a photo); their points in the search space, read in blocks (`space_scores`); their
    features, read for the photos stage 2 re-ranks."""

    def __init__(self, con: sqlite3.Connection, captioner):
        self.con, self.captioner = con, captioner
        photos = con.execute("SELECT count(*) FROM photos").fetchone()[0]
        self.source = captioner.source
        # sorted; with a search space, every photo the model indexed has a point: the ids come from the
        # points' blocks (a thousand rows for a million photos, where a row a photo took 0.6 s)
        # A row of the library damaged past SQLite's checks (a byte changed in a blob) leaves its photos
        # out of the search, counted here, and the note says so (indexing again repairs them)
        self.damaged: set[int] = set()  # photos whose stored data a search found damaged
        self.pointless: set[int] = set()  # photos of damaged rows of points: damaged for the space's modes
        lost: list[int] = []
        self.ids = point_ids(con, captioner.fingerprint, lost) if captioner.space is not None else None
        if self.ids is None or lost or not len(self.ids):
            sound = self.ids
            rows = table_rows(con, "SELECT id FROM vectors WHERE model = ? ORDER BY id", (captioner.fingerprint,))
            self.ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            if lost:
                self.pointless = set(self.ids[~np.isin(self.ids, sound)].tolist())
        self.left_out = photos - len(self.ids)  # indexed by another model (or before model search)
        self.without_features = False  # set by `rank` when a photo it re-ranked had no stored features
        self.cosine: np.ndarray | None = None  # set by `rank`: every photo's cosine with the query (a space)

    @functools.cached_property
    def _words(self) -> tuple[np.ndarray, np.ndarray]:

        rows = table_rows(self.con, "SELECT id, words FROM vectors WHERE model = ? ORDER BY id",
                          (self.captioner.fingerprint,))
        got = dict(rows)
        if len(rows) != len(self.ids) or not np.array_equal(np.fromiter(got, np.int64, len(got)), self.ids):
            got = {int(i): got.get(int(i)) for i in self.ids}  # the ids came from the points' blocks: theirs only
        return self._unpack(got)

    def words_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The expected word counts of photos `ids` only (in that order), as `word_ids`, `counts`."""
        rows = by_id(self.con, "SELECT id, words FROM vectors WHERE id IN ({})", ids)
        return self._unpack({int(i): rows[int(i)][0] if int(i) in rows else None for i in ids})

    def _unpack(self, blobs: dict[int, bytes | None]) -> tuple[np.ndarray, np.ndarray]:
        """Word-count blobs by photo id -> `word_ids`, `counts` in that order; a missing or damaged
        one (wordcounts.read_words) counts nothing, and its photo is noted as damaged."""
        ids, counts, bad = wordcounts.read_words(list(blobs.values()), len(self.captioner.vocab),
                                                self.captioner.model.cfg.max_len)
        if bad.any():
            self.damaged.update(np.fromiter(blobs, np.int64, len(blobs))[bad].tolist())
        return ids, counts

    @property
    def word_ids(self) -> np.ndarray:
        """(N, K) int32: the ids of the words each photo's expected counts keep (retrieval.py)."""
        return self._words[0]

    @property
    def counts(self) -> np.ndarray:
        """(N, K) float32: their expected counts."""
        return self._words[1]

    def query(self, text: str) -> tuple[list[int], list[str]]:
        """`text` -> tokens [<start>, w1 .. wn, <end>] (unknown words as <unk>) and the unknown words."""
        vocab = self.captioner.vocab
        words = query_words(text)[: self.captioner.model.cfg.max_len]
        return vocab.encode(" ".join(words)), [w for w in dict.fromkeys(words) if w not in vocab.stoi]

    def note(self, unknown: list[str]) -> str | None:
        return "; ".join(n for n in (self.damage_note(), _note(unknown, self.left_out, len(self.ids), self.source))
                         if n) or None

    def sound(self, ranked: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
        """`rank`'s lists without the photos whose stored data it found damaged."""
        if not self.damaged:
            return ranked
        return {mode: [(i, s) for i, s in hits if i not in self.damaged] for mode, hits in ranked.items()}

    def damage_note(self) -> str | None:
        """What a search left out because the library's rows were damaged (a byte changed inside a
        blob: SQLite's own checks pass), and how to mend it."""
        n = len(self.damaged)
        if not n:
            return None
        named = [v[0] for v in by_id(self.con, "SELECT id, path FROM photos WHERE id IN ({})",
                                     sorted(self.damaged)[:3]).values()]
        if named and n > len(named):
            named.append("...")
        which = f" ({', '.join(named)})" if named else ""
        return (f"damaged library: the stored search data of {n} photo{'s' if n > 1 else ''}{which} is damaged and "
                "was left out: captioner index over their folders captions them afresh")

    def has_space(self) -> bool:
        """Whether the photos have points in the model's search space: every photo this model indexed
        has one when the model has a space (its fingerprint covers the space)."""
        return self.captioner.space is not None and len(self.ids) > 0

    def space_note(self) -> str:
        """Why a search could not use the search space."""
        if self.captioner.space is None:
            return (f"the model ({self.source}) has no search space, so the embedding could not rank: add one "
                    f"with captioner train --space-only --init {self.source}")
        return "no photo was indexed by this model: run captioner index again"

    def space_scores(self, query: np.ndarray, best: int | None = None) -> np.ndarray:
        """The cosine of every photo's point in the search space and `query` (D,), in the order of
        `ids` (0 for a photo without one), read a block of points at a time (store.point_blocks):
        memory stays flat however large the library. `best`: exact for the photos that can be
        among the `best` highest only, within about 0.001 for the rest (`Cosines`: the scoring
        in half the time)."""
        out = np.zeros(len(self.ids), np.float32)
        if self.pointless:
            self.damaged |= self.pointless
            out[np.isin(self.ids, list(self.pointless))] = -2.0  # below every photo
        scan = Cosines(query, best)
        for ids, block in point_blocks(self.con, self.captioner.fingerprint):
            if block.shape[1] != len(scan.query):  # a damaged row of another size
                self.damaged.update(ids.tolist())
                continue
            at = np.minimum(np.searchsorted(self.ids, ids), max(len(self.ids) - 1, 0))
            mine = self.ids[at] == ids if len(self.ids) else np.zeros(len(ids), bool)
            scores = scan(block)
            bad = ~(np.abs(scores) <= 1.01)  # unit vectors: a cosine past 1 (or NaN) is a damaged point
            if bad.any():
                self.damaged.update(ids[bad].tolist())
                scores[bad] = -2.0  # below every photo
            out[at[mine]] = scores[mine]
        return out

    def features(self, ids: np.ndarray):
        """The stored features of photos `ids` (in that order) -> a float tensor (M, ...), or None
        when one of them has none (indexed with --no-features)."""
        from captioner import retrieval

        rows = by_id(self.con, "SELECT id, data FROM features WHERE id IN ({})", ids)
        blobs = {i: row[0] for i, row in rows.items()}
        if len(blobs) < len(set(int(i) for i in ids)):
            return None
        sound = retrieval.sound_features(list(blobs.values()))
        if not sound.all():  # its log p would be noise: the photo is left out, and noted
            bad = [i for i, ok in zip(blobs, sound) if not ok]
            self.damaged.update(bad)
            good = next((b for b, ok in zip(blobs.values(), sound) if ok), None)
            if good is None:
                return None
            blobs.update({i: good for i in bad})  # any sound features in their place, to keep the batch whole
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


class Cosines:
    """The cosines of stored points and one `query`, a block of points at a time (`__call__`, in
    any order): exact (`exact`) for every point that can be among the `best` highest of all the
    blocks, and for the others a float16 product that is within `error` of it. None: exact for all.

    Why: the float16 product is 3 to 7 times as fast as turning a block into float32 first (a
    million 1024-d points: 0.07 s against 0.22-0.49, the Zen 4), and stage 1 of a search wants the
    order of its best hundred only. Torch multiplies float16 with float32 sums, so a score is off
    by at most the query's rounding (|q16 - q| for points of length 1.01 at most), the rounding of
    the result (2^-11 of at most 1.01) and the sums' own (D x 2^-24). Let T be the `best`-th
    highest fast score of those seen so far, which only rises: a point whose fast score is below
    T - 2 x error is below, exactly, every one of `best` points whose exact cosine is at least
    T - error, so every point at or above T - 2 x error is computed exactly when its block comes.
    Only points whose fast score is sane (|s| <= 1.01 - 2 x error: a point of length past 1.01 is
    a damaged one, search.py) count towards T."""

    def __init__(self, query: np.ndarray, best: int | None = None):
        import torch

        self.query = torch.as_tensor(np.asarray(query, np.float32))
        self.best = best
        self.half = self.query.half()
        rounding = float(torch.linalg.vector_norm(self.half.float() - self.query))
        self.error = 1.01 * (rounding + 2.0**-11 + len(self.query) * 2.0**-24)
        self.top = np.zeros(0, np.float32)  # the `best` highest sane fast scores so far

    def __call__(self, block: np.ndarray) -> np.ndarray:
        """Points (n, D) float16 -> their cosines (n,) float32 (see the class)."""
        if self.best is None or not len(block):
            return self.exact(block)
        fast = (_tensor(block) @ self.half).float().numpy()
        sane = fast[np.abs(fast) <= 1.01 - 2 * self.error]
        self.top = np.concatenate([self.top, sane])
        if len(self.top) > self.best:
            self.top = np.partition(self.top, len(self.top) - self.best)[-self.best:]
        floor = self.top.min() - 2 * self.error if len(self.top) >= self.best else -np.inf
        near = np.nonzero(~(fast < floor))[0]  # NaN too: computed exactly, found damaged where it is used
        if len(near):
            fast[near] = self.exact(block[near])
        return fast

    def exact(self, block: np.ndarray) -> np.ndarray:
        """Points (n, D) float16 -> their cosines (n,) float32, in float32. torch turns float16 into
        float32 about three times as fast as numpy (a million points: 0.27 s against 0.85, the Zen 4)."""
        return (_tensor(block).float() @ self.query).numpy()


def _tensor(block: np.ndarray):
    """A block of points straight from SQLite (read-only) as a tensor, without copying it: it is
    read, never written, so torch's warning about a read-only array is silenced."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(block)
