"""Caption many images into a file (JSON Lines or CSV), resumably.

Each line names the image, the SHA-1 of its bytes and its caption (JSONL also holds the
alternatives when beam search gives them). A re-run skips images already in the file with the same
content, re-captions changed ones (their old lines are dropped) and appends the rest, so an
interrupted run loses at most the batch in flight. Unreadable files are reported at the end and
never stop the run. Memory stays flat however many images there are: paths stream through a
DataLoader and results go straight to the file.

Several processes (`captioner caption --nproc N`, or torchrun): process r captions every N-th
image from the r-th into its own part file `OUT.partR.jsonl`; when all are done, process 0 appends
the parts to OUT in the order of the images and deletes them. Part files left by an interrupted run
are folded into OUT at the next start, so their captions are not redone.

A file is only ever rewritten or appended to when captioner wrote it: an existing OUT that is not
such a file (a dataset's captions.csv, anything else) is refused unless `force` replaces it, and
only part files of exactly the names above are folded in and deleted. Lines and rows a person added
to a file captioner wrote are kept, in place, when it is rewritten. CSV cells that a spreadsheet
would run as a formula (starting with = + - @) are written with a leading apostrophe.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from captioner.decoding import Decoding
from captioner.errors import ConfigError
from captioner.files import atomic_write, locked_file, path_text, readable_digest

if TYPE_CHECKING:
    from captioner.api import Captioner
    from captioner.distributed import Dist  # imports torch: not for a re-run with nothing to do

# a CSV's columns; files written before tags had the first three, and are still ours (rewritten with four)
FIELDS = ("image", "sha1", "caption", "tags")
FORMULA = ("=", "+", "-", "@", "\t", "\r")  # what makes a spreadsheet cell a formula


@dataclass
class BatchReport:
    captioned: int = 0
    skipped: int = 0  # already in the file with the same content
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    processes: int = 1  # that captioned it together


def _read_existing(out: Path, foreign: bool = False) -> list[dict]:
    """Complete entries already in `out` (a line cut off by an interruption is ignored). With
    `foreign`, the lines that are not our entries too, in place, as {"_line": the line} (JSONL) or
    {"_row": the row} (CSV: a row without an image or a SHA-1), so that a rewrite keeps what a
    person added to the file."""
    if not out.is_file():
        return []
    text = out.read_text(encoding="utf-8", errors="replace")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # drop a half-written last line
    entries = []
    if out.suffix.lower() == ".csv":
        for r in csv.DictReader(io.StringIO(text)):
            if r.get("image") and r.get("sha1"):
                entries.append({k: _from_cell(v) for k, v in r.items()})
            elif foreign:
                entries.append({"_row": r})
        return entries
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and obj.get("image") and obj.get("sha1"):
            entries.append(obj)
        elif foreign and line.strip():
            entries.append({"_line": line})
    return entries


def written_by_us(out: Path) -> bool:
    """Whether `out` is missing, empty, or a file this module wrote: a CSV whose header is
    image,sha1,caption[,tags], or JSON lines that are all our entries (the first MiB is read)."""
    if not out.exists():
        return True
    if not out.is_file():
        return False
    with out.open("rb") as f:
        head = f.read(1 << 20)
    if not head.strip():
        return True  # empty: nothing to lose
    try:
        lines = head.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return False
    if out.suffix.lower() == ".csv":
        return lines[0].strip() in (",".join(FIELDS), ",".join(FIELDS[:3]))
    return all(_is_entry(line) for line in lines if line.endswith("\n"))  # a cut-off last line is not judged


def _is_entry(line: str) -> bool:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and {"image", "sha1", "caption"} <= set(obj)


def _to_cell(value):
    """A CSV cell that a spreadsheet shows as text, never runs as a formula."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA) else value


def _from_cell(value):
    return value[1:] if isinstance(value, str) and value.startswith("'") and value[1:].startswith(FORMULA) else value


def _tags_cell(tags) -> str:
    """A CSV cell of tags: "cat 0.966; egyptian cat 0.970" (JSON Lines keep the list)."""
    return "; ".join(f"{t['word']} {t['score']:.3f}" for t in tags) if isinstance(tags, list) else tags


