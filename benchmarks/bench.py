"""captioner's speed benchmarks, measured side by side in one run.

    python benchmarks/bench.py all --data ../shared/datasets/flickr8k      # everything (about 15 min on 2 cores)
    python benchmarks/bench.py train caption --data ../shared/datasets/flickr8k

Sections:
  train    training throughput on Flickr8k train, captions/s: (a) cached features, (b) the frozen
           encoder run on images every step, (c) a reference loop written here the way the seed
           articles do it (the CNN run for every caption, fp32, padding to the batch maximum, a
           Python loop over time steps); ratios a/c and b/c; seconds per epoch.
  caption  images/s at batch 1, 8, 64, greedy and beam 3, fp32 against bf16 (CPU) or fp16 (GPU);
           latency p50/p95 of one image, file on disk to caption string, model warm.
  latency  one image, warm, at 1 thread and the default: read + preprocess, encoder (as trained
           and with BatchNorm folded), decoder (greedy and the model's own), end to end before/after.
  bigjpeg  phone-size JPEGs (val photos enlarged to 4032x3024): decode + resize and file to caption,
           decoded at full size against the reduced scale (images.draft_size), and the captions.
  packed   the decoder's layers and the encoder's convolutions with packed weights (inference/packed.py)
           against the plain ones, fp32 and bf16: one photo (1 thread and the default) and batches,
           ms a photo, and whether the captions and features are the same.
  beam     the batched beam search against a loop over images: the same captions, and the ratio;
           ended images leaving the batch against kept to the end (greedy, beam 3, the model's own).
  memory   feature extraction images/s; peak memory (RSS) of a training run and of captioning
           folders of 1,000 and 10,000 images (it must not grow with the folder).
  files    files on disk to a JSONL of captions (caption --out), images/s with 0, the default and 2
           image-decoding processes, batch 32 and 64, and whether the captions are identical; rows
           with the searches as before (ended images kept) and the layers unpacked.
  finetune fine-tuning the encoder, end to end from files: images/s and captions/s of image-major
           batches (default and bf16/fp16), every stage trained, contiguous layout, each caption's
           features repeated before the decoder, glibc's allocator at its defaults, and per-caption
           batches (the old way), against the frozen path from cached features; minutes per epoch.
  search   query time of each search mode and of --like against library size (1k, 10k, 100k
           synthetic rows of the real sizes), the database's size and the memory stage 1 holds.

Every section prints its table and appends it to benchmarks/RESULTS.md with the machine described.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from captioner import Captioner, retrieval
from captioner.batch import caption_to_file
from captioner.data import wordcounts
from captioner.data.batching import ImageBatchSampler, LengthBucketSampler
from captioner.data.images import eval_transform, open_rgb
from captioner.data.records import Record, load_records, split_records
from captioner.data.vocab import Vocabulary
from captioner.decode import beam_search, caption_features
from captioner.decoding import Decoding
from captioner.inference.features import cached_features, extract_features
from captioner.inference.int8 import int8_available
from captioner.inference.packed import packable_dtypes
from captioner.inference.plan import InferencePlan
from captioner.library import MODES, connect, search, similar
from captioner.library.store import write_batch
from captioner.model.network import CaptionModel, ModelConfig, load_model
from captioner.runtime import (
    autocast,
    cpu_has_amx,
    cpu_has_fast_bf16,
    encoder_memory_format,
    keep_freed_memory,
    loader_workers,
    pick_device,
    resolve_precision,
)
from captioner.train.data import Captions, FeatureRows, ImageBatch, ImageCaptions, image_batch_collate
from captioner.train.epoch import train_one_epoch

RESULTS = Path(__file__).parent / "RESULTS.md"


# ---------------------------------------------------------------------------------------------
# the machine, and the results file


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bf16 = ("yes, AMX" if cpu_has_amx() else "yes, AVX512-BF16 without AMX") if cpu_has_fast_bf16() else "no"
    text = (f"{cpu} (native bf16: {bf16}), {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def report(title: str, lines: list[str], device: torch.device) -> None:
    block = [f"### {title}", "", f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {machine(device)}", "", *lines, ""]
    print("\n".join(block), flush=True)
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write("\n".join(block) + "\n")


def use_int8(device: torch.device) -> bool:
    """Whether the captioning sections add --precision int8 rows (a CPU with the int8 kernels)."""
    return device.type == "cpu" and int8_available() is None


def timed(fn, repeat: int = 1) -> float:
    """Seconds of the fastest of `repeat` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# 1. training throughput


class SeedStyleDecoder(nn.Module):
    """The decoder of the seed articles: an LSTMCell stepped in a Python loop, every caption
    padded to the longest in its batch."""

    def __init__(self, vocab_size: int, feat_dim: int, embed: int = 512, hidden: int = 512):
        super().__init__()
        self.head = nn.Linear(feat_dim, embed)
        self.embed = nn.Embedding(vocab_size, embed)
        self.cell = nn.LSTMCell(embed, hidden)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = c = feats.new_zeros(feats.shape[0], self.cell.hidden_size)
        h, c = self.cell(self.head(feats), (h, c))
        logits = []
        for t in range(tokens.shape[1]):
            h, c = self.cell(self.embed(tokens[:, t]), (h, c))
            logits.append(self.out(h))
        return torch.stack(logits, 1)


def reference_step(cnn: nn.Module, decoder: SeedStyleDecoder, opt, images: torch.Tensor, tokens: torch.Tensor) -> None:
    """One training step the seed way: fp32, the CNN on every caption's image, padded tokens."""
    feats = cnn(images).mean(dim=(2, 3))  # the frozen CNN, run again for every caption
    logits = decoder(feats, tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=0)
    opt.zero_grad()
    loss.backward()
    opt.step()


