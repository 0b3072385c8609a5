"""A photo's expected word counts as the photo library stores them: the word ids (int32) and their
counts (float16) of the WORDS_KEPT words the captioner most expects to say about it, 6 bytes a word
(retrieval.expected_words makes them; retrieval's first stage and the library's checks read them).
NumPy only: `index` checks a library without importing torch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WORDS_KEPT = 64  # words kept per photo (the rest count as 0)


def pack_words(ids: np.ndarray, counts: np.ndarray) -> list[bytes]:
    return [i.astype(np.int32).tobytes() + c.astype(np.float16).tobytes() for i, c in zip(ids, counts)]


def unpack_words(blobs: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """-> ids (N, K) int32, counts (N, K) float32 (K = WORDS_KEPT of the index)."""
    if not blobs:
        return np.zeros((0, WORDS_KEPT), np.int32), np.zeros((0, WORDS_KEPT), np.float32)
    k = len(blobs[0]) // 6
    raw = np.frombuffer(b"".join(blobs), np.uint8).reshape(len(blobs), 6 * k)
    ids = raw[:, :4 * k].copy().view(np.int32)
    counts = raw[:, 4 * k:].copy().view(np.float16).astype(np.float32)
    return ids, counts


def read_words(blobs: Sequence[bytes | None], vocab_size: int, max_len: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`pack_words` blobs as a library holds them -> ids (N, K), counts (N, K) as `unpack_words`, and
    which rows are damaged (N,) bool: missing, another size than most, ids outside the vocabulary,
    counts not finite from 0 to `max_len` + 1 (a word said at every step). Damaged rows count
    nothing. Every row at once: a million rows one at a time took 8 s."""
    sizes = [len(b) if isinstance(b, bytes) else 0 for b in blobs]
    size = max(set(sizes), key=sizes.count) if sizes else 0
    size = size if size and size % 6 == 0 else 6 * WORDS_KEPT
    ids, counts = unpack_words([b if n == size else bytes(size) for b, n in zip(blobs, sizes)])
    bad = ((np.array(sizes) != size) | (ids < 0).any(axis=1) | (ids >= vocab_size).any(axis=1)
           | ~((counts >= 0) & (counts <= max_len + 1)).all(axis=1))  # NaN fails too
    ids[bad], counts[bad] = 0, 0.0
    return ids, counts, bad
