"""Training: `fit()` runs epochs of `train_one_epoch()` and `validate()`.

Frozen encoder (default): every image goes through the CNN once, into the feature cache; the
decoder then trains on cached features, in length-bucketed batches with no padding.
`--fine-tune-encoder`: images go through the (augmented) encoder at every step, with its own
learning rate.

After each epoch: val loss, and free-running captions of every val image (greedy, or beam search
with `--val-beam-size`) scored with BLEU-4 and CIDEr-D (never teacher-forced "BLEU"). The best
model by val CIDEr-D and the last one are written as model folders; `checkpoint.pt`
(decoder/encoder, optimizer, scheduler, epoch, args, history; tensors and plain data only, read
back with ``weights_only=True``) lets `--resume` continue exactly where the run stopped.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import pickle
import random
import time
import warnings
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner import metrics
from captioner.data.batching import LengthBucketSampler
from captioner.data.features import cached_features, extract_features
from captioner.data.images import open_rgb, train_transform
from captioner.data.records import DataError, Record, assign_splits, check_images, load_records, split_records
from captioner.data.vocab import Vocabulary
from captioner.decode import search
from captioner.model.encoder import weights_digest
from captioner.model.folder import load_model, save_model
from captioner.model.network import CaptionModel, ModelConfig
from captioner.runtime import Dist, autocast, resolve_precision
from captioner.scst import CiderD, SelfCritical, scst_one_epoch
from captioner.viz import plot_curves

CHECKPOINT = "checkpoint.pt"


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class Captions:
    """Every training caption as ids, with the row of its image's features."""

    tokens: list[torch.Tensor]  # each (T,) = [<start>, w1..wn, <end>]
    image: torch.Tensor  # (N,) index into the image list / feature rows
    lengths: list[int]

    @classmethod
    def build(cls, records: list[Record], vocab: Vocabulary, max_words: int) -> tuple[Captions, int]:
        tokens, image, dropped = [], [], 0
        for i, r in enumerate(records):
            for c in r.captions:
                ids = vocab.encode(c)
                if len(ids) - 2 > max_words or len(ids) == 2:
                    dropped += 1
                    continue
                tokens.append(torch.tensor(ids))
                image.append(i)
        return cls(tokens, torch.tensor(image, dtype=torch.long), [len(t) for t in tokens]), dropped

    def batch(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image rows (B,), tokens (B, T)); the sampler guarantees equal lengths."""
        return self.image[idx], torch.stack([self.tokens[i] for i in idx])


class AugmentedImages(Dataset):
    """For fine-tuning: index of a caption -> (augmented image, caption ids)."""

    def __init__(self, records: list[Record], caps: Captions, cfg: ModelConfig):
        self.records, self.caps = records, caps
        self.transform = train_transform(cfg.image_size, cfg.mean, cfg.std)

    def __len__(self) -> int:
        return len(self.caps.tokens)

    def __getitem__(self, i: int):
        return self.transform(open_rgb(self.records[int(self.caps.image[i])].image)), self.caps.tokens[i]


def collate_augmented(batch):
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


class FeatureRows:
    """Cached features of the kept images, read a batch at a time from the memory-mapped file, so
    a cache larger than memory (COCO's spatial maps) still trains."""

    def __init__(self, array: np.ndarray, keep: list[int]):
        self.array = array  # (N_all, ...) fp16, usually a np.memmap
        self.keep = np.asarray(keep, dtype=np.int64)  # record index -> row of `array`

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, idx) -> torch.Tensor:
        rows = self.keep[np.asarray(idx)]
        return torch.from_numpy(np.ascontiguousarray(self.array[rows]))


def readable(records: list[Record], errors: list[str], ok: np.ndarray) -> list[int]:
    if errors:
        shown = "; ".join(errors[:3])
        warnings.warn(f"{len(errors)} unreadable images left out ({shown}{'; ...' if len(errors) > 3 else ''})",
                      stacklevel=2)
    return [i for i in range(len(records)) if ok[i]]


# ---------------------------------------------------------------------------------------------
# one epoch, and validation


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Mean cross-entropy over non-pad target tokens. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=pad)