def bench_train(args, device: torch.device) -> None:
    plan = InferencePlan.resolve(device, args.precision, training=True)
    precision = plan.precision
    records = load_records(args.data)
    train = split_records(records, "train")
    vocab = Vocabulary.build((c for r in train for c in r.captions), 5)
    caps, _ = Captions.build(train, vocab, 20)
    n = len(caps.tokens)
    torch.manual_seed(0)
    cfg = ModelConfig.for_encoder("tf_efficientnet_lite0", len(vocab))
    model = CaptionModel.create(cfg).to(device)
    model.encoder.requires_grad_(False)
    lines = [f"Flickr8k train: {len(train)} images, {n} captions; Show-and-Tell 512/512, batch 128, "
             f"precision {precision} for (a) and (b), fp32 for (c).", ""]

    # (a) cached features: a whole epoch
    f, ok, _ = cached_features(model, [r.image for r in train], plan, args.cache_dir, batch_size=64,
                               workers=args.workers)
    feats = FeatureRows(f, list(range(len(train))))
    opt = torch.optim.Adam(model.decoder.parameters(), 4e-4)
    sampler = LengthBucketSampler(caps.lengths, 128, seed=0)
    t0 = time.perf_counter()
    train_one_epoch(model, ((feats[rows], tok) for rows, tok in map(caps.batch, sampler)), opt, plan,
                    5.0, 1, vocab.pad, progress=False)
    a_epoch = time.perf_counter() - t0
    a_rate = n / a_epoch

    # (b) frozen encoder on images every step (bucketed batches, autocast), `args.batches` batches
    transform = eval_transform(cfg.image_size, cfg.mean, cfg.std)
    batches = list(sampler)[: args.batches]

    def image_batches():  # one image per caption, every caption of a batch the same length
        for idx in batches:
            rows, tok = caps.batch(idx)
            images = torch.stack([transform(open_rgb(train[int(i)].image)) for i in rows])
            yield ImageBatch(images, torch.arange(len(rows)), tok, torch.full((len(rows),), tok.shape[1] - 1), [])

    t0 = time.perf_counter()
    train_one_epoch(model, image_batches(), opt, plan, 5.0, 1, vocab.pad, images=True, progress=False)
    b_seconds = time.perf_counter() - t0
    b_caps = sum(len(b) for b in batches)
    b_rate = b_caps / b_seconds

    # (c) the reference loop: random batches padded to their longest caption, fp32, CNN per caption
    cnn = model.encoder.float().eval()
    ref = SeedStyleDecoder(len(vocab), cfg.feat_dim).to(device)
    ref_opt = torch.optim.Adam(ref.parameters(), 4e-4)
    rng = random.Random(0)
    order = list(range(n))
    rng.shuffle(order)
    c_caps, t0 = 0, time.perf_counter()
    for k in range(args.batches):
        idx = order[k * 128:(k + 1) * 128]
        toks = [caps.tokens[i] for i in idx]
        tokens = nn.utils.rnn.pad_sequence(toks, batch_first=True)  # padded to the batch maximum
        images = torch.stack([transform(open_rgb(train[int(caps.image[i])].image)) for i in idx])
        reference_step(cnn, ref, ref_opt, images.to(device), tokens.to(device))
        c_caps += len(idx)
    c_seconds = time.perf_counter() - t0
    c_rate = c_caps / c_seconds

    lines += ["| path | captions/s | seconds per epoch | measured on |", "|---|---|---|---|",
              f"| (a) cached features, bucketed, {precision} | {a_rate:,.0f} | {a_epoch:,.0f} | the whole epoch |",
              f"| (b) frozen encoder on images every step, {precision} | {b_rate:,.1f} | {n / b_rate:,.0f} "
              f"| {b_caps} captions |",
              f"| (c) reference loop (CNN per caption, fp32, padded, step loop) | {c_rate:,.1f} | {n / c_rate:,.0f} "
              f"| {c_caps} captions |", "",
              f"Ratios: a/c = **{a_rate / c_rate:,.0f}x**, b/c = **{b_rate / c_rate:,.1f}x**. "
              f"Peak RSS of this process: {peak_rss_mb():,.0f} MB."]
    report("Training throughput", lines, device)


# ---------------------------------------------------------------------------------------------
# 2. captioning speed and latency


def bench_caption(args, device: torch.device) -> None:
    records = split_records(load_records(args.data), "val")[:128]
    lows = ("bf16",) if device.type == "cpu" else ("bf16", "fp16")  # on CUDA: which one auto should pick
    lines = [f"Model: {args.model or 'shipped'}; {len(records)} Flickr8k val images, preprocessed in memory "
             "(throughput of encoder + decoder); x = against fp32; same = captions as in fp32 (batch 64 rows).", "",
             "| batch | search | fp32 img/s | " + " | ".join(f"{p} img/s | x | same" for p in lows) + " |",
             "|---|---|---|" + "---|---|---|" * len(lows)]
    results, captions = {}, {}
    for precision in ("fp32", *lows):
        cap = Captioner.load(args.model, device=str(device), precision=precision)
        x = torch.stack([cap.transform(open_rgb(r.image)) for r in records])
        for bs in (1, 8, 64):
            for beam in (1, 3):
                n = min(len(x), max(bs * 4, 32))
                decoding = Decoding(beam_size=beam, length_norm=1.0)
                results[precision, bs, beam] = n / timed(lambda c=cap, n=n, bs=bs, d=decoding, x=x: [
                    c.caption_tensor(x[i:i + bs], d) for i in range(0, n, bs)], repeat=2)
                if bs == 64:
                    captions[precision, beam] = [r["caption"] for r in cap.caption_tensor(x[:n], decoding)]
    for bs in (1, 8, 64):
        for beam in (1, 3):
            a = results["fp32", bs, beam]
            cells = []
            for p in lows:
                same = (f"{sum(u == v for u, v in zip(captions[p, beam], captions['fp32', beam]))} of "
                        f"{len(captions['fp32', beam])}") if bs == 64 else ""
                cells.append(f"{results[p, bs, beam]:,.1f} | {results[p, bs, beam] / a:.2f}x | {same}")
            lines.append(f"| {bs} | {'greedy' if beam == 1 else 'beam 3'} | {a:,.1f} | " + " | ".join(cells) + " |")

    cap = Captioner.load(args.model, device=str(device))  # the default precision
    path = records[0].image
    beam3 = Decoding(beam_size=3, length_norm=1.0)
    cap.caption(path, decoding=beam3)
    lat = []
    for _ in range(args.latency_runs):
        t0 = time.perf_counter()
        cap.caption(path, decoding=beam3)
        lat.append((time.perf_counter() - t0) * 1000)
    lat.sort()
    p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
    lines += ["", f"One image end to end (JPEG on disk -> caption string), beam 3, warm, {cap.precision}, "
              f"{len(lat)} runs: p50 **{statistics.median(lat):.1f} ms**, p95 {p95:.1f} ms."]
    report("Captioning", lines, device)


