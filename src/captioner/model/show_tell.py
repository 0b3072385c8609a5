"""Show and Tell (Vinyals et al. 2015, arXiv 1411.4555): the image is the LSTM's first input.

    x_{-1} = head(CNN(I))          image features projected to the word-embedding size
    x_t    = W_e S_t               S_0 = <start>, S_1..S_N the caption words
    p_{t+1} = softmax(W_o LSTM(x_t))  predicts S_1..S_N, then <end>

Training feeds the whole caption at once (teacher forcing, one cuDNN/oneDNN LSTM call);
decoding calls `start` once and `step` per word, which every search in `decode.py` uses.
`rnn="gru"` swaps the LSTM for a GRU (no cell state, a third fewer recurrent weights).
"""

from __future__ import annotations

import torch
from torch import nn

from captioner.errors import ConfigError
from captioner.model.base import Decoder
from captioner.model.encoder import build_head

State = tuple[torch.Tensor, ...]  # LSTM (h, c) or GRU (h,), each (layers, B, hidden)
RNNS = {"lstm": nn.LSTM, "gru": nn.GRU}


class ShowTellDecoder(Decoder):
    feature_kind = "pooled"  # wants encoder features of shape (B, C)
    state_batch_axis = 1  # every state tensor is (layers, B, hidden)

    def __init__(self, vocab_size: int, feat_dim: int, embed_dim: int = 512, hidden_dim: int = 512,
                 num_layers: int = 1, dropout: float = 0.5, head: str = "linear_bn", rnn: str = "lstm"):
        super().__init__()
        if rnn not in RNNS:
            raise ConfigError(f"unknown rnn {rnn!r}; choose from {', '.join(RNNS)}")
        self.head = build_head(head, feat_dim, embed_dim, dropout)
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.rnn = RNNS[rnn](embed_dim, hidden_dim, num_layers, batch_first=True,
                             dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)

    @classmethod
    def from_config(cls, cfg) -> ShowTellDecoder:
        return cls(cfg.vocab_size, cfg.feat_dim, cfg.embed_dim, cfg.hidden_dim, cfg.num_layers, cfg.dropout,
                   cfg.head, cfg.rnn)

    # -- training -------------------------------------------------------------------------------

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, C), tokens (B, T) = [<start>, w1..w_{T-1}] -> logits (B, T, V) for
        [w1..w_{T-1}, <end>], and an extra loss term (none here: zero; see attention.py). The LSTM
        reads left to right, so padding after a caption (`lengths`) cannot change its words' logits."""
        img = self.head(feats).unsqueeze(1)  # (B, 1, E)
        x = torch.cat([img, self.embed(tokens)], dim=1)  # (B, T+1, E)
        h, _ = self.rnn(x)  # (B, T+1, H)
        logits = self.out(self.drop(h[:, 1:]))  # (B, T, V); the output after the image step is unused
        return logits, logits.new_zeros(())

    # -- decoding (see decode.py) ---------------------------------------------------------------

    def start(self, feats: torch.Tensor) -> State:
        """Run the image step: feats (B, C) -> recurrent state."""
        _, state = self.rnn(self.head(feats).unsqueeze(1))
        return _as_tuple(state)

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One word: tokens (B,) -> logits (B, V) for the next word, new state."""
        h, state = self.rnn(self.embed(tokens).unsqueeze(1), state if len(state) > 1 else state[0])  # (B, 1, H)
        return self.out(h[:, 0]), _as_tuple(state)

    @staticmethod
    def select(state: State, index: torch.Tensor) -> State:
        """Keep/reorder rows of a state (beam search)."""
        return tuple(s.index_select(1, index) for s in state)  # type: ignore[return-value]

    # -- export and word maps -------------------------------------------------------------------

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if isinstance(self.rnn, nn.LSTM) else ("h",)

    def flatten_state(self, state: State) -> tuple[torch.Tensor, ...]:
        return tuple(state)

    def unflatten_state(self, tensors: tuple[torch.Tensor, ...]) -> State:
        return tuple(tensors)

    def word_vectors(self, layer: str = "output") -> torch.Tensor:
        """(V, E): each word's row of the output layer, or its input embedding."""
        return (self.out.weight if layer == "output" else self.embed.weight).detach()


def _as_tuple(state: torch.Tensor | State) -> State:
    """nn.LSTM's state is (h, c), nn.GRU's a bare h: keep both as tuples, so select() serves both."""
    return state if isinstance(state, tuple) else (state,)
