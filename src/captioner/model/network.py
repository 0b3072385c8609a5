"""The whole captioning model: config, encoder backbone (optional), decoder."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from captioner.decoding import MAX_BEAM, MAX_LENGTH_NORM, MAX_WORDS
from captioner.errors import ConfigError
from captioner.model.attention import AttentionDecoder
from captioner.model.base import Decoder
from captioner.model.encoder import BACKBONES, HEADS, Backbone, build_backbone
from captioner.model.show_tell import ShowTellDecoder

# Every decoder, by the name config.json and --decoder give it (see model/base.py for the contract).
DECODERS: dict[str, type[Decoder]] = {
    "show_tell": ShowTellDecoder,  # Show and Tell: the image is the LSTM's first input
    "attention": AttentionDecoder,  # Show, Attend and Tell: soft attention over the CNN's grid
}


@dataclass
class ModelConfig:
    vocab_size: int
    encoder: str = "tf_efficientnet_lite0"
    # "default": rebuilt from its pretrained source at load (frozen, never changed); "folder": stored in
    # the model folder (fine-tuned, random, or loaded from a user's file)
    encoder_weights: str = "default"
    image_size: int = 224
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    feat_dim: int = 1280
    decoder: str = "show_tell"  # or "attention"
    head: str = "linear_bn"  # show_tell only
    rnn: str = "lstm"  # or "gru"
    embed_dim: int = 512
    hidden_dim: int = 512
    num_layers: int = 1  # show_tell only
    dropout: float = 0.5
    attention_dim: int = 512  # attention only
    alpha_c: float = 1.0  # attention only: weight of the doubly stochastic penalty
    max_len: int = 20  # longest caption decoded, in words
    # the decoding this model does by default, chosen on val at the end of training
    beam_size: int = 1
    length_norm: float = 0.0
    block_trigrams: bool = False  # never repeat a word trigram within a caption
    extra: dict = field(default_factory=dict)  # free-form notes (training command, scores)

    @classmethod
    def for_encoder(cls, encoder: str, vocab_size: int, image_size: int | None = None, **kw) -> ModelConfig:
        spec = BACKBONES[encoder]
        return cls(vocab_size=vocab_size, encoder=encoder, image_size=image_size or spec.size,
                   mean=spec.mean, std=spec.std, feat_dim=spec.dim, **kw)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        data = dict(data)
        for k in ("mean", "std"):
            if isinstance(data.get(k), list):
                data[k] = tuple(data[k])
        cfg = cls(**data)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Refuse values no model can have (a config.json edited by hand, damaged, or hostile), with
        the key and the value, before anything is built from them."""
        def bad(key: str, want: str) -> ValueError:
            return ValueError(f"{key} must be {want}, not {getattr(self, key)!r}")

        for key, low, high in (("vocab_size", 5, 1_000_000), ("image_size", 16, 2048), ("feat_dim", 1, 8192),
                               ("embed_dim", 1, 8192), ("hidden_dim", 1, 8192), ("attention_dim", 1, 8192),
                               ("num_layers", 1, 16), ("max_len", 1, MAX_WORDS), ("beam_size", 1, MAX_BEAM)):
            v = getattr(self, key)
            if type(v) is not int or not low <= v <= high:
                raise bad(key, f"a whole number from {low} to {high}")
        for key, low, high in (("dropout", 0.0, 0.99), ("alpha_c", 0.0, 1e6), ("length_norm", 0.0, MAX_LENGTH_NORM)):
            v = getattr(self, key)
            if type(v) not in (int, float) or not low <= v <= high:  # also refuses NaN
                raise bad(key, f"a number from {low:g} to {high:g}")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if not (isinstance(v, tuple) and len(v) == 3 and all(type(x) in (int, float) and 0 < abs(x) < 1e3
                                                                    or (key == "mean" and x == 0) for x in v)):
                raise bad(key, "three finite numbers (std above 0)")
        for key, allowed in (("encoder", BACKBONES), ("decoder", DECODERS), ("head", HEADS), ("rnn", ("lstm", "gru")),
                             ("encoder_weights", ("default", "folder"))):
            if getattr(self, key) not in allowed:
                raise bad(key, f"one of {', '.join(allowed)}")
        if type(self.block_trigrams) is not bool:
            raise bad("block_trigrams", "true or false")
        if not isinstance(self.extra, dict):
            raise bad("extra", "an object")


def build_decoder(cfg: ModelConfig) -> Decoder:
    if cfg.decoder not in DECODERS:
        raise ConfigError(f"unknown decoder {cfg.decoder!r}; choose from {', '.join(DECODERS)}")
    return DECODERS[cfg.decoder].from_config(cfg)


class CaptionModel(nn.Module):
    """encoder (images -> spatial map) + decoder (features, tokens -> logits)."""

    def __init__(self, cfg: ModelConfig, encoder: Backbone | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.decoder: Decoder = build_decoder(cfg)

    @classmethod
    def create(cls, cfg: ModelConfig, encoder_weights: str | None = "default") -> CaptionModel:
        return cls(cfg, build_backbone(cfg.encoder, encoder_weights))

    def features(self, images: torch.Tensor, chunk: int = 0, encoder: nn.Module | None = None) -> torch.Tensor:
        """images (B, 3, S, S) -> what the decoder takes: pooled (B, C) or spatial (B, H*W, C).

        `chunk` > 0 runs the encoder on that many images at a time (InferencePlan.encoder_chunk).
        `encoder`: another copy of this model's encoder to run (InferencePlan.encoder_for's)."""
        if 0 < chunk < images.shape[0]:
            return torch.cat([self.features(part, encoder=encoder) for part in images.split(chunk)])
        fmap = (self.encoder if encoder is None else encoder)(images)  # (B, C, H, W)
        return pool_features(fmap, self.decoder.feature_kind)

    def forward(self, inputs: torch.Tensor, tokens: torch.Tensor, images: bool = False,
                rows: torch.Tensor | None = None, lengths: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (or images, when `images`) and tokens (B, T) -> logits (B, T, V) and the
        decoder's extra loss term (a scalar). Training goes through here, so that a
        DistributedDataParallel wrapper sees every trainable parameter used in its forward.

        Image-major batches (fine-tuning): `inputs` holds each image once, `rows` (B,) names the
        image of each caption, and `lengths` (B,) the words of each padded row of `tokens`. Every
        image then goes through the encoder once however many captions it has; the gradients of
        its captions meet in its features."""
        feats = self.features(inputs) if images else inputs.float()
        if rows is not None and self.decoder.shares_images:
            return self.decoder(feats, tokens, lengths, rows)  # it hands each image to its captions itself
        if rows is not None:
            # (B, ...): one row per caption. index_select, not feats[rows]: the backward of indexing sums
            # the captions' gradients in a thread-dependent order on the CPU, and a resumed run would drift
            feats = feats.index_select(0, rows)
        return self.decoder(feats, tokens, lengths)


def pool_features(fmap: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "pooled":
        return fmap.float().mean(dim=(2, 3))  # (B, C)
    return fmap.float().flatten(2).transpose(1, 2)  # (B, H*W, C)
