"""The names that options and config.json accept, in a module that does not import torch.

(Also where the shipped model lives, which `--model shipped` and `--init shipped` name.)

`captioner --help`, `--version`, `search` and argument errors must answer at once, and importing
torch takes seconds, so the command line takes its choices from here. Each tuple is the keys of a
registry that lives with its code; tests/test_structure.py checks that the two agree.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

# model/encoder.BACKBONES
ENCODERS = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2",
            "resnet50", "resnet101", "resnet152", "densenet121")
# model/network.DECODERS
DECODERS = ("show_tell", "attention")
# model/encoder.build_head: the image projection of show_tell
HEADS = ("linear_bn", "mlp")
# runtime.resolve_precision: the autocast precision
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# ... and for captioning, evaluation and search only: int8 decoder weights on the CPU (inference/int8.py)
INFERENCE_PRECISIONS = (*PRECISIONS, "int8")

# library.search: how photos are ranked; hybrid ranked best on Flickr8k val (README)
SEARCH_MODES = ("keyword", "embedding", "model", "hybrid")
DEFAULT_SEARCH_MODE = "hybrid"

# --model shipped, --init shipped: the model folder that comes inside the package
SHIPPED = "shipped"


def shipped_model_dir() -> Path:
    """The model folder that comes inside the package (its MODEL_CARD.md says what it can do)."""
    return Path(str(files("captioner") / "assets" / "model"))


def model_dir(folder: str | Path | None) -> Path:
    """A model folder as the user names it: None or "shipped" is the shipped model (a folder of
    that name in the current directory is ./shipped)."""
    return shipped_model_dir() if folder is None or str(folder) == SHIPPED else Path(folder)
