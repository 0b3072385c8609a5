"""Search: photos for words, by four modes (`MODES`) (photos like a photo: like.py).

"keyword" matches the words of the captions (BM25, instant, exact for names and rare words);
"embedding" ranks by the model's search space alone (model/embedding.py: the cosine of the query's
point and each photo's, no decoder call); "model" ranks by the captioning model itself
(retrieval.py); "hybrid" adds them up: the space picks the candidates, and the captioner's
log p(query | photo), the space's cosine, the keyword and tag scores order them (`rank`). Measured
on Flickr8k val (README), hybrid ranks best and is the default of the command line, the API and
the page. A model without a search space (or a library indexed before it) searches as before:
hybrid is then the model's score plus the keyword score.
"""

from __future__ import annotations

import heapq
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioner.data.vocab import tokenize
from captioner.errors import LibraryError
from captioner.library.store import MAX_LIMIT, by_id, reading, table_rows
from captioner.library.view import ModelView, query_words
from captioner.names import DEFAULT_SEARCH_MODE, SEARCH_MODES

MAX_QUERY_BYTES, MAX_QUERY_WORDS = 1000, 100  # a query longer than a paragraph is refused (one line)
# Words too common in captions to say anything about a photo; dropped from queries.
STOPWORDS = frozenset("a an the of on in at to and or with is are be by for from its it this that there".split())


def fts_query(text: str) -> str:
    """User words -> an FTS5 query: every word may match (OR), BM25 ranks photos that match more
    and rarer words first. Common words are dropped unless nothing else is left."""
    words = query_words(text)
    kept = [w for w in words if w not in STOPWORDS] or words
    return " OR ".join(f'"{w}"' for w in dict.fromkeys(kept))


MODES, DEFAULT_MODE = SEARCH_MODES, DEFAULT_SEARCH_MODE  # hybrid ranked best on Flickr8k val (README)
# How the scores are added up (see `rank`), chosen on Flickr8k val (docs/EXPERIMENTS.md): the weight
# of the stage-1 word score beside log p(query | photo), and, in hybrid, of the BM25 score in stage 1
# (beside the word score) and in stage 2.
WORDS_WEIGHT = 0.4
KEYWORD_WEIGHT_FIRST = 1.0
KEYWORD_WEIGHT = 0.2
# A query word that is one of a photo's tags (store.py's terms) adds TAG_WEIGHT x the tag's score
# to the photo's BM25, and TAG_WEIGHT_MODEL x it to the model modes' final score (beside
# log p(query | photo)); both chosen on Flickr8k val (docs/EXPERIMENTS.md).
TAG_WEIGHT = 8.0
TAG_WEIGHT_MODEL = 4.0
# With a search space, hybrid's stage 1 is the cosine of the query's point and the photo's, and
# stage 2 adds SPACE_WEIGHT x the cosine to the sum of `rank`, with the word score at
# SPACE_WORDS_WEIGHT instead of WORDS_WEIGHT. Chosen on Flickr8k val for the shipped space
# (docs/EXPERIMENTS.md): the cosine alone picks the photos to re-rank as well as with the word and
# BM25 scores added, and reads a photo's point alone (2 KB), not its word counts as well.
SPACE_WEIGHT = 30.0
SPACE_WORDS_WEIGHT = 0.2
# A hit's relevance (with a search space): the share of val captions whose own photo scored a lower
# cosine (EmbeddingConfig.relevance). When no photo shown reaches NO_GOOD_MATCH, the note says so.
NO_GOOD_MATCH = 0.05


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
    _check_query(text)
    with reading(db) as con:
        if mode == "keyword":
            return _keyword(con, text, limit)
        if captioner is None:
            raise LibraryError(f"{mode} search needs the model that indexed the library")
        view = ModelView(con, captioner)
        tokens, unknown = view.query(text)
        note = None
        if mode == "embedding" and not view.has_space():
            mode, note = "hybrid", view.space_note()
        if len(view.ids) and any(t != captioner.vocab.unk for t in tokens[1:-1]):
            ranked = rank(con, view, text, (mode,), limit, every=False)[mode]
            hits = _hits(con, ranked[:limit])
            weak = _relevance(view, hits) if mode in ("embedding", "hybrid") else None
            lacks = ("the library keeps no encoder features (indexed with --no-features), so the captioning model's "
                     "log p(query | photo) was left out of the ranking") if view.without_features else None
            notes = "; ".join(n for n in (weak, note, lacks, view.note(unknown)) if n) or None
            return Found(hits, mode, len(view.ids), notes)
        found = _keyword(con, text, limit)  # nothing this model can rank, or no word it knows: the keywords can
        if not len(view.ids):
            found.note = view.note([])
        elif unknown:
            found.note = (f"the model knows none of the words {', '.join(map(repr, unknown))}: "
                          "searched the captions' words instead")
        return found


