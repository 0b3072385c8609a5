"""Self-critical sequence training (Rennie et al. 2017, arXiv 1612.00563), a second stage after
cross-entropy: the model captions each training image several times by sampling, each sample is
scored with CIDEr-D against the image's references, and the model is pushed towards the samples
that score above a baseline:

    loss = - sum_t (r(w) - b) * log p(w_t | w_<t, I)   over the words of each sample w

Baselines: "mean", the mean reward of the image's other samples (Luo 2020, arXiv 2003.09971), or
"greedy", the reward of the model's own greedy caption (the original paper).

The reward is CIDEr-D as pycocoevalcap computes it (clipped tf-idf n-gram cosine, Gaussian length
penalty, sigma 6, times 10), except that the document frequencies come from all the training
references once, not from the batch at hand.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from captioner.data.vocab import Vocabulary, tokenize
from captioner.decode import never_said, sample, search
from captioner.decoding import Decoding
from captioner.distributed import Dist
from captioner.errors import ConfigError
from captioner.inference.plan import InferencePlan
from captioner.train.steps import Meter, Steps, caption_loss

Ngrams = list[Counter]  # Counter of n-gram tuples for n = 1..4


def _ngrams(words: Sequence[str], n: int = 4) -> Ngrams:
    return [Counter(tuple(words[i:i + k]) for i in range(len(words) - k + 1)) for k in range(1, n + 1)]


class CiderD:
    """CIDEr-D of captions against the references of training images, with document frequencies
    over all of those images. `references[i]` are image i's captions."""

    def __init__(self, references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        refs = [[_ngrams(tokenize(c), n) for c in caps] for caps in references]
        df: Counter = Counter()
        for image_refs in refs:
            df.update({g for r in image_refs for counts in r for g in counts})
        self.log_images = math.log(float(len(refs)))
        self.log_df = {g: math.log(max(1.0, d)) for g, d in df.items()}
        self.refs = [[self._vector(r) for r in image_refs] for image_refs in refs]

    def _vector(self, counts: Ngrams) -> tuple[list[dict], list[float], int]:
        """tf-idf vectors per n, their norms, and the caption length in words."""
        vecs, norms = [], []
        for c in counts:
            v = {g: tf * (self.log_images - self.log_df.get(g, 0.0)) for g, tf in c.items()}
            vecs.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return vecs, norms, sum(counts[0].values())

    def score(self, caption: str | Sequence[str], image: int) -> float:
        """CIDEr-D of one caption (text or words) against image `image`'s references."""
        words = tokenize(caption) if isinstance(caption, str) else list(caption)
        vh, nh, lh = self._vector(_ngrams(words, self.n))
        total = 0.0
        for vr, nr, lr in self.refs[image]:
            penalty = math.exp(-((lh - lr) ** 2) / (2 * self.sigma ** 2))
            for k in range(self.n):
                if nh[k] and nr[k]:
                    dot = sum(min(x, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, x in vh[k].items())
                    total += dot / (nh[k] * nr[k]) * penalty
        return 10.0 * total / self.n / len(self.refs[image])

    def __call__(self, captions: Sequence[str | Sequence[str]], images: Sequence[int]) -> np.ndarray:
        return np.array([self.score(c, i) for c, i in zip(captions, images)], dtype=np.float32)


def _words(tokens: torch.Tensor, vocab: Vocabulary) -> list[list[str]]:
    return [vocab.decode(row).split() for row in tokens.tolist()]


def sampling_batches(n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This rank's batches of image indices for one epoch: a shuffled order shared by all ranks,
    every world-th image for this rank, cut into the same number of batches on every rank (the
    last ones may be a little smaller, or empty on a rank with one image fewer)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    mine = order[rank::world]
    steps = max(1, math.ceil(math.ceil(n / world) / batch_size))
    return [chunk.tolist() for chunk in np.array_split(np.asarray(mine, dtype=np.int64), steps)]


@dataclass
class SelfCritical:
    """Everything a self-critical step needs besides the model and the features."""

    reward: CiderD  # CIDEr-D against the training references
    references: list[list[list[int]]]  # token ids of every caption of each training image
    samples: int  # captions sampled per image (TrainConfig.samples)
    baseline: str  # "mean" of the other samples, or "greedy" (TrainConfig.baseline)
    max_len: int  # the longest caption sampled (the model's)
    xe_weight: float  # weight of a cross-entropy term on one reference per image, 0: pure SCST (TrainConfig.scst_xe)


def scst_one_epoch(model, vocab: Vocabulary, feats, sc: SelfCritical, optimizer, plan: InferencePlan,
                   clip: float, epoch: int, batch_size: int = 50, seed: int = 0, progress: bool = True,
                   dist: Dist | None = None, epochs: int | None = None) -> dict:
    """One pass over the training images (not captions). `feats[idx]` gives image features.
    Returns the mean reward of the samples (over all ranks)."""
    if sc.baseline == "mean" and sc.samples < 2:
        raise ConfigError("the 'mean' baseline needs --samples 2 or more")
    dist = dist or Dist()
    batches = sampling_batches(len(feats), batch_size, seed + epoch, dist.rank, dist.world)
    model.train()
    model.encoder.eval()
    steps = Steps(optimizer, plan, clip, dist=dist, average=True)  # sampling is outside forward(): no DDP
    meter = Meter(batches, f"scst, epoch {epoch}" + (f" of {epochs}" if epochs else ""), progress=progress, dist=dist)
    for idx in meter:
        if idx:  # (a rank with one image fewer may have an empty last batch; it still takes the step)
            r, loss = scst_loss(model, vocab, feats[idx].to(plan.device).float(), idx, sc, plan)
            steps.backward(loss)
            meter.add("reward", float(r.sum()), r.numel())
        steps.step()
        meter.show(len(idx) * dist.world, "img_s", reward=".3f")
    return {"reward": meter.totals().get("reward", 0.0)}


def scst_loss(model, vocab: Vocabulary, f: torch.Tensor, idx: list[int], sc: SelfCritical, plan: InferencePlan
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (B, samples) of captions sampled for the images `idx` (features `f`), and the loss:
    the policy gradient, plus `sc.xe_weight` times cross-entropy on one reference per image."""
    with plan.autocast():
        tokens, logp, mask = sample(model.decoder, f, vocab.start, vocab.end, sc.max_len, sc.samples,
                                    banned=never_said(vocab))
    images = [i for i in idx for _ in range(sc.samples)]
    r = torch.from_numpy(sc.reward(_words(tokens, vocab), images)).view(len(idx), sc.samples)
    if sc.baseline == "mean":  # the mean of the *other* samples of the same image
        b = (r.sum(1, keepdim=True) - r) / (sc.samples - 1)
    else:  # the model's own greedy caption, decoded without dropout
        model.eval()
        with torch.no_grad(), plan.autocast():
            greedy_tokens = search(model.decoder, f, vocab, Decoding(max_len=sc.max_len),
                                   check_every=plan.check_every).tokens[:, 0]
        model.train()
        model.encoder.eval()
        b = torch.from_numpy(sc.reward(_words(greedy_tokens, vocab), idx))[:, None]
    advantage = (r - b).view(-1, 1).to(plan.device)  # (B*samples, 1)
    loss = -(advantage * logp.float() * mask).sum() / mask.sum()
    if sc.xe_weight and any(sc.references[i] for i in idx):
        # one reference per image (images whose captions were all too long have none), padded: the
        # decoders are causal and the loss ignores <pad>
        rows = [k for k, i in enumerate(idx) if sc.references[i]]
        refs = [torch.tensor(random.choice(sc.references[idx[k]])) for k in rows]
        ref = torch.nn.utils.rnn.pad_sequence(refs, batch_first=True, padding_value=vocab.pad).to(plan.device)
        with plan.autocast():
            logits, _ = model(f[rows], ref[:, :-1])
        loss = loss + sc.xe_weight * caption_loss(logits, ref[:, 1:], vocab.pad)
    return r, loss
