"""Options declared once, torch-free: each field's default sits beside its help, choices and range
(the field's metadata), and what reads options is generated from them: the `train` command's
parser and --help (cli/parser.py), and the range checks of a model's config.json
(ModelConfig.check).

    option()        a dataclass field with that metadata
    ModelOptions    the model's architecture as a user chooses it: both a training run's options
                    (TrainConfig) and a model folder's config (ModelConfig) are these and more, so
                    each is declared here only
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

from captioner.decoding import MAX_WORDS
from captioner.names import DECODERS, ENCODERS, HEADS


def option(default, help: str, *, flag: str | None = None, choices=None, low: float | None = None,
           high: float | None = None, metavar: str | None = None, type=None, default_text: str | None = None,
           alias: str | None = None):
    """A dataclass field declaring one option. `flag`: its command-line name (default --the-name);
    `choices`; `low`, `high`: its range; `default_text`: how --help states a default that is not a
    plain value (None standing for a rule); `alias`: an old flag still accepted, not shown."""
    meta = {"help": help, "flag": flag, "choices": choices, "low": low, "high": high, "metavar": metavar,
            "type": type, "default_text": default_text, "alias": alias}
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


def whole(low: int):
    """An argparse type: a whole number of at least `low` (a clear one-line error otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, not {value}")
        return value
    return parse


POSITIVE, NATURAL = whole(1), whole(0)


def between(low: float, high: float, *, low_included: bool = True):
    """An argparse type: a finite number from `low` to `high` (NaN, infinity and the rest refused
    in one line: `serve --batch-wait-ms inf` once killed the batcher thread)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (math.isfinite(value) and (low <= value if low_included else low < value) and value <= high):
            side = "from" if low_included else "above"
            raise argparse.ArgumentTypeError(f"must be a number {side} {low:g} to {high:g}, not {text}")
        return value
    return parse


def flag(f: dataclasses.Field) -> str:
    """The command-line name of an option field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_ranges(obj, choices: dict | None = None) -> None:
    """Refuse, as `KEY must be ...` (a ValueError), any field of `obj` outside its declared range or
    choices (`choices` overrides some: the live registries, which code may extend): whole numbers for
    int fields, finite numbers for float ones (NaN fails every range)."""
    choices = choices or {}
    for f in dataclasses.fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        allowed = choices.get(f.name, meta.get("choices"))
        if allowed is not None and value not in tuple(allowed):  # a tuple: an unhashable value is just not in it
            raise ValueError(f"{f.name} must be one of {', '.join(allowed)}, not {value!r}")
        if "low" not in meta:
            continue
        low, high = meta["low"], meta["high"]
        if f.type in ("int", int):
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"{f.name} must be a whole number from {low} to {high}, not {value!r}")
        elif type(value) not in (int, float) or not low <= value <= high:
            raise ValueError(f"{f.name} must be a number from {low:g} to {high:g}, not {value!r}")


@dataclass(kw_only=True)
class ModelOptions:
    """The model's architecture, as a user chooses it (`captioner train --decoder ...`)."""

    encoder: str = option("tf_efficientnet_lite0", "the CNN", choices=ENCODERS)
    decoder: str = option("show_tell", "show_tell: the image as the LSTM's first input; attention: Show, Attend "
                          "and Tell", choices=DECODERS)
    head: str = option("linear_bn", "the image's projection (show_tell)", choices=HEADS)
    rnn: str = option("lstm", "the decoder's recurrent cell", choices=("lstm", "gru"))
    embed_dim: int = option(512, "word embedding size", low=1, high=8192)
    hidden_dim: int = option(512, "the recurrent cell's size", low=1, high=8192)
    num_layers: int = option(1, "recurrent layers (show_tell)", low=1, high=16)
    dropout: float = option(0.5, "dropout before the output layer", low=0.0, high=0.99)
    attention_dim: int = option(512, "attention layer size (attention)", low=1, high=8192)
    alpha_c: float = option(1.0, "weight of the doubly stochastic attention penalty (attention)", low=0.0, high=1e6)
    max_len: int = option(20, "the longest caption, in words: longer training captions are left out, and no "
                          "caption decoded is longer", flag="--max-words", metavar="N", low=1, high=MAX_WORDS)

    def model_options(self) -> dict:
        """This object's architecture fields, by name (what a new ModelConfig is built from)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelOptions)}
