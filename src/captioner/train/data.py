"""Training data: records -> train/val splits -> encoder features and caption ids.

Frozen encoder (the default): every image goes through the CNN once, into the feature cache, and
training reads the memory-mapped features a batch at a time. `fine_tune_encoder`: train images go
through the (augmented) encoder at every step instead.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from captioner import metrics
from captioner.data.images import draft_size, open_rgb, train_transform
from captioner.data.records import (
    MIN_VAL_PHOTOS,
    Record,
    assign_splits,
    check_images,
    load_records,
    split_records,
)
from captioner.data.vocab import Vocabulary
from captioner.distributed import Dist
from captioner.errors import CaptionerWarning, DataError, ImageError
from captioner.inference.features import cached_features, extract_features
from captioner.inference.plan import InferencePlan
from captioner.model.network import CaptionModel, ModelConfig
from captioner.runtime import one_thread
from captioner.train.config import TrainConfig
from captioner.train.scst import CiderD, SelfCritical


@dataclass
class Captions:
    """Every training caption as ids, with the row of its image's features."""

    tokens: list[torch.Tensor]  # each (T,) = [<start>, w1..wn, <end>]
    image: torch.Tensor  # (N,) index into the image list / feature rows
    lengths: list[int]

    @classmethod
    def build(cls, records: list[Record], vocab: Vocabulary, max_words: int) -> tuple[Captions, int]:
        """-> (the captions of `records` of 1 to `max_words` words, how many others were left out)."""
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


class ImageCaptions(Dataset):
    """For fine-tuning: index of an image -> (one augmented view of it, its captions' indices), or
    (an error message, its captions' indices) when the image cannot be read: a bad file costs its
    own captions, never the epoch. One view per image per epoch, shared by all its captions."""

    def __init__(self, records: list[Record], caps: Captions, cfg: ModelConfig):
        self.records = records
        self.transform = train_transform(cfg.image_size, cfg.mean, cfg.std)
        self.min_size = draft_size(cfg.image_size)  # big JPEGs decode at a reduced scale, as in captioning
        self.of_image: list[list[int]] = [[] for _ in records]  # image -> its caption indices
        for c, i in enumerate(caps.image.tolist()):
            self.of_image[i].append(c)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | str, list[int]]:
        try:
            return self.transform(open_rgb(self.records[i].image, min_size=self.min_size)), self.of_image[i]
        except ImageError as e:
            return str(e), self.of_image[i]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor | str, list[int]]]:
        """A whole batch (DataLoader asks for one this way). In the training process itself (no
        loader processes), on one thread: its threads are for the model, and they slow small ops."""
        if get_worker_info() is not None:
            return [self[i] for i in indices]
        with one_thread():
            return [self[i] for i in indices]


@dataclass
class ImageBatch:
    """An image-major batch: each image once, each of its captions a row, longest first."""

    images: torch.Tensor  # (I, 3, S, S)
    rows: torch.Tensor  # (B,) which image each caption describes
    tokens: torch.Tensor  # (B, T) [<start>, words, <end>], padded after <end>
    lengths: torch.Tensor  # (B,) inputs of each row that are words: its token count minus one
    errors: list[str]  # images that could not be read (their captions are left out)

    def pin_memory(self) -> ImageBatch:
        """Page-locked copies, so that the copies to the GPU overlap the step (DataLoader calls this
        with pin_memory=True)."""
        return ImageBatch(self.images.pin_memory(), self.rows.pin_memory(), self.tokens.pin_memory(),
                          self.lengths.pin_memory(), self.errors)