def _write_csv_rows(writer: csv.DictWriter, entries) -> None:
    writer.writerows({k: _to_cell(_tags_cell(v) if k == "tags" else v) for k, v in e.items()} for e in entries)


def _rewrite(out: Path, entries: list[dict]) -> None:
    """Write `entries` as the whole file, atomically (the lines and rows of others as they were)."""
    with atomic_write(out, newline="") as f:
        if out.suffix.lower() == ".csv":
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            for e in entries:
                if "_row" in e:
                    w.writerow(e["_row"])
                else:
                    _write_csv_rows(w, [e])
        else:
            f.writelines((e["_line"] if "_line" in e else json.dumps(e)) + "\n" for e in entries)


def _part_files(out: Path) -> list[Path]:
    """The part files of `out` that this module writes: exactly OUT.part<rank>.jsonl."""
    name = re.compile(re.escape(out.name) + r"\.part\d+\.jsonl")
    found = out.parent.glob(glob.escape(out.name) + ".part*")
    return sorted(p for p in found if name.fullmatch(p.name) and p.is_file())


def _fold_parts(out: Path, order: dict[str, int] | None = None) -> None:
    """Append the entries of `out`'s part files to it (in `order` of their images when given),
    then delete the parts."""
    parts = _part_files(out)
    if not parts:
        return
    entries = [e for part in parts for e in _read_existing(part)]
    if order is not None:
        entries.sort(key=lambda e: order.get(e["image"], len(order)))
    _rewrite(out, _read_existing(out, foreign=True) + entries)
    for part in parts:
        part.unlink()


def caption_to_file(captioner, paths: Sequence[Path], out: Path, *, batch_size: int | None = None,
                    progress: bool = True,
                    dist: Dist | None = None, decoding: Decoding | None = None, force: bool = False,
                    workers: int | None = None, jpegs_on_device: bool | None = None) -> BatchReport:
    """Caption `paths` into `out` (.jsonl or .csv) with `decoding` (else the model's own), skipping
    those already there unchanged. With `dist` (several processes), each captions its share and
    process 0 merges them. An existing `out` that captioner did not write is refused unless
    `force` (then it is replaced). `workers`, `jpegs_on_device`: see Captioner.caption_files."""
    out = Path(out)
    batch_size = batch_size or captioner.batch_size
    if out.suffix.lower() not in (".jsonl", ".csv"):
        raise ConfigError(f"{out}: the output must end in .jsonl or .csv")
    if out.exists() and not out.is_file():  # --force replaces a file, never a folder
        raise ConfigError(f"{out}: is a folder, not a file; --out names the .jsonl or .csv file to write")
    from captioner.distributed import Dist

    dist = dist or Dist()
    # process 0 holds the file for the run: a second run into it would rewrite it under the first
    with locked_file(out, "captioner caption run") if dist.main else contextlib.nullcontext():
        return _caption_to_file(captioner, paths, out, batch_size, progress, dist, decoding, force, workers,
                                jpegs_on_device)


