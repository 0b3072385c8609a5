"""`fit()`: one training run, read top to bottom as its table of contents.

    prepare data        records -> splits; features from the cache; captions as ids
    build the model     resumed from the checkpoint, started from a model folder, or new
    build the optimiser Adam (the encoder with its own rate when fine-tuned), plateau scheduler,
                        length-bucketed sampler (image-major when fine-tuned), DDP wrapper with
                        several processes
    resume              optimiser, scheduler and RunState from checkpoint.pt
    loop over epochs    train (cross-entropy or self-critical), validate, keep the best, checkpoint
    finish              choose the best model's decoding on val; train its search space
                        (train/embedding.py) on the same features and add it to best/ and last/

Cross-entropy by default; with `cfg.scst`, self-critical training (see scst.py), usually from a
cross-entropy model given as `cfg.init`. The best model by val CIDEr-D and the last one are
written as model folders (best/, last/) after every epoch.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from captioner.data.batching import ImageBatchSampler, LengthBucketSampler
from captioner.data.records import Record
from captioner.data.vocab import SPECIALS, Vocabulary
from captioner.decoding import Decoding
from captioner.distributed import Dist
from captioner.errors import ConfigError, DataError
from captioner.inference.plan import InferencePlan
from captioner.model.encoder import weights_digest
from captioner.model.network import (
    NAMING,
    CaptionModel,
    ModelConfig,
    copy_model,
    load_model,
    save_model,
    save_naming,
)
from captioner.runtime import encoder_memory_format, keep_freed_memory
from captioner.threads import fit_threads
from captioner.train.checkpoint import (
    CHECKPOINT,
    SPACE_CHECKPOINT,
    RunState,
    load_checkpoint,
    log_to_tensorboard,
    run_folder,
    save_checkpoint,
    write_metrics,
)
from captioner.train.config import TrainConfig
from captioner.train.data import (
    ImageCaptions,
    Splits,
    TrainData,
    image_batch_collate,
    mirrored_features,
    prepare_data,
    read_splits,
    val_features,
)
from captioner.train.epoch import choose_decoding, count_naming, train_one_epoch, val_decoding, validate
from captioner.train.scst import scst_one_epoch
from captioner.train.steps import Warmup
from captioner.viz import plot_curves


def fit(cfg: TrainConfig) -> dict:
    """Train a model as `cfg` says. Returns {"best_CIDEr": the best epoch's val CIDEr-D (with the
    validation decoding, greedy unless --val-beam-size), "best_epoch", "history": one row per epoch,
    "decoding": the decoding chosen on val for the best model with its scores (None when no epoch
    was saved as best)}."""
    cfg.check()
    dist, device = Dist.from_env(cfg.device)
    out = Path(cfg.out)
    try:
        # rank 0 writes the run folder: it claims it (locked; an earlier run is resumed or refused)
        with run_folder(out, cfg.resume, cfg.overwrite) if dist.main else contextlib.nullcontext():
            return _fit(cfg, out, dist, device)
    finally:
        dist.close()


def _fit(cfg: TrainConfig, out: Path, dist: Dist, device: torch.device) -> dict:
    """The run itself: prepare data, build the model and optimiser, resume, loop, finish."""
    log = print if dist.main else (lambda *a, **k: None)
    plan = InferencePlan.resolve(device, cfg.precision, training=True)  # extraction, steps, validation
    if device.type == "cpu":
        keep_freed_memory()  # steps reuse their memory instead of faulting it in afresh (see runtime.py)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    ckpt = _resume_point(cfg, out, log)

    splits = read_splits(cfg)
    if ckpt:
        _check_same_run(cfg, ckpt, splits, out)
    model, vocab = build_model(cfg, splits.train, ckpt)
    model.to(device)
    if cfg.fine_tune_encoder:  # its weights laid out as its images will be (see encoder_memory_format)
        model.encoder.to(memory_format=encoder_memory_format(device))
    data = prepare_data(cfg, model, vocab, splits, plan, dist)
    log(f"{data.summary(vocab, model.cfg.max_len)}, {'self-critical, ' if cfg.scst else ''}device {device}, "
        f"precision {plan.precision}{f', {dist.world} processes' if dist.world > 1 else ''}")
    if cfg.space_only:  # the --init model as it is, with a search space added
        space = None
        if dist.main:
            copy_model(cfg.init, out / "best")
            space = _add_space(cfg, [out / "best"], data, model, plan, log)
        return {"best_CIDEr": None, "best_epoch": 0, "history": [], "decoding": None, "space": space}

    opt = Optimisation.build(cfg, model, data, dist, device)
    run = RunState()
    if ckpt:
        opt.load_state_dict(ckpt)
        run = RunState.from_checkpoint(ckpt)
        log(f"resumed from {out / CHECKPOINT} after epoch {run.epoch}")
    elif cfg.init:
        _start_from(cfg, model, vocab, data, plan, dist, run, log)

    started, first = time.perf_counter(), run.epoch + 1
    for epoch in range(first, cfg.epochs + 1):
        train_epoch(cfg, model, vocab, data, opt, plan, dist, epoch, run, log)
        if cfg.patience and run.epochs_without_improvement() >= cfg.patience:
            log(f"no val improvement for {cfg.patience} epochs: stopping")
            break
        if epoch < cfg.epochs:  # each epoch as long as the ones so far, validation and saving included
            each = (time.perf_counter() - started) / (epoch - first + 1)
            log(f"about {_duration(each * (cfg.epochs - epoch))} left for epochs {epoch + 1}-{cfg.epochs}"
                f"{f' (at most; early stopping after {cfg.patience} without a gain)' if cfg.patience else ''}")

    chosen = None
    if run.best_epoch and dist.main:
        if ckpt and ckpt.get("chosen") and int(ckpt["epoch"]) == run.epoch:  # done before the run was stopped
            rows = ckpt["chosen"]
            log("decoding of the best model on val, chosen before the run was stopped: " + _describe_choice(rows))
        else:
            rows = _choose_decoding(cfg, out, model, vocab, data, plan, device, log)
        chosen = next(r for r in rows if r.get("chosen"))
    space = None
    if cfg.space_epochs and run.best_epoch and dist.main:
        if cfg.fine_tune_encoder:  # the cached features are the old encoder's
            log(f"no search space: it is trained on a frozen encoder's features; add one with captioner train "
                f"--space-only --init {out / 'best'} --data {cfg.data} --out FOLDER")
        else:
            space = _add_space(cfg, [out / "best", out / "last"], data, model, plan, log)
    return {"best_CIDEr": run.best, "best_epoch": run.best_epoch, "history": run.history, "decoding": chosen,
            "space": space, "start_CIDEr": None if math.isnan(run.start) else run.start}


def _choose_decoding(cfg: TrainConfig, out: Path, model: CaptionModel, vocab: Vocabulary, data: TrainData,
                     plan: InferencePlan, device: torch.device, log) -> list[dict]:
    """After the last epoch: the decoding of best/ chosen on val, and naming.json counted, both
    written to the model folders; then the rows of the choice are kept in the checkpoint, so that a
    run stopped later (while its search space trains) does not choose again when resumed."""
    feats = data.val_feats
    if cfg.fine_tune_encoder:  # the best epoch's encoder, not the last one's
        feats = val_features(load_model(out / "best", device)[0], data.val, cfg, plan)
    rows = choose_decoding(out / "best", feats, data.scorer, plan, cfg.half, keep=bool(cfg.init))
    log("decoding of the best model on val: " + _describe_choice(rows))
    if cfg.fine_tune_encoder:  # tags come from the pretrained encoder, whose features are not cached here
        log(f"no {NAMING}: tag guidance of this model asks for every confident tag word (the training photos' "
            "tags would need the pretrained encoder run again)")
    elif naming := count_naming(model.cfg.encoder, vocab, data.train_feats, data.train_caps):
        for folder in (out / "best", out / "last"):  # the same captions and vocabulary: the same counts
            save_naming(naming, folder)
        log(f"{NAMING}: the training captions said a photo's tag word {naming.prior:.0%} of the time, over "
            f"{len(naming.words)} words (tag guidance asks only for words said often enough)")
    state = load_checkpoint(out / CHECKPOINT)
    save_checkpoint(out / CHECKPOINT, state | {"chosen": rows})
    return rows


def _describe_choice(rows: list[dict]) -> str:
    """choose_decoding's rows as one line: each decoding and its val CIDEr-D, the chosen one marked."""
    return "; ".join(f"{_describe(r)}: CIDEr-D {r['CIDEr']:.3f}{' (chosen)' if r.get('chosen') else ''}" for r in rows)


