"""captioner: image captioning with a CNN encoder and an LSTM decoder (Show and Tell)."""

from captioner.api import Captioner, shipped_model_dir

__all__ = ["Captioner", "shipped_model_dir"]
__version__ = "0.1.0"
