"""The command line's parser: every subcommand's options, their types and help.

Nothing here imports torch: `--help`, `--version` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from pathlib import Path

from captioner import __version__, decoding
from captioner.data.records import LAYOUTS
from captioner.decoding import Decoding
from captioner.errors import ConfigError
from captioner.names import (
    DEFAULT_SEARCH_MODE,
    INFERENCE_PRECISIONS,
    PRECISIONS,
    SEARCH_MODES,
    shipped_model_dir,
)
from captioner.options import NATURAL, POSITIVE, between, flag, whole
from captioner.train.config import TrainConfig


class _Help(argparse.RawDescriptionHelpFormatter):
    """States each option's default after its help, in brackets, from the option itself (so it cannot
    drift from what the option does): none for options without one, or whose help already says.
    Descriptions are kept as written (the model card's path on a line of its own)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (text and not text.endswith("]") and default not in (None, False, [], argparse.SUPPRESS)
                and action.option_strings):
            text += " [on]" if default is True else f" [{default}]"
        return text


def _checked(check):
    """An argparse type from one of decoding.py's checks: its one-line ConfigError becomes argparse's
    usage error, before anything is loaded."""
    def parse(text: str):
        try:
            return check(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = check.__name__  # argparse names the type in its messages
    return parse


def _model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="model folder (default: shipped, the model that comes with captioner)")


def _machine_options(p: argparse.ArgumentParser, inference: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    help = "autocast precision; auto = bf16 on CPUs with native bf16, fp16/bf16 on CUDA, else fp32"
    if inference:
        help += ("; int8 (CPU only): the decoder's weights in 8 bits, faster than fp32, not than native bf16 in "
                 "batches; about 15%% of captions differ (measured figures: the README's Captioning section)")
    p.add_argument("--precision", default="auto", choices=INFERENCE_PRECISIONS if inference else PRECISIONS,
                   help=help)
    _threads_option(p)


def _threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=POSITIVE, metavar="N",
                   help="CPU threads for the model; by default as many as the cores other processes leave free, "
                        "measured at the start and every 10 s (on a busy machine torch's default of one a core ran "
                        "up to 10x slower); the same as CAPTIONER_THREADS=N [auto]")


def png_path(text: str) -> Path:
    """An argparse type: a path ending in .png (the plots are PNGs; another name ended, after the
    work, in matplotlib's "Format not supported" traceback)."""
    if Path(text).suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"{text}: must end in .png (the image written is a PNG)")
    return Path(text)


def _decoding_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam-size", type=_checked(decoding.beam_size),
                   help=f"1 = greedy, at most {decoding.MAX_BEAM} (default: the model's own setting)")
    p.add_argument("--length-norm", type=_checked(decoding.length_norm), metavar="ALPHA",
                   help=f"rank beams by logprob / length**ALPHA, 0 = off, at most {decoding.MAX_LENGTH_NORM:g} "
                        "(default: the model's own setting)")
    p.add_argument("--block-trigrams", action=argparse.BooleanOptionalAction,
                   help="never repeat a word trigram within a caption (default: the model's own setting)")
    p.add_argument("--tag-threshold", type=_checked(decoding.tag_threshold), metavar="P",
                   help="the caption must say the words of the encoder's ImageNet tags scoring at least P, 0 = off "
                        "(default: the model's own setting)")
    p.add_argument("--tag-named", type=_checked(decoding.tag_named), metavar="RATE",
                   help="ask only for tag words the model's training captions said at least this often when the "
                        "tag was there (naming.json), 0 = every word (default: the model's own setting)")
    p.add_argument("--tag-borrow", action=argparse.BooleanOptionalAction,
                   help="a confident tag word the vocabulary lacks (zebra) is said where the model would say the "
                        "nearest word it has in WordNet (horse) (default: the model's own setting)")
    p.add_argument("--space-rerank", type=_checked(decoding.space_rerank), metavar="WEIGHT",
                   help="order the beams by score + WEIGHT x how well each matches the photo in the model's search "
                        "space, 0 = by score alone (default: the model's own setting)")
    p.add_argument("--rarity-penalty", type=_checked(decoding.rarity_penalty), metavar="WEIGHT",
                   help="... minus WEIGHT x how rare each one's words are (the mean log of their rank in the "
                        "vocabulary), 0 = off (default: the model's own setting)")
    p.add_argument("--no-tags", action="store_true",
                   help="caption without tag guidance (tags are still reported with --json)")


def _data_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data", required=required, type=Path,
                   help="dataset folder or caption file (layout auto-detected)")
    p.add_argument("--layout", choices=LAYOUTS, help="the dataset's layout, when detection guesses wrong")
    p.add_argument("--format", dest="layout", choices=LAYOUTS, help=argparse.SUPPRESS)  # its old name
    p.add_argument("--images", type=Path, help="image folder, when not where the layout expects it")
    p.add_argument("--skip-missing", action="store_true", help="leave out listed images that are missing")
    p.add_argument("--max-images", type=NATURAL, default=0,
                   help="use only the first N images of the split (0: all)")


