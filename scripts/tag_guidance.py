"""Choose tag guidance on data: caption a split with and without confident tags as constraints.

    python scripts/tag_guidance.py --data ../shared/datasets/coco240 --split test
    python scripts/tag_guidance.py --data ../shared/datasets/flickr8k --split val --thresholds 0.5 0.7

Features are computed once (the feature cache); each row re-runs only the search. Prints one row
per setting: how many captions the tags changed, CIDEr-D, BLEU-4, METEOR, ROUGE-L (docs/EXPERIMENTS.md
records the runs that chose the shipped default).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch

from captioner import Captioner, metrics
from captioner.data.records import check_images, load_records, split_records
from captioner.evaluate import image_ids
from captioner.inference.features import cached_features
from captioner.tags import Tagger, pooled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--model", help="model folder (default: the shipped model)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--most", type=int, nargs="+", default=[1, 2], help="constraint sets per caption")
    ap.add_argument("--beams", type=int, nargs="+", help="beam sizes (default: the model's own)")
    ap.add_argument("--no-meteor", action="store_true")
    args = ap.parse_args()

    cap = Captioner.load(args.model, precision=args.precision)
    tagger = Tagger.for_encoder(cap.model.cfg.encoder).to(cap.device)
    records = check_images(split_records(load_records(args.data), args.split))
    feats, ok, _ = cached_features(cap.model, [r.image for r in records], cap.plan, encoder=cap.encoder)
    keep = np.flatnonzero(ok)
    records = [records[i] for i in keep]
    feats = torch.from_numpy(np.asarray(feats[keep]))
    probs = torch.cat([tagger.probs(pooled(feats[i:i + 256].float())) for i in range(0, len(feats), 256)])
    refs = {k: r.captions for k, r in zip(image_ids([r.image for r in records]), records)}
    ids = list(refs)
    print(f"{args.data} {args.split}: {len(records)} images; precision {cap.precision}")
    print("| beam | threshold | sets | captions changed | CIDEr-D | BLEU-4 | METEOR | ROUGE-L | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for beam in args.beams or [cap.decoding.beam_size]:
        plain = cap.decoding.replace(beam_size=beam, tag_threshold=0.0)
        base = None
        for threshold, most in [(0.0, 2)] + list(itertools.product(args.thresholds, args.most)):
            decoding = plain.replace(tag_threshold=threshold, tag_words=most)
            t0 = time.perf_counter()
            hyps = [r["caption"] for i in range(0, len(feats), 100)  # as `captioner evaluate` runs it
                    for r in cap.caption_features(feats[i:i + 100], decoding, probs[i:i + 100])]
            seconds = time.perf_counter() - t0
            base = base or hyps
            s = metrics.score(refs, dict(zip(ids, hyps)), meteor=not args.no_meteor)
            meteor = f"{s['METEOR']:.4f}" if s["METEOR"] is not None else "-"
            print(f"| {beam} | {threshold or 'off'} | {most if threshold else '-'} | "
                  f"{sum(a != b for a, b in zip(hyps, base))} | {s['CIDEr']:.4f} | {s['BLEU-4']:.4f} | {meteor} | "
                  f"{s['ROUGE-L']:.4f} | {seconds:.1f} |", flush=True)

if __name__ == "__main__":
    main()
