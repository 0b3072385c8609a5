"""A model is a folder: ``config.json`` + ``vocab.json`` + ``model.safetensors`` + ``decoding.json``,
and optionally its search space: ``embedding.json`` + ``embedding.safetensors`` (model/embedding.py).
Never a pickle.

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
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from captioner.data.vocab import Vocabulary
from captioner.decoding import Decoding
from captioner.errors import ConfigError, ModelError
from captioner.files import atomic_folder, atomic_write, complete_folder
from captioner.model.embedding import EmbeddingConfig, JointEmbedding
from captioner.model.encoder import EncoderError, build_backbone, weights_digest
from captioner.model.network import CaptionModel, ModelConfig, build_decoder
from captioner.names import model_dir

CONFIG, VOCAB, WEIGHTS, DECODING = "config.json", "vocab.json", "model.safetensors", "decoding.json"
SPACE_CONFIG, SPACE_WEIGHTS = "embedding.json", "embedding.safetensors"


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
        for name in (CONFIG, VOCAB, WEIGHTS, DECODING) + ((SPACE_CONFIG, SPACE_WEIGHTS) if space else ()):
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
    return Path(folder)


def save_space(space: JointEmbedding, folder: Path, *, half: bool = True) -> None:
    """Add (or replace) the search space of the model folder `folder`: the weights first, then
    embedding.json, which says a space is there, so a kill between the two leaves the folder as it
    was. Stored in float16 unless `half` is False (the vectors it makes are float16 anyway)."""
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in space.state_dict().items()}
    with atomic_write(Path(folder) / SPACE_WEIGHTS, "wb") as f:
        f.write(save(state, metadata={"format": "pt"}))
    with atomic_write(Path(folder) / SPACE_CONFIG) as f:
        f.write(json.dumps(space.cfg.to_json(), indent=2))


def load_space(folder: str | Path | None, cfg: ModelConfig, pad: int = 0,
               device: torch.device | str = "cpu") -> JointEmbedding | None:
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
    space = JointEmbedding(scfg, pad)
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
