"""A small synthetic captioned dataset: one coloured shape on a plain background per image (the
tests and the walkthrough notebook use it when no real data is at hand).

Captions are templated from what is drawn ("a red circle on a blue background"), so a model that
really learns from pixels can be checked word by word on held-out images.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30)}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = (
    "a {c} {s} on a {b} background",
    "a {c} {s} on a {b} background",
    "there is a {c} {s} on a {b} background",
    "{c} {s} on a {b} background",
    "a {c} {s} in front of a {b} background",
)


def draw(colour: str, shape: str, background: str, size: int = 96, rng: random.Random | None = None) -> Image.Image:
    """One image: `shape` in `colour`, at a random place and size, on `background`."""
    rng = rng or random.Random(0)
    img = Image.new("RGB", (size, size), COLOURS[background])
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def combos() -> list[tuple[str, str, str]]:
    return [(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c]


def make_dataset(folder: Path, per_combo: int = 4, val_per_combo: int = 1, size: int = 96, seed: int = 0) -> Path:
    """Write images and `captions.jsonl` (with a split per image) into `folder`; return the jsonl path.

    Every (colour, shape, background) combination appears `per_combo` times in train and
    `val_per_combo` times in val, drawn at other places and sizes.
    """
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for c, s, b in combos():
        for k in range(per_combo + val_per_combo):
            name = f"{c}_{s}_{b}_{k}.png"
            draw(c, s, b, size, rng).save(folder / name)
            captions = [t.format(c=c, s=s, b=b) for t in TEMPLATES]
            split = "train" if k < per_combo else "val"
            lines.append(json.dumps({"image": name, "captions": captions, "split": split}))
    path = folder / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