def bench_latency(args, device: torch.device) -> None:
    """One image, file to caption, warm: where the time goes, at each thread count, with the
    encoder as trained (what captioning ran before) and folded (encoder.fold_batchnorm, now), and
    on a CPU with the decoder in int8 (--precision int8) beside its own precision."""
    cap = Captioner.load(args.model, device=str(device), precision=args.precision)
    cap8 = Captioner.load(args.model, device=str(device), precision="int8") if use_int8(device) else None
    folded = cap.encoder
    as_trained = copy.deepcopy(cap.model.encoder).to(memory_format=torch.channels_last)
    path = split_records(load_records(args.data), "val")[0].image
    x = cap.transform(open_rgb(path))[None]
    feats = cap.features(x)
    greedy = cap.decoding.replace(beam_size=1)
    beam3 = cap.decoding.replace(beam_size=3, block_trigrams=False)

    def encoder(enc):
        cap.encoder = enc
        cap.features(x)

    def end_to_end(enc, decoding=None):
        cap.encoder = enc
        cap.caption(path, decoding=decoding)

    parts = {"read + preprocess": lambda: cap.transform(open_rgb(path)),
             "encoder as trained": lambda: encoder(as_trained), "encoder folded": lambda: encoder(folded),
             "decoder greedy": lambda: caption_features(cap.model.decoder, cap.vocab, feats, greedy, cap.plan),
             "decoder " + cap.decoding.describe(): lambda: caption_features(cap.model.decoder, cap.vocab, feats,
                                                                            cap.decoding, cap.plan),
             "end to end, before": lambda: end_to_end(as_trained), "end to end, now": lambda: end_to_end(folded),
             # the decoding the speed targets were set at (the shipped model's own until 2026-11-23)
             "end to end now, beam 3 (ln 1.5)": lambda: end_to_end(folded, beam3)}
    if device.type == "cpu" and packable_dtypes() and cap.precision != "int8":  # before inference/packed.py
        plain = plain_layers(cap)
        parts["end to end, plain layers"] = lambda: plain.caption(path)
    if device.type == "cuda":  # the search asking the device at every step (InferencePlan.check_every 1)
        parts["decoder " + cap.decoding.describe() + ", asking the GPU at every step (before)"] = lambda: \
            caption_features(cap.model.decoder, cap.vocab, feats, cap.decoding, cap.plan.replace(check_every=1))
    if cap.plan.decoder_precision(1) != "fp32":  # a CPU where one image decodes in bf16
        parts["decoder fp32, " + cap.decoding.describe()] = lambda: caption_features(
            cap.model.decoder, cap.vocab, feats, cap.decoding, cap.plan.replace(precision="fp32"))
    if cap8:
        cap8.encoder = folded
        parts |= {"decoder int8, " + cap.decoding.describe(): lambda: caption_features(
                      cap8.model.decoder, cap.vocab, feats, cap.decoding, cap8.plan),
                  "end to end, int8": lambda: cap8.caption(path),
                  "end to end int8, beam 3 (ln 1.5)": lambda: cap8.caption(path, decoding=beam3)}
    threads_before = torch.get_num_threads()
    counts = sorted({1, threads_before})
    lines = [f"Model: {args.model or 'shipped'}, its own decoding ({cap.decoding.describe()}), {cap.precision}; one "
             f"Flickr8k val photo ({path.name}); p50 of {args.latency_runs} runs in ms, the variants taken in turn "
             "in each round. Before = the encoder as trained (channels-last); now = BatchNorm folded and the decoder's "
             "layers and encoder's convolutions packed (inference/packed.py; plain layers = now without that)"
             + ("; int8 = now with --precision int8 (the decoder's weights in 8 bits)" if cap8 else "")
             + ("; decoder fp32 = one image decoded in fp32, as every CPU did before 2026-11-23 (this CPU's own "
                "rule: InferencePlan.decoder_precision)" if any(k.startswith("decoder fp32") for k in parts) else "")
             + ".", "",
             "| torch threads | " + " | ".join(parts) + " | end to end now/before |"
             + (" end to end now/plain layers |" if "end to end, plain layers" in parts else "")
             + (" end to end int8/now |" if cap8 else ""),
             "|---" * (len(parts) + 2 + bool(cap8) + ("end to end, plain layers" in parts)) + "|"]
    for n in counts:
        torch.set_num_threads(n)
        times: dict[str, list[float]] = {k: [] for k in parts}
        for fn in parts.values():
            fn()  # warm
        for _ in range(args.latency_runs):
            for k, fn in parts.items():
                t0 = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[k].append((time.perf_counter() - t0) * 1000)
        p50 = {k: statistics.median(v) for k, v in times.items()}
        lines.append(f"| {n} | " + " | ".join(f"{v:.1f}" for v in p50.values())
                     + f" | {p50['end to end, before'] / p50['end to end, now']:.2f}x faster |"
                     + (f" {p50['end to end, plain layers'] / p50['end to end, now']:.2f}x faster |"
                        if "end to end, plain layers" in p50 else "")
                     + (f" {p50['end to end, now'] / p50['end to end, int8']:.2f}x faster |" if cap8 else ""))
    torch.set_num_threads(threads_before)
    cap.encoder = folded
    report("One-image latency", lines, device)


