"""The joint image-sentence space of search: a photo and a sentence that describes it map to nearby
unit vectors, so "which photos show this?" is one matrix product over vectors stored at index time.

Two small towers over what the captioner already has:

    image side   the encoder's features (B, P, C) (or pooled (B, C)) -> pooled over the grid (mean,
                 or a learned attention over the cells) -> Linear + a residual MLP -> (B, D), unit length
    text side    a caption's tokens (B, T) -> word vectors (initialised from the captioner's own) ->
                 a bidirectional GRU, mean over the words (or the mean word vector alone: "bag") ->
                 Linear -> (B, D), unit length

trained with a contrastive loss over a batch of (photo, caption) pairs: each caption's own photo
must score above the batch's other photos, and each photo's caption above the other captions
(InfoNCE with a learned temperature, or VSE++'s hinge on the hardest negative). What was tried and
measured is in docs/EXPERIMENTS.md; the defaults here are the winners.

A space may be several such pairs of towers trained apart from different seeds (`members`,
`SpaceEnsemble`): a point is their unit vectors side by side, scaled by 1/sqrt(members), so it is a
unit vector too and its dot product is the mean of the members' cosines. Two members found the
right photo more often than either alone (docs/EXPERIMENTS.md), for twice the stored bytes.

The space lives in its own files of the model folder (embedding.json + embedding.safetensors, see
model/network.py): trained after the decoder on the same cached features, it is a second opinion
beside the captioner's log p(query | photo), and a folder without it captions and searches as before.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from captioner.options import check_ranges, option

POOLS = ("mean", "attention")
TEXTS = ("gru", "bag")
LOSSES = ("infonce", "hardest")


@dataclass(kw_only=True)
class EmbeddingConfig:
    """embedding.json: the space's sizes and how it was trained (checked like config.json)."""

    vocab_size: int = option(5, "words in the vocabulary (the caption model's)", low=5, high=1_000_000)
    feat_dim: int = option(1280, "the encoder's channels", low=1, high=8192)
    dim: int = option(512, "dimensions of each member's space (a stored photo is dim x members x 2 bytes)", low=8,
                      high=4096)
    members: int = option(1, "spaces trained apart (seeds seed, seed + 1, ...) whose cosines are averaged", low=1,
                          high=8)
    word_dim: int = option(512, "word vectors of the text side", low=8, high=4096)
    pool: str = option("attention", "how the image side pools the encoder's grid", choices=POOLS)
    text: str = option("gru", "the text side: a bidirectional GRU, or the mean word vector", choices=TEXTS)
    loss: str = option("infonce", "contrastive loss: InfoNCE (learned temperature) or VSE++ hardest-negative "
                       "hinge", choices=LOSSES)
    margin: float = option(0.2, "the hinge's margin (loss 'hardest')", low=0.0, high=2.0)
    dropout: float = option(0.0, "dropout on the pooled image and on the word vectors, in training", low=0.0,
                            high=0.9)
    # What a match scores: the cosines of val captions with their own photos at the 0th, 5th, ...
    # 100th percentile, measured when the space was trained (train/embedding.py `calibrate`). A
    # search reads a photo's cosine against them as a relevance from 0 to 1 (`relevance`).
    calibration: tuple[float, ...] = ()

    @property
    def point_dim(self) -> int:
        """The length of a point: every member's dimensions side by side."""
        return self.dim * self.members

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> EmbeddingConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        if isinstance(data.get("calibration"), list):
            data = data | {"calibration": tuple(data["calibration"])}
        cfg = cls(**data)
        check_ranges(cfg, choices={"pool": POOLS, "text": TEXTS, "loss": LOSSES})
        c = cfg.calibration
        if not (isinstance(c, tuple) and len(c) <= 101 and all(type(x) in (int, float) and -1 <= x <= 1 for x in c)
                and list(c) == sorted(c)):
            raise ValueError(f"calibration must be at most 101 rising numbers from -1 to 1, not {c!r}")
        return cfg

    def relevance(self, cosine):
        """A photo's cosine with a query -> how it compares with the right answers on val, 0 to 1:
        the share of val captions whose own photo scored lower (None without a calibration)."""
        if not self.calibration:
            return None
        return np.interp(cosine, self.calibration, np.linspace(0, 1, len(self.calibration)))


