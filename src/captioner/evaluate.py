"""`captioner evaluate`: free-running captions for every image of a split, scored with the COCO
caption metrics against all of that image's references."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from captioner import metrics
from captioner.data.features import cached_features
from captioner.data.records import DataError, check_images, load_records, split_records
from captioner.decode import search
from captioner.model.folder import load_model
from captioner.runtime import autocast, pick_device, resolve_precision


@torch.no_grad()
def evaluate(model_dir: Path, data: Path, split: str = "val", *, fmt: str | None = None,
             images: Path | None = None, beam_size: int | None = None, length_norm: float | None = None,
             block_trigrams: bool = False, batch_size: int = 100, device: str = "auto",
             precision: str = "auto", cache_dir: Path | None = None, out: Path | None = None,
             skip_missing: bool = False, max_images: int = 0, meteor: bool = True,
             progress: bool = True) -> dict:
    dev = pick_device(device)
    prec = resolve_precision(precision, dev)
    records = load_records(data, fmt, images)
    chosen = split_records(records, split)
    if not chosen and all(r.split == "" for r in records):
        chosen = records  # a folder holding only one split's images and captions
    if not chosen:
        raise DataError(f"{data}: no images in the {split!r} split")
    chosen = check_images(chosen, skip_missing)[: max_images or None]
    model, vocab = load_model(model_dir, dev)

    t0 = time.perf_counter()
    feats, ok, errors = cached_features(model, [r.image for r in chosen], cache_dir, device=dev, precision=prec,
                                        progress=progress)
    if errors:
        print(f"{len(errors)} unreadable images left out (first: {errors[0]})")
    keep = np.flatnonzero(ok)
    chosen = [chosen[i] for i in keep]
    feats = torch.from_numpy(np.asarray(feats[keep]))
    settings = model.cfg.search_settings(beam_size, length_norm, block_trigrams)
    hyps = []
    for i in range(0, len(chosen), batch_size):
        f = feats[i:i + batch_size].to(dev).float()
        with autocast(dev, prec):
            h = search(model.decoder, f, vocab, **settings)
        hyps += [vocab.decode(t) for t in h.tokens[:, 0].tolist()]
    ids = [r.image.name for r in chosen]
    scores = metrics.score({k: r.captions for k, r in zip(ids, chosen)}, dict(zip(ids, hyps)), meteor=meteor)
    result = {k: (round(scores[k], 4) if scores[k] is not None else None) for k in metrics.KEYS}
    result |= {"images": len(chosen), "beam_size": settings["beam_size"], "length_norm": settings["length_norm"],
               "split": split, "tokenizer": scores["tokenizer"], "seconds": round(time.perf_counter() - t0, 1)}
    if scores.get("meteor_skipped"):
        result["meteor_skipped"] = scores["meteor_skipped"]
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "captions.json").write_text(json.dumps(
            [{"image_id": k, "caption": h} for k, h in zip(ids, hyps)], indent=1))
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result
