"""Length-bucketed batches: every batch holds captions of one length, so no step pads."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthBucketSampler(Sampler[list[int]]):
    """Yields lists of indices whose `lengths` are equal.

    Built once from precomputed lengths. Each epoch (call `set_epoch`) shuffles the indices in
    every bucket, cuts them into batches of at most `batch_size`, and shuffles the batch order.
    Every index appears exactly once per epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0):
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.buckets: dict[int, torch.Tensor] = {}
        lengths_t = torch.as_tensor(list(lengths))
        for length in torch.unique(lengths_t).tolist():
            self.buckets[length] = torch.nonzero(lengths_t == length).flatten()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        out: list[list[int]] = []
        for length in sorted(self.buckets):
            idx = self.buckets[length]
            if self.shuffle:
                idx = idx[torch.randperm(len(idx), generator=g)]
            out += [chunk.tolist() for chunk in idx.split(self.batch_size)]
        if self.shuffle:
            out = [out[i] for i in torch.randperm(len(out), generator=g).tolist()]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return sum((len(v) + self.batch_size - 1) // self.batch_size for v in self.buckets.values())