def train_one_epoch(model, batches, optimizer, device, precision: str, clip: float, epoch: int,
                    images: bool = False, progress: bool = True, dist: Dist | None = None, accum: int = 1,
                    total: int | None = None) -> float:
    """`batches` yields (features, tokens), or (images, tokens) when `images` (the encoder is
    trained too). `model` is a CaptionModel, or its DistributedDataParallel wrapper. Every `accum`
    batches make one optimiser step on the mean of their losses (gradient accumulation; the
    sampler makes the number of batches a multiple of it). `total`: how many batches there are,
    for the progress bar. Returns the mean cross-entropy per word (over all ranks)."""
    dist = dist or Dist()
    core = getattr(model, "module", model)
    model.train()
    if not images:
        core.encoder.eval()  # frozen: keep its BatchNorm statistics fixed
    # fp16 needs its gradients scaled up so that small ones do not underflow (bf16 does not)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    loss_sum, tokens_seen, captions, t0 = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", total=total, leave=False,
               disable=not (progress and dist.main))
    optimizer.zero_grad(set_to_none=True)
    for i, (x, tok) in enumerate(bar):
        x, tok = x.to(device, non_blocking=True), tok.to(device, non_blocking=True)
        step = (i + 1) % accum == 0
        # DDP averages gradients over ranks on the backward pass of a step's last batch only
        sync = contextlib.nullcontext() if step or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, precision):
                logits, penalty = model(x, tok[:, :-1], images=images)  # (B, T-1, V)
            loss = caption_loss(logits, tok[:, 1:])
            scaler.scale((loss + penalty.float()) / accum).backward()
        if step:
            if clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        n = tok[:, 1:].ne(0).sum().item()
        loss_sum += loss.item() * n
        tokens_seen += n
        captions += tok.shape[0] * dist.world
        bar.set_postfix(loss=f"{loss_sum / tokens_seen:.3f}", cap_s=f"{captions / (time.perf_counter() - t0):.0f}")
    loss_sum, tokens_seen = dist.sum([loss_sum, tokens_seen])
    return loss_sum / max(tokens_seen, 1)


@torch.no_grad()
def validate(model: CaptionModel, vocab: Vocabulary, feats: FeatureRows, caps: Captions, scorer: metrics.Scorer,
             device, precision: str, batch_size: int = 256, max_len: int = 20, beam_size: int = 1) -> dict:
    """Val loss (teacher-forced, as a loss only) and free-running captions of every val image
    (greedy, or beam search with length normalisation 1.0) scored with BLEU-4 and CIDEr-D against
    all of its references."""
    model.eval()
    total, n_tok = 0.0, 0
    for idx in LengthBucketSampler(caps.lengths, batch_size, shuffle=False):
        rows, tok = caps.batch(idx)
        f, tok = feats[rows].to(device).float(), tok.to(device)
        with autocast(device, precision):
            logits, _ = model(f, tok[:, :-1])  # features, not images
        n = tok[:, 1:].ne(0).sum().item()
        total += caption_loss(logits, tok[:, 1:]).item() * n
        n_tok += n
    hyps = generate_text(model, vocab, feats, device, precision, batch_size if beam_size == 1 else 100, max_len,
                         beam_size, 1.0 if beam_size > 1 else 0.0)
    s = scorer(dict(enumerate(hyps)), meteor=False)
    return {"val_loss": total / max(n_tok, 1), "BLEU-4": s["BLEU-4"], "CIDEr": s["CIDEr"], "samples": hyps[:3]}


@torch.no_grad()
def generate_text(model: CaptionModel, vocab: Vocabulary, feats: FeatureRows, device, precision: str,
                  batch_size: int = 256, max_len: int = 20, beam_size: int = 1, length_norm: float = 0.0) -> list[str]:
    """Captions of every image of `feats`, in order (greedy unless `beam_size` > 1)."""
    model.eval()
    out = []
    for i in range(0, len(feats), batch_size):
        f = feats[np.arange(i, min(i + batch_size, len(feats)))].to(device).float()
        with autocast(device, precision):
            hyp = search(model.decoder, f, vocab, beam_size, length_norm, max_len=max_len)
        out += [vocab.decode(t) for t in hyp.tokens[:, 0].tolist()]
    return out


DECODING_CANDIDATES = ((1, 0.0), (3, 0.0), (3, 0.5), (3, 1.0), (3, 1.5), (3, 2.0))  # (beam size, length norm)


