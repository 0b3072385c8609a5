"""One record form for every caption layout, a reader per layout, and `detect()`.

A record is one image with all of its captions and the split it belongs to. Every reader
returns ``list[Record]``; nothing downstream knows which layout the data came in.

Layouts:
  flickr   Flickr8k/Flickr30k official: ``Flickr8k.token.txt`` (``name#n<TAB>caption``) plus
           ``Flickr_8k.{train,dev,test}Images.txt`` split lists.
  csv      ``image,caption`` CSV with a header (Kaggle's ``captions.txt``, or a user's own file);
           an optional ``split`` column. Official Flickr split lists beside it are used.
  jsonl    one ``{"image": ..., "caption": ...}`` (or ``"captions": [...]``) object per line.
  karpathy ``dataset_{coco,flickr8k,flickr30k}.json`` (``restval`` counts as train).
  coco     COCO caption annotations ``captions_{train,val}2014.json`` plus image folders.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from captioner.errors import CaptionerWarning, DataError

LAYOUTS = ("flickr", "csv", "jsonl", "karpathy", "coco")  # the dataset layouts read here
SPLITS = ("train", "val", "test")

# Folder names the common distributions use for their images, tried in order.
_IMAGE_DIRS = ("Images", "images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "flickr30k_images")


@dataclass
class Record:
    image: Path
    captions: list[str] = field(default_factory=list)
    split: str = ""  # "train", "val", "test", or "" when the layout says nothing


# ---------------------------------------------------------------------------------------------
# helpers


def _image_root(folder: Path) -> Path:
    for name in _IMAGE_DIRS:
        if (folder / name).is_dir():
            return folder / name
    return folder


def read_text(path: Path) -> str:
    """A caption file's text. UTF-8 (with or without a byte-order mark) and UTF-16 with a BOM are
    read as they are; anything else is read as Windows-1252/Latin-1 with a warning, so a file
    saved by another program never stops a run and never changes silently."""
    data = Path(path).read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        warnings.warn(f"{path}: not UTF-8 (byte {e.start}); read as Windows-1252", CaptionerWarning, stacklevel=3)
        return data.decode("cp1252", errors="replace")


class SplitMap(dict):
    """image name -> split, keeping the first split an image is listed in: an image listed in two
    splits (train and val) must not be trained on and validated on, nor move silently. Conflicts
    are counted for the warning `_group` gives."""

    def __init__(self):
        super().__init__()
        self.conflicts: list[str] = []

    def __setitem__(self, name: str, split: str) -> None:
        if name in self and self[name] != split:
            self.conflicts.append(f"{name}: {self[name]} and {split}")
            return
        super().__setitem__(name, split)


MAX_SAME_CAPTION = 2  # copies of one caption kept for one image


def _group(pairs: list[tuple[str, str]], root: Path, splits: dict[str, str], source: Path | None = None
           ) -> list[Record]:
    """(image name, caption) pairs -> records, in first-seen order. Empty captions are left out
    with a warning that counts them, and so are copies of a caption past MAX_SAME_CAPTION for one
    image (50,000 duplicated rows once trained as 48,000 captions without a word). Two people
    writing the same sentence for one photo is real data, and kept: Flickr8k has 9 such pairs."""
    by_image: OrderedDict[str, Record] = OrderedDict()
    seen: Counter = Counter()
    empty = repeated = 0
    for name, caption in pairs:
        caption = " ".join(caption.split())
        rec = by_image.get(name)
        if rec is None:
            rec = by_image[name] = Record(root / name, [], splits.get(name, ""))
        if not caption:
            empty += 1
        elif seen[name, caption] >= MAX_SAME_CAPTION:
            repeated += 1
        else:
            seen[name, caption] += 1
            rec.captions.append(caption)
    if empty:
        warnings.warn(f"{source or root}: {empty} empty captions left out", CaptionerWarning, stacklevel=3)
    if repeated:
        warnings.warn(f"{source or root}: {repeated} rows repeat a caption of their image a third time or more; "
                      "left out", CaptionerWarning, stacklevel=3)
    conflicts = getattr(splits, "conflicts", [])
    if conflicts:
        warnings.warn(f"{source or root}: {len(conflicts)} images are listed in two splits (first: {conflicts[0]}); "
                      "each stays in the split it is first listed in", CaptionerWarning, stacklevel=3)
    return [r for r in by_image.values() if r.captions]


def _read_split_lists(folder: Path) -> dict[str, str]:
    """Official Flickr split lists (``Flickr_8k.trainImages.txt`` ...) found in `folder`."""
    splits: dict[str, str] = SplitMap()
    for path in sorted(folder.glob("*Images.txt")):
        lower = path.name.lower()
        split = "train" if "train" in lower else "val" if "dev" in lower or "val" in lower else (
            "test" if "test" in lower else "")
        if not split:
            continue
        for line in read_text(path).splitlines():
            if line.strip():
                splits[line.strip()] = split
    return splits


# ---------------------------------------------------------------------------------------------
# readers

_TOKEN_ID = re.compile(r"^(?P<name>.+?\.(?:jpe?g|png))(?:\.\d+)?#\d+$", re.IGNORECASE)


def read_flickr(path: Path, images: Path | None = None) -> list[Record]:
    """Official Flickr8k/30k token file. `path` is the token file or the folder holding it."""
    path = Path(path)
    token = path if path.is_file() else _find_token_file(path)
    folder = token.parent
    root = Path(images) if images else _image_root(folder)
    pairs: list[tuple[str, str]] = []
    bad = 0
    seen: set[str] = set()
    duplicates: list[str] = []
    for lineno, line in enumerate(read_text(token).splitlines(), 1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        m = _TOKEN_ID.match(key.strip())
        if not sep or not m:
            bad += 1
            if bad <= 3:
                warnings.warn(f"{token}:{lineno}: not 'image#n<TAB>caption', skipped", CaptionerWarning, stacklevel=2)
            continue
        # The official file has one bad id, '2258277193_586949ec62.jpg.1#0': the regex drops the '.1'.
        if key.strip() in seen:
            duplicates.append(f"{lineno}: {key.strip()}")
            continue
        seen.add(key.strip())
        pairs.append((m["name"], caption))
    if duplicates:
        warnings.warn(f"{token}: {len(duplicates)} lines repeat an id already read and were skipped (line "
                      f"{duplicates[0]}{', ...' if len(duplicates) > 1 else ''})", CaptionerWarning, stacklevel=2)
    if bad > 3:
        warnings.warn(f"{token}: {bad} malformed lines skipped in all", CaptionerWarning, stacklevel=2)
    return _group(pairs, root, _read_split_lists(folder), token)


def _find_token_file(folder: Path) -> Path:
    for name in ("Flickr8k.token.txt", "results_20130124.token", "Flickr30k.token.txt"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.token*"))
    if not found:
        raise DataError(f"{folder}: no Flickr token file (Flickr8k.token.txt) found")
    return found[0]


def read_csv(path: Path, images: Path | None = None) -> list[Record]:
    """``image,caption`` CSV with a header row; optional ``split`` column."""
    path = Path(path)
    root = Path(images) if images else _image_root(path.parent)
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        try:
            i_img = next(i for i, h in enumerate(header) if h in ("image", "image_name", "filename", "file"))
            i_cap = next(i for i, h in enumerate(header) if h in ("caption", "comment", "text"))
        except StopIteration:
            raise DataError(f"{path}: the header must name an 'image' and a 'caption' column, "
                            f"found {header}") from None
        i_split = header.index("split") if "split" in header else None
        pairs, row_splits, bad = [], SplitMap(), 0
        for row in _checked_rows(reader, path):
            if len(row) <= max(i_img, i_cap):
                bad += bool(row)
                continue
            name = row[i_img].strip()
            # An unquoted caption with commas spills into more columns: join them back.
            caption = ",".join(row[i_cap:]) if i_split is None and i_cap == len(header) - 1 else row[i_cap]
            if not name:
                bad += 1
                continue
            pairs.append((name, caption))
            if i_split is not None and len(row) > i_split:
                row_splits[name] = _norm_split(row[i_split])
    if bad:
        warnings.warn(f"{path}: {bad} malformed rows skipped", CaptionerWarning, stacklevel=2)
    splits = row_splits or _read_split_lists(path.parent)
    return _group(pairs, root, splits, path)


def _checked_rows(reader, path: Path):
    """The rows of a csv.reader, refusing what only a broken file gives: a field that runs over
    several lines (a quote opened and never closed swallows the rows after it) or one too large to
    be a caption or a file name. Both name the line where the trouble starts."""
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}:{start}: {e} (a quote that is never closed?)") from None
        if any("\n" in f or "\r" in f for f in row):
            raise DataError(f"{path}:{start}: a field runs over {reader.line_num - start + 1} lines, swallowing the "
                            "rows after it: a quote that is never closed? Fix that line and run again")
        if any(len(f) > 10_000 for f in row):
            raise DataError(f"{path}:{start}: a field of more than 10,000 characters: not a caption or a file name")
        yield row


def read_jsonl(path: Path, images: Path | None = None) -> list[Record]:
    """One JSON object per line: ``image`` plus ``caption`` or ``captions``; optional ``split``."""
    path = Path(path)
    root = Path(images) if images else path.parent
    pairs, splits, bad = [], SplitMap(), 0
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            name = obj["image"]
            caps = obj["captions"] if "captions" in obj else [obj["caption"]]
            caps = [caps] if isinstance(caps, str) else caps
            if not isinstance(name, str) or not name.strip() or not isinstance(caps, list):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
            bad += 1
            if bad <= 3:
                warnings.warn(f"{path}:{lineno}: not a JSON object with 'image' and 'caption', skipped",
                              CaptionerWarning, stacklevel=2)
            continue
        pairs.extend((name, c if isinstance(c, str) else "") for c in caps or [""])  # no captions: one empty
        if obj.get("split"):
            splits[name] = _norm_split(obj["split"])
    if bad > 3:
        warnings.warn(f"{path}: {bad} malformed lines skipped in all", CaptionerWarning, stacklevel=2)
    return _group(pairs, root, splits, path)


def read_karpathy(path: Path, images: Path | None = None) -> list[Record]:
    """Karpathy split JSON (``images[].filename/filepath/split/sentences[].raw``)."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a Karpathy split file (no 'images' list)")
    root = Path(images) if images else _image_root(path.parent)
    pairs, splits, bad = [], SplitMap(), 0
    for img in data["images"]:
        name = img.get("filename") if isinstance(img, dict) else None
        sentences = img.get("sentences", []) if isinstance(img, dict) else None
        if not isinstance(name, str) or not name or not isinstance(sentences, list):
            bad += 1
            continue
        name = str(Path(str(img.get("filepath") or "")) / name)
        for sent in sentences:
            sent = sent if isinstance(sent, dict) else {}
            raw = sent.get("raw")
            if not isinstance(raw, str):
                tokens = sent.get("tokens")
                raw = " ".join(t for t in tokens if isinstance(t, str)) if isinstance(tokens, list) else ""
            pairs.append((name, raw))
        splits[name] = _norm_split(img.get("split", ""))
    if bad:
        warnings.warn(f"{path}: {bad} entries of 'images' without a filename or sentences skipped",
                      CaptionerWarning, stacklevel=2)
    return _group(pairs, root, splits, path)


