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
import warnings
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

    from captioner.files import atomic_folder
    from captioner.model.network import load_model, model_dir

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    model, vocab = load_model(folder)
    model = model.float().eval()
    cfg = model.cfg
    size = image_size or cfg.image_size
    start, step, names = _modules(model)
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "export.json").is_file())):
        raise ExportError(f"{out}: already holds something that is not a captioner export; it is left as it is: "
                          "choose another --out")
    with atomic_folder(out) as tmp:  # written whole, or not at all (a full disk leaves no half export)
        _write(tmp, model, vocab, fmt, size, start, step, names, source=model_dir(folder))
    return out


def _write(out: Path, model, vocab, fmt: str, size: int, start, step, names: list[str], source: Path) -> None:
    """The graphs, vocab.json and export.json, into the folder `out`."""
    import torch

    from captioner.decode import never_said

    cfg = model.cfg
    images = torch.zeros(2, 3, size, size)
    with torch.no_grad():
        state = start(images)
    tokens = torch.full((2,), vocab.start, dtype=torch.long)
    state_in = [f"{n}_in" for n in names]
    state_out = [f"{n}_out" for n in names]
    batch_axis = {n: model.decoder.state_batch_axis for n in names}  # Show-and-Tell's (layers, B, H): 1
    # torch's exporters warn about their own internals (the legacy exporter, tracing, LSTM batch
    # sizes): nothing a user can act on; tests/test_export.py checks the graphs at batch 1 and 6
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
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
    shutil.copy(source / "vocab.json", out / "vocab.json")
    (out / "export.json").write_text(json.dumps({
        "format": fmt, "image_size": size, "mean": list(cfg.mean), "std": list(cfg.std),
        "state": names, "start": vocab.start, "end": vocab.end, "banned": never_said(vocab), "max_len": cfg.max_len,
        "decoder": cfg.decoder, "rnn": cfg.rnn, "source": _source_name(source),
        # how OnnxCaptioner decodes, and how the model itself does (captioner caption, the server)
        "decoding": "greedy", "model_decoding": model.decoding.saved(),
        # what the graphs leave out, said where a runtime reads it
        "not_exported": "the ImageNet classifier (tags) and tag guidance; the search space (embedding.json); beam "
                        "search: captions are greedy and can differ from `captioner caption`",
    }, indent=2) + "\n")


def _source_name(source: Path) -> str:
    """What export.json says it was exported from: 'shipped', or the model folder's name and the
    first digits of its weights' SHA-1 (never an absolute path: an export is made to be copied
    elsewhere, and the shipped model's path is the exporting machine's virtual environment)."""
    from captioner.files import file_digest
    from captioner.names import shipped_model_dir

    if Path(source).resolve() == shipped_model_dir().resolve():
        return "shipped"
    return f"{Path(source).resolve().name} (weights {file_digest(Path(source) / 'model.safetensors')[:12]})"


def _read_export(folder: Path) -> tuple[dict, list[str]]:
    """export.json and vocab.json, checked as model folders are: a damaged or edited file is one
    ExportError naming it, never an IndexError or a huge allocation later."""
    def load(name: str):
        try:
            return json.loads((folder / name).read_text(encoding="utf-8"))
        except (ValueError, RecursionError, OSError) as e:
            raise ExportError(f"{folder / name}: not readable JSON ({str(e)[:120]})") from None

    meta, vocab = load("export.json"), load("vocab.json")
    if not isinstance(meta, dict):
        raise ExportError(f"{folder / 'export.json'}: not a JSON object")
    if meta.get("format") != "onnx":
        raise ExportError(f"{folder}: a {meta.get('format')} export, not ONNX")
    itos = vocab.get("itos") if isinstance(vocab, dict) else None
    if not (isinstance(itos, list) and len(itos) >= 4 and all(isinstance(w, str) for w in itos)
            and len(set(itos)) == len(itos)):
        raise ExportError(f"{folder / 'vocab.json'}: 'itos' must be a list of at least 4 different words")

    def whole(key: str, low: int, high: int) -> int:
        v = meta.get(key)
        if type(v) is not int or not low <= v <= high:
            raise ExportError(f"{folder / 'export.json'}: {key} must be a whole number from {low} to {high}, not {v!r}")
        return v

    whole("image_size", 16, 1024)  # ModelConfig's bounds (not imported: an export is read without torch)
    whole("max_len", 1, 1000)
    whole("start", 0, len(itos) - 1)
    whole("end", 0, len(itos) - 1)
    for key, low in (("mean", -1e3), ("std", 1e-6)):
        v = meta.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(type(x) in (int, float) and low <= x <= 1e3 for x in v)):
            raise ExportError(f"{folder / 'export.json'}: {key} must be 3 numbers from {low:g} to 1000, not {v!r}")
    banned, state = meta.get("banned"), meta.get("state")
    if not (isinstance(banned, list) and all(type(i) is int and 0 <= i < len(itos) for i in banned)):
        raise ExportError(f"{folder / 'export.json'}: banned must be word ids below {len(itos)}")
    if not (isinstance(state, list) and state and all(isinstance(n, str) for n in state)):
        raise ExportError(f"{folder / 'export.json'}: state must be a list of the step graph's state names")
    return meta, itos


