"""captioner: image captioning with a CNN encoder and an LSTM decoder (Show and Tell).

    from captioner import Captioner
    Captioner.load().caption(["photo.jpg"])

`Captioner` is imported on first use, so that `import captioner` (and the command line's `--help`)
does not wait for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from captioner import threads  # noqa: F401  (its clock of the machine's load starts here: threads.py)

__all__ = ["Captioner", "shipped_model_dir"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from captioner.api import Captioner, shipped_model_dir


def __getattr__(name: str):
    if name in __all__:
        from captioner import api

        return getattr(api, name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
