"""Every CUDA path measured in one run: what benchmarks/gpu.sh runs on a lent GPU.

    python benchmarks/gpu.py --data DATA --results gpu.md                   # on a GPU: the full sizes
    python benchmarks/gpu.py --data DATA --results gpu.md --device cpu      # small sizes, seconds
    python benchmarks/gpu.py --subset-of ../shared/datasets/flickr8k --data .gpu/flickr8k   # what travels

DATA is a captioned dataset in any layout `captioner train` reads, with a train and a val split
(gpu.sh makes a small Flickr8k subset of it). Its photos are copied to reach --files for the
file rows. Each table sits beside its ceiling, measured in the same run:

  files     files on disk -> captions (`caption --out`): fp32/bf16/fp16 (the CPU: fp32/bf16), JPEGs
            decoded by the GPU (nvJPEG) and by Pillow, batch 64/256/512, the shipped decoding and
            greedy; how many captions match fp32 (and Pillow's); against the model alone on
            preprocessed images already on the device (the ceiling);
  photo     one photo, file to caption, warm: p50 and p95;
  train     one epoch on cached features and one fine-tuning epoch from files, AMP on and off;
  server    `captioner serve` with the request batcher: 32 clients on loopback, requests/s and p95.

Every row records torch.cuda.max_memory_allocated (the server's is in its own process: not read).
Rows are written to --results as they finish, so a run cut short keeps what it measured. A row's
photo count shrinks when the first row shows it would take longer than --row-seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench import finetune_epoch, machine  # noqa: E402

from captioner import Captioner  # noqa: E402
from captioner.batch import caption_to_file  # noqa: E402
from captioner.data.batching import LengthBucketSampler  # noqa: E402
from captioner.data.images import open_rgb  # noqa: E402
from captioner.data.records import Record, load_records, split_records  # noqa: E402
from captioner.decoding import Decoding  # noqa: E402
from captioner.inference.features import cached_features  # noqa: E402
from captioner.inference.plan import InferencePlan  # noqa: E402
from captioner.model.network import load_model  # noqa: E402
from captioner.runtime import pick_device  # noqa: E402
from captioner.train.data import Captions, FeatureRows  # noqa: E402
from captioner.train.epoch import train_one_epoch  # noqa: E402

# train_photos: the subset's train photos the training rows use (their captions repeated
# train_repeat times make an epoch about Flickr8k's size on a GPU)
FULL = SimpleNamespace(files=10_000, batches=(64, 256, 512), photo_runs=100, train_photos=None, train_repeat=10,
                       finetune_images=6000, clients=32, requests=2000)
SMALL = SimpleNamespace(files=48, batches=(8, 16), photo_runs=5, train_photos=48, train_repeat=1, finetune_images=16,
                        clients=4, requests=24)


class Results:
    """The results file, rewritten after every row so that a run cut short keeps what it has."""

    def __init__(self, path: Path, device: torch.device):
        self.path, self.device, self.blocks = path, device, [f"# GPU benchmark\n\n{machine(device)}\n"]
        self.t0 = time.perf_counter()

    def table(self, title: str, header: str) -> None:
        cols = header.count("|") - 1
        self.blocks.append(f"\n### {title}\n\n{header}\n|" + "---|" * cols)

    def row(self, text: str) -> None:
        self.blocks[-1] += "\n" + text
        print(f"[{time.perf_counter() - self.t0:6.0f} s] {text}", flush=True)
        self.path.write_text("\n".join(self.blocks) + "\n", encoding="utf-8")

    def note(self, text: str) -> None:
        self.blocks[-1] += "\n\n" + text
        self.path.write_text("\n".join(self.blocks) + "\n", encoding="utf-8")


def peak(device: torch.device) -> str:
    """The largest allocation on the device since the last reset, in MiB ('-' on a CPU)."""
    if device.type != "cuda":
        return "-"
    return f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB"


def reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call, the device's queue drained before and after."""
    reset(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def copies(records: list[Record], n: int, folder: Path) -> list[Path]:
    """`n` photo files made by copying the records' photos round and round (distinct names, the
    same bytes: a folder of `n` to decode, as `caption --out` meets it)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(n):
        src = records[k % len(records)].image
        dst = folder / f"{k:06d}{src.suffix.lower()}"
        shutil.copyfile(src, dst)
        out.append(dst)
    return out


def read_captions(path: Path) -> dict[str, str]:
    lines = (json.loads(x) for x in path.read_text(encoding="utf-8").splitlines())
    return {Path(e["image"]).name: e["caption"] for e in lines}


def agreement(got: dict[str, str], ref: dict[str, str] | None) -> str:
    if ref is None:
        return "(reference)"
    common = [k for k in got if k in ref]
    return f"{sum(got[k] == ref[k] for k in common)} of {len(common)}"


# ---------------------------------------------------------------------------------------------


def bench_files(args, device: torch.device, sizes, photos: list[Path], out: Results, tmp: Path) -> None:
    gpu = device.type == "cuda"
    precisions = ("fp32", "bf16", "fp16") if gpu else ("fp32", "bf16")
    caps = {p: Captioner.load(args.model, device=str(device), precision=p) for p in precisions}
    shipped = caps["fp32"].decoding
    greedy = shipped.replace(beam_size=1, block_trigrams=False)
    auto = Captioner.load(args.model, device=str(device)).precision

    out.table("Model alone: preprocessed photos already on the device (the ceiling)",
              "| precision | decoding | batch | images/s | peak memory |")
    x = torch.stack([caps["fp32"].transform(open_rgb(p)) for p in photos[: max(sizes.batches)]]).to(device)
    for p in precisions:
        for decoding in dict.fromkeys((shipped, greedy)):
            for batch in sizes.batches:
                run = lambda c=caps[p], b=batch, d=decoding: [c.caption_tensor(x[i:i + b], d)  # noqa: E731
                                                             for i in range(0, len(x), b)]
                run()  # warm-up: kernels chosen, memory pooled
                seconds = min(timed(run, device) for _ in range(2))
                out.row(f"| {p} | {decoding.describe()} | {batch} | {len(x) / seconds:,.0f} | {peak(device)} |")

    out.table(f"Files to captions (`caption --out`), up to {len(photos):,} JPEGs",
              "| precision | decoding | batch | JPEGs decoded by | photos | images/s | same as fp32 | "
              "same as Pillow | peak memory |")
    refs: dict[tuple, dict] = {}
    n = len(photos)

    def row(p: str, decoding: Decoding, batch: int, on_device: bool) -> None:
        nonlocal n
        target = tmp / f"files{len(refs)}_{p}_{batch}_{int(on_device)}_{decoding.beam_size}.jsonl"
        seconds = timed(lambda: caption_to_file(caps[p], photos[:n], target, batch_size=batch, progress=False,
                                                decoding=decoding, jpegs_on_device=on_device), device)
        rate = n / seconds
        got = read_captions(target)
        vs_fp32 = agreement(got, refs.get(("fp32", decoding.beam_size, on_device)))
        vs_pillow = agreement(got, refs.get((p, decoding.beam_size, False))) if on_device else ""
        refs.setdefault((p, decoding.beam_size, on_device), got)
        out.row(f"| {p} | {decoding.describe()} | {batch} | {'GPU (nvJPEG)' if on_device else 'Pillow'} | {n:,} | "
                f"{rate:,.0f} | {vs_fp32} | {vs_pillow} | {peak(device)} |")
        if rate * args.row_seconds < n:  # later rows: as many photos as fit the time, at least 2 batches
            n = max(2 * max(sizes.batches), int(rate * args.row_seconds))

    middle = sizes.batches[len(sizes.batches) // 2]
    for p in precisions:
        for on_device in ((False, True) if gpu else (False,)):
            row(p, shipped, middle, on_device)
    for batch in sizes.batches:
        if batch != middle:
            row(auto, shipped, batch, gpu)
    if greedy != shipped:
        row("fp32", greedy, middle, gpu)
        row(auto, greedy, middle, gpu)
    out.note(f"Shipped decoding: {shipped.describe()}. Auto precision here: {auto}. 'same as fp32' compares "
             "with the fp32 row of the same decoding and JPEG decoder; 'same as Pillow' with the row of the same "
             "precision decoded by Pillow.")

    out.table("One photo, file to caption, warm", "| precision | runs | p50 | p95 | peak memory |")
    cap = Captioner.load(args.model, device=str(device))
    for path in photos[:3]:
        cap.caption(path)
    reset(device)
    lat = sorted(timed(lambda k=k: cap.caption(photos[k % len(photos)]), device) * 1000
                 for k in range(sizes.photo_runs))
    p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
    out.row(f"| {cap.precision} | {len(lat)} | {statistics.median(lat):.1f} ms | {p95:.1f} ms | {peak(device)} |")


def bench_train(args, device: torch.device, sizes, train: list[Record], out: Results, tmp: Path) -> None:
    out.table("Training", "| what | AMP | precision | items | seconds | items/s | peak memory |")
    model, vocab = load_model(args.model or "shipped", device)
    plan = InferencePlan.resolve(device, "auto", training=True)
    train = train[: sizes.train_photos]
    repeated = train * sizes.train_repeat
    f, _, _ = cached_features(model, [r.image for r in train], plan, tmp / "cache", progress=False)
    feats = FeatureRows(f, [i % len(train) for i in range(len(repeated))])
    caps, _ = Captions.build(repeated, vocab, model.cfg.max_len)
    for precision in dict.fromkeys((plan.precision, "fp32")):
        model, vocab = load_model(args.model or "shipped", device)
        model.encoder.requires_grad_(False)
        opt = torch.optim.Adam(model.decoder.parameters(), 1e-4)
        sampler = LengthBucketSampler(caps.lengths, 128, seed=0)
        batches = ((feats[rows], tok) for rows, tok in map(caps.batch, sampler))
        seconds = timed(lambda b=batches, o=opt, m=model, p=precision, pad=vocab.pad: train_one_epoch(
            m, b, o, InferencePlan(device, p), 5.0, 1, pad, progress=False), device)
        out.row(f"| an epoch on cached features | {'on' if precision != 'fp32' else 'off'} | {precision} | "
                f"{len(caps.tokens):,} captions | {seconds:.1f} | {len(caps.tokens) / seconds:,.0f} | {peak(device)} |")
    images = (train * (sizes.finetune_images // len(train) + 1))[: sizes.finetune_images]
    for precision in dict.fromkeys((plan.precision, "fp32")):
        reset(device)
        seconds, n_caps = finetune_epoch(SimpleNamespace(model=args.model), device, images, precision)
        out.row(f"| a fine-tuning epoch from files (stages 4+ trained) | {'on' if precision != 'fp32' else 'off'} | "
                f"{precision} | {len(images):,} photos, {n_caps:,} captions | {seconds:.1f} | "
                f"{len(images) / seconds:,.0f} photos, {n_caps / seconds:,.0f} captions | {peak(device)} |")


def bench_server(args, device: torch.device, sizes, photos: list[Path], out: Results) -> None:
    import load

    out.table(f"Server (`captioner serve`, request batcher), {sizes.clients} clients on loopback",
              "| batcher | requests | failed | requests/s | p50 | p95 |")
    for wait in (0.0, 5.0):
        r = load.run(str(args.model) if args.model else None, sizes.clients, sizes.requests, [photos[0]], wait,
                     extra=["--device", device.type], log=args.results.parent / f"serve-wait{wait:g}.log")
        batcher = f"on, wait <= {wait:g} ms" if wait else "off"
        out.row(f"| {batcher} | {r['requests']} | {r['failed']} | "
                f"{r['requests_per_s']} | {r['p50_ms']} ms | {r['p95_ms']} ms |")
    out.note("8 in 10 requests upload a photo, 1 in 10 a non-image (415), 1 in 10 GET /health (benchmarks/load.py).")


def make_subset(source: Path, folder: Path, photos: int) -> None:
    """A captions.jsonl dataset of `photos` photos of `source`, 2 in 5 from val and the rest from
    train, the JPEGs copied beside it: small enough to travel to a GPU machine."""
    records = load_records(source)
    val, train = split_records(records, "val"), split_records(records, "train")
    chosen = [(r, "val") for r in val[: photos * 2 // 5]] + [(r, "train") for r in train[: photos - photos * 2 // 5]]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with (folder / "captions.jsonl").open("w", encoding="utf-8") as f:
        for k, (r, split) in enumerate(chosen):
            name = f"images/{k:05d}_{r.image.name}"
            shutil.copyfile(r.image, folder / name)
            f.write(json.dumps({"image": name, "captions": r.captions, "split": split}) + "\n")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"{len(chosen)} photos ({sum(s == 'val' for _, s in chosen)} val) in {folder}: {size / 2**20:.1f} MiB")


SECTIONS = ("files", "train", "server")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="captioned dataset with train and val splits")
    ap.add_argument("--results", type=Path, help="the results file to write (Markdown)")
    ap.add_argument("--subset-of", type=Path, metavar="DATASET",
                    help="instead of measuring, write --photos photos of DATASET to --data (captions.jsonl)")
    ap.add_argument("--photos", type=int, default=800, help="photos in the subset --subset-of writes (800: 13 MiB; "
                    "with the wheels and the repository, under the 64 MiB a GPU machine may be sent)")
    ap.add_argument("--model", type=Path, help="model folder (default: the shipped model)")
    ap.add_argument("--device", default="cuda", help="cuda (the full sizes) or cpu (small sizes, to test the script)")
    ap.add_argument("--files", type=int, help="photos for the file rows (default: 10,000 on a GPU, 48 on a CPU)")
    ap.add_argument("--row-seconds", type=float, default=20.0,
                    help="later file rows caption fewer photos when the first shows they would take longer")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = ap.parse_args()
    if args.subset_of:
        return make_subset(args.subset_of, args.data, args.photos)
    if not args.results:
        ap.error("--results is required when measuring")
    device = pick_device(args.device)
    sizes = FULL if device.type == "cuda" else SMALL
    records = load_records(args.data)
    val, train = split_records(records, "val"), split_records(records, "train")
    if not val or not train:
        sys.exit(f"{args.data}: needs photos in both the train and the val split")
    out = Results(args.results, device)
    with tempfile.TemporaryDirectory() as tmp:
        photos = copies(val + train, args.files or sizes.files, Path(tmp) / "photos")
        if "files" in args.sections:
            bench_files(args, device, sizes, photos, out, Path(tmp))
        if "train" in args.sections:
            bench_train(args, device, sizes, train, out, Path(tmp))
        if "server" in args.sections:
            bench_server(args, device, sizes, photos, out)
    print(f"done in {time.perf_counter() - out.t0:.0f} s; results in {args.results}")


if __name__ == "__main__":
    main()