def choose_decoding(folder: Path, feats: FeatureRows, scorer: metrics.Scorer, device, precision: str,
                    half: bool = False) -> list[dict]:
    """Score the model folder's captions of val with each candidate decoding and store the best
    (by CIDEr-D) in its config.json as the model's default. Returns one row per candidate."""
    model, vocab = load_model(folder, device)
    rows = []
    for beam_size, length_norm in DECODING_CANDIDATES:
        hyps = generate_text(model, vocab, feats, device, precision, 100, model.cfg.max_len, beam_size, length_norm)
        s = scorer(dict(enumerate(hyps)), meteor=False)
        rows.append({"beam_size": beam_size, "length_norm": length_norm, "BLEU-4": round(s["BLEU-4"], 4),
                     "CIDEr": round(s["CIDEr"], 4)})
    best = max(rows, key=lambda r: r["CIDEr"])
    model.cfg.beam_size, model.cfg.length_norm = best["beam_size"], best["length_norm"]
    model.cfg.extra = {**model.cfg.extra, "decoding_on_val": rows}
    save_model(model, vocab, folder, half=half)
    return rows


# ---------------------------------------------------------------------------------------------
# records of a run: metrics.csv, curves.png, checkpoint


def write_metrics(out: Path, history: list[dict]) -> None:
    cols = ["epoch", "train_loss", "reward", "val_loss", "BLEU-4", "CIDEr", "lr", "seconds"]
    tmp = out / "metrics.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, out / "metrics.csv")


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write a temporary file, fsync, rename. A crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint with ``weights_only=True``: tensors and plain data, never code. Anything
    else (a pickle from elsewhere, a damaged file) is refused in one line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(f"{path}: holds objects other than tensors and plain data; captioner refuses to "
                        "unpickle it, because unpickling can run arbitrary code") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:200]})") from None
    needed = {"epoch", "optimizer", "scheduler", "history", "best", "best_epoch"}
    missing = needed - set(state) if isinstance(state, dict) else needed
    if missing:
        raise DataError(f"{path}: not a captioner checkpoint (it lacks {', '.join(sorted(missing))})")
    return state


def _plain(args: Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if isinstance(v, (str, int, float, bool, type(None), Path))}


# ---------------------------------------------------------------------------------------------
# the whole run


def build_model(args: Namespace, train_recs: list[Record], ckpt: dict | None) -> tuple[CaptionModel, Vocabulary]:
    """The model to train: resumed from the checkpoint (its own config, vocabulary and weights),
    started from a model folder (`--init`), or new, with a vocabulary from the training captions."""
    if ckpt:
        cfg = ModelConfig.from_json(ckpt["config"])
        vocab = Vocabulary(ckpt["vocab"][4:])
        model = CaptionModel.create(cfg, "none" if cfg.encoder_weights == "folder" else "default")
        model.decoder.load_state_dict(ckpt["decoder"])
        if "encoder" in ckpt:
            model.encoder.load_state_dict(ckpt["encoder"])
            model.encoder.identity = f"{cfg.encoder}:weights:{weights_digest(model.encoder)}"
    elif args.init:
        model, vocab = load_model(Path(args.init))
        model.cfg.extra = {}
    else:
        vocab = Vocabulary.build((c for r in train_recs for c in r.captions), args.min_count)
        cfg = ModelConfig.for_encoder(
            args.encoder, len(vocab), args.image_size, decoder=args.decoder, head=args.head, rnn=args.rnn,
            embed_dim=args.embed_dim, hidden_dim=args.hidden_dim, num_layers=args.num_layers, dropout=args.dropout,
            attention_dim=args.attention_dim, alpha_c=args.alpha_c, max_len=args.max_words)
        model = CaptionModel.create(cfg, args.encoder_weights)
        cfg.encoder_weights = "default" if args.encoder_weights == "default" else "folder"
    if args.fine_tune_encoder:
        model.cfg.encoder_weights = "folder"
    model.encoder.requires_grad_(bool(args.fine_tune_encoder))
    return model, vocab


def fit(args: Namespace) -> dict:
    """Train a model as `args` says (see `captioner train --help`). Returns the best val scores.

    Cross-entropy by default; with `args.scst`, self-critical training (see scst.py), usually
    from a cross-entropy model given as `args.init`."""
    out = Path(args.out)
    dist, device = Dist.from_env(args.device)
    try:
        return _fit(args, out, dist, device)
    finally:
        dist.close()


