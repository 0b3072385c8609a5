"""The command line's commands: each parses nothing, checks what it was given, and calls the function
that does the work (the API, training, evaluation, the library, the server, export).

Nothing that imports torch is imported at the top; each command imports what it needs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from captioner.cli.parser import decoding_from
from captioner.decoding import Decoding
from captioner.errors import ConfigError, DataError, ModelError
from captioner.files import complete_folder, path_text
from captioner.names import model_dir
from captioner.train.config import TrainConfig


def _images(paths: list[Path], recursive: bool) -> list[Path]:
    from captioner.data.images import list_images

    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DataError(f"{missing[0]}: no such file" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    found = list_images(paths, recursive=recursive)
    if not found:
        hint = "" if recursive else " (without --no-recursive, sub-folders are looked in too)"
        raise DataError(f"no images found in {', '.join(map(str, paths))}{hint}")
    return found


_CONTROL = {9: "\\t", 10: "\\n", 13: "\\r"}  # tab, newline, carriage return in a file name, shown escaped


def _report_failures(failed: list[str]) -> None:
    for e in failed:
        print(f"captioner: skipped {e}", file=sys.stderr)
    if failed:
        print(f"captioner: {len(failed)} file(s) could not be read and were skipped", file=sys.stderr)


def check_paths(a: argparse.Namespace) -> None:
    """The model folder, data, folders and library a command names exist: said in one line before
    anything loads (torch and a model take seconds: `index` of a mistyped folder took 32 s to say
    so on a busy machine). The commands check what they read again, in full."""
    for model in (getattr(a, "model", None), getattr(a, "init", None)):
        # (complete_folder: a kill mid-save can leave only .NAME.old, which loading puts back)
        if model is not None and not complete_folder(model_dir(model)).is_dir():
            raise ModelError(f"{model}: not a model folder (no such directory)")
    data = getattr(a, "data", None)
    if data is not None and not Path(data).exists():
        raise DataError(f"{data}: no such file or folder")
    for folder in getattr(a, "folders", None) or ():
        if not Path(folder).is_dir():
            raise DataError(f"{folder}: no such folder")
    if a.command == "serve" and a.db is not None:
        from captioner.library.store import connect

        connect(a.db, create=False).close()  # there, and a library of this captioner's (one line if not)


def cmd_caption(a: argparse.Namespace) -> int:
    if a.nproc > 1 and not a.out:
        raise DataError("--nproc N needs --out FILE: the processes merge their captions into it")
    if a.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _torchrun(a.nproc, a.argv)
    from captioner.data.urls import is_url

    remote = [p for p in a.paths if is_url(p) or p == "-"]
    if remote:
        if a.out or a.attention_map or a.nproc > 1:
            raise DataError(f"{remote[0]}: addresses and standard input are captioned to the terminal; --out, "
                            "--attention-map and --nproc take files (save the images first)")
        return _caption_remote(a)
    paths = _images([Path(p) for p in a.paths], a.recursive)
    if a.out:
        from captioner.batch import caption_files_to

        r, cap, decoding = caption_files_to(paths, a.out, a.model, a.device, a.precision, batch_size=a.batch_size,
                                            progress=not a.quiet, force=a.force, attention=bool(a.attention_map),
                                            decoding=lambda own: decoding_from(a, own))
        if r is None:  # another process's share, merged by process 0
            return 0
        _report_failures(r.failed)
        print(f"{r.captioned} captioned, {r.skipped} already in {a.out}, {len(r.failed)} unreadable; "
              f"{r.seconds:.1f}s{f', {r.processes} processes' if r.processes > 1 else ''}", file=sys.stderr)
        _attention_maps(a, cap, paths, decoding)
        return 1 if r.failed and not (r.captioned or r.skipped) else 0
    from captioner.api import Captioner  # torch: not for a re-run of --out with nothing to do

    cap = Captioner.load(a.model, a.device, a.precision)
    if a.attention_map:
        cap.require_attention()
    decoding = decoding_from(a, cap.decoding)
    failed = []
    for path, result, error in cap.caption_files(paths, a.batch_size, decoding):
        if error:
            failed.append(error)
            continue
        _print_caption(a, path_text(path), result)
    _report_failures(failed)
    _attention_maps(a, cap, paths, decoding)
    return 1 if failed and len(failed) == len(paths) else 0


def _caption_remote(a: argparse.Namespace) -> int:
    """`caption` of paths mixed with http(s) addresses (fetched: data/urls.py) and `-` (an image's
    bytes on standard input), printed in the order given."""
    import warnings

    from captioner.api import Captioner
    from captioner.data.images import MAX_FETCH_BYTES
    from captioner.data.urls import is_url
    from captioner.errors import CaptionerWarning

    items, names = [], []
    for p in a.paths:
        if p == "-":
            data = sys.stdin.buffer.read(MAX_FETCH_BYTES + 1)
            if len(data) > MAX_FETCH_BYTES:
                raise DataError(f"-: more than {MAX_FETCH_BYTES:,} bytes on standard input")
            items.append(data)
            names.append("-")
        elif is_url(p):
            items.append(p)
            names.append(p)
        else:
            found = _images([Path(p)], a.recursive)
            items += found
            names += [path_text(f) for f in found]
    cap = Captioner.load(a.model, a.device, a.precision)
    decoding = decoding_from(a, cap.decoding)
    size, failed = a.batch_size or cap.batch_size, []
    for start in range(0, len(items), size):
        with warnings.catch_warnings():  # a failure is reported below, as for files
            warnings.simplefilter("ignore", CaptionerWarning)
            results = cap.caption(items[start:start + size], decoding=decoding, errors="skip", details=True)
        for name, result in zip(names[start:start + size], results):
            if result["caption"] is None:
                failed.append(result["error"])
            else:
                _print_caption(a, name, result)
    _report_failures(failed)
    return 1 if failed and len(failed) == len(items) else 0


def _print_caption(a: argparse.Namespace, name: str, result: dict) -> None:
    if a.json:
        obj = {"image": name, "caption": result["caption"]}
        if len(result["alternatives"]) > 1:
            obj["alternatives"] = result["alternatives"]
        obj |= {k: result[k] for k in ("tags", "disagrees") if k in result}
        print(json.dumps(obj), flush=True)
    else:  # one line per photo, whatever its name holds
        print(f"{name.translate(_CONTROL)}\t{result['caption']}", flush=True)


def _attention_maps(a: argparse.Namespace, cap, paths: list[Path], decoding: Decoding) -> None:
    if a.attention_map:
        from captioner.viz import draw_attention_maps

        for _, png in draw_attention_maps(cap, paths, a.attention_map, decoding):
            print(f"attention map: {png}", file=sys.stderr)


def cmd_index(a: argparse.Namespace) -> int:
    from captioner.library.index import nothing_to_do

    r = nothing_to_do(a.folders, a.db, a.model)  # told without torch or the model, when it is so
    if r is None:
        from captioner.api import Captioner
        from captioner.library import index_folders

        cap = Captioner.load(a.model, a.device, a.precision)
        r = index_folders(cap, a.folders, a.db, batch_size=a.batch_size, progress=not a.quiet,
                          decoding=decoding_from(a, cap.decoding), features=not a.no_features)
    _report_failures(r.failed)
    damaged = f" ({r.damaged} of them damaged in the library, captioned afresh)" if r.damaged else ""
    print(f"{a.db}: {r.captioned} captioned{damaged}, {r.unchanged} unchanged, {r.touched} touched, {r.removed} "
          f"removed, {len(r.failed)} unreadable; {r.seconds:.1f}s", file=sys.stderr)
    return 0


def cmd_search(a: argparse.Namespace) -> int:
    from captioner.library.like import find

    if (a.query is None) == (a.like is None):
        raise ConfigError("give words to look for, or --like PHOTO (not both)")
    if a.like is not None and not a.like.is_file():
        raise DataError(f"{a.like}: no such file")

    def load(source: str | None):
        from captioner.api import Captioner

        return Captioner.load(a.model or source, a.device, a.precision)

    found = find(a.db, a.query, a.like, mode=a.mode, limit=a.limit, load=load)
    if found.note:
        print(f"captioner: note: {found.note}", file=sys.stderr)
    hits = found.hits
    for h in hits:
        if a.json:
            print(json.dumps({"path": h["path"], "caption": h["caption"], "score": h["score"]}
                             | ({"relevance": h["relevance"]} if "relevance" in h else {})))
        else:
            print(f"{h['score']:.2f}\t{h['path'].translate(_CONTROL)}\t{h['caption']}")
    if not hits and not a.json:
        print(f"no photo in {a.db} {f'matches {a.query!r}' if a.query is not None else 'to compare with'}",
              file=sys.stderr)
    elif len(hits) < found.total and not a.json:
        what = "matching photos" if found.mode == "keyword" else "photos"
        print(f"the best {len(hits)} of {found.total} {what} ({found.mode}; --limit N for more)", file=sys.stderr)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from captioner.api import Captioner
    from captioner.server.protocol import serve

    serve(Captioner.load(a.model, a.device, a.precision), a.db, a.host, a.port, allowed_hosts=a.allowed_host,
          header_timeout=a.header_timeout, max_upload_mb=a.max_upload_mb, batch_wait_ms=a.batch_wait_ms,
          allow_private_urls=a.allow_private_urls)
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    try:
        if a.nproc > 1 and "WORLD_SIZE" not in os.environ:
            return _torchrun(a.nproc, a.argv)
        from captioner.train import fit

        result = fit(TrainConfig(**{f.name: getattr(a, f.name) for f in fields(TrainConfig)}))
    except KeyboardInterrupt:
        _how_to_continue(a)
        return 130
    print(_closing_line(result, a))
    return 0


def _closing_line(result: dict, a: argparse.Namespace) -> str:
    """What was trained, scored as the model will caption: with the decoding chosen on val."""
    folders = f"model folders in {a.out}/best and {a.out}/last"
    if a.space_only and result.get("space"):
        s = result["space"]
        return (f"search space added: val text->image R@1/5/10 {s['text_to_image']['R@1']:.1f}/"
                f"{s['text_to_image']['R@5']:.1f}/{s['text_to_image']['R@10']:.1f}, rsum {s['rsum']:.1f}; the model "
                f"with it in {a.out}/best (index your photos again to search with it)")
    if not result.get("history"):
        return f"no epoch was trained (--epochs {a.epochs}); nothing new was saved in {a.out}"
    picked = "greedy" if a.val_beam_size == 1 else f"beam {a.val_beam_size}"
    start = result.get("start_CIDEr")
    if start is not None and not result["best_epoch"]:
        top = max(float(r["CIDEr"]) for r in result["history"])
        return (f"no epoch beat the model it started from on val (CIDEr-D {start:.3f} {picked}; the best epoch "
                f"{top:.3f}): {a.out}/best is that model, unchanged, and {a.out}/last the last epoch")
    than = f"; the start model: {start:.3f}" if start is not None else ""
    d = result.get("decoding")
    if not d:
        return f"best val CIDEr-D {result['best_CIDEr']:.3f}{than}; {folders}"
    how = Decoding.from_json(d).describe()
    return (f"best epoch {result['best_epoch']}: val CIDEr-D {d['CIDEr']:.3f} with its decoding ({how}; "
            f"{result['best_CIDEr']:.3f} {picked}, which picked the epoch{than}); {folders}")


def _how_to_continue(a: argparse.Namespace) -> None:
    """After Ctrl-C: which epoch's checkpoint is saved, and the command that continues from it."""
    import shlex

    from captioner.train.checkpoint import CHECKPOINT, SPACE_CHECKPOINT, saved_epoch

    if int(os.environ.get("RANK", "0")) != 0:
        return
    epoch, space = saved_epoch(a.out), (a.out / SPACE_CHECKPOINT).is_file()
    if not epoch and not space:
        print("captioner: interrupted before the first epoch was saved; nothing to resume", file=sys.stderr)
        return
    saved = f"the checkpoint after epoch {epoch} is in {a.out / CHECKPOINT}" if epoch else ""
    if space:
        saved += f"{'; ' if saved else ''}the search space's training so far is in {a.out / SPACE_CHECKPOINT}"
    argv = [x for x in a.argv if x not in ("--overwrite", "--resume")] + ["--resume"]
    print(f"captioner: interrupted; {saved}. Continue with:\n  captioner {shlex.join(argv)}", file=sys.stderr)