def _start_from(cfg: TrainConfig, model: CaptionModel, vocab: Vocabulary, data: TrainData, plan: InferencePlan,
                dist: Dist, run: RunState, log) -> None:
    """Fine-tuning from `cfg.init`: score it on val as each epoch will be scored and save it as best/,
    so that an epoch replaces it only by beating it (fine-tuning on a few hundred photos can score
    below the model it started from: 0.533 against 0.594 on 50 held-out photos once)."""
    decoding = val_decoding(cfg.val_beam_size, model.cfg.max_len)
    val = validate(model, vocab, data.val_feats, data.val_caps, data.scorer, plan, decoding) if dist.main else None
    run.start = run.best = dist.broadcast(val)["CIDEr"]
    if dist.main:
        copy_model(cfg.init, Path(cfg.out) / "best", space=True)
    log(f"the start model ({cfg.init}) on val: CIDEr-D {run.start:.3f} ({decoding.describe()}); an epoch "
        "replaces it in best/ only by scoring higher")


def _add_space(cfg: TrainConfig, folders: list[Path], data: TrainData, model: CaptionModel, plan: InferencePlan,
               log) -> dict:
    """Train the search space on the run's cached features (and, with --space-flip, those of the
    training photos mirrored, extracted here by `model`'s frozen encoder) and add it to `folders`
    -> its val R@K."""
    from captioner.train.embedding import add_space

    flipped = None
    if cfg.space_flip:
        log("search space: the training photos mirrored, a second view of each")
        flipped = mirrored_features(cfg, model, data.train, plan)
        if flipped is None:  # a photo read before is unreadable now: train on the photos as they are
            log("search space: some training photos could not be read again; trained without the mirrored ones")
    return add_space(folders, (data.train_feats, data.train_caps), (data.val_feats, data.val_caps), cfg.space_epochs,
                     members=cfg.space_members, seed=cfg.seed, flipped=flipped,
                     checkpoint=Path(cfg.out) / SPACE_CHECKPOINT, progress=not cfg.quiet, log=log)["val"]