def read_coco(path: Path, images: Path | None = None) -> list[Record]:
    """COCO caption annotations. `path` is a ``captions_*.json`` file or a folder of them."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("**/captions_*.json"))
    if not files:
        raise DataError(f"{path}: no COCO captions_*.json file found")
    records: list[Record] = []
    for f in files:
        data = _load_json(f)
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) or \
                not isinstance(data.get("images"), list):
            raise DataError(f"{f}: not a COCO caption file (needs lists 'images' and 'annotations')")
        stem = f.stem.replace("captions_", "")  # e.g. train2014
        split = "train" if "train" in stem else "val" if "val" in stem else "test" if "test" in stem else ""
        base = f.parent.parent if f.parent.name == "annotations" else f.parent
        root = Path(images) if images else next(
            (p for p in (base / stem, base / "images" / stem, base / "images") if p.is_dir()), base)
        names = {im["id"]: im["file_name"] for im in data["images"]
                 if isinstance(im, dict) and isinstance(im.get("file_name"), str) and _is_id(im.get("id"))}
        notes = [a for a in data["annotations"] if isinstance(a, dict) and _is_id(a.get("image_id"))]
        pairs = [(names[a["image_id"]], a["caption"] if isinstance(a.get("caption"), str) else "")
                 for a in notes if a["image_id"] in names]
        if len(pairs) < len(data["annotations"]) or len(names) < len(data["images"]):
            warnings.warn(f"{f}: {len(data['annotations']) - len(pairs)} annotations and "
                          f"{len(data['images']) - len(names)} images malformed or unmatched, skipped",
                          CaptionerWarning, stacklevel=2)
        records += _group(pairs, root, {n: split for n in names.values()}, f)
    return records


def _is_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


READERS = {"flickr": read_flickr, "csv": read_csv, "jsonl": read_jsonl, "karpathy": read_karpathy,
           "coco": read_coco}


def _norm_split(s: str) -> str:
    s = str(s).strip().lower()
    return {"restval": "train", "dev": "val", "valid": "val", "validation": "val"}.get(s, s)


def _load_json(path: Path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to be a caption file") from None


# ---------------------------------------------------------------------------------------------
# detection and loading


def detect(path: Path) -> tuple[str, Path]:
    """Which layout `path` holds, and the file to read it from."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        for name in ("Flickr8k.token.txt", "results_20130124.token", "Flickr30k.token.txt"):
            if (path / name).is_file():
                return "flickr", path / name
        karpathy = sorted(path.glob("dataset_*.json"))
        if karpathy:
            return "karpathy", karpathy[0]
        for name in ("captions.txt", "captions.csv"):
            if (path / name).is_file():
                return "csv", path / name
        if (path / "captions.jsonl").is_file():
            return "jsonl", path / "captions.jsonl"
        if sorted(path.glob("**/captions_*.json")):
            return "coco", path
        raise DataError(f"{path}: no caption file found (looked for Flickr8k.token.txt, dataset_*.json, "
                        "captions.txt/.csv/.jsonl, annotations/captions_*.json)")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl", path
    if suffix == ".json":
        data = _load_json(path)
        if isinstance(data, dict) and "annotations" in data:
            return "coco", path
        if isinstance(data, dict) and "images" in data:
            return "karpathy", path
        raise DataError(f"{path}: JSON is neither a Karpathy split file nor COCO annotations")
    if ".token" in path.name:
        return "flickr", path
    with path.open("rb") as f:
        first = f.read(65536).decode("utf-8-sig", errors="replace").split("\n", 1)[0]
    if "\t" in first and "#" in first.split("\t")[0]:
        return "flickr", path
    return "csv", path