def cmd_evaluate(a: argparse.Namespace) -> int:
    from captioner.evaluate import evaluate
    from captioner.metrics import format_scores
    from captioner.model.network import read_decoding

    model = model_dir(a.model)
    if a.task == "retrieval":
        from captioner.evaluate import retrieval

        r = retrieval(a.model, a.data, a.split, layout=a.layout, images=a.images, db=a.db, device=a.device,
                      precision=a.precision, skip_missing=a.skip_missing, max_images=a.max_images,
                      modes=tuple(dict.fromkeys(a.modes)))
        print(f"{r['images']} {a.split} photos, {r['queries']} queries (each reference caption; its own photo is "
              f"the answer):")
        for mode, m in r["modes"].items():
            star = " (default)" if mode == r["default_mode"] else ""
            print(f"  {mode + star:18s} R@1 {m['R@1']:5.1f}%  R@5 {m['R@5']:5.1f}%  R@10 {m['R@10']:5.1f}%  "
                  f"median rank {m['median_rank']:g}")
        if "image_to_text" in r:
            m = r["image_to_text"]
            print(f"image to text (each photo searches the {r['queries']} captions by the search space, found by the "
                  f"best of its own): R@1 {m['R@1']:.1f}%  R@5 {m['R@5']:.1f}%  R@10 {m['R@10']:.1f}%  median rank "
                  f"{m['median_rank']:g}" + (f"; rsum {r['rsum']:.1f}" if "rsum" in r else ""))
        if a.json:
            print(json.dumps(r))
        return 0
    r = evaluate(model, a.data, a.split, layout=a.layout, images=a.images,
                 decoding=decoding_from(a, read_decoding(model)), device=a.device, precision=a.precision,
                 cache_dir=a.cache_dir, out=a.out, skip_missing=a.skip_missing, max_images=a.max_images,
                 meteor=not a.no_meteor)
    print(f"{r['images']} {a.split} images, beam {r['beam_size']}: {format_scores(r)}")
    if a.json:
        print(json.dumps(r))
    return 0


