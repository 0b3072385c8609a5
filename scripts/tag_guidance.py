"""Choose tag guidance on data: caption a split with and without confident tags as constraints.

    python scripts/tag_guidance.py --data ../shared/datasets/coco240 --split test
    python scripts/tag_guidance.py --data ../shared/datasets/flickr8k --split val --thresholds 0.5 0.7
    python scripts/tag_guidance.py --data ../shared/datasets/flickr8k --split val --cost   # what guidance costs
    python scripts/tag_guidance.py --data ../shared/datasets/flickr8k --split train --count-naming --model FOLDER

Features are computed once (the feature cache); each row re-runs only the search. Prints one row
per setting: how many captions the tags changed, CIDEr-D, BLEU-4, METEOR, ROUGE-L (docs/EXPERIMENTS.md
records the runs that chose the shipped default). `--count-naming` instead counts how often the
split's captions say their photos' tag words and writes the model folder's naming.json, as training
does at its end (for a folder trained before it, such as the shipped one).
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
from captioner.model.network import NAMING, model_dir, save_naming
from captioner.tags import Tagger, pooled
from captioner.train.data import Captions, FeatureRows
from captioner.train.epoch import count_naming


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--model", help="model folder (default: the shipped model)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--most", type=int, nargs="+", default=[1, 2], help="constraint sets per caption")
    ap.add_argument("--beams", type=int, nargs="+", help="beam sizes (default: the model's own)")
    ap.add_argument("--named", type=float, nargs="+", default=[0.0],
                    help="least naming rates of a tag word (naming.json; 0 = every word)")
    ap.add_argument("--count-naming", action="store_true",
                    help="instead, write the model folder's naming.json from the split's captions (the training split)")
    ap.add_argument("--borrow", action="store_true", help="tag words the vocabulary lacks borrow the nearest it has")
    ap.add_argument("--no-meteor", action="store_true")
    ap.add_argument("--cost", action="store_true",
                    help="instead, time guidance at the model's own setting against none, fp32 and bf16: one photo "
                         "(examples/chelsea.jpg, which it changes, and grace_hopper.jpg, which it does not; p50 of 25, "
                         "twice in turns) and `caption --out` over 500 photos of the split (twice in turns)")
    args = ap.parse_args()
    if args.cost:
        return cost(args)

    cap = Captioner.load(args.model, precision=args.precision)
    tagger = Tagger.for_encoder(cap.model.cfg.encoder).to(cap.device)
    if args.count_naming and cap.tags_need_own_pass:
        raise SystemExit("the encoder was fine-tuned: its cached features do not fit the ImageNet classifier")
    records = check_images(split_records(load_records(args.data), args.split))
    feats, ok, _ = cached_features(cap.model, [r.image for r in records], cap.plan, encoder=cap.encoder)
    keep = np.flatnonzero(ok)
    if args.count_naming:
        caps, _ = Captions.build([records[i] for i in keep], cap.vocab, cap.model.cfg.max_len)
        naming = count_naming(cap.model.cfg.encoder, cap.vocab, FeatureRows(feats, keep.tolist()), caps)
        if naming is None:
            raise SystemExit(f"{cap.model.cfg.encoder}: no ImageNet classifier, so no tags to count")
        save_naming(naming, model_dir(args.model))
        print(f"{model_dir(args.model) / NAMING}: {len(naming.words)} words; the captions said a photo's tag word "
              f"{naming.prior:.1%} of the time")
        for word, (photos, said) in sorted(naming.words.items(), key=lambda x: -x[1][0])[:40]:
            print(f"  {word}: {photos} photos, said in {said / photos:.0%} of their captions "
                  f"(rate {naming.rate(word):.2f})")
        return
    records = [records[i] for i in keep]
    feats = torch.from_numpy(np.asarray(feats[keep]))
    probs = torch.cat([tagger.probs(pooled(feats[i:i + 256].float())) for i in range(0, len(feats), 256)])
    refs = {k: r.captions for k, r in zip(image_ids([r.image for r in records]), records)}
    ids = list(refs)
    print(f"{args.data} {args.split}: {len(records)} images; precision {cap.precision}")
    print(f"naming.json: {'yes' if cap.model.naming else 'none (--named has no effect)'}")
    print("| beam | threshold | sets | named | captions changed | CIDEr-D | BLEU-4 | METEOR | ROUGE-L | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for beam in args.beams or [cap.decoding.beam_size]:
        plain = cap.decoding.replace(beam_size=beam, tag_threshold=0.0)
        base = None
        for threshold, most, named in [(0.0, 2, 0.0)] + list(itertools.product(args.thresholds, args.most, args.named)):
            decoding = plain.replace(tag_threshold=threshold, tag_words=most, tag_borrow=args.borrow, tag_named=named)
            t0 = time.perf_counter()
            hyps = [r["caption"] for i in range(0, len(feats), 100)  # as `captioner evaluate` runs it
                    for r in cap.caption_features(feats[i:i + 100], decoding, probs[i:i + 100])]
            seconds = time.perf_counter() - t0
            base = base or hyps
            s = metrics.score(refs, dict(zip(ids, hyps)), meteor=not args.no_meteor)
            meteor = f"{s['METEOR']:.4f}" if s["METEOR"] is not None else "-"
            print(f"| {beam} | {threshold or 'off'} | {most if threshold else '-'} | {named if threshold else '-'} | "
                  f"{sum(a != b for a, b in zip(hyps, base))} | {s['CIDEr']:.4f} | {s['BLEU-4']:.4f} | {meteor} | "
                  f"{s['ROUGE-L']:.4f} | {seconds:.1f} |", flush=True)

def cost(args) -> None:
    import statistics
    import tempfile

    from captioner.batch import caption_to_file

    examples = Path(__file__).resolve().parents[1] / "examples"
    paths = [r.image for r in check_images(split_records(load_records(args.data), args.split))][:500]
    for precision in ("fp32", "bf16"):
        cap = Captioner.load(args.model, precision=precision)
        unguided = cap.decoding.replace(tag_threshold=0.0)
        for photo in ("chelsea.jpg", "grace_hopper.jpg"):
            p50: dict[bool, list[float]] = {False: [], True: []}
            for guided in (False, True, False, True):
                for _ in range(3):
                    cap.caption(examples / photo, guided=guided)
                lat = []
                for _ in range(25):
                    t0 = time.perf_counter()
                    cap.caption(examples / photo, guided=guided)
                    lat.append((time.perf_counter() - t0) * 1000)
                p50[guided].append(statistics.median(lat))
            print(f"{precision} {photo}: p50 {min(p50[False]):.1f} ms without guidance, {min(p50[True]):.1f} ms with "
                  f"({min(p50[True]) / min(p50[False]):.2f}x)", flush=True)
        rates: dict[bool, list[float]] = {False: [], True: []}
        for guided in (False, True, False, True):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                caption_to_file(cap, paths, Path(tmp) / "out.jsonl", progress=False,
                                decoding=cap.decoding if guided else unguided)
                rates[guided].append(len(paths) / (time.perf_counter() - t0))
        print(f"{precision} caption --out, {len(paths)} photos: {max(rates[False]):.1f} photos/s without guidance, "
              f"{max(rates[True]):.1f} with ({max(rates[True]) / max(rates[False]):.2f}x)", flush=True)


if __name__ == "__main__":
    main()