def load_records(path: Path, layout: str | None = None, images: Path | None = None) -> list[Record]:
    """Read any supported layout into records. `layout` overrides detection."""
    detected, file = detect(path)
    if layout and layout != detected:
        if layout not in READERS:
            raise DataError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
        file = Path(path)
        detected = layout
    records = READERS[detected](file, images)
    if not records:
        raise DataError(f"{path}: no captioned images found ({detected} layout)")
    return records


MIN_VAL_PHOTOS = 50  # fewer, and choosing an epoch or a decoding by val CIDEr-D is mostly chance


def assign_splits(records: list[Record], val_fraction: float | None = None) -> None:
    """When the layout names no split at all (a user's own CSV), give every record a stable one:
    `val_fraction` of them (by a hash of the file name, so the choice never changes between runs)
    become val, the rest train. By default 5%, or enough for about MIN_VAL_PHOTOS * 2 val photos in
    a small set, up to 20%: 5% of 300 photos was 18, and the best epoch and decoding chosen on them
    scored below the model fine-tuning started from. Layouts with split lists keep unlisted images
    out of every split."""
    unknown = Counter(r.split for r in records if r.split and r.split not in SPLITS)
    if unknown:
        shown = ", ".join(f"{k} ({n})" for k, n in unknown.most_common(5))
        warnings.warn(f"{sum(unknown.values())} images are in splits that are not train, val or test ({shown}); "
                      "they are left out", CaptionerWarning, stacklevel=2)
    if any(r.split for r in records):
        return
    unsplit = records
    if val_fraction is None:
        val_fraction = min(0.2, max(0.05, 2 * MIN_VAL_PHOTOS / max(len(unsplit), 1)))
    for r in unsplit:
        h = int(hashlib.sha1(r.image.name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        r.split = "val" if h < val_fraction else "train"
    if len(unsplit) > 1 and not any(r.split == "val" for r in unsplit):
        unsplit[-1].split = "val"


def split_records(records: list[Record], split: str) -> list[Record]:
    return [r for r in records if r.split == split]


def check_images(records: list[Record], skip_missing: bool = False) -> list[Record]:
    """Fail with one clear message when listed images are missing, or drop them with a warning."""
    missing = [r for r in records if not r.image.is_file()]
    if not missing:
        return records
    first = ", ".join(str(r.image) for r in missing[:3])
    msg = f"{len(missing)} of {len(records)} listed images are missing (first: {first})"
    if not skip_missing:
        raise DataError(msg + "; pass --skip-missing to leave them out")
    warnings.warn(msg + "; left out", CaptionerWarning, stacklevel=2)
    gone = {id(r) for r in missing}
    return [r for r in records if id(r) not in gone]
