"""`captioner evaluate`: free-running captions for every image of a split, scored with the COCO
caption metrics against all of that image's references."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from captioner import library, metrics
from captioner.api import Captioner
from captioner.data.records import check_images, load_records, split_records
from captioner.decoding import Decoding
from captioner.errors import DataError
from captioner.files import atomic_write, path_text
from captioner.inference.features import cached_features
from captioner.inference.plan import InferencePlan
from captioner.library import DEFAULT_MODE, MODES, index_folders
from captioner.retrieval import RERANK


@torch.no_grad()
def evaluate(model_dir: Path, data: Path, split: str = "val", *, layout: str | None = None,
             images: Path | None = None, decoding: Decoding | None = None, batch_size: int = 100,
             device: str = "auto", precision: str = "auto", cache_dir: Path | None = None, out: Path | None = None,
             skip_missing: bool = False, max_images: int = 0, meteor: bool = True, progress: bool = True) -> dict:
    """Caption every image of `split` with the model folder `model_dir` (with `decoding`, else the
    model's own) and score the captions against all of each image's references. Returns the
    scores and what was run (images, beam size, length norm, split, tokenizer, seconds)."""
    plan = InferencePlan.resolve(device, precision)  # a device or precision this machine lacks: said first
    records = load_records(data, layout, images)
    chosen = split_records(records, split)
    if not chosen and all(r.split == "" for r in records):
        chosen = records  # a folder holding only one split's images and captions
    if not chosen:
        raise DataError(f"{data}: no images in the {split!r} split")
    chosen = check_images(chosen, skip_missing)[: max_images or None]
    cap = Captioner.load(model_dir, plan=plan)
    if out:  # find out now, not after the work, that the results cannot be written there
        Path(out).mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    feats, ok, errors = cached_features(cap.model, [r.image for r in chosen], cap.plan, cache_dir, progress=progress,
                                        encoder=cap.encoder)  # the copy Captioner.load made
    if errors:
        print(f"{len(errors)} unreadable images left out (first: {errors[0]})")
    keep = np.flatnonzero(ok)
    chosen = [chosen[i] for i in keep]
    feats = torch.from_numpy(np.asarray(feats[keep]))
    decoding = decoding or cap.decoding
    probs = None  # the tags' class probabilities, when they cannot come from these features
    if cap.tagger is not None and cap.tags_need_own_pass and decoding.guided:
        probs = cap.tag_probs_of_files([r.image for r in chosen])
    hyps = [r["caption"] for i in range(0, len(feats), batch_size)
            for r in cap.caption_features(feats[i:i + batch_size].to(cap.device), decoding,
                                          None if probs is None else probs[i:i + batch_size])]
    ids = image_ids([r.image for r in chosen])
    scores = metrics.score({k: r.captions for k, r in zip(ids, chosen)}, dict(zip(ids, hyps)), meteor=meteor)
    result = {k: (round(scores[k], 4) if scores[k] is not None else None) for k in metrics.KEYS}
    result |= {"images": len(chosen), "beam_size": decoding.beam_size, "length_norm": decoding.length_norm,
               "block_trigrams": decoding.block_trigrams,
               "split": split, "tokenizer": scores["tokenizer"], "seconds": round(time.perf_counter() - t0, 1)}
    if scores.get("meteor_skipped"):
        result["meteor_skipped"] = scores["meteor_skipped"]
    if out:
        with atomic_write(Path(out) / "captions.json") as f:
            f.write(json.dumps([{"image_id": k, "caption": h} for k, h in zip(ids, hyps)], indent=1))
        with atomic_write(Path(out) / "metrics.json") as f:
            f.write(json.dumps(result, indent=2))
    return result


def image_ids(paths: list[Path]) -> list[str]:
    """One id per image for scoring and for captions.json: the file name, or, where two images of
    the split share a name (a/x.jpg, b/x.jpg), the path below the folder they all sit in, so that
    no image's captions are scored against another's references."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [path_text(p.relative_to(root)) for p in paths]


def retrieval(model_dir: Path | None, data: Path, split: str = "val", *, layout: str | None = None,
              images: Path | None = None, db: Path | None = None, modes: tuple[str, ...] = MODES,
              batch_size: int = 32, device: str = "auto", precision: str = "auto", skip_missing: bool = False,
              max_images: int = 0, progress: bool = True) -> dict:
    """Text-to-image search, measured: index the split's photos (into `db`, else a temporary
    database) and run each of their reference captions as a query, whose one right answer is its
    own photo. Returns R@1, R@5, R@10 (percent of queries whose photo is in the first 1, 5, 10) and
    the median rank for each of `modes`, and those of the default mode at the top level.

    With a model that has a search space, also image-to-text: each photo ranks all the captions by
    the space's cosine, and is found by the best of its own ("image_to_text", R@K and median rank),
    and "rsum", the six R@K of the default mode's text-to-image and this added, as the retrieval
    papers report them. ("embedding" is measured only for such a model.)

    Photos a mode cannot tell apart (those no keyword matches, say) share their ranks: each gets the
    mean of the places they fill, so no mode gains from the order of the files."""
    t0 = time.perf_counter()
    records = load_records(data, layout, images)
    chosen = split_records(records, split) or (records if all(r.split == "" for r in records) else [])
    if not chosen:
        raise DataError(f"{data}: no images in the {split!r} split")
    chosen = check_images(chosen, skip_missing)[: max_images or None]
    if db:
        _check_only_the_split(Path(db), chosen, split)
    cap = Captioner.load(model_dir, device, precision)
    if cap.space is None:
        modes = tuple(m for m in modes if m != "embedding")
    with tempfile.TemporaryDirectory(prefix="captioner-retrieval-") as tmp:
        db = Path(db) if db else Path(tmp) / "library.db"
        report = index_folders(cap, [], db, batch_size=batch_size, progress=progress,
                               files=[r.image for r in chosen])
        if report.failed:
            print(f"{len(report.failed)} unreadable images left out (first: {report.failed[0]})")
        with library.reading(db) as con:
            photo = {path: pid for pid, path in con.execute("SELECT id, path FROM photos")}
            view = library.ModelView(con, cap) if set(modes) - {"keyword"} else None
            found = [(photo.get(path_text(Path(os.path.abspath(r.image)))), r) for r in chosen]  # as index stored it
            queries = [(pid, c) for pid, r in found if pid is not None for c in r.captions]
            ranks: dict[str, list[float]] = {m: [] for m in modes}
            model_modes = tuple(m for m in modes if m != "keyword")
            for pid, text in tqdm(queries, desc="queries", unit="query", disable=not progress):
                if "keyword" in modes:
                    scores = library.keyword_scores(con, text)
                    ranked = sorted(scores.items(), key=lambda x: -x[1])
                    ranks["keyword"].append(rank_of(ranked, pid, len(photo), len(ranked)))
                if model_modes:
                    for mode, ranked in library.rank(con, view, text, model_modes).items():
                        scored = len(ranked) if mode == "embedding" else min(RERANK, len(ranked))
                        ranks[mode].append(rank_of(ranked, pid, len(photo), scored))
            image_to_text = _image_to_text(con, cap, queries) if cap.space is not None and queries else None
    result = {"images": len(photo), "queries": len(queries), "split": split, "model": str(model_dir or "shipped"),
              "default_mode": DEFAULT_MODE, "modes": {m: recall(r) for m, r in ranks.items()}}
    if DEFAULT_MODE in result["modes"]:
        result |= result["modes"][DEFAULT_MODE]
    if image_to_text is not None:
        result["image_to_text"] = image_to_text
        if DEFAULT_MODE in result["modes"]:
            result["rsum"] = round(sum(result["modes"][DEFAULT_MODE][k] + image_to_text[k]
                                       for k in ("R@1", "R@5", "R@10")), 2)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _check_only_the_split(db: Path, chosen: list, split: str) -> None:
    """Refuse a --db that holds photos other than the split's: each query ranks every photo in the
    library, so the figures would not be the split's, and indexing would add the split to it for good."""
    if not db.is_file() or db.stat().st_size == 0:
        return
    wanted = {path_text(Path(os.path.abspath(r.image))) for r in chosen}
    with library.reading(db) as con:
        others = sum(path not in wanted for (path,) in con.execute("SELECT path FROM photos"))
    if others:
        raise DataError(f"{db}: holds {others:,} photos that are not in the {split!r} split measured here; every "
                        "query would rank them too. Give a new --db (it keeps the split's library for the next run), "
                        "or none for a temporary one")


def _image_to_text(con, cap: Captioner, queries: list[tuple[int, str]]) -> dict:
    """Each photo ranks every query caption by the cosine of their points in the search space (the
    photo's as the library stores it); R@K and median rank of the best of its own captions."""
    from captioner.library.search import query_words
    from captioner.library.store import point_blocks
    from captioner.train.embedding import recall_both, retrieval_ranks

    ids = sorted({pid for pid, _ in queries})
    stored = {}
    for block_ids, block in point_blocks(con, cap.fingerprint):
        keep = np.isin(block_ids, ids)
        stored.update(zip(block_ids[keep].tolist(), block[keep]))
    img = torch.from_numpy(np.stack([stored[i] for i in ids]).astype(np.float32))
    txt = torch.from_numpy(np.concatenate([cap.embed_text([" ".join(query_words(t)) for _, t in queries[i:i + 512]])
                                           for i in range(0, len(queries), 512)]))
    where = {pid: i for i, pid in enumerate(ids)}
    _, i2t = retrieval_ranks(img, txt, torch.tensor([where[pid] for pid, _ in queries]))
    return recall_both(i2t, i2t)["image_to_text"]


def rank_of(ranked: list[tuple[int, float]], target: int, total: int, scored: int) -> float:
    """The rank (1 = first) of photo `target` in `ranked`, (id, score) best first, of which the first
    `scored` were ordered by score and the rest by a coarser score; photos of `total` not in
    `ranked` come after all of them. Ties share the mean of their places."""
    pos = next((i for i, (pid, _) in enumerate(ranked) if pid == target), None)
    if pos is None:  # not ranked at all: after the ranked ones, tied with the other unranked
        return len(ranked) + (total - len(ranked) + 1) / 2
    lo, hi = (0, scored) if pos < scored else (scored, len(ranked))
    own = ranked[pos][1]
    better = sum(1 for _, s in ranked[lo:hi] if s > own)
    tied = sum(1 for _, s in ranked[lo:hi] if s == own) - 1
    return lo + better + 1 + tied / 2


def recall(ranks: list[float]) -> dict:
    """Ranks (1 = first) -> {"R@1", "R@5", "R@10" (percent), "median_rank"}."""
    r = np.asarray(ranks, dtype=np.float64)
    out = {f"R@{k}": round(float((r <= k).mean() * 100), 2) if len(r) else None for k in (1, 5, 10)}
    return out | {"median_rank": float(np.median(r)) if len(r) else None}