def decoding_from(a: argparse.Namespace, own: Decoding) -> Decoding:
    """The one decoding a command uses: the model's own (`own`), changed where the options say."""
    return own.changed(beam_size=a.beam_size, length_norm=a.length_norm, block_trigrams=a.block_trigrams,
                       tag_threshold=0.0 if a.no_tags else a.tag_threshold, tag_borrow=a.tag_borrow,
                       tag_named=a.tag_named, space_rerank=a.space_rerank, rarity_penalty=a.rarity_penalty)


def _caption_parser(sub) -> None:
    p = sub.add_parser(
        "caption", help="caption images or folders of images",
        epilog="Without --model: the shipped model, trained on Flickr8k (research use) for everyday photos\n"
               "of people, dogs and outdoor scenes; outside that world it errs (a cat or a cup of coffee\n"
               "comes out as a dog). What it can and cannot do, its model card:\n"
               f"  {shipped_model_dir() / 'MODEL_CARD.md'}")  # on a line of its own: never wrapped
    p.add_argument("paths", nargs="+", help="image files and/or folders, http(s) addresses of images, or - for an "
                   "image on standard input")
    _model_option(p)
    p.add_argument("--json", action="store_true",
                   help='one JSON object per line: {"image", "caption"}, with "alternatives" when asked for, the '
                        'encoder\'s "tags" and, when the caption names an animal the encoder does not see, "disagrees"')
    p.add_argument("-r", "--recursive", action=argparse.BooleanOptionalAction, default=True,
                   help="look for images in sub-folders too, as index does (--no-recursive: only the folders "
                        "named)")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="write to FILE (.jsonl or .csv) instead of the terminal; a re-run skips images already "
                        "there with the same content")
    p.add_argument("--force", action="store_true",
                   help="with --out: replace FILE even when captioner did not write it (else such a file is refused)")
    p.add_argument("--batch-size", type=POSITIVE, help="images per batch (default: 64 on a CPU, 256 on a GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=POSITIVE, default=1,
                   help="with --out: caption in N processes on this machine, each its share of the images "
                        "(same as: torchrun --nproc-per-node N -m captioner caption ...)")
    p.add_argument("--attention-map", type=png_path, metavar="PNG",
                   help="draw where an attention model looked for each word (one image: this file; several: "
                        "PNG-<image name>.png)")
    _decoding_options(p)
    _machine_options(p)


def _embeddings_parser(sub) -> None:
    p = sub.add_parser("embeddings", help="draw a 2-D map of the model's word embeddings (PNG)")
    _model_option(p)
    p.add_argument("--out", type=png_path, default=Path("words.png"), help="the PNG to write")
    p.add_argument("--words", type=POSITIVE, default=150, help="how many of the most frequent words")
    p.add_argument("--method", choices=("pca", "tsne"), default="pca", help="tsne needs scikit-learn")
    p.add_argument("--layer", choices=("output", "input"), default="output",
                   help="output: each word's row of the last layer (clusters by meaning); "
                        "input: the embedding fed to the LSTM")
    p.add_argument("--neighbours", nargs="*", default=[], metavar="WORD",
                   help="also print the 5 nearest words to each WORD (cosine similarity)")


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a model as ONNX or TorchScript graphs (start + one decoder step)")
    _model_option(p)
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="file format")
    p.add_argument("--out", type=Path, required=True, help="the folder to write")


def _index_parser(sub) -> None:
    p = sub.add_parser("index", help="caption every photo under folders into a searchable SQLite database")
    p.add_argument("folders", nargs="+", type=Path, help="folders of photos (sub-folders too)")
    p.add_argument("--db", type=Path, required=True, help="the database file (created when missing)")
    _model_option(p)
    p.add_argument("--batch-size", type=POSITIVE, help="images per batch (default: 64 on a CPU, 256 on a GPU)")
    p.add_argument("--no-features", action="store_true",
                   help="keep no encoder features (about 63 KB of the 68 a photo takes): model and hybrid search "
                        "then rank without the captioning model's log p(query | photo) (README: Search)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _decoding_options(p)
    _machine_options(p)


def _search_parser(sub) -> None:
    p = sub.add_parser("search", help="find photos in a database by what they show (or by an example photo)")
    p.add_argument("query", nargs="?", help='words to look for, e.g. "dog running on the beach"')
    p.add_argument("--db", type=Path, required=True, help="the photo library (made by captioner index)")
    p.add_argument("--mode", choices=SEARCH_MODES, default=DEFAULT_SEARCH_MODE,
                   help=f"how photos are ranked ({DEFAULT_SEARCH_MODE} ranked best on Flickr8k val): "
                        "'keyword' matches the words of their captions (instant; no model loaded); 'embedding' "
                        "compares the words and each photo in the model's search space (fast); 'model' asks the "
                        "captioning model how well the words describe each photo; 'hybrid' adds them all up")
    p.add_argument("--like", type=Path, metavar="PHOTO", help="instead of words: photos that look like this one")
    p.add_argument("--model", help="the model that indexed the library (default: the one named in it)")
    p.add_argument("--limit", type=whole(1), default=20, help="how many photos at most")
    p.add_argument("--json", action="store_true", help='one JSON object per line, best first: {"path", "caption", '
                                                        '"score"} and, in embedding and hybrid mode, "relevance" (0 '
                                                        'to 1: the share of right answers on val that scored lower)')
    _machine_options(p)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="web page and REST API: caption uploads, search a library")
    _model_option(p)
    p.add_argument("--db", type=Path, help="photo library made by 'captioner index' (enables search)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer to this host name (repeatable; '*': any). By default only this machine's own "
                        "names and IP addresses are answered to, so that no web page elsewhere can read the "
                        "library through a browser (DNS rebinding)")
    p.add_argument("--max-upload-mb", type=between(0, 1000, low_included=False), default=20.0, metavar="MB",
                   help="largest upload accepted, per file (a request holds at most 16 files)")
    p.add_argument("--header-timeout", type=between(0, 3600, low_included=False), default=10.0, metavar="SECONDS",
                   help="close connections that take longer to send a request's headers")
    p.add_argument("--batch-wait-ms", type=between(0, 1000), default=5.0, metavar="MS",
                   help="caption requests that arrive together in one model call, waiting at most this long "
                        "for one still uploading (0: each request on its own)")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="fetch images by address (the 'url' field) from loopback, private and link-local addresses "
                        "too; by default only public ones, so that the server cannot be made to read its own "
                        "network")
    _machine_options(p)