def image_batch_collate(caps: Captions, pad: int):
    """-> collate_fn(items of ImageCaptions) -> ImageBatch (of no rows when no image could be read)."""

    def collate(items: list[tuple[torch.Tensor | str, list[int]]]) -> ImageBatch:
        good = [(x, c) for x, c in items if isinstance(x, torch.Tensor)]
        errors = [x for x, _ in items if isinstance(x, str)]
        if not good:
            return ImageBatch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, 0, dtype=torch.long),
                              torch.empty(0, dtype=torch.long), errors)
        pairs = sorted(((caps.lengths[c], row, c) for row, (_, cs) in enumerate(good) for c in cs), reverse=True)
        tokens = torch.full((len(pairs), pairs[0][0]), pad, dtype=torch.long)
        for j, (n, _, c) in enumerate(pairs):
            tokens[j, :n] = caps.tokens[c]
        return ImageBatch(torch.stack([x for x, _ in good]), torch.tensor([row for _, row, _ in pairs]), tokens,
                          torch.tensor([n - 1 for n, _, _ in pairs]), errors)

    return collate


class FeatureRows:
    """Cached features of the kept images, read a batch at a time from the memory-mapped file, so
    a cache larger than memory (COCO's spatial maps) still trains."""

    def __init__(self, array: np.ndarray, keep: list[int]):
        self.array = array  # (N_all, ...) fp16, usually a np.memmap
        self.keep = np.asarray(keep, dtype=np.int64)  # record index -> row of `array`

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, idx) -> torch.Tensor:
        """Rows by index array, tensor or slice -> a tensor (len(idx), ...)."""
        rows = self.keep[idx] if isinstance(idx, slice) else self.keep[np.asarray(idx)]
        return torch.from_numpy(np.ascontiguousarray(self.array[rows]))


@dataclass
class Splits:
    train: list[Record]
    val: list[Record]

    def fingerprint(self) -> str:
        """Names what is trained and validated on: every image's file name, split and captions (not
        where the folder is, so a moved dataset resumes, but a changed one does not)."""
        h = hashlib.sha1()
        for split, records in (("train", self.train), ("val", self.val)):
            for r in records:
                h.update(json.dumps([split, r.image.name, r.captions]).encode())
        return h.hexdigest()


def read_splits(cfg: TrainConfig) -> Splits:
    """The records of the train and val splits (the first `max_images` / `val_images` of each)."""
    records = load_records(Path(cfg.data), cfg.layout, Path(cfg.images) if cfg.images else None)
    assign_splits(records)
    train = check_images(split_records(records, "train"), cfg.skip_missing)[: cfg.max_images or None]
    val = check_images(split_records(records, "val"), cfg.skip_missing)[: cfg.val_images or None]
    if not train or not val:
        found = Counter(r.split or "(none)" for r in records)
        raise DataError(f"{cfg.data}: need train and val images, found {len(train)} and {len(val)}; its splits: "
                        + ", ".join(f"{k} ({n})" for k, n in found.most_common())
                        + " (train, val and test are understood, also restval, dev, valid, validation)")
    if len(val) < MIN_VAL_PHOTOS and not cfg.val_images:
        warnings.warn(f"{cfg.data}: val holds {len(val)} photos, too few to choose the best epoch and the decoding "
                      f"on (a choice on so few is mostly chance); give {MIN_VAL_PHOTOS} or more photos the split "
                      "'val'", CaptionerWarning, stacklevel=2)
    return Splits(train, val)


@dataclass
class TrainData:
    """Everything an epoch and a validation read, for the images that could be read."""

    train: list[Record]
    val: list[Record]
    train_feats: FeatureRows | None  # None when the encoder is fine-tuned (it sees images)
    val_feats: FeatureRows
    train_caps: Captions
    val_caps: Captions
    dropped: int  # training captions left out as too long (or empty)
    scorer: metrics.Scorer | None  # val references, on the process that validates
    critic: SelfCritical | None  # the self-critical reward, with --scst
    fingerprint: str  # Splits.fingerprint() of the data as read: a resumed run must be given the same

    def summary(self, vocab: Vocabulary, max_words: int) -> str:
        return (f"{len(self.train)} train images ({len(self.train_caps.tokens)} captions, {self.dropped} longer "
                f"than {max_words} words left out), {len(self.val)} val images, {len(vocab)} words")