class JointEmbedding(nn.Module):
    """images(feats) and texts(tokens) -> unit vectors (B, dim) whose dot product ranks matches."""

    def __init__(self, cfg: EmbeddingConfig, pad: int = 0):
        super().__init__()
        self.cfg, self.pad = cfg, pad
        C, D = cfg.feat_dim, cfg.dim
        # image side
        self.cell_score = nn.Linear(C, 1) if cfg.pool == "attention" else None  # a weight per grid cell
        self.image_norm = nn.LayerNorm(C)  # Lite0's features are 0..6 with a few large channels
        self.drop = nn.Dropout(cfg.dropout)
        self.image_linear = nn.Linear(C, D)
        self.image_mlp = nn.Sequential(nn.Linear(C, D), nn.ReLU(), nn.Linear(D, D))  # added to the linear map
        # text side
        self.words = nn.Embedding(cfg.vocab_size, cfg.word_dim, padding_idx=pad)
        if cfg.text == "gru":
            self.rnn = nn.GRU(cfg.word_dim, D, batch_first=True, bidirectional=True)
            self.text_linear = nn.Linear(2 * D, D)
        else:
            self.rnn = None
            self.text_linear = nn.Linear(cfg.word_dim, D)
        # InfoNCE's temperature, learned (as log of its inverse: CLIP starts at 1/0.07), kept at most 100
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def images(self, feats: torch.Tensor) -> torch.Tensor:
        """Encoder features (B, P, C) or pooled (B, C) -> unit vectors (B, D)."""
        x = self.image_norm(feats.float())
        if x.dim() == 3:
            if self.cell_score is not None:
                weights = self.cell_score(x).softmax(dim=1)  # (B, P, 1)
                x = (weights * x).sum(dim=1)  # (B, C)
            else:
                x = x.mean(dim=1)
        x = self.drop(x)
        return F.normalize(self.image_linear(x) + self.image_mlp(x), dim=-1)

    def texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T), padded with `pad` (<start>/<end> may be there) -> unit vectors (B, D).
        A row of padding alone gets a zero vector (it matches nothing)."""
        mask = (tokens != self.pad).unsqueeze(-1).float()  # (B, T, 1)
        x = self.drop(self.words(tokens))  # (B, T, W)
        if self.rnn is not None:
            lengths = mask.sum(dim=1).squeeze(-1).clamp(min=1).long().cpu()
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, _ = self.rnn(packed)
            x, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])  # (B, T, 2D)
        pooled = (x * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # mean over the words
        return F.normalize(self.text_linear(pooled), dim=-1) * (mask.sum(dim=1) > 0)

    def loss(self, img: torch.Tensor, txt: torch.Tensor, same: torch.Tensor | None = None) -> torch.Tensor:
        """Contrastive loss of a batch of pairs: img (B, D) and txt (B, D), row i of each a match.
        `same` (B,): an id of each row's photo, so that two captions of one photo in a batch are not
        each other's negatives."""
        sims = img @ txt.t()  # (B, B): photo i, caption j
        B = sims.shape[0]
        positive = torch.eye(B, dtype=torch.bool, device=sims.device)
        other = ~(same[:, None] == same[None, :]) if same is not None else ~positive
        if self.cfg.loss == "infonce":
            logits = (sims * self.log_scale.clamp(max=math.log(100)).exp()).masked_fill(~(other | positive), -1e4)
            target = torch.arange(B, device=sims.device)
            return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        diag = sims.diagonal()
        masked = sims.masked_fill(~other, -1e4)
        caption_side = (self.cfg.margin - diag[:, None] + masked).clamp(min=0).max(dim=1).values  # per photo
        photo_side = (self.cfg.margin - diag[None, :] + masked).clamp(min=0).max(dim=0).values  # per caption
        return (caption_side + photo_side).mean()


class SpaceEnsemble(nn.Module):
    """`cfg.members` spaces trained apart, used as one: images() and texts() give every member's unit
    vector side by side, over sqrt(members), so that a dot product is the mean of their cosines."""

    def __init__(self, cfg: EmbeddingConfig, pad: int = 0, members: list[JointEmbedding] | None = None):
        super().__init__()
        self.cfg, self.pad = cfg, pad
        self.members = nn.ModuleList(members or [JointEmbedding(cfg, pad) for _ in range(cfg.members)])
        if len(self.members) != cfg.members:
            raise ValueError(f"{len(self.members)} members given, the config says {cfg.members}")

    def images(self, feats: torch.Tensor) -> torch.Tensor:
        """Encoder features (B, P, C) or pooled (B, C) -> unit vectors (B, dim x members)."""
        return torch.cat([m.images(feats) for m in self.members], dim=-1) / math.sqrt(len(self.members))

    def texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> unit vectors (B, dim x members); a row of padding alone stays zeros."""
        return torch.cat([m.texts(tokens) for m in self.members], dim=-1) / math.sqrt(len(self.members))


def build_space(cfg: EmbeddingConfig, pad: int = 0) -> JointEmbedding | SpaceEnsemble:
    """An untrained space of `cfg`: one pair of towers, or an ensemble of `cfg.members`."""
    return JointEmbedding(cfg, pad) if cfg.members == 1 else SpaceEnsemble(cfg, pad)