def _fit(args: Namespace, out: Path, dist: Dist, device: torch.device) -> dict:
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    ckpt = load_checkpoint(out / CHECKPOINT) if args.resume and (out / CHECKPOINT).is_file() else None
    if args.resume and ckpt is None and dist.main:
        print(f"no {out / CHECKPOINT} yet: starting from scratch")
    fine_tune, scst = bool(args.fine_tune_encoder), bool(args.scst)
    if scst and fine_tune:
        raise ValueError("--scst trains the decoder on cached features; it cannot be combined with --fine-tune-encoder")
    if scst and args.accum > 1:
        raise ValueError("--accum applies to cross-entropy training; with --scst, raise --batch-size instead")
    lr = args.lr or (5e-5 if scst else 4e-4)

    # records -> splits -> model and vocabulary
    records = load_records(Path(args.data), args.format, Path(args.images) if args.images else None)
    assign_splits(records)
    train_recs = check_images(split_records(records, "train"), args.skip_missing)
    val_recs = check_images(split_records(records, "val"), args.skip_missing)
    if args.max_images:
        train_recs = train_recs[: args.max_images]
    if args.val_images:
        val_recs = val_recs[: args.val_images]
    if not train_recs or not val_recs:
        raise ValueError(f"{args.data}: need train and val images, found {len(train_recs)} and {len(val_recs)}")
    model, vocab = build_model(args, train_recs, ckpt)
    model.to(device)
    cfg = model.cfg
    max_words = cfg.max_len

    # features of frozen encoders come from the cache (a missing entry is extracted in shares by
    # every process, then merged); then unreadable images are dropped
    extract_kw = dict(batch_size=args.feature_batch_size, device=device, precision=precision,
                      workers=args.workers, progress=not args.quiet and dist.main)
    cache = Path(args.cache_dir) if args.cache_dir else None
    if not fine_tune:
        f_train, ok, errs = cached_features(model, [r.image for r in train_recs], cache, dist=dist, **extract_kw)
        keep = readable(train_recs, errs, ok)
        train_recs, train_feats = [train_recs[i] for i in keep], FeatureRows(f_train, keep)
    f_val, ok, errs = (cached_features(model, [r.image for r in val_recs], cache, dist=dist, **extract_kw)
                       if not fine_tune else extract_features(model, [r.image for r in val_recs], **extract_kw))
    keep = readable(val_recs, errs, ok)
    val_recs, val_feats = [val_recs[i] for i in keep], FeatureRows(f_val, keep)

    train_caps, dropped = Captions.build(train_recs, vocab, max_words)
    val_caps, _ = Captions.build(val_recs, vocab, max_words)
    scorer = metrics.Scorer({i: r.captions for i, r in enumerate(val_recs)}) if dist.main else None
    critic = None
    if scst:
        references = [[] for _ in train_recs]
        for tok, i in zip(train_caps.tokens, train_caps.image.tolist()):
            references[i].append(tok.tolist())
        critic = SelfCritical(CiderD([r.captions for r in train_recs]), references, args.samples, args.baseline,
                              max_words, args.scst_xe)
    log = print if dist.main else (lambda *a, **k: None)
    log(f"{len(train_recs)} train images ({len(train_caps.tokens)} captions, {dropped} longer than "
        f"{max_words} words left out), {len(val_recs)} val images, {len(vocab)} words, "
        f"{'self-critical, ' if scst else ''}device {device}, precision {precision}"
        f"{f', {dist.world} processes' if dist.world > 1 else ''}")

    # optimiser: decoder, and the encoder with its own rate when fine-tuning
    groups = [{"params": list(model.decoder.parameters()), "lr": lr}]
    if fine_tune:
        groups.append({"params": list(model.encoder.parameters()), "lr": args.encoder_lr})
    optimizer = torch.optim.Adam(groups, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=args.lr_factor,
                                                           patience=args.lr_patience)
    sampler = LengthBucketSampler(train_caps.lengths, args.batch_size, shuffle=True, seed=args.seed,
                                  rank=dist.rank, world=dist.world, accum=1 if scst else args.accum)
    net = model
    if dist.world > 1 and not scst:  # SCST samples step by step outside forward(): gradients averaged by hand
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    history: list[dict] = []
    start_epoch, best, best_epoch = 1, -math.inf, 0
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        history, best, best_epoch = list(ckpt["history"]), float(ckpt["best"]), int(ckpt["best_epoch"])
        start_epoch = int(ckpt["epoch"]) + 1
        log(f"resumed from {out / CHECKPOINT} after epoch {ckpt['epoch']}")
    if fine_tune:
        loader_ds = AugmentedImages(train_recs, train_caps, cfg)

    for epoch in range(start_epoch, args.epochs + 1):
        torch.manual_seed(args.seed + epoch)  # dropout/augmentation/sampling noise: same per epoch on resume
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        train_loss, mean_reward = math.nan, math.nan
        if scst:
            random.seed(args.seed + epoch)  # which reference the cross-entropy term sees
            mean_reward = scst_one_epoch(model, vocab, train_feats, critic, optimizer, device, precision, args.clip,
                                         epoch, args.batch_size, args.seed, progress=not args.quiet,
                                         dist=dist)["reward"]
        else:
            if fine_tune:
                batches = DataLoader(loader_ds, batch_sampler=sampler, num_workers=args.workers,
                                     collate_fn=collate_augmented)
            else:
                batches = ((train_feats[rows], tok) for rows, tok in map(train_caps.batch, sampler))
            train_loss = train_one_epoch(net, batches, optimizer, device, precision, args.clip, epoch,
                                         images=fine_tune, progress=not args.quiet, dist=dist, accum=args.accum,
                                         total=len(sampler))
        seconds = time.perf_counter() - t0
        # validation on rank 0; every rank then takes the same scheduler and early-stopping decisions
        val = validate(model, vocab, val_feats, val_caps, scorer, device, precision, max_len=max_words,
                       beam_size=args.val_beam_size) \
            if dist.main else None
        val = dist.broadcast(val)
        scheduler.step(val["CIDEr"])
        row = {"epoch": epoch, "train_loss": round(train_loss, 4), "reward": round(mean_reward, 4),
               "val_loss": round(val["val_loss"], 4), "BLEU-4": round(val["BLEU-4"], 4),
               "CIDEr": round(val["CIDEr"], 4), "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 1)}
        history.append(row)
        improved = val["CIDEr"] > best
        if improved:
            best, best_epoch = val["CIDEr"], epoch
            decode = "greedy" if args.val_beam_size == 1 else f"beam {args.val_beam_size}, length norm 1.0"
            cfg.extra = {"val": {"epoch": epoch, "BLEU-4": row["BLEU-4"], "CIDEr": row["CIDEr"], "decode": decode}}
        if improved and dist.main:
            save_model(model, vocab, out / "best", half=args.half)
        trained = f"reward {mean_reward:.3f}" if scst else f"train loss {train_loss:.3f}"
        log(f"epoch {epoch}: {trained}  val loss {val['val_loss']:.3f}  "
            f"BLEU-4 {val['BLEU-4']:.3f}  CIDEr-D {val['CIDEr']:.3f}  {seconds:.1f}s"
            f"{'  (best)' if improved else ''}  e.g. \"{val['samples'][0]}\"")
        if dist.main:
            save_run(out, model, vocab, optimizer, scheduler, args, epoch, history, best, best_epoch)
        if args.patience and epoch - best_epoch >= args.patience:
            log(f"no val improvement for {args.patience} epochs: stopping")
            break
    if best_epoch and dist.main:
        rows = choose_decoding(out / "best", val_feats, scorer, device, precision, args.half)
        log("decoding of the best model on val: " + "; ".join(
            f"beam {r['beam_size']} length-norm {r['length_norm']}: CIDEr-D {r['CIDEr']:.3f}" for r in rows))
    return {"best_CIDEr": best, "history": history}


def save_run(out: Path, model: CaptionModel, vocab: Vocabulary, optimizer, scheduler, args: Namespace, epoch: int,
             history: list[dict], best: float, best_epoch: int) -> None:
    """After each epoch: the last model folder, metrics.csv, curves.png and the checkpoint."""
    cfg = model.cfg
    save_model(model, vocab, out / "last", half=args.half)
    write_metrics(out, history)
    plot_curves(out / "curves.png", history)
    state = {"decoder": model.decoder.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "epoch": epoch, "args": _plain(args),
             "vocab": vocab.itos, "config": cfg.to_json(), "history": history, "best": best,
             "best_epoch": best_epoch}
    if cfg.encoder_weights == "folder":
        state["encoder"] = model.encoder.state_dict()
    save_checkpoint(out / CHECKPOINT, state)