def plain_layers(cap: Captioner) -> Captioner:
    """`cap` as it captioned before inference/packed.py: the same model, loaded again with the decoder's
    layers and the encoder's convolutions unpacked (InferencePlan's `pack` off)."""
    return Captioner.load(cap.source if cap.source != "shipped" else None, plan=cap.plan.replace(pack=False))


def ended_images_kept(cap: Captioner) -> Captioner:
    """`cap` searching as before 2026-11-23, 23:00 UTC: every image of a batch searched until the last is
    done (InferencePlan's `drop_finished` off); the same model and encoder."""
    return Captioner(cap.model, cap.vocab, cap.plan.replace(drop_finished=False), cap.source, cap.encoder)


def decode_with(cap: Captioner, feats: torch.Tensor, batch: int, decoding: Decoding) -> list[dict]:
    return caption_features(cap.model.decoder, cap.vocab, feats, decoding, cap.plan, batch_size=batch)


def bench_packed(args, device: torch.device) -> None:
    """The decoder's products and the encoder's convolutions through oneDNN with packed weights against
    the plain layers, in turns; captions and features compared one photo at a time and in batches."""
    if device.type != "cpu" or not packable_dtypes():
        report("Packed weights", ["Not applicable here: packing is for the CPU, with oneDNN."], device)
        return
    records = split_records(load_records(args.data), "val")[: args.beam_images]
    precisions = ["fp32"] + (["bf16"] if torch.bfloat16 in packable_dtypes() and cpu_has_fast_bf16() else [])
    threads = torch.get_num_threads()
    lines = [f"Model: {args.model or 'shipped'}; {len(records)} Flickr8k val photos' features for the decoder rows, "
             "the photos themselves for the encoder rows; ms a photo, p50 over the photos one at a time (plain and "
             "packed in turns), or in batches (the decoder: all the photos, 64 at a time; the encoder: the first "
             "64, 32 at a time); same = captions (and log-probabilities) equal between the two over all the photos. "
             "The precision is the autocast asked for: a CPU's rule (InferencePlan.decoder_precision) may run 1-3 "
             "photos in fp32 whatever is asked, and then the rows say so.", "",
             "| precision | photos at once | threads | what | plain ms | packed ms | packed faster | same captions "
             "| same logprobs |", "|---|---|---|---|---|---|---|---|---|"]
    for precision in precisions:
        cap = Captioner.load(args.model, device=str(device), precision=precision)
        plain = plain_layers(cap)
        x = torch.stack([cap.transform(open_rgb(r.image)) for r in records])
        feats = torch.cat([cap.features(x[i:i + 32]).float() for i in range(0, len(x), 32)])
        for decoding in (Decoding(beam_size=3, length_norm=1.0), cap.decoding):
            for bs in (1, 64):
                one = [(feats[i:i + 1], 1, decoding) for i in range(len(feats))] if bs == 1 else [(feats, bs, decoding)]
                a = [r for job in one for r in decode_with(plain, *job)]
                b = [r for job in one for r in decode_with(cap, *job)]
                same = (f"{sum(u['caption'] == v['caption'] for u, v in zip(a, b))} of {len(a)} | "
                        f"{sum(u['logprob'] == v['logprob'] for u, v in zip(a, b))} of {len(a)}")
                ran = cap.plan.decoder_precision(bs)
                for n in dict.fromkeys((1, threads) if bs == 1 else (threads,)):
                    torch.set_num_threads(n)
                    ms = {c: [] for c in (plain, cap)}
                    for job in one[:60]:
                        for c in ms:
                            ms[c].append(timed(functools.partial(decode_with, c, *job)) * 1000 / len(job[0]))
                    pa, pb = (statistics.median(v) for v in ms.values())
                    lines.append(f"| {precision}{'' if ran == precision else f' (runs {ran})'} | {bs} | {n} | "
                                 f"{decoding.describe()} | {pa:.2f} | {pb:.2f} | {pa / pb:.2f}x | {same} |")
                torch.set_num_threads(threads)
        for bs in (1, 32):  # the encoder: images to features
            jobs = [x[i:i + bs] for i in range(0, len(x), bs)]
            same = sum(torch.equal(plain.features(j), cap.features(j)) for j in jobs[: 60 // bs + 1])
            for n in dict.fromkeys((1, threads) if bs == 1 else (threads,)):
                torch.set_num_threads(n)
                ms = {c: [] for c in (plain, cap)}
                for j in jobs[: 60 // bs + 1]:
                    for c in ms:
                        ms[c].append(timed(functools.partial(c.features, j)) * 1000 / len(j))
                pa, pb = (statistics.median(v) for v in ms.values())
                lines.append(f"| {cap.plan.encoder_precision} | {bs} | {n} | encoder | {pa:.2f} | {pb:.2f} | "
                             f"{pa / pb:.2f}x | features equal bit for bit in {same} of {min(len(jobs), 60 // bs + 1)} "
                             "batches | |")
            torch.set_num_threads(threads)
    report("Packed weights", lines, device)


def bench_bigjpeg(args, device: torch.device) -> None:
    """Big JPEGs, as phones take them: decoded at full size (as before) against libjpeg's reduced
    scale (images.draft_size), both sides at least twice the model's input; photos in turns."""
    records = split_records(load_records(args.data), "val")[:30]
    cap = Captioner.load(args.model, device=str(device))
    full = Captioner(cap.model, cap.vocab, cap.device, cap.precision, cap.source, cap.encoder)
    full.draft_size = 0  # the decode before: full size
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for r in records:
            paths.append(Path(tmp) / f"{r.image.stem}.jpg")
            open_rgb(r.image).resize((4032, 3024), Image.BICUBIC).save(paths[-1], quality=90)
        same = sum(full.caption(p) == cap.caption(p) for p in paths)
        ms: dict[str, list[float]] = {k: [] for k in ("decode full", "decode reduced", "caption full",
                                                        "caption reduced")}
        for p in paths:
            for name, c in (("full", full), ("reduced", cap)):
                ms[f"decode {name}"].append(timed(lambda c=c, p=p: c.read(p)) * 1000)
                ms[f"caption {name}"].append(timed(lambda c=c, p=p: c.caption(p)) * 1000)
    p50 = {k: statistics.median(v) for k, v in ms.items()}
    report("Big JPEGs", [
        f"Model: {args.model or 'shipped'}, its own decoding, {cap.precision}; {len(paths)} Flickr8k val photos "
        "enlarged to 4032x3024 (12 MP) and saved as JPEG quality 90; p50 ms a photo, full size and reduced "
        f"scale in turns (the reduced scale keeps both sides >= {cap.draft_size} px).", "",
        "| what | full size | reduced scale | faster |", "|---|---|---|---|",
        f"| decode + resize | {p50['decode full']:.1f} | {p50['decode reduced']:.1f} | "
        f"{p50['decode full'] / p50['decode reduced']:.1f}x |",
        f"| file to caption | {p50['caption full']:.1f} | {p50['caption reduced']:.1f} | "
        f"{p50['caption full'] / p50['caption reduced']:.1f}x |", "",
        f"Captions the same at both scales: {same} of {len(paths)}."], device)


# ---------------------------------------------------------------------------------------------
# 3. batched beam search against a loop over images


def bench_beam(args, device: torch.device) -> None:
    cap = Captioner.load(args.model, device=str(device))
    records = split_records(load_records(args.data), "val")[: args.beam_images]
    f, _, _ = cached_features(cap.model, [r.image for r in records], cap.plan, args.cache_dir, progress=False)
    feats = torch.from_numpy(np.array(f, dtype=np.float32)).to(device)
    v, m = cap.vocab, cap.model

    def batched():
        with autocast(device, cap.precision):
            return beam_search(m.decoder, feats, v.start, v.end, 20, 3, 1.0, banned=[v.unk]).tokens[:, 0]

    def looped():
        out = []
        with autocast(device, cap.precision):
            for i in range(len(feats)):
                out.append(beam_search(m.decoder, feats[i:i + 1], v.start, v.end, 20, 3, 1.0, banned=[v.unk])
                           .tokens[0, 0])
        return torch.stack(out)

    same = sum(v.decode(a) == v.decode(b) for a, b in zip(batched().tolist(), looped().tolist()))
    tb, tl = timed(batched, 2), timed(looped, 1)
    lines = [f"{len(feats)} Flickr8k val images, beam 3, length normalisation 1.0, decoder {m.cfg.decoder}, "
             f"{cap.precision}: batched {tb:.2f} s ({len(feats) / tb:,.0f} img/s), loop {tl:.2f} s "
             f"({len(feats) / tl:,.0f} img/s): **{tl / tb:.1f}x**; identical captions for {same} of {len(feats)} "
             "images.", ""]

    # ended images leaving the batch (decode.py) against keeping them to the end, as before
    kept = ended_images_kept(cap)

    def search_all(decoding: Decoding, batch: int, keep: bool) -> list[dict]:
        return decode_with(kept if keep else cap, feats, batch, decoding)

    lines += ["| decoding | batch | kept to the end (before) img/s | leaving when done img/s | faster | "
              "same captions, log-probabilities and alternatives |", "|---|---|---|---|---|---|"]
    for decoding in (cap.decoding, Decoding(beam_size=3, length_norm=1.0), Decoding()):
        for batch in dict.fromkeys((cap.plan.batch_size, 64)):
            same = sum(a == b for a, b in zip(search_all(decoding, batch, True), search_all(decoding, batch, False)))
            t = {True: [], False: []}
            for _ in range(3):  # in turns
                for keep in t:
                    t[keep].append(timed(lambda c=decoding, b=batch, k=keep: search_all(c, b, k)))
            tk, tl = min(t[True]), min(t[False])
            lines.append(f"| {decoding.describe()} | {batch} | {len(feats) / tk:,.0f} | {len(feats) / tl:,.0f} | "
                         f"{tk / tl:.2f}x | {same} of {len(feats)} |")
    lines += ["", "A batch's search runs until its last image is done; an image whose search has ended (K finished "
              "captions) leaves the batch, so the steps after cost only the others. The decoder alone, from "
              "features; the fastest of 3 runs each, in turns."]
    report("Beam search: batched against a loop over images; ended images leaving the batch", lines, device)


# ---------------------------------------------------------------------------------------------
# 4. feature extraction and memory


PEAK = ("import resource, sys\nfrom captioner.cli import main\nrc = main(sys.argv[1:])\n"
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(rc)")


def child_peak_mb(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of `captioner ARGS...` run in a child process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    kb = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_KB"))
    return time.perf_counter() - t0, kb / 1024


def bench_memory(args, device: torch.device) -> None:
    records = split_records(load_records(args.data), "train")
    cap = Captioner.load(args.model, device=str(device))
    lines = ["| what | result |", "|---|---|"]
    for precision in ("fp32", "bf16" if device.type == "cpu" else "fp16"):
        paths = [r.image for r in records[:512]]
        t0 = time.perf_counter()
        extract_features(cap.model, paths, InferencePlan(device, precision), batch_size=32, workers=args.workers,
                         progress=False)
        lines.append(f"| feature extraction, {cap.model.cfg.encoder}, {precision} | "
                     f"{len(paths) / (time.perf_counter() - t0):,.0f} img/s |")

    with tempfile.TemporaryDirectory() as tmp:
        for count in (1000, 10000):
            folder = Path(tmp) / f"photos{count}"
            folder.mkdir()
            for i in range(count):  # links to real photos: a folder of `count` files
                (folder / f"{i:05d}.jpg").symlink_to(records[i % len(records)].image.resolve())
            seconds, mb = child_peak_mb(["caption", str(folder), "--out",
                                         str(Path(tmp) / f"c{count}.jsonl"), "--quiet", "--beam-size", "3"] +
                                        (["--model", str(args.model)] if args.model else []))
            lines.append(f"| captioning a folder of {count:,} photos, beam 3 (peak RSS) | {mb:,.0f} MB, "
                         f"{count / seconds:,.0f} img/s including start-up |")
        run = Path(tmp) / "run"
        seconds, mb = child_peak_mb(["train", "--data", str(args.data), "--out", str(run),
                                     "--epochs", "1", "--quiet"] +
                                    (["--cache-dir", str(args.cache_dir)] if args.cache_dir else []))
        lines.append(f"| training, one Show-and-Tell epoch on cached features (peak RSS) | {mb:,.0f} MB, "
                     f"{seconds:,.0f} s with validation and start-up |")
    report("Feature extraction and memory", lines, device)


# ---------------------------------------------------------------------------------------------
# 5. files to captions


def bench_files(args, device: torch.device) -> None:
    """`caption --out` from files on disk: batch sizes and loader processes with Pillow decoding; on
    CUDA also the GPU decoding the JPEGs (data/jpeg.py), and greedy and beam 3 at the defaults; on a
    CPU with the int8 kernels also the decoder in int8. Captions are compared with the first row of
    the same batch size."""
    records = split_records(load_records(args.data), "val") + split_records(load_records(args.data), "train")
    paths = [r.image for r in records[: args.files]]
    cap = Captioner.load(args.model, device=str(device), precision=args.precision)
    gpu = device.type == "cuda"
    batches = (64, 256, 512) if gpu else (32, 64, 128)
    default = cap.plan.workers(len(paths), cap.plan.batch_size)
    own = cap.decoding
    lines = ["| batch | loader processes | JPEGs decoded by | decoding | images/s | captions as in the batch's "
             "first row |", "|---|---|---|---|---|---|"]
    first: dict[int, dict] = {}  # batch size -> the captions of its first row

    def row(batch: int, workers: int, on_device: bool, decoding: Decoding, model=cap, note: str = "") -> None:
        out = Path(tmp) / f"run{len(lines)}.jsonl"
        t0 = time.perf_counter()
        caption_to_file(model, paths, out, batch_size=batch, progress=False, workers=workers, decoding=decoding,
                        jpegs_on_device=on_device)
        rate = len(paths) / (time.perf_counter() - t0)  # the captions are on the host: the device is done
        got = {json.loads(x)["image"]: json.loads(x)["caption"] for x in out.read_text().splitlines()}
        same = ""
        if decoding == own:
            ref = first.setdefault(batch, got)
            same = f"{sum(got[p] == ref[p] for p in ref)} of {len(ref)}"
        lines.append(f"| {batch} | {workers}{' (default)' if workers == default else ''} | "
                     f"{'the GPU (nvJPEG)' if on_device else 'Pillow'} | {decoding.describe()}{note} | {rate:,.1f} | "
                     f"{same} |")

    with tempfile.TemporaryDirectory() as tmp:
        for batch in batches:
            for workers in dict.fromkeys((0, default, 2)):
                row(batch, workers, False, own)
            if gpu:
                row(batch, default, True, own)
        if gpu:  # the two figures: greedy and beam 3, at the defaults
            for beam in (1, 3):
                row(cap.plan.batch_size, default, True, own.replace(beam_size=beam, block_trigrams=False))
        row(cap.plan.batch_size, default, gpu, own, model=ended_images_kept(cap),
            note=", **ended images kept to the end** (before)")
        if device.type == "cpu" and packable_dtypes() and cap.precision != "int8":  # as before inference/packed.py
            row(cap.plan.batch_size, default, False, own, model=plain_layers(cap),
                note=", **plain layers** (unpacked)")
        if use_int8(device):  # the same at the defaults, the decoder in int8
            cap8 = Captioner.load(args.model, device=str(device), precision="int8")
            for batch in batches:
                row(batch, default, False, own, model=cap8, note=", **int8 decoder**")
    lines += ["", f"`captioner caption DIR --out x.jsonl` as the API runs it: {len(paths):,} Flickr8k photos (224x224 "
              f"JPEGs) from disk to the JSONL file, the model's own decoding ({own.describe()}) unless the row says, "
              f"precision {cap.precision}. Loader processes by default: InferencePlan.workers."]
    report("Files to captions", lines, device)


# ---------------------------------------------------------------------------------------------
# 6. search: query time against library size


QUERIES = ("a dog runs through the grass", "puppy playing outside", "two children on a beach",
           "a man riding a bike down a dirt road", "a girl in a pink dress", "people walking in the city snow",
           "a black dog and a white dog", "someone climbing a rock wall")


def synthetic_library(db: Path, cap: Captioner, rows: int, seed: int = 0, features: bool = True) -> None:
    """A library of `rows` photos as `captioner index` would write it for `cap`, with synthetic
    numbers: captions of vocabulary words, features of random codes (the real size: P*C bytes),
    pooled unit vectors, expected word counts of random words, and points in the search space when
    the model has one (and then no pooled feature, as index writes them). `features=False`: as
    `index --no-features` writes it. Only the timing is meaningful."""
    rng = np.random.default_rng(seed)
    words = cap.vocab.itos[4:1004]
    con = connect(db)
    feat_shape = (49, cap.model.cfg.feat_dim) if cap.model.decoder.feature_kind == "spatial" else (
        cap.model.cfg.feat_dim,)
    pool = [rng.integers(0, 256, int(np.prod(feat_shape)), dtype=np.uint8).tobytes() for _ in range(256)]
    head = np.array([0.0, 6 / 255], np.float32).tobytes()
    zipf = 1 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    stat = SimpleNamespace(st_size=0, st_mtime=0.0)
    for start in range(0, rows, 2000):  # written as index writes a batch: one transaction each
        n = min(2000, rows - start)
        ids = rng.choice(len(words), size=(n, wordcounts.WORDS_KEPT), p=zipf) + 4
        counts = rng.exponential(0.2, size=(n, wordcounts.WORDS_KEPT))
        pooled = rng.normal(size=(n, cap.model.cfg.feat_dim)).astype(np.float32)
        pooled = (pooled / np.linalg.norm(pooled, axis=1, keepdims=True)).astype(np.float16)
        photos = [(f"/photos/{start + i:06d}.jpg", stat, "x", {"caption": " ".join(words[j - 4] for j in ids[i, :10])})
                  for i in range(n)]
        points = [None] * n
        if cap.space is not None:
            p = rng.normal(size=(n, cap.space.cfg.point_dim)).astype(np.float32)
            points = [q.tobytes() for q in (p / np.linalg.norm(p, axis=1, keepdims=True)).astype(np.float16)]
        vectors = [(head + pool[(start + i) % len(pool)] if features else None,
                    pooled[i].tobytes() if cap.space is None else None, w, points[i])
                   for i, w in enumerate(wordcounts.pack_words(ids, counts))]
        write_batch(con, photos, [], "bench", vectors, cap.fingerprint)
    con.close()


def bench_search(args, device: torch.device) -> None:
    cap = Captioner.load(args.model, device=str(device))
    example = sorted((args.data / "Images").glob("*.jpg"))[:1] or [Path(__file__).parent.parent / "examples"
                                                                     / "camera.jpg"]
    modes = [m for m in MODES if m != "embedding" or cap.space is not None]
    lines = ["| photos in the library | database | stage-1 numbers in memory | " + " | ".join(modes)
             + " | --like | peak RSS |", "|---|---|---|" + "---|" * len(modes) + "---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.search_rows:
            db = Path(tmp) / f"lib{rows}.db"
            t0 = time.perf_counter()
            synthetic_library(db, cap, rows, features=not args.search_no_features)
            print(f"{rows:,} synthetic rows written in {time.perf_counter() - t0:.0f} s", flush=True)
            times = {}
            for mode in modes:
                per = []
                for q in QUERIES:
                    t0 = time.perf_counter()
                    search(db, q, 20, mode=mode, captioner=cap)
                    per.append(time.perf_counter() - t0)
                times[mode] = statistics.median(per)
            like = [timed(lambda db=db: similar(db, example[0], 20, captioner=cap)) for _ in range(3)]
            stage1 = rows * wordcounts.WORDS_KEPT * 8 / 1e6  # ids int32 + counts float32
            size = db.stat().st_size
            lines.append(f"| {rows:,} | {size / 1e9:.2f} GB ({size / rows / 1e3:.1f} KB a photo) | {stage1:,.0f} MB | "
                         + "".join(f"{times[m] * 1000:,.0f} ms | " for m in modes)
                         + f"{min(like) * 1000:,.0f} ms | {peak_rss_mb():,.0f} MB |")
            db.unlink()
    written = ("Indexed as `index --no-features` writes (no encoder features: model and hybrid rank without log p). "
               if args.search_no_features else "")
    lines += ["", written + f"Median over {len(QUERIES)} queries, limit 20, the model re-ranking the best "
              f"{retrieval.RERANK} of stage 1; the database in the page cache (just written). Synthetic rows "
              "(random features and word counts, the real sizes): the timing is real, the ranking is not. "
              "Peak RSS is the process's high-water mark so far (model included)."]
    report("Search: query time against library size", lines, device)


# ---------------------------------------------------------------------------------------------
# 7. fine-tuning the encoder: end to end from files


def finetune_epoch(args, device: torch.device, records: list, precision: str, per_caption: bool = False,
                   freeze_stages: int = 3, memory_format: torch.memory_format | None = None,
                   shares_images: bool = True) -> tuple[float, int]:
    """One fine-tuning epoch over `records` as `captioner train --fine-tune-encoder --init` runs it
    (image-major batches of 128 captions from the files, augmented in the default loader processes,
    BatchNorm statistics frozen), from the model to fine-tune. -> (seconds, captions).

    `per_caption`: the old way instead, every caption loading, augmenting and encoding its own
    image. `memory_format`: force the encoder's layout, weights and images alike (default: the
    training's own choice, runtime.encoder_memory_format). `shares_images=False`: the decoder repeats
    each image's features for its captions before it runs (Decoder.shares_images), as before."""
    model, vocab = load_model(args.model or "shipped", device)
    if not shares_images:
        model.decoder.shares_images = False  # this model's decoder only
    model.encoder.requires_grad_(True)
    model.encoder.freeze_stages(freeze_stages)
    caps, _ = Captions.build(records, vocab, model.cfg.max_len)
    if per_caption:  # a record per caption: its image is read and encoded for it alone
        records = [Record(records[int(i)].image, [vocab.decode(t.tolist())])
                   for i, t in zip(caps.image, caps.tokens)]
        caps, _ = Captions.build(records, vocab, model.cfg.max_len)
    sampler = ImageBatchSampler(torch.bincount(caps.image, minlength=len(records)).tolist(), 128, seed=0)
    loader = DataLoader(ImageCaptions(records, caps, model.cfg), batch_sampler=sampler,
                        num_workers=loader_workers(len(sampler), 1), collate_fn=image_batch_collate(caps, vocab.pad))
    opt = torch.optim.Adam([{"params": model.decoder.parameters(), "lr": 1e-4},
                            {"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": 5e-5}])
    fmt = memory_format or encoder_memory_format(device)
    model.encoder.to(memory_format=fmt)
    t0 = time.perf_counter()
    train_one_epoch(model, loader, opt, InferencePlan(device, precision), 5.0, 1, vocab.pad, images=True,
                    progress=False, freeze_bn=True, memory_format=fmt)  # images laid out as the weights
    return time.perf_counter() - t0, len(caps.tokens)


FINETUNE_CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import bench, torch
from captioner.runtime import keep_freed_memory
if sys.argv[3] == "keep":
    keep_freed_memory()
args = bench.SimpleNamespace(model=None if sys.argv[4] == "-" else Path(sys.argv[4]))
train = bench.split_records(bench.load_records(Path(sys.argv[2])), "train")[: int(sys.argv[5])]
seconds, _ = bench.finetune_epoch(args, torch.device("cpu"), train, sys.argv[6])
print(len(train) / seconds)
"""


def allocator_ab(args, n_images: int, precision: str, rounds: int = 2) -> tuple[float, float]:
    """Fine-tuning images/s with freed memory kept (runtime.keep_freed_memory) and with glibc's
    defaults, each in fresh child processes run in turns (the setting cannot be undone within a
    process, and a process's heap remembers what ran before). -> (kept, default), medians."""
    rates: dict[str, list[float]] = {"keep": [], "default": []}
    for _ in range(rounds):
        for mode in rates:
            cmd = [sys.executable, "-c", FINETUNE_CHILD, str(Path(__file__).parent), str(args.data), mode,
                   str(args.model or "-"), str(n_images), precision]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
            rates[mode].append(float(out.stdout.split()[-1]))
    return statistics.median(rates["keep"]), statistics.median(rates["default"])


def bench_finetune(args, device: torch.device) -> None:
    train = split_records(load_records(args.data), "train")
    images = train[: args.finetune_images]
    auto = resolve_precision("auto", device)
    low = "bf16" if device.type == "cpu" or auto == "bf16" else "fp16"
    lines = [f"Fine-tuning the model ({args.model or 'shipped'}) on the first {len(images)} Flickr8k train images "
             f"from disk: batches of 128 captions, Adam, loader processes as `captioner train` picks them. Epoch "
             f"minutes are for the 6,000 train images at the measured rate.", "",
             "| path | precision | images/s | captions/s | minutes per epoch |", "|---|---|---|---|---|"]
    table: dict[str, str] = {}

    def row(name: str, precision: str, n_images: list, **kw) -> float:
        seconds, n_caps = finetune_epoch(args, device, n_images, precision, **kw)
        rate = len(n_images) / seconds
        table[name] = f"| {name} | {precision} | {rate:,.1f} | {n_caps / seconds:,.0f} | {6000 / rate / 60:,.1f} |"
        return rate

    if device.type == "cpu":  # as captioner train does there; (g) measures it in child processes
        keep_freed_memory()
    # (a) the frozen path, cached features, for scale: decoder steps only
    model, vocab = load_model(args.model or "shipped", device)
    caps, _ = Captions.build(images, vocab, model.cfg.max_len)
    plan = InferencePlan(device, auto)
    f, _, _ = cached_features(model, [r.image for r in images], plan, args.cache_dir, batch_size=64,
                              workers=args.workers)
    feats = FeatureRows(f, list(range(len(images))))
    opt = torch.optim.Adam(model.decoder.parameters(), 1e-4)
    sampler = LengthBucketSampler(caps.lengths, 128, seed=0)
    seconds = timed(lambda: train_one_epoch(model, ((feats[rows], tok) for rows, tok in map(caps.batch, sampler)), opt,
                                            plan, 5.0, 1, vocab.pad, progress=False))  # a second epoch: warm
    frozen = len(images) / seconds
    table["(a)"] = (f"| (a) frozen encoder, cached features (no fine-tuning) | {auto} | {frozen:,.1f} | "
                   f"{len(caps.tokens) / seconds:,.0f} | {6000 / frozen / 60:,.1f} |")
    fast = row("(b) fine-tuning: image-major, first 3 stages frozen (the default)", auto, images)
    row("(b) the same", low, images[: max(20, len(images) // 5)])
    row("(c) image-major, every stage trained (--freeze-stages 0)", auto, images, freeze_stages=0)
    if device.type == "cpu":
        row("(d) image-major, encoder contiguous (not channels-last)", auto, images,
            memory_format=torch.contiguous_format)
    slow = row("(e) per caption: each caption loads, augments and encodes its image (before)", auto,
               images[: max(20, len(images) // 5)])
    repeated = row("(f) image-major, each image's features repeated for its captions before the decoder "
                   "(before)", auto, images, shares_images=False)
    if device.type == "cpu":
        kept, default = allocator_ab(args, len(images), auto)
        name = "(g) image-major, glibc's allocator at its defaults (before); child processes, in turns"
        table[name] = f"| {name} | {auto} | {default:,.1f} | | {6000 / default / 60:,.1f} |"
        name = "(g) the same, freed memory kept (as `captioner train` does); child processes, in turns"
        table[name] = f"| {name} | {auto} | {kept:,.1f} | | {6000 / kept / 60:,.1f} |"
    lines += [table[k] for k in sorted(table)]
    lines += ["", f"Image-major against per caption: **{fast / slow:,.1f}x** images/s. The attention decoder working "
              f"once per image against once per caption (b/f): **{fast / repeated:,.2f}x**."]
    if device.type == "cpu":
        lines.append(f"Freed memory kept for the next step against glibc's defaults (the two g rows, each the median "
                     f"of 2 child processes run in turns): **{kept / default:,.2f}x**.")
    lines.append("bf16/fp16 rows time a fifth of the images where they are slow.")
    report("Fine-tuning the encoder", lines, device)


SECTIONS = {"train": bench_train, "caption": bench_caption, "latency": bench_latency, "packed": bench_packed,
            "bigjpeg": bench_bigjpeg, "beam": bench_beam,
            "memory": bench_memory, "files": bench_files, "search": bench_search, "finetune": bench_finetune}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sections", nargs="+", choices=[*SECTIONS, "all"])
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets/flickr8k"))
    ap.add_argument("--model", type=Path, help="model folder (default: the shipped model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--cache-dir", type=Path)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batches", type=int, default=10, help="batches timed for training paths (b) and (c)")
    ap.add_argument("--beam-images", type=int, default=200)
    ap.add_argument("--latency-runs", type=int, default=50)
    ap.add_argument("--files", type=int, default=1000, help="photos the files section captions")
    ap.add_argument("--finetune-images", type=int, default=300, help="train photos the finetune section trains on")
    ap.add_argument("--search-rows", type=int, nargs="+", default=[1000, 10000, 100000],
                    help="library sizes the search section times")
    ap.add_argument("--search-no-features", action="store_true",
                    help="search section: libraries as index --no-features writes them (for 1,000,000 photos: the "
                         "features would take 63 GB)")
    args = ap.parse_args()
    device = pick_device(args.device)
    for name in SECTIONS if "all" in args.sections else dict.fromkeys(args.sections):
        SECTIONS[name](args, device)


if __name__ == "__main__":
    main()
