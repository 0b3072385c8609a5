"""Choose hybrid search's weights on data: every score `library.search.rank` adds up, for a sample of
queries, then a grid over their weights.

    python scripts/search_fusion.py --model runs/space/best --data ../shared/datasets/flickr8k --split val \\
        --db /tmp/val.sqlite --queries 500

Indexes the split's photos into --db (once: a second run reuses it), then for each query (a
reference caption; its one right answer is its own photo) computes, for every photo, the search
space's cosine, the stage-1 word score, BM25 and the tag score, and log p(query | photo) for the
photos any stage 1 of the grid could re-rank (the union of the best --candidates by each). Prints
R@1/5/10 for each weight set, best first (docs/EXPERIMENTS.md records the runs that chose the
shipped weights). The formula is `rank`'s: keep the two in step.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import time
from pathlib import Path

import numpy as np

from captioner import Captioner, library, retrieval
from captioner.data.records import check_images, load_records, split_records
from captioner.files import path_text
from captioner.library.search import SPACE_WEIGHT, SPACE_WORDS_WEIGHT, STOPWORDS, _scatter, query_words, tag_scores

# the grid's stage 1: the word score + BM25 + this x the cosine, or (None) the cosine alone, as `rank`
SPACE_FIRST = (None, 0, 10, 20, 50, 1000)


def components(con, view, cap, text: str, candidates: int) -> dict:
    """Every score of `rank` for the query `text`, over the photos of `view`."""
    n = len(view.ids)
    content = [w for w in query_words(text) if w not in STOPWORDS and w in cap.vocab.stoi]
    words = retrieval.word_scores(view.word_ids, view.counts, list(dict.fromkeys(cap.vocab.stoi[w] for w in content)))
    bm, tags = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for scores, into in ((library.keyword_scores(con, text), bm), (tag_scores(con, text), tags)):
        _scatter(view.ids, scores, into)  # as rank does
    cosine = view.space_scores(cap.embed_text(" ".join(query_words(text)))[0])
    pool = set()
    for s1 in SPACE_FIRST:  # every stage 1 of the grid
        stage1 = cosine if s1 is None else words + bm + s1 * cosine
        pool |= set(np.argsort(-stage1, kind="stable")[:candidates].tolist())
    pool = np.array(sorted(pool))
    tokens, _ = view.query(text)
    logp = np.full(n, -np.inf, np.float32)
    logp[pool] = retrieval.query_logprob(cap.model.decoder, view.features(view.ids[pool]), tokens).numpy()
    return {"cosine": cosine, "words": words, "bm": bm, "tags": tags, "logp": logp}


def ranks(parts: list[dict], targets: list[int], w: dict, rerank: int) -> np.ndarray:
    """The rank of each query's photo under weights `w` (rank's formula; ties count against)."""
    out = []
    for c, t in zip(parts, targets):
        stage1 = c["cosine"] if w["space1"] is None else c["words"] + w["kw1"] * c["bm"] + w["space1"] * c["cosine"]
        order = np.argsort(-stage1, kind="stable")
        top = order[:rerank]
        final = (w["logp"] * c["logp"][top] + w["words"] * c["words"][top] + w["tags"] * c["tags"][top]
                 + w["kw"] * c["bm"][top] + w["space"] * c["cosine"][top])
        if not np.isfinite(final).all():
            raise SystemExit("a re-ranked photo has no log p: raise --candidates")
        where = np.nonzero(top == t)[0]
        if len(where):
            out.append(1 + int((final > final[where[0]]).sum()))
        else:
            out.append(rerank + 1 + int((stage1[order[rerank:]] > stage1[t]).sum()))
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--model", help="model folder with a search space (default: the shipped model)")
    ap.add_argument("--db", type=Path, required=True, help="the split's library (made when missing)")
    ap.add_argument("--queries", type=int, default=500, help="reference captions drawn as queries (0: all)")
    ap.add_argument("--candidates", type=int, default=100, help="photos each stage 1 of the grid re-ranks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", type=Path, help="also write every query's scores here (.npz), for other grids")
    a = ap.parse_args()

    cap = Captioner.load(a.model)
    cap.require_space()
    records = check_images(split_records(load_records(a.data), a.split), skip_missing=True)
    library.index_folders(cap, [], a.db, files=[r.image for r in records])
    with library.reading(a.db) as con:
        photo = {path: pid for pid, path in con.execute("SELECT id, path FROM photos")}
        view = library.ModelView(con, cap)
        pos = {int(pid): i for i, pid in enumerate(view.ids)}
        queries = [(pos[photo[path_text(Path(os.path.abspath(r.image)))]], c)  # as index keys them
                   for r in records for c in r.captions]
        if a.queries:
            queries = random.Random(a.seed).sample(queries, min(a.queries, len(queries)))
        t0 = time.perf_counter()
        parts = []
        for i, (_, text) in enumerate(queries):
            parts.append(components(con, view, cap, text, a.candidates))
            if (i + 1) % 50 == 0:
                left = (time.perf_counter() - t0) / (i + 1) * (len(queries) - i - 1)
                print(f"{i + 1}/{len(queries)} queries, {left:.0f} s left", flush=True)
    targets = [t for t, _ in queries]
    if a.save:
        np.savez_compressed(a.save, targets=np.array(targets), **{k: np.stack([c[k] for c in parts])
                                                                 for k in parts[0]})
    base = {"logp": 1.0, "words": 0.4, "tags": 4.0, "kw": 0.2, "kw1": 1.0, "space": 0.0, "space1": 0.0}
    grid = [base | {"space1": s1, "space": s, "logp": lp, "words": ww}
            for s1, s, lp, ww in itertools.product(SPACE_FIRST, (0, 10, 20, 30, 50, 80, 120, 200), (1.0, 0.5, 0.0),
                                                   (0.2, 0.4, 0.8))]
    rows = []
    for w in grid:
        r = ranks(parts, targets, w, a.candidates)
        rows.append(((r <= 1).mean() * 100, (r <= 5).mean() * 100, (r <= 10).mean() * 100, float(np.median(r)), w))
    rows.sort(key=lambda x: (-(x[0] + x[1] + x[2]),))
    print(f"{len(queries)} queries, {len(view.ids)} photos")
    print("R@1   R@5   R@10  median  space1 space logp words")
    shown = rows[:20] + [r for r in rows if r[4]["logp"] == 0][:3]  # and the best without log p (--no-features)
    for r1, r5, r10, med, w in shown:
        print(f"{r1:5.1f} {r5:5.1f} {r10:5.1f} {med:6.1f}  {str(w['space1']):>6} {w['space']:5g} {w['logp']:4g} "
              f"{w['words']:5g}")
    shipped = base | {"space1": None, "space": SPACE_WEIGHT, "words": SPACE_WORDS_WEIGHT}
    for name, w in (("old hybrid", base), ("shipped hybrid", shipped),
                    ("space alone", base | {"space1": None, "space": 1, "logp": 0, "words": 0, "tags": 0, "kw": 0})):
        r = ranks(parts, targets, w, a.candidates)
        print(f"{name}: R@1 {(r <= 1).mean() * 100:.1f} R@5 {(r <= 5).mean() * 100:.1f} "
              f"R@10 {(r <= 10).mean() * 100:.1f} median {np.median(r):.0f}")


if __name__ == "__main__":
    main()
