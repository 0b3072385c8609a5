"""The whole captioning model: its config, its modules (encoder backbone, decoder) and its folder.

A model is a folder: ``config.json`` + ``vocab.json`` + ``model.safetensors`` + ``decoding.json``,
optionally ``naming.json`` (how often its training captions said the words of their photos' tags:
decoding.Naming, which tag guidance reads), and optionally its search space: ``embedding.json`` +
``embedding.safetensors`` (model/embedding.py). Never a pickle.

``decoding.json`` holds how the model captions unless told otherwise (beam size, length
normalisation, trigram blocking, chosen on val at the end of training). Folders written before it
existed kept those settings in config.json: they are read from there.

The weights file holds the decoder (``decoder.*``) and, unless the encoder is rebuilt from its
own offline source (the frozen default), the encoder too (``encoder.*``).

The search space is trained after the decoder, over the same encoder's features and vocabulary,
and added to the folder (`save_space`); a folder without it captions and searches as before
(`load_space` gives None).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from captioner.data.vocab import Vocabulary
from captioner.decoding import MAX_BEAM, MAX_LENGTH_NORM, Decoding, Naming
from captioner.errors import ConfigError, ModelError
from captioner.files import atomic_folder, atomic_write, complete_folder
from captioner.model.attention import AttentionDecoder
from captioner.model.base import Decoder
from captioner.model.embedding import EmbeddingConfig, JointEmbedding, SpaceEnsemble, build_space
from captioner.model.encoder import BACKBONES, HEADS, Backbone, EncoderError, build_backbone, weights_digest
from captioner.model.show_tell import ShowTellDecoder
from captioner.names import model_dir
from captioner.options import ModelOptions, check_ranges, option

CONFIG, VOCAB, WEIGHTS, DECODING = "config.json", "vocab.json", "model.safetensors", "decoding.json"
NAMING = "naming.json"
SPACE_CONFIG, SPACE_WEIGHTS = "embedding.json", "embedding.safetensors"

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
        # how often its training captions said its photos' tag words (naming.json), or None: counted
        # at the end of training (train/run.py), read by tag guidance
        self.naming: Naming | None = None

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


# The model's folder on disk
def save_model(model: CaptionModel, vocab: Vocabulary, folder: Path, *, half: bool = False) -> Path:
    """Write the model folder atomically: built beside the target, then swapped in. The encoder's
    weights go in only when ``cfg.encoder_weights == "folder"`` (fine-tuned, random or from a
    user's file); the default pretrained encoder is rebuilt from its own source at load."""
    folder = Path(folder)
    cfg = model.cfg
    state = {f"decoder.{k}": v for k, v in model.decoder.state_dict().items()}
    if cfg.encoder_weights == "folder":
        state.update({f"encoder.{k}": v for k, v in model.encoder.state_dict().items()})
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in state.items()}
    with atomic_folder(folder) as tmp:
        (tmp / CONFIG).write_text(json.dumps(cfg.to_json(), indent=2), encoding="utf-8")
        (tmp / DECODING).write_text(json.dumps(model.decoding.saved(), indent=2), encoding="utf-8")
        if model.naming is not None:
            save_naming(model.naming, tmp)
        vocab.save(tmp / VOCAB)
        # bytes written as any file is (safetensors' own writer reports a full disk as a SafetensorError)
        (tmp / WEIGHTS).write_bytes(save(state, metadata={"format": "pt", "vocab": vocab.digest()}))
    return folder