def _caption_to_file(captioner, paths: Sequence[Path], out: Path, batch_size: int, progress: bool, dist: Dist,
                     decoding: Decoding | None, force: bool, workers: int | None,
                     jpegs_on_device: bool | None) -> BatchReport:
    if not force and not written_by_us(out):  # every process sees the same file: the same answer
        raise ConfigError(f"{out}: already exists and was not written by captioner caption (what it holds would be "
                          "lost); choose another --out, or add --force to replace it")
    if force and dist.main and not written_by_us(out):
        out.unlink()
    t0 = time.perf_counter()
    report = BatchReport()
    digests: dict[str, str] = {}  # SHA-1 of each image, read once (by process 0)
    todo = None
    if dist.main:
        _fold_parts(out)  # what an interrupted run of several processes had finished
        existing = _read_existing(out, foreign=True)  # a person's own lines and rows are kept as they are
        digests = {path_text(p): readable_digest(p) for p in paths}
        others = [("_line" in e or "_row" in e) for e in existing]
        done = {e["image"] for e, other in zip(existing, others) if not other and digests.get(e["image"]) == e["sha1"]}
        keep = [e for e, other in zip(existing, others) if other or e["image"] in done or e["image"] not in digests]
        _rewrite(out, keep)  # drops stale lines of changed files and any half-written line
        todo = [Path(p) for p in paths if path_text(p) not in done]
    todo = dist.broadcast(todo)
    report.skipped = len(paths) - len(todo)
    target = out
    if dist.world > 1:
        todo = todo[dist.rank:: dist.world]
        target = out.with_name(f"{out.name}.part{dist.rank}.jsonl")

    is_csv = target.suffix.lower() == ".csv"
    with target.open("a", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore") if is_csv else None
        bar = tqdm(total=len(todo), desc="captioning", unit="img", disable=not (progress and dist.main))
        for path, result, error in captioner.caption_files(todo, batch_size=batch_size, decoding=decoding,
                                                            workers=workers, jpegs_on_device=jpegs_on_device):
            bar.update(1)
            if error:
                report.failed.append(error)
                continue
            sha1 = digests.get(path_text(path)) or readable_digest(path) or "unreadable"  # others hash their share
            entry = {"image": path_text(path), "sha1": sha1, "caption": result["caption"]}
            if len(result["alternatives"]) > 1:
                entry["alternatives"] = result["alternatives"]
            entry |= {k: result[k] for k in ("tags", "disagrees") if k in result}  # a CSV keeps FIELDS
            if writer:
                _write_csv_rows(writer, [entry])
            else:
                f.write(json.dumps(entry) + "\n")
            report.captioned += 1
            if report.captioned % batch_size == 0:
                f.flush()
        bar.close()
    if dist.world > 1:
        report.captioned = int(dist.sum([report.captioned])[0])  # `skipped` is the same on every process
        report.failed = [e for errors in dist.gather_objects(report.failed) for e in errors]
        if dist.main:
            _fold_parts(out, {path_text(p): i for i, p in enumerate(paths)})
        dist.barrier()
    report.seconds = time.perf_counter() - t0
    return report


def _all_done(paths: Sequence[Path], out: Path) -> bool:
    """Whether `out` (a file captioner wrote) already holds every one of `paths` with its content
    unchanged, so that caption_to_file would caption nothing."""
    if out.suffix.lower() not in (".jsonl", ".csv") or not out.is_file() or not written_by_us(out):
        return False  # caption_to_file says what is wrong with it, or there is work
    if _part_files(out):
        return False  # parts of an interrupted run of several processes, to fold in
    done = {e["image"]: e["sha1"] for e in _read_existing(out)}
    return all(done.get(path_text(p)) and done[path_text(p)] == readable_digest(p) for p in paths)


def caption_files_to(paths: Sequence[Path], out: Path, model: str | Path | None, device: str = "auto",
                     precision: str = "auto", *, decoding: Callable | None = None, attention: bool = False,
                     **kw) -> tuple[BatchReport | None, Captioner | None, Decoding | None]:
    """`captioner caption --out`: load the model (None: the shipped one) on this process's device,
    caption `paths` into `out` with this process's share when torchrun started several (each on its
    own GPU, or sharing the CPU), and merge. `decoding(own)` gives the decoding from the model's
    own (default: that one); `attention`: refuse a model without attention maps before
    the work, not after it; `kw`: caption_to_file's. Returns (the report, or None on a process other
    than the first; the captioner; the decoding). When `out` already holds every photo unchanged,
    nothing is loaded: (the report, None, None)."""
    if "WORLD_SIZE" not in os.environ and not attention and not kw.get("force") and _all_done(paths, Path(out)):
        # a re-run with nothing left: said at once, without the seconds torch and a model take to load
        return BatchReport(skipped=len(paths)), None, None
    from captioner.api import Captioner
    from captioner.distributed import Dist

    dist, dev = Dist.from_env(device)
    try:
        cap = Captioner.load(model, str(dev), precision)
        if attention:
            cap.require_attention()
        chosen = decoding(cap.decoding) if decoding else cap.decoding
        report = caption_to_file(cap, paths, out, dist=dist, decoding=chosen, **kw)
    finally:
        dist.close()
    report.processes = dist.world
    return (report if dist.main else None), cap, chosen