def cmd_embeddings(a: argparse.Namespace) -> int:
    from captioner.model.network import load_model
    from captioner.viz import nearest_words, word_map, word_vectors

    model, vocab = load_model(a.model)
    vectors = word_vectors(model, a.layer)
    word_map(vectors, vocab.itos, a.out, a.words, a.method,
             f"{a.method.upper()} of the {a.layer} word vectors ({a.model or 'shipped model'})")
    for word in a.neighbours:
        near = ", ".join(f"{w} {s:.2f}" for w, s in nearest_words(vectors, vocab.itos, word))
        print(f"{word}: {near}")
    print(f"word map: {a.out}", file=sys.stderr)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from captioner.export import export_model

    out = export_model(model_dir(a.model), a.out, a.format)
    print(f"{a.format} export of {a.model or 'the shipped model'}: {out}", file=sys.stderr)
    return 0


COMMANDS = {"caption": cmd_caption, "index": cmd_index, "search": cmd_search, "serve": cmd_serve,
            "train": cmd_train, "evaluate": cmd_evaluate, "embeddings": cmd_embeddings, "export": cmd_export}


def _torchrun(nproc: int, argv: list[str]) -> int:
    """Start `nproc` processes of this command on this machine with torch's own launcher."""
    import subprocess

    rest, skip = [], False
    for arg in argv:  # everything but --nproc
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "captioner", *rest]
    return subprocess.call(cmd)