class OnnxCaptioner:
    """Greedy captions from an ONNX export with onnxruntime, NumPy and Pillow only (no torch).

    >>> OnnxCaptioner("exported/").caption(["photo.jpg", "other.png"])

    Greedy, not the model's own decoding (export.json's model_decoding: for the shipped model beam
    5, length norm 1.5, no repeated trigrams and tag guidance), so captions can differ from
    `captioner caption`'s and score lower: the shipped model's greedy captions of Flickr8k val
    scored CIDEr-D 0.484 against 0.547 with its own decoding. `decoding` says which it is.

    Images are opened and checked as everywhere else in captioner (data/images.open_rgb: EXIF
    orientation, size limits, one-line errors), then resized with Pillow's bilinear filter to the
    export's size and normalised with its mean and std. (The torch path resizes with
    torchvision's antialiased bilinear: pixel values can differ by a level or so.)
    """

    def __init__(self, folder: str | Path):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("OnnxCaptioner needs onnxruntime (pip install onnxruntime)") from None
        folder = Path(folder)
        for name in ("export.json", "vocab.json", "start.onnx", "step.onnx"):
            if not (folder / name).is_file():
                raise ExportError(f"{folder}: not an ONNX export (no {name}; make one with captioner export)")
        self.meta, self.itos = _read_export(folder)
        self.decoding = "greedy"  # (see the class's docstring)
        opts = ort.SessionOptions()
        try:
            self.start = ort.InferenceSession(str(folder / "start.onnx"), opts, providers=["CPUExecutionProvider"])
            self.step = ort.InferenceSession(str(folder / "step.onnx"), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own errors: a damaged or foreign graph
            raise ExportError(f"{folder}: the ONNX graphs cannot be loaded ({str(e).splitlines()[0][:200]})") from None
        words = self.step.get_outputs()[0].shape[-1]
        if isinstance(words, int) and words != len(self.itos):
            raise ExportError(f"{folder}: vocab.json has {len(self.itos)} words and step.onnx scores {words}; "
                              "export the model again")

    def preprocess(self, image, name: str | None = None) -> np.ndarray:
        """An image (path, bytes, PIL image or uint8 array) -> the model's input (3, S, S) float32."""
        from PIL import Image

        from captioner.data.images import open_rgb

        m = self.meta
        img = open_rgb(image, name=name).resize((m["image_size"], m["image_size"]), Image.BILINEAR,
                                                 reducing_gap=None)
        x = np.asarray(img, dtype=np.float32) / 255.0
        x = (x - np.array(m["mean"], np.float32)) / np.array(m["std"], np.float32)
        return x.transpose(2, 0, 1)

    def caption(self, images, batch_size: int = 32) -> str | list[str]:
        """Caption one image (path, bytes, PIL image or uint8 array) -> str, or a list of them ->
        list[str], `batch_size` at a time. An image that cannot be read raises ImageError naming it."""
        from captioner.data.images import image_name, one_or_many

        single, batch = one_or_many(images)
        out: list[str] = []
        for i in range(0, len(batch), batch_size):
            part = batch[i:i + batch_size]
            out += self.caption_arrays(np.stack([self.preprocess(im, image_name(im, i + k, single))
                                                 for k, im in enumerate(part)]))
        return out[0] if single else out

    def caption_arrays(self, x: np.ndarray) -> list[str]:
        """Preprocessed images (B, 3, S, S), as `preprocess` makes them -> greedy captions."""
        m = self.meta
        x = np.asarray(x, dtype=np.float32)
        if not len(x):
            return []
        state = self.start.run(None, {"images": x})
        tokens = np.full(len(x), m["start"], dtype=np.int64)
        words: list[list[str]] = [[] for _ in x]
        done = np.zeros(len(x), dtype=bool)
        for t in range(m["max_len"] + 1):
            logits, *state = self.step.run(None, {"tokens": tokens, **{f"{n}_in": s for n, s in
                                                                          zip(m["state"], state)}})
            if logits.shape[-1] != len(self.itos):  # a graph whose size was not known until it ran
                raise ExportError(f"vocab.json has {len(self.itos)} words and step.onnx scored {logits.shape[-1]}; "
                                  "export the model again")
            logits[:, m["banned"]] = -np.inf
            if t == m["max_len"]:
                tokens = np.full(len(x), m["end"], dtype=np.int64)
            else:
                tokens = logits.argmax(axis=1)
            for b, tok in enumerate(tokens):
                if not done[b] and tok != m["end"]:
                    words[b].append(self.itos[tok])
            done |= tokens == m["end"]
            if done.all():
                break
        from captioner.data.vocab import join_words

        return [join_words(w) for w in words]
