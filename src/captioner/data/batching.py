"""Which captions (or images) go together in a training batch.

LengthBucketSampler: captions of one length per batch, so no step pads (cached features).
ImageBatchSampler: whole images with all their captions (fine-tuning: each image is loaded,
augmented and encoded once per epoch, not once per caption)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from captioner.errors import ConfigError


class _EpochBatches(Sampler[list[int]]):
    """What both samplers share: the epoch's seed, and each rank's share of the batches (see
    LengthBucketSampler). Subclasses say which batches an epoch has (`all_batches`)."""

    def __init__(self, batch_size: int, shuffle: bool, seed: int, rank: int, world: int, accum: int):
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} is not in a world of {world}")
        if accum < 1:
            raise ConfigError(f"accum must be at least 1, not {accum}")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world, self.accum = rank, world, accum
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def all_batches(self, g: torch.Generator) -> list[list[int]]:
        raise NotImplementedError

    def batches(self) -> list[list[int]]:
        """This epoch's batches for this rank."""
        out = self.all_batches(torch.Generator().manual_seed(self.seed + self.epoch))
        if self.world * self.accum > 1:
            out = _divisible(out, self.world * self.accum)[self.rank:: self.world]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())


class LengthBucketSampler(_EpochBatches):
    """Yields lists of indices whose `lengths` are equal.

    Built once from precomputed lengths. Each epoch (call `set_epoch`) shuffles the indices in
    every bucket, cuts them into batches of at most `batch_size`, and shuffles the batch order.
    Every index appears exactly once per epoch.

    Distributed training (`world` > 1): every rank draws the same batches from the same seed and
    takes every world-th one, starting at its `rank`. When the batches do not divide evenly, the
    largest are split in two (both halves still of one length) until they do, so every rank takes
    the same number of steps and, over all ranks, every index still appears exactly once.

    Gradient accumulation (`accum` > 1): the batches are made to divide by world x accum the same
    way, so every optimiser step sees world x accum whole batches. One optimiser step then uses
    the same batches in a 1-process run with accum = N as in an N-process run with accum = 1.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world: int = 1, accum: int = 1):
        super().__init__(batch_size, shuffle, seed, rank, world, accum)
        self.buckets: dict[int, torch.Tensor] = {}
        lengths_t = torch.as_tensor(list(lengths))
        for length in torch.unique(lengths_t).tolist():
            self.buckets[length] = torch.nonzero(lengths_t == length).flatten()

    def all_batches(self, g: torch.Generator) -> list[list[int]]:
        out: list[list[int]] = []
        for length in sorted(self.buckets):
            idx = self.buckets[length]
            if self.shuffle:
                idx = idx[torch.randperm(len(idx), generator=g)]
            out += [chunk.tolist() for chunk in idx.split(self.batch_size)]
        if self.shuffle:
            out = [out[i] for i in torch.randperm(len(out), generator=g).tolist()]
        return out

    def __len__(self) -> int:
        n = sum((len(v) + self.batch_size - 1) // self.batch_size for v in self.buckets.values())
        group = self.world * self.accum
        return -(-n // group) * self.accum  # batches per rank: a whole number of optimiser steps


class ImageBatchSampler(_EpochBatches):
    """Yields lists of image indices whose captions add up to at most `batch_size` (at least one
    image per batch). Each epoch (call `set_epoch`) shuffles the images; every image appears
    exactly once per epoch, so every caption is seen once. `captions[i]`: how many captions image
    i has (an image with none is never drawn). `rank`, `world` and `accum` as LengthBucketSampler."""

    def __init__(self, captions: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world: int = 1, accum: int = 1):
        super().__init__(batch_size, shuffle, seed, rank, world, accum)
        self.captions = list(captions)
        self.images = torch.tensor([i for i, n in enumerate(self.captions) if n > 0], dtype=torch.long)

    def all_batches(self, g: torch.Generator) -> list[list[int]]:
        order = self.images[torch.randperm(len(self.images), generator=g)] if self.shuffle else self.images
        out: list[list[int]] = []
        batch: list[int] = []
        filled = 0
        for i in order.tolist():
            if batch and filled + self.captions[i] > self.batch_size:
                out.append(batch)
                batch, filled = [], 0
            batch.append(i)
            filled += self.captions[i]
        if batch:
            out.append(batch)
        return out

    def __len__(self) -> int:
        return len(self.batches())


def _divisible(batches: list[list[int]], world: int) -> list[list[int]]:
    """Split the largest batches in two until their number divides by `world` (order kept)."""
    batches = list(batches)
    while len(batches) % world:
        i = max(range(len(batches)), key=lambda j: len(batches[j]))
        if len(batches[i]) < 2:
            raise ConfigError(f"{sum(map(len, batches))} items cannot make equal steps on {world} processes")
        b = batches[i]
        batches[i: i + 1] = [b[: len(b) // 2], b[len(b) // 2:]]
    return batches