def load_model(folder: str | Path | None, device: torch.device | str = "cpu") -> tuple[CaptionModel, Vocabulary]:
    """Load a model folder into eval mode. Only JSON and safetensors are read."""
    folder = complete_folder(model_dir(folder))
    if not folder.is_dir():
        raise ModelError(f"{folder}: not a model folder (no such directory)")
    for name in (CONFIG, VOCAB, WEIGHTS):
        if not (folder / name).is_file():
            pickles = [p.name for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".pkl", ".bin")]
            hint = (f"; found {pickles[0]}, a pickle, which captioner never loads because unpickling can run "
                    "arbitrary code") if pickles else ""
            raise ModelError(f"{folder}: missing {name}{hint}")
    cfg, older = _read_config(folder)  # config.json read once, for both
    decoding = _read_decoding(folder, cfg, older)
    try:
        vocab = Vocabulary.load(folder / VOCAB)
    except (ValueError, TypeError, KeyError, RecursionError) as e:
        raise ModelError(f"{folder}: bad vocab.json ({e})") from None
    if len(vocab) != cfg.vocab_size:
        raise ModelError(f"{folder}: vocab.json has {len(vocab)} words but config.json says {cfg.vocab_size}")
    saved_with = _check_shapes(folder, cfg)  # before anything of the config's sizes is allocated
    if saved_with.get("vocab", vocab.digest()) != vocab.digest():  # folders saved before the digest have none
        raise ModelError(f"{folder}: vocab.json is not the vocabulary {WEIGHTS} was saved with (edited, or "
                         "another model's); the rows of the weights would be read as other words")
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{folder}: {WEIGHTS} is not a readable safetensors file ({e})") from None
    # folders written before the GRU option named Show-and-Tell's recurrent layer "lstm"
    state = {k.replace("decoder.lstm.", "decoder.rnn.", 1): v for k, v in state.items()}

    in_folder = cfg.encoder_weights == "folder"
    try:
        encoder = build_backbone(cfg.encoder, "none" if in_folder else "default")
    except EncoderError as e:
        raise ModelError(f"{folder}: {e}") from None
    model = CaptionModel(cfg, encoder)
    model.decoding = decoding
    model.naming = _read_naming(folder)
    parts = [("decoder", model.decoder)] + ([("encoder", model.encoder)] if in_folder else [])
    for prefix, module in parts:
        sub = {k[len(prefix) + 1:]: v.float() if v.is_floating_point() else v
               for k, v in state.items() if k.startswith(prefix + ".")}
        try:
            module.load_state_dict(sub, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise ModelError(f"{folder}: {WEIGHTS} does not fit config.json ({prefix}: "
                             f"{first[1].strip() if len(first) > 1 else first[0]})") from None
    if in_folder:  # name the exact weights, so the feature cache can never mix two encoders
        encoder.identity = f"{cfg.encoder}:weights:{weights_digest(encoder)}"
    return model.to(device).eval(), vocab


def copy_model(source: str | Path | None, folder: Path, *, space: bool = False) -> Path:
    """Copy the model folder `source` (or the shipped one) to `folder` as it is, byte for byte,
    atomically; its search space only with `space` (`--space-only` adds its own)."""
    source = complete_folder(model_dir(source))
    with atomic_folder(folder) as tmp:
        for name in (CONFIG, VOCAB, WEIGHTS, DECODING, NAMING) + ((SPACE_CONFIG, SPACE_WEIGHTS) if space else ()):
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
    return Path(folder)


def save_space(space: JointEmbedding | SpaceEnsemble, folder: Path, *, half: bool = True) -> None:
    """Add (or replace) the search space of the model folder `folder`: the weights first, then
    embedding.json, which says a space is there, so a kill between the two leaves the folder as it
    was. Stored in float16 unless `half` is False (the vectors it makes are float16 anyway)."""
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in space.state_dict().items()}
    with atomic_write(Path(folder) / SPACE_WEIGHTS, "wb") as f:
        f.write(save(state, metadata={"format": "pt"}))
    with atomic_write(Path(folder) / SPACE_CONFIG) as f:
        f.write(json.dumps(space.cfg.to_json(), indent=2))


def save_naming(naming: Naming, folder: Path) -> None:
    """Add (or replace) the model folder's naming.json, the rest of the folder as it is."""
    data = naming.to_json()
    words = ",\n".join(f"  {json.dumps(w)}: {json.dumps(v)}" for w, v in data.pop("words").items())
    with atomic_write(Path(folder) / NAMING) as f:  # a word a line
        f.write(json.dumps(data)[:-1] + ', "words": {\n' + words + "\n}}\n")


