"""Search by meaning: rank photos by how well the captioning model explains a query given each photo.

A photo is a good answer to "puppy playing outside" when the model, shown that photo, finds those
words likely: log p(query | photo), the query teacher-forced through the decoder. That costs a
decoder pass per (query, photo) pair, so a library is searched in two stages:

  1. every photo, from numbers kept at index time (no model call):
         sum over the query's content words w of  log(count_i(w) + EPS) - log(mean_j count_j(w) + EPS)
     where count_i(w) is how often the model says w about photo i (expected counts over SAMPLES
     captions drawn from it: "puppy" gets some weight even where the best caption says "dog");
     the second term, over the whole library, keeps words the model says everywhere from counting
  2. the best RERANK of those: log p(query | photo), summed over the query's words and <end>.

The per-query normalisations one might add (divide by length, subtract the query's log-probability
under a prior) cannot change the order of photos for one query; per-photo ones (the photo's own
caption's log-probability, its entropy) were measured on Flickr8k val and ranked worse, so none is
applied (docs/EXPERIMENTS.md). `library.py` adds the keyword (BM25) score for the hybrid mode.

What is kept per photo (see library.py for where):
  features  the encoder's output the decoder reads, as 8-bit codes with an offset and a scale
            (P*C bytes: 62,720 for a 7x7x1280 grid), so stage 2 never re-reads the image
  pooled    the mean feature, unit length, float16: search by example photo
  words     the WORDS_KEPT words with the highest expected counts, int32 ids + float16 counts
            (data/wordcounts.py, NumPy only)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from captioner.data.wordcounts import WORDS_KEPT
from captioner.decode import log_probs, never_said

SAMPLES = 5  # captions drawn per photo for its expected word counts
EPS = 1e-3  # smoothing of expected counts (chosen on Flickr8k val)
RERANK = 100  # photos scored by the decoder per query (chosen on val: recall against time)
PAIRS_PER_CALL = 256  # (query, photo) pairs per decoder call: bounds memory


# -- what is kept per photo ----------------------------------------------------------------------


def pack_features(feats: torch.Tensor) -> list[bytes]:
    """Encoder features (B, ...) -> one blob per photo: offset and scale (2 float32) + uint8 codes.
    The codes' error is at most scale/2 = (max - min)/510 per value (0.012 for EfficientNet-Lite0's
    0..6 features). Measured on 100 Flickr8k val queries against float features, re-ranking 100
    photos each: log p moved by at most 0.012, the first 10 came in the same order for 91 queries,
    the right photo's rank was unchanged for 80 of 83, R@10 was the same."""
    x = feats.detach().float().cpu().flatten(1).numpy()  # (B, D)
    lo = x.min(axis=1, keepdims=True)
    scale = np.maximum(x.max(axis=1, keepdims=True) - lo, 1e-12) / 255.0
    codes = np.rint((x - lo) / scale).clip(0, 255).astype(np.uint8)
    head = np.concatenate([lo, scale], axis=1).astype(np.float32)
    return [h.tobytes() + c.tobytes() for h, c in zip(head, codes)]


def unpack_features(blobs: Sequence[bytes], shape: tuple[int, ...]) -> torch.Tensor:
    """Blobs from `pack_features` -> float features (B, *shape)."""
    head = np.stack([np.frombuffer(b, np.float32, 2) for b in blobs])  # (B, 2)
    codes = np.stack([np.frombuffer(b, np.uint8, offset=8) for b in blobs]).astype(np.float32)
    x = codes * head[:, 1:2] + head[:, 0:1]
    return torch.from_numpy(x).view(len(blobs), *shape)


def pooled_vectors(feats: torch.Tensor) -> np.ndarray:
    """Features (B, C) or (B, P, C) -> unit-length mean features, float16 (B, C)."""
    x = feats.detach().float().cpu()
    if x.dim() == 3:
        x = x.mean(dim=1)
    return torch.nn.functional.normalize(x, dim=1).numpy().astype(np.float16)


