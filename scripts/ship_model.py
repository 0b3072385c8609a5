"""Turn a trained model folder into the shipped one: fp16 weights, the chosen decoding (decoding.json),
and its search space (embedding.json + embedding.safetensors) when it has one.

    python scripts/ship_model.py runs/att512_scst_xe/best --length-norm 1.5
    python scripts/ship_model.py runs/space/best --space-only   # add a space trained for the shipped model
    python scripts/ship_model.py --decoding-only --space-rerank 0.3   # change the shipped decoding.json alone

writes src/captioner/assets/model (or --out). Only JSON and safetensors are read and written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from captioner.model.network import DECODING, load_model, load_space, read_config, read_decoding, save_model, save_space

ASSETS = Path(__file__).resolve().parents[1] / "src" / "captioner" / "assets" / "model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, nargs="?", help="a trained model folder, e.g. runs/NAME/best")
    ap.add_argument("--out", type=Path, default=ASSETS)
    ap.add_argument("--beam-size", type=int, default=None, help="default decoding (default: the folder's own)")
    ap.add_argument("--length-norm", type=float, default=None, help="default length normalisation")
    ap.add_argument("--block-trigrams", action=argparse.BooleanOptionalAction, default=None,
                    help="never repeat a word trigram (default: the folder's own)")
    ap.add_argument("--tag-threshold", type=float, default=None,
                    help="tag guidance: the caption says confident tags' words, 0 = off (default: the folder's own)")
    ap.add_argument("--tag-words", type=int, default=None, help="tag guidance: at most this many words a caption")
    ap.add_argument("--tag-named", type=float, default=None,
                    help="tag guidance: only words the training captions said this often (naming.json)")
    ap.add_argument("--space-rerank", type=float, default=None,
                    help="order the beams by score + this x their match in the search space, 0 = off")
    ap.add_argument("--rarity-penalty", type=float, default=None,
                    help="... minus this x how rare their words are (Vocabulary.rarity), 0 = off")
    ap.add_argument("--note", default="", help="stored in config.json under extra.shipped")
    ap.add_argument("--decoding-only", action="store_true",
                    help="change only --out's decoding.json, by the options above (no model folder read)")
    ap.add_argument("--space-only", action="store_true",
                    help="copy only the folder's search space into --out, whose model it must fit (captioner train "
                         "--space-only --init shipped made it); the rest of --out is left as it is")
    args = ap.parse_args()
    changes = dict(beam_size=args.beam_size, length_norm=args.length_norm, block_trigrams=args.block_trigrams,
                   tag_threshold=args.tag_threshold, tag_words=args.tag_words, tag_named=args.tag_named,
                   space_rerank=args.space_rerank, rarity_penalty=args.rarity_penalty)
    if args.decoding_only:
        decoding = read_decoding(args.out).changed(**changes)
        (args.out / DECODING).write_text(json.dumps(decoding.saved(), indent=2) + "\n", encoding="utf-8")
        print(f"{args.out / DECODING}: {decoding.describe()}")
        return
    if args.model is None:
        ap.error("give the model folder to ship (or --decoding-only)")
    if args.space_only:
        space = load_space(args.model, read_config(args.out))
        if space is None:
            raise SystemExit(f"{args.model}: no search space (embedding.json) to ship")
        save_space(space, args.out)
        print(f"{args.out}: search space from {args.model} ({space.cfg.point_dim} dimensions, fp16)")
        return
    space = load_space(args.model, read_config(args.model))

    model, vocab = load_model(args.model)
    model.decoding = model.decoding.changed(**changes)  # decoding.json
    card = args.out / "MODEL_CARD.md"
    card_text = card.read_text(encoding="utf-8") if card.is_file() else None
    save_model(model, vocab, args.out, half=True)  # replaces the folder: keep its model card
    if space is not None:
        save_space(space, args.out)
    if card_text is not None:
        card.write_text(card_text, encoding="utf-8")
        print(f"{card}: kept; update its figures for the new model")
    path = args.out / "config.json"
    cfg = json.loads(path.read_text())
    cfg.setdefault("extra", {})["shipped"] = f"from {args.model}, weights in fp16. {args.note}".strip()
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"{args.out}: {model.decoding.describe()}")

if __name__ == "__main__":
    main()
