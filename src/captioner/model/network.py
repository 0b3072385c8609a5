"""The whole captioning model: config, encoder backbone (optional), decoder."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from captioner.decoding import MAX_BEAM, MAX_LENGTH_NORM, Decoding
from captioner.errors import ConfigError
from captioner.model.attention import AttentionDecoder
from captioner.model.base import Decoder
from captioner.model.encoder import BACKBONES, HEADS, Backbone, build_backbone
from captioner.model.show_tell import ShowTellDecoder
from captioner.options import ModelOptions, check_ranges, option

# Every decoder, by the name config.json and --decoder give it (see model/base.py for the contract).
DECODERS: dict[str, type[Decoder]] = {
    "show_tell": ShowTellDecoder,  # Show and Tell: the image is the LSTM's first input
    "attention": AttentionDecoder,  # Show, Attend and Tell: soft attention over the CNN's grid
}


@dataclass(kw_only=True)
class ModelConfig(ModelOptions):
    """A model folder's config.json: the architecture (ModelOptions, declared there) and what it was
    built for (vocabulary, encoder and its input). Its decoding is its own file (decoding.json)."""

    vocab_size: int = field(metadata={"help": "words in the vocabulary", "low": 5, "high": 1_000_000})
    # "default": rebuilt from its pretrained source at load (frozen, never changed); "folder": stored in
    # the model folder (fine-tuned, random, or loaded from a user's file)
    encoder_weights: str = option("default", "where the encoder's weights come from", choices=("default", "folder"))
    image_size: int = option(224, "input side in pixels", low=16, high=1024)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    feat_dim: int = option(1280, "the encoder's channels", low=1, high=8192)
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
        return cls.split_json(data)[0]

    @classmethod
    def split_json(cls, data: dict) -> tuple[ModelConfig, dict]:
        """config.json -> (the config, checked; the decoding settings an older config.json held,
        also checked: {} for a folder that keeps them in decoding.json)."""
        data = dict(data)
        older = {f.name: data.pop(f.name) for f in fields(_OlderDecoding) if f.name in data}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        for k in ("mean", "std"):
            if isinstance(data.get(k), list):
                data[k] = tuple(data[k])
        cfg = cls(**data)
        check_ranges(_OlderDecoding(**older))  # wrong types fail here too, with the key
        if type(older.get("block_trigrams", False)) is not bool:
            raise ValueError(f"block_trigrams must be true or false, not {older['block_trigrams']!r}")
        cfg.check()
        return cfg, older

    def check(self) -> None:
        """Refuse values no model can have (a config.json edited by hand, damaged, or hostile), with
        the key and the value, before anything is built from them: each field's declared range and
        choices (options.py), the encoder and decoder against their live registries."""
        check_ranges(self, choices={"encoder": BACKBONES, "decoder": DECODERS, "head": HEADS})
        # pixels are 0..1: a std under 1e-3 would scale them past 1,000 (1e-30 captioned noise without a word)
        for key, low, high in (("mean", -1e3, 1e3), ("std", 1e-3, 1e3)):
            v = getattr(self, key)
            if not (isinstance(v, tuple) and len(v) == 3 and all(type(x) in (int, float) and low <= x <= high
                                                                    for x in v)):
                raise ValueError(f"{key} must be three numbers from {low:g} to {high:g}, not {v!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be an object, not {self.extra!r}")


@dataclass(kw_only=True)
class _OlderDecoding:
    """The decoding settings config.json held before decoding.json, with their declared ranges."""

    beam_size: int = option(1, "beam size (1 = greedy)", low=1, high=MAX_BEAM)
    length_norm: float = option(0.0, "length normalisation", low=0.0, high=MAX_LENGTH_NORM)
    block_trigrams: bool = False  # never repeat a word trigram


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
        # how it captions unless told otherwise: its folder's decoding.json, chosen on val at the end of training
        self.decoding = Decoding(max_len=cfg.max_len)

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