@torch.no_grad()
def expected_words(decoder, feats: torch.Tensor, vocab, max_len: int = 20, samples: int = SAMPLES,
                   keep: int = WORDS_KEPT, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """How often the model says each word about each photo: the mean over `samples` captions
    drawn from it of sum_t p_t(w), the full next-word distribution at every step (not only the
    word drawn). Returns the `keep` largest as word ids (B, keep) int32 and counts (B, keep) float16.

    Drawn with a fixed seed, so indexing the same photos in the same batches gives the same counts."""
    B, dev = feats.shape[0], feats.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    state = decoder.select(decoder.start(feats.float()), torch.arange(B, device=dev).repeat_interleave(samples))
    tokens = torch.full((B * samples,), vocab.start, dtype=torch.long, device=dev)
    counts = torch.zeros(B * samples, len(vocab), device=dev)
    alive = torch.ones(B * samples, 1, device=dev)
    banned = never_said(vocab)
    for _ in range(max_len):
        logits, state = decoder.step(tokens, state)
        p = log_probs(logits.float(), banned).exp()  # (B*S, V)
        counts += p * alive
        tokens = torch.multinomial(p, 1, generator=gen).squeeze(1)
        alive = alive * (tokens != vocab.end)[:, None]
        if not alive.any():
            break
    counts = counts.view(B, samples, -1).mean(dim=1)  # (B, V)
    counts[:, [vocab.start, vocab.end, vocab.pad, vocab.unk]] = 0  # never query words
    top = counts.topk(min(keep, counts.shape[1]), dim=1)
    return top.indices.int().cpu().numpy(), top.values.cpu().numpy().astype(np.float16)


def sound_features(blobs: Sequence[bytes]) -> np.ndarray:
    """Which `pack_features` blobs read as features (B,) bool: an offset and a scale that are finite
    and in reach of an encoder's values, and the size of the first (a byte of the header changed
    would scale every value of the photo past anything an encoder says)."""
    size = len(blobs[0]) if blobs else 0
    ok = np.zeros(len(blobs), bool)
    for i, b in enumerate(blobs):
        if isinstance(b, bytes) and len(b) == size and size > 8:
            lo, scale = np.frombuffer(b, np.float32, 2)
            ok[i] = abs(lo) <= 1e4 and 0 < scale <= 1e2
    return ok


# -- stage 1: every photo --------------------------------------------------------------------------


def word_scores(ids: np.ndarray, counts: np.ndarray, words: Sequence[int]) -> np.ndarray:
    """Stage 1 for every photo (see the module docstring): ids, counts (N, K) from `unpack_words`,
    `words` the query's content words (ids, no repeats) -> scores (N,), float32."""
    n = ids.shape[0]
    if not words or n == 0:
        return np.zeros(n, np.float32)
    score = np.zeros(n, np.float32)
    for w in words:
        hit = ids == w  # (N, K): at most one True per row
        c = np.where(hit, counts, 0.0).sum(axis=1)  # count_i(w), 0 where not kept
        prior = np.log(c.mean() + EPS)
        score += np.log(c + EPS) - prior
    return score


# -- stage 2: the decoder ------------------------------------------------------------------------------


@torch.no_grad()
def query_logprob(decoder, feats: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """log p(query | photo) for each photo: feats (M, ...) of M photos, `tokens` the query as
    [<start>, w1 .. wn, <end>] -> (M,) the sum of log p(w_t | photo, w_<t) over w1 .. wn and <end>,
    teacher-forced, in fp32, PAIRS_PER_CALL photos per decoder call."""
    out = []
    for part in feats.split(PAIRS_PER_CALL):
        M, dev = part.shape[0], part.device
        seq = torch.tensor(tokens, device=dev).expand(M, -1)  # (M, n+2)
        state = decoder.start(part.float())
        total = torch.zeros(M, device=dev)
        for t in range(seq.shape[1] - 1):
            logits, state = decoder.step(seq[:, t], state)
            total += logits.float().log_softmax(dim=-1).gather(1, seq[:, t + 1:t + 2]).squeeze(1)
        out.append(total)
    return torch.cat(out) if out else torch.zeros(0)
