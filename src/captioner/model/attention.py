"""Show, Attend and Tell (Xu et al. 2015, arXiv 1502.03044): soft attention over the CNN's grid.

At every word the LSTM looks at the P = H*W cells of the encoder's last feature map (7x7x1280
for EfficientNet-Lite0 at 224 px) and reads a weighted mean of them:

    a_i      = proj(v_i)                                cells projected to D    (B, P, D)
    e_ti     = w . tanh(U a_i + W h_{t-1})              one score per cell      (B, P)
    alpha_t  = softmax(e_t)                             where it looks          (B, P), sums to 1
    z_t      = sigmoid(f h_{t-1}) * sum_i alpha_ti a_i  gated context           (B, D)
    h_t, c_t = LSTMCell([E y_{t-1}, z_t], (h_{t-1}, c_{t-1}))
    p_t      = softmax(L_o dropout(h_t + L_z z_t + E y_{t-1}))   deep output (paper eq. 7)

h_0 and c_0 come from the mean cell. Training adds the "doubly stochastic" penalty
lambda * sum_i (1 - sum_t alpha_ti)^2, which pushes every cell to be looked at about once.

Beam search keeps the per-image tensors (the cells and their projection U a) at B rows and only
the LSTM state at B*K rows: attention broadcasts the K beams of an image over its cells, so no
beam step copies the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from captioner.errors import ConfigError
from captioner.model.base import Decoder, image_rows


@dataclass
class AttentionState:
    h: torch.Tensor  # (B*K, hidden)
    c: torch.Tensor | None  # (B*K, hidden); None for a GRU
    cells: torch.Tensor  # (B, P, D) projected encoder cells, one copy per image
    keys: torch.Tensor  # (B, P, A) their attention projection U a_i
    alpha: torch.Tensor | None = None  # (B*K, P) the last step's attention weights


class AttentionDecoder(Decoder):
    feature_kind = "spatial"  # wants encoder features of shape (B, P, C)
    has_attention = True
    shares_images = True  # forward takes `rows`: each image's features once, for all of its captions
    state_batch_axis = 0  # h, c (B, hidden); cells (B, P, D); keys (B, P, A)

    def __init__(self, vocab_size: int, feat_dim: int, embed_dim: int = 512, hidden_dim: int = 512,
                 attention_dim: int = 512, dropout: float = 0.5, alpha_c: float = 1.0, rnn: str = "lstm"):
        super().__init__()
        if rnn not in ("lstm", "gru"):
            raise ConfigError(f"unknown rnn {rnn!r}; choose from lstm, gru")
        self.alpha_c = alpha_c
        self.proj = nn.Sequential(nn.Linear(feat_dim, hidden_dim), nn.ReLU())
        self.init_h = nn.Linear(hidden_dim, hidden_dim)
        self.init_c = nn.Linear(hidden_dim, hidden_dim) if rnn == "lstm" else None  # a GRU has no cell state
        self.att_cells = nn.Linear(hidden_dim, attention_dim)  # U
        self.att_hidden = nn.Linear(hidden_dim, attention_dim)  # W
        self.att_score = nn.Linear(attention_dim, 1)  # w
        self.gate = nn.Linear(hidden_dim, hidden_dim)  # f
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.cell = (nn.LSTMCell if rnn == "lstm" else nn.GRUCell)(embed_dim + hidden_dim, hidden_dim)
        self.ctx_out = nn.Linear(hidden_dim, embed_dim)  # L_z
        self.h_out = nn.Linear(hidden_dim, embed_dim)  # L_h
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(embed_dim, vocab_size)  # L_o

    @classmethod
    def from_config(cls, cfg) -> AttentionDecoder:
        return cls(cfg.vocab_size, cfg.feat_dim, cfg.embed_dim, cfg.hidden_dim, cfg.attention_dim, cfg.dropout,
                   cfg.alpha_c, cfg.rnn)

    # -- the pieces -----------------------------------------------------------------------------

    def start(self, feats: torch.Tensor) -> AttentionState:
        """feats (B, P, C) -> the state before the first word."""
        cells = self.proj(feats.float())  # (B, P, D)
        mean = cells.mean(dim=1)  # (B, D)
        h = torch.tanh(self.init_h(mean))
        c = torch.tanh(self.init_c(mean)) if self.init_c is not None else None
        return AttentionState(h, c, cells, self.att_cells(cells))

    def attend(self, s: AttentionState) -> tuple[torch.Tensor, torch.Tensor]:
        """-> gated context (B*K, D) and weights alpha (B*K, P) for the current hidden state."""
        B, P, _ = s.cells.shape
        K = s.h.shape[0] // B  # beams per image (1 in training and greedy search)
        query = self.att_hidden(s.h).view(B, K, 1, -1)  # (B, K, 1, A)
        scores = self.att_score(torch.tanh(s.keys[:, None] + query)).squeeze(-1)  # (B, K, P)
        alpha = scores.float().softmax(dim=-1)  # (B, K, P)
        context = torch.bmm(alpha.to(s.cells.dtype), s.cells)  # (B, K, P) @ (B, P, D) -> (B, K, D)
        context = torch.sigmoid(self.gate(s.h)) * context.reshape(B * K, -1)
        return context, alpha.view(B * K, P)

    def _advance(self, tokens: torch.Tensor, s: AttentionState) -> tuple[torch.Tensor, AttentionState]:
        emb = self.embed(tokens)  # (N, E)
        context, alpha = self.attend(s)
        x = torch.cat([emb, context], dim=1)
        if s.c is None:  # GRU
            h, c = self.cell(x, s.h), None
        else:
            h, c = self.cell(x, (s.h, s.c))
        logits = self.out(self.drop(emb + self.h_out(h) + self.ctx_out(context)))  # (N, V)
        return logits, AttentionState(h, c, s.cells, s.keys, alpha)

    # -- training -------------------------------------------------------------------------------

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, P, C), tokens (B, T) = [<start>, w1..w_{T-1}] -> logits (B, T, V) for
        [w1..w_{T-1}, <end>], and the doubly stochastic penalty (a scalar). `lengths` (B,): words
        per row when rows are padded (see teacher_forced); padding adds nothing to the penalty.
        `rows` (B,): feats holds each image once (I, P, C) and rows names each caption's image."""
        logits, alpha = self.teacher_forced(feats, tokens, lengths, rows)
        penalty = self.alpha_c * ((1.0 - alpha.sum(dim=1)) ** 2).mean()
        return logits, penalty

    def teacher_forced(self, feats: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor | None = None,
                       rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> logits (B, T, V) and attention weights (B, T, P) with `tokens` as the words so far.

        With `lengths`, each step runs only the captions still going: the rows are sorted longest
        first, so those are the first n_t rows, and the state shrinks to them (sgrvinod's tutorial
        does the same). A finished caption's later logits and weights are zeros.

        With `rows`, the cells, their keys and the first state are computed once per image and then
        handed to each of its captions: in image-major batches (about 5 captions an image) that is
        a third of the decoder's arithmetic saved."""
        B, T = tokens.shape
        s = self.start(feats)  # (I, ...) with rows, else (B, ...)
        order = None
        active = [B] * T  # rows still going at each step
        if lengths is not None:
            order = lengths.argsort(descending=True)
            tokens = tokens[order]
            longest_first = lengths[order].tolist()
            active = [sum(n > t for n in longest_first) for t in range(T)]
        pick = rows  # (B,): which row of the state each caption starts from, longest first
        if order is not None:
            pick = order if rows is None else rows.index_select(0, order)
        if pick is not None:
            s = AttentionState(*(None if x is None else x.index_select(0, pick) for x in (s.h, s.c, s.cells, s.keys)))
        logits, alphas = [], []
        for t in range(T):
            n = active[t]
            if n == 0:
                break
            if n < s.h.shape[0]:
                s = AttentionState(s.h[:n], None if s.c is None else s.c[:n], s.cells[:n], s.keys[:n])
            step_logits, s = self._advance(tokens[:n, t], s)  # (n, V)
            logits.append(F.pad(step_logits, (0, 0, 0, B - n)))
            alphas.append(F.pad(s.alpha, (0, 0, 0, B - n)))
        logits = F.pad(torch.stack(logits, dim=1), (0, 0, 0, T - len(logits)))  # (B, T, V)
        alphas = F.pad(torch.stack(alphas, dim=1), (0, 0, 0, T - len(alphas)))  # (B, T, P)
        if order is not None:
            inverse = order.argsort()
            logits, alphas = logits[inverse], alphas[inverse]
        return logits, alphas

    # -- decoding (see decode.py) ---------------------------------------------------------------

    def step(self, tokens: torch.Tensor, state: AttentionState) -> tuple[torch.Tensor, AttentionState]:
        """One word: tokens (N,) -> logits (N, V) for the next word, new state (with its alpha)."""
        return self._advance(tokens, state)

    @staticmethod
    def select(state: AttentionState, index: torch.Tensor) -> AttentionState:
        """Keep/reorder rows of the LSTM state. `index` never moves a row to another image (see
        decode.py), so the per-image cells and keys stay as they are."""
        alpha = state.alpha.index_select(0, index) if state.alpha is not None else None
        c = state.c.index_select(0, index) if state.c is not None else None
        return AttentionState(state.h.index_select(0, index), c, state.cells, state.keys, alpha)

    def keep_images(self, state: AttentionState, images: torch.Tensor, k: int) -> AttentionState:
        """Only the images `images`: their k rows of the LSTM state and their cells and keys."""
        rows = image_rows(images, k)
        return AttentionState(state.h.index_select(0, rows), None if state.c is None else state.c.index_select(0, rows),
                              state.cells.index_select(0, images), state.keys.index_select(0, images),
                              None if state.alpha is None else state.alpha.index_select(0, rows))

    # -- attention maps, export and word maps ---------------------------------------------------

    def attention_maps(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Where the decoder looked for each word: weights (B, T, P), `tokens` (B, T) the words so far."""
        return self.teacher_forced(feats, tokens)[1]

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c", "cells", "keys") if self.init_c is not None else ("h", "cells", "keys")

    def flatten_state(self, state: AttentionState) -> tuple[torch.Tensor, ...]:
        if state.c is None:  # GRU
            return state.h, state.cells, state.keys
        return state.h, state.c, state.cells, state.keys

    def unflatten_state(self, tensors: tuple[torch.Tensor, ...]) -> AttentionState:
        if self.init_c is None:  # GRU
            h, cells, keys = tensors
            return AttentionState(h, None, cells, keys)
        return AttentionState(*tensors)

    def word_vectors(self, layer: str = "output") -> torch.Tensor:
        """(V, E): each word's row of the output layer, or its input embedding."""
        return (self.out.weight if layer == "output" else self.embed.weight).detach()

