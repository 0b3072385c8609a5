"""Pictures people would rather look at than numbers: training curves and attention maps (PNG)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from captioner.data.images import open_rgb
from captioner.data.vocab import SPECIALS
from captioner.errors import ConfigError, ImageError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_curves(path: Path, history: list[dict]) -> None:
    """Loss (train/val) and val scores per epoch, side by side."""
    plt = _pyplot()
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(ep, [h["val_loss"] for h in history], "o-", label="val")
    a.set(xlabel="epoch", ylabel="cross-entropy per word", title="loss")
    a.legend()
    b.plot(ep, [h["CIDEr"] for h in history], "o-", label="CIDEr-D")
    b.plot(ep, [h["BLEU-4"] for h in history], "o-", label="BLEU-4")
    if any(not math.isnan(h.get("reward", math.nan)) for h in history):
        b.plot(ep, [h.get("reward", math.nan) for h in history], "o--", label="train reward (CIDEr-D)")
    b.set(xlabel="epoch", title="val captions")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_attention(image: Image.Image, words: list[str], alpha: torch.Tensor, path: Path, columns: int = 5) -> None:
    """The image, then one panel per word with the attention weights `alpha` (T, H, W) over it."""
    plt = _pyplot()
    img = np.asarray(image.convert("RGB").resize((224, 224)), dtype=np.float32) / 255
    maps = F.interpolate(alpha[:, None].float(), size=(224, 224), mode="bilinear", align_corners=False)[:, 0]
    panels = len(words) + 1
    rows = math.ceil(panels / columns)
    # constrained layout leaves room for each panel's title and the caption above them all
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.7 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(axes).ravel()
    for ax in axes:
        ax.axis("off")
    axes[0].imshow(img)
    axes[0].set_title("image", fontsize=10)
    for ax, word, m in zip(axes[1:], words, maps):
        m = (m / m.max().clamp(min=1e-8)).numpy()
        ax.imshow(img * (0.25 + 0.75 * m[..., None]))
        ax.imshow(m, cmap="jet", alpha=0.35)
        ax.set_title(word, fontsize=11)
    fig.suptitle(" ".join(w for w in words if w != "<end>"), fontsize=12)
    fig.get_layout_engine().set(h_pad=0.08)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def draw_attention_maps(captioner, paths: Sequence[Path], target: Path, decoding=None) -> list[tuple[Path, Path]]:
    """An attention map PNG for each image that can be read: `target` itself for one image, else
    TARGET-<image name>.png beside it (numbered when two images share a name). `decoding` as for
    the printed captions, so the caption drawn is the caption printed. Returns [(image, PNG
    written)]; unreadable images are left out (the caller has reported them already)."""
    written, stems = [], Counter(Path(p).stem for p in paths)
    seen: Counter = Counter()
    for path in paths:
        seen[path.stem] += 1  # a/x.jpg and b/x.jpg: TARGET-x-1.png and TARGET-x-2.png, never one over the other
        name = path.stem if stems[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}"
        out = target if len(paths) == 1 else target.with_name(f"{target.stem}-{name}.png")
        try:
            _, words, alpha = captioner.attention(path, decoding)
        except ImageError:
            continue
        draw_attention(open_rgb(path), words, alpha, out)
        written.append((path, out))
    return written


def embedding_map(weights: torch.Tensor, words: list[str], method: str = "pca", seed: int = 0) -> np.ndarray:
    """Word embeddings (N, E) -> 2-D points (N, 2): PCA (the two directions of largest variance),
    or t-SNE (scikit-learn), which keeps neighbours together at the cost of global distances."""
    x = weights.detach().float().cpu()
    x = x - x.mean(dim=0)
    if method == "pca":
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        return (x @ v[:2].T).numpy()
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            raise ConfigError("--method tsne needs scikit-learn (pip install scikit-learn); --method pca does not") \
                from None
        perplexity = min(30.0, max(2.0, (len(words) - 1) / 3))
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x.numpy())
    raise ConfigError(f"unknown method {method!r}; choose pca or tsne")


def word_vectors(model, layer: str = "output") -> torch.Tensor:
    """One vector per vocabulary word (V, E). "output": the word's row of the decoder's last layer,
    which on Flickr8k clusters by meaning (dog: puppy, pitbull, lab); "input": its embedding,
    which after a few epochs stays close to its random start."""
    return model.decoder.word_vectors(layer)


def word_map(vectors: torch.Tensor, itos: list[str], path: Path, words: int = 150, method: str = "pca",
             title: str = "") -> None:
    """Draw the `words` most frequent words (the vocabulary is ordered by frequency after its four
    special tokens) at their 2-D positions, titled "N most frequent words, TITLE"."""
    first = len(SPECIALS)
    chosen = itos[first:first + words]
    plot_embeddings(embedding_map(vectors[first:first + words], chosen, method), chosen, path,
                    f"{len(chosen)} most frequent words, {title}")


def nearest_words(weights: torch.Tensor, itos: list[str], word: str, k: int = 5) -> list[tuple[str, float]]:
    """The k words whose embeddings are closest to `word`'s by cosine similarity."""
    if word not in itos:
        raise ConfigError(f"{word!r} is not in the model's vocabulary")
    w = F.normalize(weights.detach().float(), dim=1)
    sims = w @ w[itos.index(word)]
    order = [i for i in sims.argsort(descending=True).tolist() if itos[i] != word and itos[i] not in SPECIALS]
    return [(itos[i], round(float(sims[i]), 3)) for i in order[:k]]


def plot_embeddings(points: np.ndarray, words: list[str], path: Path, title: str = "") -> None:
    """A labelled scatter of 2-D word positions."""
    plt = _pyplot()
    size = 8 + len(words) / 25
    fig, ax = plt.subplots(figsize=(size, size * 0.75))
    ax.scatter(points[:, 0], points[:, 1], s=8, c="#4a78c2", alpha=0.6)
    for (x, y), w in zip(points, words):
        ax.annotate(w, (x, y), fontsize=8, xytext=(2, 2), textcoords="offset points")
    ax.set(title=title, xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