def load_space(folder: str | Path | None, cfg: ModelConfig, pad: int = 0,
               device: torch.device | str = "cpu") -> JointEmbedding | SpaceEnsemble | None:
    """The search space of a model folder, in eval mode, or None when it has none (embedding.json
    absent). It must fit the caption model `cfg` (its vocabulary and encoder channels)."""
    folder = complete_folder(model_dir(folder))
    if not (folder / SPACE_CONFIG).is_file():
        return None
    try:
        data = json.loads((folder / SPACE_CONFIG).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        scfg = EmbeddingConfig.from_json(data)
    except (ValueError, TypeError, RecursionError) as e:
        raise ModelError(f"{folder}: bad {SPACE_CONFIG} ({e})") from None
    if (scfg.vocab_size, scfg.feat_dim) != (cfg.vocab_size, cfg.feat_dim):
        raise ModelError(f"{folder}: {SPACE_CONFIG} is for {scfg.vocab_size} words and {scfg.feat_dim} channels, the "
                         f"model has {cfg.vocab_size} and {cfg.feat_dim}")
    if not (folder / SPACE_WEIGHTS).is_file():
        raise ModelError(f"{folder}: {SPACE_CONFIG} is there but {SPACE_WEIGHTS} is missing")
    try:
        state = load_file(str(folder / SPACE_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{folder}: {SPACE_WEIGHTS} is not a readable safetensors file ({e})") from None
    space = build_space(scfg, pad)
    want = {k: tuple(v.shape) for k, v in space.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        key = next(k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k))
        raise ModelError(f"{folder}: {SPACE_WEIGHTS} does not fit {SPACE_CONFIG} ({key} should be "
                         f"{list(want[key]) if key in want else 'absent'} but is "
                         f"{list(have[key]) if key in have else 'missing'})")
    space.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return space.to(device).eval()


def _check_shapes(folder: Path, cfg: ModelConfig) -> dict[str, str]:
    """Compare the decoder that config.json describes (built on the meta device: no memory) with the
    tensors the weights file declares in its header: a config asking for sizes its weights do not
    have is refused before the model is built (hidden_dim 12000 would allocate gigabytes first).
    Returns the header's metadata."""
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            shapes = {k.replace("decoder.lstm.", "decoder.rnn.", 1): tuple(f.get_slice(k).get_shape())
                      for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{folder}: {WEIGHTS} is not a readable safetensors file ({e})") from None
    with torch.device("meta"):
        expected = {f"decoder.{k}": tuple(v.shape) for k, v in build_decoder(cfg).state_dict().items()}
    for key, shape in expected.items():
        if shapes.get(key) != shape:
            have = "is missing" if key not in shapes else f"is {list(shapes[key])}"
            raise ModelError(f"{folder}: {WEIGHTS} does not fit config.json ({key} should be {list(shape)} but "
                             f"{have})")
    return metadata


def read_config(folder: str | Path | None) -> ModelConfig:
    """A model folder's config.json alone (its sizes), without loading weights."""
    return _read_config(complete_folder(model_dir(folder)))[0]


def read_decoding(folder: str | Path | None) -> Decoding:
    """How a model folder captions unless told otherwise, without loading weights: its
    decoding.json, or for a folder written before it, the settings its config.json held."""
    folder = complete_folder(model_dir(folder))
    return _read_decoding(folder, *_read_config(folder))


def _read_decoding(folder: Path, cfg: ModelConfig, older: dict) -> Decoding:
    path = folder / DECODING
    if not path.is_file():
        return Decoding.from_json({**older, "max_len": cfg.max_len})
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        unknown = set(data) - set(Decoding().to_json()) | {"max_len"} & set(data)
        if unknown:  # max_len too: the longest caption is the model's (config.json)
            raise ValueError(f"unknown keys {sorted(unknown)}")
        return Decoding.from_json({**data, "max_len": cfg.max_len})
    except (ValueError, TypeError, ConfigError, RecursionError) as e:
        raise ModelError(f"{folder}: bad {DECODING} ({e})") from None


def _read_naming(folder: Path) -> Naming | None:
    """naming.json, or None for a folder without it (guidance then asks for every confident word)."""
    path = folder / NAMING
    if not path.is_file():
        return None
    try:
        return Naming.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, RecursionError) as e:
        raise ModelError(f"{folder}: bad {NAMING} ({e})") from None


def _read_config(folder: Path) -> tuple[ModelConfig, dict]:
    path = folder / CONFIG
    if not path.is_file():
        raise ModelError(f"{folder}: not a model folder (no {CONFIG})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return ModelConfig.split_json(data)
    except (ValueError, TypeError, KeyError, RecursionError) as e:
        raise ModelError(f"{folder}: bad config.json ({e})") from None
