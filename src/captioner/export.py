"""`captioner export`: a model as two graphs that caption without this package's training code.

    start:  images (B, 3, S, S)            -> the decoder's first state (encoder included)
    step:   tokens (B,), state...          -> logits (B, V), next state...

written as ONNX (`start.onnx`, `step.onnx`) or TorchScript (`start.pt`, `step.pt`), with
`vocab.json` and `export.json` (preprocessing, special tokens, the names of the state tensors).
Any runtime can then caption: preprocess, run `start` once, run `step` once per word.
`OnnxCaptioner` is such a loop for greedy decoding, using only onnxruntime, NumPy and Pillow.

The state is a flat list of tensors: Show-and-Tell (h, c) or (h) for a GRU, each (layers, B, H);
soft attention (h, c, cells, keys) or (h, cells, keys), with h and c (B, H).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from captioner.errors import ExportError

FORMATS = ("onnx", "torchscript")


def _modules(model):
    """The `start` and `step` modules of a loaded CaptionModel, over the decoder's flat state
    tensors (see the decoder contract in model/base.py)."""
    import torch
    from torch import nn

    decoder = model.decoder

    class Start(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor):
            return decoder.flatten_state(decoder.start(self.model.features(images)))

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = decoder

        def forward(self, tokens: torch.Tensor, *state: torch.Tensor):
            logits, new = self.decoder.step(tokens, decoder.unflatten_state(state))
            return (logits, *decoder.flatten_state(new))

    return Start().eval(), Step().eval(), list(decoder.state_names)


def export_model(folder: Path, out: Path, fmt: str = "onnx", image_size: int | None = None) -> Path:
    """Export the model folder `folder` into the folder `out` (see the module docstring)."""
    import torch

    from captioner.model.folder import load_model

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    model, vocab = load_model(folder)
    model = model.float().eval()
    cfg = model.cfg
    size = image_size or cfg.image_size
    start, step, names = _modules(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = torch.zeros(2, 3, size, size)
    with torch.no_grad():
        state = start(images)
    tokens = torch.full((2,), vocab.start, dtype=torch.long)
    state_in = [f"{n}_in" for n in names]
    state_out = [f"{n}_out" for n in names]
    batch_axis = {n: model.decoder.state_batch_axis for n in names}  # Show-and-Tell's (layers, B, H): 1
    with torch.no_grad():
        if fmt == "onnx":
            try:
                import onnx  # noqa: F401
            except ImportError:
                raise ExportError("ONNX export needs the onnx package (pip install onnx onnxscript)") from None
            torch.onnx.export(start, (images,), out / "start.onnx", input_names=["images"], output_names=state_in,
                              dynamic_axes={"images": {0: "batch"}, **{f"{n}_in": {batch_axis[n]: "batch"}
                                                                      for n in names}},
                              dynamo=False, opset_version=17)
            torch.onnx.export(step, (tokens, *state), out / "step.onnx", input_names=["tokens", *state_in],
                              output_names=["logits", *state_out],
                              dynamic_axes={"tokens": {0: "batch"}, "logits": {0: "batch"},
                                            **{f"{n}_in": {batch_axis[n]: "batch"} for n in names},
                                            **{f"{n}_out": {batch_axis[n]: "batch"} for n in names}},
                              dynamo=False, opset_version=17)
        else:
            torch.jit.trace(start, (images,), check_trace=False).save(str(out / "start.pt"))
            torch.jit.trace(step, (tokens, *state), check_trace=False).save(str(out / "step.pt"))
    shutil.copy(Path(folder) / "vocab.json", out / "vocab.json")
    (out / "export.json").write_text(json.dumps({
        "format": fmt, "image_size": size, "mean": list(cfg.mean), "std": list(cfg.std),
        "state": names, "start": vocab.start, "end": vocab.end, "banned": [vocab.unk], "max_len": cfg.max_len,
        "decoder": cfg.decoder, "rnn": cfg.rnn, "source": str(folder),
    }, indent=2) + "\n")
    return out


class OnnxCaptioner:
    """Greedy captions from an ONNX export with onnxruntime, NumPy and Pillow only (no torch)."""

    def __init__(self, folder: Path):
        import onnxruntime as ort

        folder = Path(folder)
        self.meta = json.loads((folder / "export.json").read_text())
        self.itos = json.loads((folder / "vocab.json").read_text())["itos"]
        opts = ort.SessionOptions()
        self.start = ort.InferenceSession(str(folder / "start.onnx"), opts, providers=["CPUExecutionProvider"])
        self.step = ort.InferenceSession(str(folder / "step.onnx"), opts, providers=["CPUExecutionProvider"])

    def preprocess(self, path: Path) -> np.ndarray:
        from PIL import Image, ImageOps

        m = self.meta
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        img = img.resize((m["image_size"], m["image_size"]), Image.BILINEAR, reducing_gap=None)
        x = np.asarray(img, dtype=np.float32) / 255.0
        x = (x - np.array(m["mean"], np.float32)) / np.array(m["std"], np.float32)
        return x.transpose(2, 0, 1)

    def caption(self, images: list[np.ndarray]) -> list[str]:
        """Preprocessed images (3, S, S) each -> greedy captions."""
        m = self.meta
        x = np.stack(images).astype(np.float32)
        state = self.start.run(None, {"images": x})
        tokens = np.full(len(images), m["start"], dtype=np.int64)
        words: list[list[str]] = [[] for _ in images]
        done = np.zeros(len(images), dtype=bool)
        for t in range(m["max_len"] + 1):
            logits, *state = self.step.run(None, {"tokens": tokens, **{f"{n}_in": s for n, s in
                                                                          zip(m["state"], state)}})
            logits[:, m["banned"]] = -np.inf
            if t == m["max_len"]:
                tokens = np.full(len(images), m["end"], dtype=np.int64)
            else:
                tokens = logits.argmax(axis=1)
            for b, tok in enumerate(tokens):
                if not done[b] and tok != m["end"]:
                    words[b].append(self.itos[tok])
            done |= tokens == m["end"]
            if done.all():
                break
        return [" ".join(w) for w in words]
