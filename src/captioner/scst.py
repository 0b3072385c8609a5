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
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from captioner.data.vocab import Vocabulary, tokenize
from captioner.decode import sample, search
from captioner.runtime import autocast

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


def scst_one_epoch(model, vocab: Vocabulary, feats, reward: CiderD, optimizer, device, precision: str, clip: float,
                   epoch: int, batch_size: int = 50, samples: int = 5, baseline: str = "mean",
                   max_len: int = 20, seed: int = 0, progress: bool = True) -> dict:
    """One pass over the training images (not captions). `feats[idx]` gives image features.
    Returns the mean reward of the samples and of greedy captions seen along the way."""
    if baseline == "mean" and samples < 2:
        raise ValueError("the 'mean' baseline needs --samples 2 or more")
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(feats), generator=g).tolist()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    model.train()
    model.encoder.eval()
    sum_reward, n_seen, t0 = 0.0, 0, time.perf_counter()
    bar = tqdm(batches, desc=f"scst {epoch}", unit="batch", leave=False, disable=not progress)
    for idx in bar:
        f = feats[idx].to(device).float()
        with autocast(device, precision):
            tokens, logp, mask = sample(model.decoder, f, vocab.start, vocab.end, max_len, samples, banned=[vocab.unk])
        images = [i for i in idx for _ in range(samples)]
        r = torch.from_numpy(reward(_words(tokens, vocab), images)).view(len(idx), samples)
        if baseline == "mean":  # the mean of the *other* samples of the same image
            b = (r.sum(1, keepdim=True) - r) / (samples - 1)
        else:
            model.eval()
            with torch.no_grad(), autocast(device, precision):
                greedy_tokens = search(model.decoder, f, vocab, beam_size=1, max_len=max_len).tokens[:, 0]
            model.train()
            model.encoder.eval()
            b = torch.from_numpy(reward(_words(greedy_tokens, vocab), idx))[:, None]
        advantage = (r - b).view(-1, 1).to(device)  # (B*n, 1)
        loss = -(advantage * logp.float() * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for grp in optimizer.param_groups for p in grp["params"]], clip)
        optimizer.step()
        sum_reward += float(r.sum())
        n_seen += r.numel()
        speed = n_seen / samples / (time.perf_counter() - t0)
        bar.set_postfix(reward=f"{sum_reward / n_seen:.3f}", img_s=f"{speed:.0f}")
    return {"reward": sum_reward / max(n_seen, 1)}
