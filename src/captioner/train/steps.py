"""What every training loop shares: the loss, the optimiser's steps and the meter.

    caption_loss   cross-entropy over the words of padded captions
    Warmup         a parameter group's learning rate raised from 0 over its first steps
    Steps          one optimiser's steps: fp16 loss scaling, gradient accumulation, the gradient
                   mean across processes where no DistributedDataParallel wrapper takes it,
                   clipping, warm-up
    Meter          the running means and rate a loop shows, summed over processes at the end

Cross-entropy (train_one_epoch, with or without the encoder) and the self-critical stage
(scst_one_epoch) each keep only what is theirs: what a batch is and what its loss is.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from captioner.distributed import Dist
from captioner.inference.plan import InferencePlan


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, pad: int) -> torch.Tensor:
    """Mean cross-entropy over non-pad target tokens. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=pad)


class Warmup:
    """Raises one parameter group's learning rate linearly to what it was over its first `steps`
    optimiser steps. Adam's first steps move every weight by about the learning rate itself,
    whatever the gradients, and a pretrained CNN would be knocked off its weights by a decoder's
    first, noisy gradients before they mean anything."""

    def __init__(self, group: dict, steps: int):
        self.group, self.steps, self.peak, self.done = group, max(1, steps), group["lr"], 0

    def before_step(self) -> None:
        if self.done < self.steps:
            self.done += 1
            self.group["lr"] = self.peak * self.done / self.steps


class Steps:
    """One optimiser's steps, the same for every loop: call `backward(loss)` for each batch and
    `step()` when a step is due (`due(i)` says when: every `accum` batches).

    fp16 needs its gradients scaled up so that small ones do not underflow (bf16 does not).
    `average`: the gradients are averaged over processes here, before unscaling, so that an inf on
    any rank reaches all and all skip the step (for loops whose gradients do not come through a
    DistributedDataParallel wrapper, such as self-critical sampling)."""

    def __init__(self, optimizer: torch.optim.Optimizer, plan: InferencePlan, clip: float, accum: int = 1,
                 warmup: Warmup | None = None, dist: Dist | None = None, average: bool = False):
        self.optimizer, self.clip, self.accum, self.warmup = optimizer, clip, accum, warmup
        self.dist, self.average = dist or Dist(), average
        self.scaler = torch.amp.GradScaler(plan.device.type, enabled=plan.precision == "fp16")
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        optimizer.zero_grad(set_to_none=True)

    def due(self, i: int) -> bool:
        """Whether batch `i` (from 0) ends an optimiser step."""
        return (i + 1) % self.accum == 0

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of one batch's loss, a 1/accum share of the step's."""
        self.scaler.scale(loss / self.accum).backward()

    def step(self) -> None:
        if self.average:
            self.dist.average_gradients(self.params)
        if self.clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if self.warmup:
            self.warmup.before_step()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


class Meter:
    """Weighted running means (a loss per word, a reward per sample) and a rate of things done per
    second, shown on a progress bar over `batches`; `totals()` sums them over processes."""

    def __init__(self, batches, desc: str, unit: str = "batch", total: int | None = None, progress: bool = True,
                 dist: Dist | None = None):
        self.dist = dist or Dist()
        self.bar = tqdm(batches, desc=desc, unit=unit, total=total, leave=False,
                        disable=not (progress and self.dist.main))
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.done, self.t0 = 0.0, time.perf_counter()

    def __iter__(self):
        return iter(self.bar)

    def add(self, name: str, total: float, count: float) -> None:
        """`total` is the sum over `count` things (a batch's words, its samples)."""
        self.sums[name] = self.sums.get(name, 0.0) + total
        self.weights[name] = self.weights.get(name, 0.0) + count

    def mean(self, name: str) -> float:
        return self.sums.get(name, 0.0) / max(self.weights.get(name, 0.0), 1)

    def show(self, count: float, rate: str, **means: str) -> None:
        """Count `count` more things done (over all processes) and show the means named in `means`
        (name -> format) and the rate as `rate`."""
        self.done += count
        shown = {k: format(self.mean(k), fmt) for k, fmt in means.items()}
        self.bar.set_postfix(**shown, **{rate: f"{self.done / (time.perf_counter() - self.t0):.0f}"})

    def totals(self) -> dict[str, float]:
        """Each mean over every process's batches (each process must call it)."""
        names = sorted(self.sums)
        flat = self.dist.sum([x for k in names for x in (self.sums[k], self.weights[k])])
        return {k: flat[2 * i] / max(flat[2 * i + 1], 1) for i, k in enumerate(names)}