def _duration(seconds: float) -> str:
    """'40 s', '12 min', '1 h 35 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def _describe(row: dict) -> str:
    """'greedy' or 'beam 5, length norm 1.5, no repeated trigrams', for a row of choose_decoding."""
    return Decoding.from_json(row).describe()


def _resume_point(cfg: TrainConfig, out: Path, log) -> dict | None:
    """The checkpoint to continue from, with `cfg.resume` (None: start from scratch)."""
    if not cfg.resume:
        return None
    if not (out / CHECKPOINT).is_file():
        if not cfg.space_only:  # its search space's training is continued from its own file
            log(f"no {out / CHECKPOINT} yet: starting from scratch")
        return None
    return load_checkpoint(out / CHECKPOINT)


def _check_same_run(cfg: TrainConfig, ckpt: dict, splits: Splits, out: Path) -> None:
    """--resume continues the run in `out`, or nothing: other options or other data would make a run
    that is neither the old one nor a new one."""
    changes = cfg.changes_from(ckpt.get("args", {}))
    if changes:
        raise ConfigError(f"--resume: {out} was started with other options: {'; '.join(changes)}. Resume with the "
                          "run's own options, or start a new run (another --out, or --overwrite)")
    if ckpt.get("data") not in (None, splits.fingerprint()):
        raise DataError(f"--resume: the data in {cfg.data} is not what {out} was started on (other images, "
                        "captions or splits); resume with that data, or start a new run")


def build_model(cfg: TrainConfig, train: list[Record], ckpt: dict | None) -> tuple[CaptionModel, Vocabulary]:
    """The model to train: resumed from the checkpoint (its own config, vocabulary and weights),
    started from a model folder (`cfg.init`), or new, with a vocabulary from the training captions."""
    if ckpt:
        mcfg, older = ModelConfig.split_json(ckpt["config"])  # older checkpoints: the decoding in the config
        vocab = Vocabulary(ckpt["vocab"][4:])
        model = CaptionModel.create(mcfg, "none" if mcfg.encoder_weights == "folder" else "default")
        model.decoding = Decoding.from_json({**older, **ckpt.get("decoding", {}), "max_len": mcfg.max_len})
        model.decoder.load_state_dict(ckpt["decoder"])
        if "encoder" in ckpt:
            model.encoder.load_state_dict(ckpt["encoder"])
            model.encoder.identity = f"{mcfg.encoder}:weights:{weights_digest(model.encoder)}"
    elif cfg.init:
        model, vocab = load_model(cfg.init)  # a folder, or "shipped"
        model.cfg.extra = {}
    else:
        vocab = Vocabulary.build((c for r in train for c in r.captions), cfg.min_count)
        if len(vocab) == len(SPECIALS):
            raise DataError(f"{cfg.data}: no word occurs {cfg.min_count} or more times in the "
                            f"{sum(len(r.captions) for r in train)} training captions: lower --min-count, or check "
                            "that the captions hold words (not only punctuation or numbers in another encoding)")
        architecture = {k: v for k, v in cfg.model_options().items() if k != "encoder"}  # options.ModelOptions
        mcfg = ModelConfig.for_encoder(cfg.encoder, len(vocab), cfg.image_size, **architecture)
        model = CaptionModel.create(mcfg, cfg.encoder_weights)
        mcfg.encoder_weights = "default" if cfg.encoder_weights == "default" else "folder"
    model.encoder.requires_grad_(bool(cfg.fine_tune_encoder))
    if cfg.fine_tune_encoder:
        model.cfg.encoder_weights = "folder"
        model.encoder.freeze_stages(cfg.freeze_stages)
    usable = sum(1 <= len(vocab.encode(c)) - 2 <= model.cfg.max_len for r in train for c in r.captions)
    if not usable:
        raise DataError(f"{cfg.data}: none of the {sum(len(r.captions) for r in train)} training captions has 1 to "
                        f"{model.cfg.max_len} words (see --max-words): nothing to train on")
    return model, vocab


@dataclass
class Optimisation:
    """What changes the weights: the optimiser and its scheduler, the order of the batches, and the
    module the steps go through (the model, or its DistributedDataParallel wrapper)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    sampler: LengthBucketSampler | ImageBatchSampler
    net: torch.nn.Module

    @classmethod
    def build(cls, cfg: TrainConfig, model: CaptionModel, data: TrainData, dist: Dist,
              device: torch.device) -> Optimisation:
        groups = [{"params": list(model.decoder.parameters()), "lr": cfg.learning_rate}]
        if cfg.fine_tune_encoder:
            groups.append({"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": cfg.encoder_lr})
        optimizer = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.lr_factor,
                                                               patience=cfg.lr_patience)
        place = dict(shuffle=True, seed=cfg.seed, rank=dist.rank, world=dist.world, accum=1 if cfg.scst else cfg.accum)
        if cfg.fine_tune_encoder:  # image-major: each image loaded, augmented and encoded once per epoch
            per_image = torch.bincount(data.train_caps.image, minlength=len(data.train)).tolist()
            sampler = ImageBatchSampler(per_image, cfg.batch_size, **place)
        else:
            sampler = LengthBucketSampler(data.train_caps.lengths, cfg.batch_size, **place)
        net = model
        if dist.world > 1 and not cfg.scst:  # SCST samples outside forward(): gradients are averaged by hand
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                            else None)
        return cls(optimizer, scheduler, sampler, net)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, ckpt: dict) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])