def prepare_data(cfg: TrainConfig, model: CaptionModel, vocab: Vocabulary, splits: Splits, plan: InferencePlan,
                 dist: Dist) -> TrainData:
    """Features of frozen encoders come from the cache (a missing entry is extracted in shares by
    every process, then merged); then unreadable images are dropped, and captions become ids."""
    extract_kw = _extract_kw(cfg, len(splits.train), dist)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    train, train_feats = splits.train, None
    if not cfg.fine_tune_encoder:
        f_train, ok, errs = cached_features(model, [r.image for r in train], plan, cache, dist=dist, **extract_kw)
        keep = readable(train, errs, ok)
        train, train_feats = [train[i] for i in keep], FeatureRows(f_train, keep)
    val_paths = [r.image for r in splits.val]
    f_val, ok, errs = (extract_features(model, val_paths, plan, **extract_kw) if cfg.fine_tune_encoder
                       else cached_features(model, val_paths, plan, cache, dist=dist, **extract_kw))
    keep = readable(splits.val, errs, ok)
    val, val_feats = [splits.val[i] for i in keep], FeatureRows(f_val, keep)

    max_words = model.cfg.max_len
    train_caps, dropped = Captions.build(train, vocab, max_words)
    val_caps, _ = Captions.build(val, vocab, max_words)
    scorer = metrics.Scorer({i: r.captions for i, r in enumerate(val)}) if dist.main else None
    critic = None
    if cfg.scst:
        references: list[list[list[int]]] = [[] for _ in train]
        for tok, i in zip(train_caps.tokens, train_caps.image.tolist()):
            references[i].append(tok.tolist())
        critic = SelfCritical(CiderD([r.captions for r in train]), references, cfg.samples, cfg.baseline,
                              max_words, cfg.scst_xe)
    return TrainData(train, val, train_feats, val_feats, train_caps, val_caps, dropped, scorer, critic,
                     splits.fingerprint())


def _extract_kw(cfg: TrainConfig, count: int, dist: Dist) -> dict:
    """extract_features's batch size, loader workers and progress for `count` images of a run."""
    return dict(batch_size=cfg.feature_batch_size, workers=cfg.loader_workers(count, cfg.feature_batch_size),
                progress=not cfg.quiet and dist.main)


def mirrored_features(cfg: TrainConfig, model: CaptionModel, train: list[Record], plan: InferencePlan
                      ) -> FeatureRows | None:
    """The training photos `train` mirrored left to right, through `model`'s frozen encoder and
    cached as the run's other features are: the search space's second view of each photo, row for
    row with them. None when a photo read before can no longer be read."""
    f, ok, _ = cached_features(model, [r.image for r in train], plan, Path(cfg.cache_dir) if cfg.cache_dir else None,
                               flip=True, **_extract_kw(cfg, len(train), Dist()))
    return FeatureRows(f, list(range(len(train)))) if ok.all() else None


def val_features(model: CaptionModel, val: list[Record], cfg: TrainConfig, plan: InferencePlan) -> FeatureRows:
    """The val images' features from `model`'s encoder as it is now. A fine-tuned encoder changes
    every step, so its validation (each epoch, and the choice of decoding for the best model) must
    read these, never the features extracted before training."""
    f, _, _ = extract_features(model, [r.image for r in val], plan, batch_size=cfg.feature_batch_size,
                               workers=cfg.loader_workers(len(val), cfg.feature_batch_size),
                               progress=False)
    return FeatureRows(f, list(range(len(val))))  # `val` holds only images that were read before


def readable(records: list[Record], errors: list[str], ok: np.ndarray) -> list[int]:
    """Indices of the records whose images could be read; a warning names the others."""
    if errors:
        shown = "; ".join(errors[:3])
        warnings.warn(f"{len(errors)} unreadable images left out ({shown}{'; ...' if len(errors) > 3 else ''})",
                      CaptionerWarning, stacklevel=2)
    return [i for i in range(len(records)) if ok[i]]