def _train_parser(sub) -> None:
    """Generated from TrainConfig's fields (their defaults, help, choices: see options.py), so that
    every default is declared once and --help states it."""
    p = sub.add_parser("train", help="train a model on captioned images",
                       description="Train a captioning model. Every option's default is shown in brackets.")
    first = ("data", "out")  # what every run is given, at the top of --help
    for f in sorted(fields(TrainConfig), key=lambda f: f.name not in first):
        p.add_argument(flag(f), **_argument(f))
        if "alias" in f.metadata:  # an old name, still accepted
            p.add_argument(f.metadata["alias"], dest=f.name, choices=f.metadata.get("choices"),
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _threads_option(p)
    p.add_argument("--nproc", type=POSITIVE, default=1,
                   help="train in N processes with torch.distributed (DDP; gloo on CPU, NCCL on GPUs); "
                        "same as: torchrun --nproc-per-node N -m captioner train ... [1]")


def _argument(f) -> dict:
    """argparse's keywords for one option field."""
    meta, default = f.metadata, f.default
    shown = meta.get("default_text") or ("" if default is None or default is MISSING else str(default))
    kw = {"dest": f.name, "default": default, "help": meta.get("help", "") + (f" [{shown}]" if shown else "")}
    if f.name in ("data", "out"):
        kw.update(required=True, default=None, help=meta["help"])
    if f.type == "bool":
        kw["action"] = argparse.BooleanOptionalAction if default else "store_true"
        kw["help"] = meta["help"] + (" [on]" if default else "")
    else:
        kw["type"] = meta.get("type") or {"int": int, "float": float, "int | None": int,
                                          "float | None": float}.get(f.type, str)
    for key in ("choices", "metavar"):
        if key in meta:
            kw[key] = meta[key]
    return kw


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="score a model on a split: captions (BLEU/METEOR/ROUGE-L/CIDEr-D) or "
                                         "search (recall at 1, 5, 10)")
    _model_option(p)
    _data_options(p, required=True)
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="which of the dataset's splits")
    p.add_argument("--task", choices=("captions", "retrieval"), default="captions",
                   help="'captions' (default): caption every image and score the captions against the references; "
                        "'retrieval': index the split's photos and search for each reference caption, reporting "
                        "how often its own photo comes first, in the first 5 and 10, and its median rank, for "
                        "each search mode; and, with a model that has a search space, each photo's search for "
                        "its captions (image to text)")
    p.add_argument("--modes", nargs="+", choices=SEARCH_MODES, default=list(SEARCH_MODES), metavar="MODE",
                   help=f"retrieval: the search modes to measure ({', '.join(SEARCH_MODES)}; default: all; on 2 CPU "
                        "cores model and hybrid take about half a second a query)")
    p.add_argument("--db", type=Path, help="retrieval: keep the photo library here (default: a temporary one)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it needs Java and takes a while)")
    p.add_argument("--out", type=Path, help="write captions.json (COCO results) and metrics.json here")
    p.add_argument("--cache-dir", type=Path, help="feature cache (default: $CAPTIONER_CACHE, else ~/.cache/captioner)")
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object on the last line")
    _decoding_options(p)
    _machine_options(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="captioner", description="Caption images with a CNN + LSTM model.")
    ap.add_argument("--version", action="version", version=f"captioner {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    _caption_parser(sub)
    _embeddings_parser(sub)
    _export_parser(sub)
    _index_parser(sub)
    _search_parser(sub)
    _serve_parser(sub)
    _train_parser(sub)
    _evaluate_parser(sub)
    for parser in sub.choices.values():
        parser.formatter_class = _Help
    return ap