def _check_query(text: str) -> None:
    """A one-line LibraryError for a query no one types: a 10 MB one took 168 s in hybrid mode."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_QUERY_BYTES:
        raise LibraryError(f"the query is {size:,} bytes long: at most {MAX_QUERY_BYTES:,} are searched")
    words = len(tokenize(text))
    if words > MAX_QUERY_WORDS:
        raise LibraryError(f"the query has {words:,} words: at most {MAX_QUERY_WORDS} are searched")


def _check(limit: int, mode: str) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise LibraryError(f"the limit must be 1 to {MAX_LIMIT:,}, not {limit}")
    if mode not in MODES:
        raise LibraryError(f"unknown search mode {mode!r}; choose from {', '.join(MODES)}")


def _keyword(con: sqlite3.Connection, text: str, limit: int) -> Found:
    scores = keyword_scores(con, text)
    best = heapq.nlargest(limit, scores.items(), key=lambda item: item[1])
    return Found(_hits(con, best), "keyword", len(scores))


def keyword_scores(con: sqlite3.Connection, text: str, only: Sequence[int] | None = None) -> dict[int, float]:
    """Score of every photo the words of `text` match (higher is better), by photo id: the BM25 of
    its captions, plus TAG_WEIGHT x the score of each query word (or two-word phrase) that is one of
    its tags or their hypernyms ("animal" finds the cat). `only`: of these photos alone (the same
    scores; a common word matches most of a million photos, 0.5 s to read them all)."""
    query = fts_query(text)
    if not query or (only is not None and not len(only)):
        return {}
    sql = "SELECT rowid, -bm25(photos_fts, 1.0, 0.3) FROM photos_fts WHERE photos_fts MATCH ?"
    scores = dict(con.execute(sql + _among("rowid", only), (query,)))
    for pid, tag in tag_scores(con, text, only).items():
        scores[pid] = scores.get(pid, 0.0) + TAG_WEIGHT * tag
    return scores


def tag_scores(con: sqlite3.Connection, text: str, only: Sequence[int] | None = None) -> dict[int, float]:
    """The summed scores of the query's words and two-word phrases among each photo's terms (of the
    photos `only`, when given)."""
    words = [w for w in query_words(text) if w not in STOPWORDS]
    phrases = list(dict.fromkeys(words + [f"{a} {b}" for a, b in zip(words, words[1:])]))
    if not phrases or (only is not None and not len(only)):
        return {}
    rows = table_rows(con, f"SELECT id, score FROM terms WHERE word IN ({', '.join('?' * len(phrases))})"
                      + _among("id", only), tuple(phrases))
    out: dict[int, float] = {}
    for pid, score in rows:
        out[pid] = out.get(pid, 0.0) + score
    return out


def _among(column: str, ids: Sequence[int] | None) -> str:
    """" AND column IN (ids)" as integers written out (no parameter limit), or "" for None."""
    return "" if ids is None else f" AND {column} IN ({','.join(str(int(i)) for i in ids)})"


def _hits(con: sqlite3.Connection, ranked: list[tuple[int, float]]) -> list[dict]:
    info = by_id(con, "SELECT id, path, caption FROM photos WHERE id IN ({})", [i for i, _ in ranked])
    return [{"id": i, "path": info[i][0], "caption": info[i][1], "score": round(s, 4)} for i, s in ranked if i in info]


def _relevance(view: ModelView, hits: list[dict]) -> str | None:
    """Give each hit its relevance (see NO_GOOD_MATCH), from the cosine `rank` left in `view`; ->
    "no good match" when none reaches NO_GOOD_MATCH, else None."""
    space = view.captioner.space
    if view.cosine is None or space is None or not space.cfg.calibration or not hits:
        return None
    at = np.searchsorted(view.ids, [h["id"] for h in hits])
    for h, r in zip(hits, space.cfg.relevance(view.cosine[at])):
        h["relevance"] = round(float(r), 3)
    best = max(h["relevance"] for h in hits)
    if best >= NO_GOOD_MATCH:
        return None
    return (f"no good match: the words and these photos are further apart than {100 * (1 - NO_GOOD_MATCH):.0f}% of "
            f"right answers were on the model's val set (best relevance {best:.2f})")


def rank(con: sqlite3.Connection, view: ModelView, text: str, modes: Sequence[str] = ("hybrid",),
         limit: int = 1, every: bool = True) -> dict[str, list[tuple[int, float]]]:
    """Every photo of `view` for the query `text` (or, unless `every`, the best `limit`), best
    first, as (id, score), for each of `modes` ("embedding", "model", "hybrid").

    "embedding": the cosine of the query's point in the search space and each photo's, alone.
    "model" and "hybrid" rank in two stages. Stage 1 scores every photo:

        model    retrieval.word_scores + TAG_WEIGHT * tag score
        hybrid   with a search space: the cosine (one pass over the stored points);
                 without: retrieval.word_scores + KEYWORD_WEIGHT_FIRST * BM25

    and the best max(RERANK, limit) of it are ordered by

        log p(query | photo) + WORDS_WEIGHT * word score + TAG_WEIGHT_MODEL * tag score
            [+ KEYWORD_WEIGHT * BM25 in hybrid; with a space, + SPACE_WEIGHT * cosine, and the word
             score at SPACE_WORDS_WEIGHT]

    (the tag score: tag_scores; in hybrid it is in the BM25 too, keyword_scores; the cosine where the
    model has a search space and the library holds its points) divided by the query's length (a
    score per word, for people to read); the other photos follow in stage-1 order with their stage-1
    score. The decoder scores each photo once for all the modes. With a space, hybrid reads the
    word counts of the photos it re-ranks only, so a query costs one pass over a point a photo (2 KB)."""
    from captioner import retrieval

    cap = view.captioner
    tokens, _ = view.query(text)
    n = len(view.ids)
    take = max(retrieval.RERANK, limit)
    cosine = None
    if view.has_space() and {"embedding", "hybrid"} & set(modes):  # exact where an order is shown or re-ranked
        cosine = view.space_scores(cap.embed_text(" ".join(query_words(text)))[0],
                                   None if every else (take if "hybrid" in modes else limit))
    view.cosine = cosine
    out: dict[str, list[tuple[int, float]]] = {}
    if "embedding" in modes:
        if cosine is None:
            raise LibraryError("embedding search needs a model with a search space and a library indexed by it")
        best = _best(cosine, None if every else limit)
        out["embedding"] = [(int(view.ids[i]), float(cosine[i])) for i in best]
    modes = [m for m in modes if m != "embedding"]
    if not modes:
        return view.sound(out)
    content = [w for w in query_words(text) if w not in STOPWORDS and w in cap.vocab.stoi]
    content = list(dict.fromkeys(cap.vocab.stoi[w] for w in content))
    bm, tags = np.zeros(n, np.float32), np.zeros(n, np.float32)
    stage1, chosen = {}, {}
    if "model" in modes or cosine is None:  # stage 1 by the expected words, BM25 and tags of every photo
        for scores, into in ((keyword_scores(con, text) if "hybrid" in modes else {}, bm),
                             (tag_scores(con, text), tags)):
            _scatter(view.ids, scores, into)
        words = retrieval.word_scores(view.word_ids, view.counts, content)
        for mode in modes:
            stage1[mode] = words + (KEYWORD_WEIGHT_FIRST * bm if mode == "hybrid" else TAG_WEIGHT * tags)
            chosen[mode] = _best(stage1[mode], None if every else take)
    if "hybrid" in modes and cosine is not None:
        stage1["hybrid"], chosen["hybrid"] = cosine, _best(cosine, None if every else take)
        if "model" not in modes:  # the words, BM25 and tags of the photos re-ranked only
            words = np.zeros(n, np.float32)
            top = chosen["hybrid"][:take]
            words[top] = retrieval.word_scores(*view.words_of(view.ids[top]), content)
            _scatter(view.ids, keyword_scores(con, text, view.ids[top]), bm)
            _scatter(view.ids, tag_scores(con, text, view.ids[top]), tags)
    scored = np.unique(np.concatenate([chosen[m][:take] for m in modes]))  # positions in view.ids
    feats = view.features(view.ids[scored])
    view.without_features = feats is None  # indexed with --no-features: ranked without the decoder
    logp = (retrieval.query_logprob(cap.model.decoder, feats.to(cap.device), tokens).cpu().numpy()
            if feats is not None else np.zeros(len(scored)))
    logp = dict(zip(scored.tolist(), logp.tolist()))
    length = len(tokens) - 1  # the words and <end>
    for mode in modes:
        top = chosen[mode][:take]
        spaced = mode == "hybrid" and cosine is not None
        final = (np.array([logp[i] for i in top]) + (SPACE_WORDS_WEIGHT if spaced else WORDS_WEIGHT) * words[top]
                 + TAG_WEIGHT_MODEL * tags[top])
        if mode == "hybrid":
            final += KEYWORD_WEIGHT * bm[top] + (SPACE_WEIGHT * cosine[top] if spaced else 0)
        best = np.argsort(-final, kind="stable")
        rest = chosen[mode][take:] if every else chosen[mode][take:max(take, limit)]
        out[mode] = ([(int(view.ids[top[i]]), float(final[i] / length)) for i in best]
                     + [(int(view.ids[i]), float(stage1[mode][i])) for i in rest])
    return view.sound(out)


def _scatter(ids: np.ndarray, scores: dict[int, float], into: np.ndarray) -> None:
    """into[i] = scores[ids[i]] for the ids (sorted) that `scores` has, in one vectorised pass."""
    if not scores or not len(ids):
        return
    pids = np.fromiter(scores.keys(), np.int64, len(scores))
    values = np.fromiter(scores.values(), np.float32, len(scores))
    at = np.minimum(np.searchsorted(ids, pids), len(ids) - 1)
    hit = ids[at] == pids
    into[at[hit]] = values[hit]


def _best(scores: np.ndarray, k: int | None = None) -> np.ndarray:
    """Positions of `scores` best first (ties in order of position, as a stable sort), all of them
    or the best `k`: found without sorting a million photos to show twenty."""
    if k is None or k >= len(scores):
        return np.argsort(-scores, kind="stable")
    kth = np.partition(-scores, k - 1)[k - 1]
    above = np.nonzero(-scores < kth)[0]
    part = np.concatenate([above, np.nonzero(-scores == kth)[0][:k - len(above)]])
    return part[np.lexsort((part, -scores[part]))]