def train_epoch(cfg: TrainConfig, model: CaptionModel, vocab: Vocabulary, data: TrainData, opt: Optimisation,
                plan: InferencePlan, dist: Dist, epoch: int, run: RunState, log) -> None:
    """One epoch: train, validate (on rank 0; every rank then takes the same scheduler and
    early-stopping decisions), record it in `run`, and write the run folder."""
    if plan.device.type == "cpu":
        fit_threads()  # the machine may have become busier or freer since the last epoch (threads.py)
    torch.manual_seed(cfg.seed + epoch)  # dropout/augmentation/sampling noise: the same per epoch on resume
    opt.sampler.set_epoch(epoch)
    t0 = time.perf_counter()
    train_loss, mean_reward = math.nan, math.nan
    progress = not cfg.quiet
    if cfg.scst:
        random.seed(cfg.seed + epoch)  # which reference the cross-entropy term sees
        mean_reward = scst_one_epoch(model, vocab, data.train_feats, data.critic, opt.optimizer, plan,
                                     cfg.clip, epoch, cfg.batch_size, cfg.seed, progress=progress,
                                     dist=dist, epochs=cfg.epochs)["reward"]
    else:
        warmup = None
        if cfg.fine_tune_encoder:
            batches = DataLoader(ImageCaptions(data.train, data.train_caps, model.cfg), batch_sampler=opt.sampler,
                                 num_workers=cfg.loader_workers(len(opt.sampler), 1),  # batches of images
                                 collate_fn=image_batch_collate(data.train_caps, vocab.pad),
                                 pin_memory=plan.device.type == "cuda")
            if epoch == 1 and cfg.encoder_warmup:  # within the first epoch, before the plateau scheduler acts
                warmup = Warmup(opt.optimizer.param_groups[1], min(cfg.encoder_warmup, len(opt.sampler) // cfg.accum))
        else:
            batches = ((data.train_feats[rows], tok) for rows, tok in map(data.train_caps.batch, opt.sampler))
        train_loss = train_one_epoch(opt.net, batches, opt.optimizer, plan, cfg.clip, epoch, vocab.pad,
                                     images=cfg.fine_tune_encoder, progress=progress, dist=dist, accum=cfg.accum,
                                     total=len(opt.sampler), freeze_bn=cfg.freeze_bn, warmup=warmup,
                                     epochs=cfg.epochs)
    seconds = time.perf_counter() - t0

    decoding = val_decoding(cfg.val_beam_size, model.cfg.max_len)
    if cfg.fine_tune_encoder and dist.main:  # the encoder just changed: so do the val features
        data.val_feats = val_features(model, data.val, cfg, plan)
    val = validate(model, vocab, data.val_feats, data.val_caps, data.scorer, plan, decoding) \
        if dist.main else None
    val = dist.broadcast(val)
    opt.scheduler.step(val["CIDEr"])
    row = {"epoch": epoch, "train_loss": round(train_loss, 4), "reward": round(mean_reward, 4),
           "val_loss": round(val["val_loss"], 4), "BLEU-4": round(val["BLEU-4"], 4),
           "CIDEr": round(val["CIDEr"], 4), "lr": opt.optimizer.param_groups[0]["lr"], "seconds": round(seconds, 1)}
    improved = run.record(row, val["CIDEr"])
    if improved:
        model.cfg.extra = {"val": {"epoch": epoch, "BLEU-4": row["BLEU-4"], "CIDEr": row["CIDEr"],
                                   "decode": decoding.describe()}}
    trained = f"reward {mean_reward:.3f}" if cfg.scst else f"train loss {train_loss:.3f}"
    log(f"epoch {epoch} of {cfg.epochs}: {trained}  val loss {val['val_loss']:.3f}  "
        f"BLEU-4 {val['BLEU-4']:.3f}  CIDEr-D {val['CIDEr']:.3f}  {seconds:.1f}s"
        f"{'  (best)' if improved else ''}  e.g. \"{val['samples'][0]}\"")
    if dist.main:
        out = Path(cfg.out)
        if improved:
            save_model(model, vocab, out / "best", half=cfg.half)
        save_run(out, cfg, model, vocab, data, opt, run)


def save_run(out: Path, cfg: TrainConfig, model: CaptionModel, vocab: Vocabulary, data: TrainData,
             opt: Optimisation, run: RunState) -> None:
    """After each epoch: the last model folder, metrics.csv, curves.png and the checkpoint."""
    save_model(model, vocab, out / "last", half=cfg.half)
    write_metrics(out, run.history)
    plot_curves(out / "curves.png", run.history)
    if cfg.tensorboard and run.history:
        log_to_tensorboard(Path(cfg.tensorboard), run.history[-1])
    state = {"decoder": model.decoder.state_dict(), **opt.state_dict(), "args": cfg.to_json(),
             "data": data.fingerprint, "vocab": vocab.itos, "config": model.cfg.to_json(),
             "decoding": model.decoding.saved(), **run.to_checkpoint()}
    if model.cfg.encoder_weights == "folder":
        state["encoder"] = model.encoder.state_dict()
    save_checkpoint(out / CHECKPOINT, state)
