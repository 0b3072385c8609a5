"""The decoder contract: what every decoder offers, and the only thing other code may rely on.

Training, the searches in `decode.py`, the Python API, export and the word maps talk to a decoder
through these members alone, never through its layers. A new decoder is one file with a subclass
of `Decoder` and one line in `model/network.py`'s `DECODERS`.

    feature_kind      "pooled": features (B, C); "spatial": a grid of cells (B, P, C)
    has_attention     whether `attention_maps` can say where the decoder looked for each word
    state_batch_axis  the batch axis of every tensor of a flattened state (see `flatten_state`)
    shares_images     whether `forward` takes `rows` (below); if not, the model repeats each
                      image's features for its captions before calling it

    from_config(cfg)                -> a new decoder for a ModelConfig
    forward(feats, tokens, lengths) -> logits (B, T, V), extra loss term (a scalar)   training
    start(feats)                    -> state before the first word                  decoding
    step(tokens (N,), state)        -> logits (N, V) for the next word, new state
    select(state, index (N',))      -> the state's rows `index` (keep / repeat / reorder beams)
    keep_images(state, images, k)   -> the state of images `images` only (k rows each), the others
                                       dropped: a search stops computing captions that have ended
    flatten_state(state)            -> tuple of tensors, named by `state_names`     export
    unflatten_state(tensors)        -> state
    attention_maps(feats, tokens)   -> weights (B, T, P) of each word over the cells
    word_vectors(layer)             -> (V, E): "output" rows of the last layer, or "input" embeddings

`lengths` (B,), or None when every row of `tokens` is all words: how many of each row's tokens are
words; the rest are padding, whose logits the loss ignores (a decoder may leave them zero, and must
keep them out of its extra term). Padded rows come from image-major batches (an image's captions
differ in length); length-bucketed batches need none. `rows` (B,), only for a decoder that
declares `shares_images`: feats then holds each image once (I, ...) and `rows` names each
caption's image, so the decoder can do its per-image work once (see attention.py).

A state is whatever the decoder likes (a tuple, a dataclass); only the decoder looks inside it.
`select` is only ever asked to repeat each image's row K times (once, at the start of a beam
search or sampling) or to reorder rows within one image's block of K, never to move a row to
another image, so a decoder may keep per-image tensors at B rows (see attention.py).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

State = Any  # each decoder's own


class Decoder(nn.Module):
    """Base class of every decoder; the methods below are the contract (see the module docstring)."""

    feature_kind: ClassVar[str]  # "pooled" or "spatial"
    has_attention: ClassVar[bool] = False
    shares_images: ClassVar[bool] = False
    state_batch_axis: ClassVar[int] = 0

    @classmethod
    def from_config(cls, cfg) -> Decoder:
        raise NotImplementedError

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def start(self, feats: torch.Tensor) -> State:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    @staticmethod
    def select(state: State, index: torch.Tensor) -> State:
        raise NotImplementedError

    def keep_images(self, state: State, images: torch.Tensor, k: int) -> State:
        """The state of the images `images` (ascending ids of the current batch), each image's block
        of `k` rows kept, every other image's dropped. The default serves decoders whose state is
        all rows; a decoder with per-image tensors (attention's cells) drops those too."""
        return self.select(state, image_rows(images, k))

    @property
    def state_names(self) -> tuple[str, ...]:
        """Names of the tensors `flatten_state` returns, in order (export names its graph inputs by them)."""
        raise NotImplementedError

    def flatten_state(self, state: State) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def unflatten_state(self, tensors: tuple[torch.Tensor, ...]) -> State:
        raise NotImplementedError

    def attention_maps(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Attention weights (B, T, P) with `tokens` (B, T) as the words so far."""
        raise NotImplementedError(f"{type(self).__name__} has no attention")

    def word_vectors(self, layer: str = "output") -> torch.Tensor:
        raise NotImplementedError


def image_rows(images: torch.Tensor, k: int) -> torch.Tensor:
    """Images (N,) -> their rows (N*k,) in a state of k rows an image: image b's are b*k .. b*k+k-1."""
    return (images[:, None] * k + torch.arange(k, device=images.device)).view(-1)
