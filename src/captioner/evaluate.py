"""`captioner evaluate`: free-running captions for every image of a split, scored with the COCO
caption metrics against all of that image's references."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from captioner import metrics
from captioner.data.features import cached_features
from captioner.data.records import check_images, load_records, split_records
from captioner.decode import Decoding, caption_features
from captioner.errors import DataError
from captioner.files import atomic_write, path_text
from captioner.model.folder import load_model
from captioner.runtime import pick_device, resolve_precision


@torch.no_grad()
def evaluate(model_dir: Path, data: Path, split: str = "val", *, layout: str | None = None,
             images: Path | None = None, decoding: Decoding | None = None, batch_size: int = 100,
             device: str = "auto", precision: str = "auto", cache_dir: Path | None = None, out: Path | None = None,
             skip_missing: bool = False, max_images: int = 0, meteor: bool = True, progress: bool = True) -> dict:
    """Caption every image of `split` with the model folder `model_dir` (with `decoding`, else the
    model's own) and score the captions against all of each image's references. Returns the
    scores and what was run (images, beam size, length norm, split, tokenizer, seconds)."""
    dev = pick_device(device)
    prec = resolve_precision(precision, dev)
    records = load_records(data, layout, images)
    chosen = split_records(records, split)
    if not chosen and all(r.split == "" for r in records):
        chosen = records  # a folder holding only one split's images and captions
    if not chosen:
        raise DataError(f"{data}: no images in the {split!r} split")
    chosen = check_images(chosen, skip_missing)[: max_images or None]
    model, vocab = load_model(model_dir, dev)
    if out:  # find out now, not after the work, that the results cannot be written there
        Path(out).mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    feats, ok, errors = cached_features(model, [r.image for r in chosen], cache_dir, device=dev, precision=prec,
                                        progress=progress)
    if errors:
        print(f"{len(errors)} unreadable images left out (first: {errors[0]})")
    keep = np.flatnonzero(ok)
    chosen = [chosen[i] for i in keep]
    feats = torch.from_numpy(np.asarray(feats[keep]))
    decoding = decoding or Decoding.for_model(model.cfg)
    hyps = [r["caption"] for r in caption_features(model.decoder, vocab, feats, decoding, dev, prec, batch_size)]
    ids = image_ids([r.image for r in chosen])
    scores = metrics.score({k: r.captions for k, r in zip(ids, chosen)}, dict(zip(ids, hyps)), meteor=meteor)
    result = {k: (round(scores[k], 4) if scores[k] is not None else None) for k in metrics.KEYS}
    result |= {"images": len(chosen), "beam_size": decoding.beam_size, "length_norm": decoding.length_norm,
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
