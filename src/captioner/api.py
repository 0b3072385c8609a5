"""`Captioner`: load a model folder (or the shipped one) and caption images."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from importlib.resources import files
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from captioner.data.features import ImageDataset, collate_images
from captioner.data.images import eval_transform, open_rgb
from captioner.decode import search
from captioner.model.folder import ModelError, load_model
from captioner.runtime import autocast, decoder_precision, encoder_chunk, pick_device, resolve_precision

ImageLike = str | Path | Image.Image


def shipped_model_dir() -> Path:
    """The model folder that comes inside the package."""
    return Path(str(files("captioner") / "assets" / "model"))


class Captioner:
    """A loaded captioning model.

    >>> from captioner import Captioner
    >>> Captioner.load().caption("photo.jpg")
    'a dog runs through the grass'
    """

    def __init__(self, model, vocab, device: torch.device, precision: str, source: str = ""):
        self.model, self.vocab, self.device, self.precision = model, vocab, device, precision
        self.source = source  # where the model came from: its folder, or "shipped"
        cfg = model.cfg
        self.transform = eval_transform(cfg.image_size, cfg.mean, cfg.std)

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "auto", precision: str = "auto") -> Captioner:
        """Load the model folder at `path`, or the shipped model when `path` is None."""
        dev = pick_device(device)
        model, vocab = load_model(Path(path) if path else shipped_model_dir(), dev)
        model.encoder.to(memory_format=torch.channels_last)  # faster in fp32 and bf16 on the CPU
        return cls(model, vocab, dev, resolve_precision(precision, dev), str(path) if path else "shipped")

    # -- captioning ------------------------------------------------------------------------------

    def caption(self, images: ImageLike | Sequence[ImageLike], beam_size: int | None = None,
                **search) -> str | list[str]:
        """Caption one image (path or PIL image) -> str, or a list of them -> list[str].

        `beam_size` (1 = greedy), `length_norm`, `block_trigrams`, `max_len`: default to the
        model's own decoding settings (config.json)."""
        single = isinstance(images, (str, Path, Image.Image))
        batch = [images] if single else list(images)
        x = torch.stack([self.transform(open_rgb(im)) for im in batch])
        texts = [r["caption"] for r in self.caption_tensor(x, beam_size, **search)]
        return texts[0] if single else texts

    @torch.no_grad()
    def caption_tensor(self, x: torch.Tensor, beam_size: int | None = None, length_norm: float | None = None,
                       block_trigrams: bool = False, max_len: int | None = None) -> list[dict]:
        """Preprocessed images (B, 3, S, S) -> [{"caption", "logprob", "alternatives": [...]}]."""
        m, v = self.model, self.vocab
        x = x.to(self.device, memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            feats = m.features(x, chunk=encoder_chunk(self.device))
        with autocast(self.device, decoder_precision(self.precision, self.device, x.shape[0])):
            hyp = search(m.decoder, feats, v, **m.cfg.search_settings(beam_size, length_norm, block_trigrams, max_len))
        results = []
        for b in range(hyp.tokens.shape[0]):
            alts = [{"caption": v.decode(hyp.tokens[b, k].tolist()), "logprob": round(float(hyp.logprob[b, k]), 4)}
                    for k in range(hyp.tokens.shape[1]) if torch.isfinite(hyp.logprob[b, k])]
            results.append({**alts[0], "alternatives": alts})
        return results

    @torch.no_grad()
    def attention(self, image: ImageLike, **search_args) -> tuple[str, list[str], torch.Tensor]:
        """Caption one image and say where the model looked for each word: (caption, words,
        weights (T, H, W)), one map per word and one for <end>. Attention models only."""
        m, v = self.model, self.vocab
        if not hasattr(m.decoder, "teacher_forced"):
            raise ModelError(f"this model's decoder ({m.cfg.decoder}) has no attention to show; "
                             "train one with --decoder attention")
        pil = open_rgb(image)
        x = self.transform(pil)[None].to(self.device)
        with autocast(self.device, self.precision):
            feats = m.features(x)  # (1, P, C)
            hyp = search(m.decoder, feats, v, **m.cfg.search_settings(**search_args))
            caption = v.decode(hyp.tokens[0, 0].tolist())
            ids = [v.stoi[w] for w in caption.split()]
            tokens = torch.tensor([[v.start, *ids]], device=self.device)  # the words as inputs, <start> first
            _, alpha = m.decoder.teacher_forced(feats, tokens)  # (1, T, P): where it looked for each word
        side = round(alpha.shape[-1] ** 0.5)
        return caption, caption.split() + ["<end>"], alpha[0].float().cpu().view(-1, side, side)

    def caption_files(self, paths: Sequence[Path], batch_size: int = 32, beam_size: int | None = None, workers: int = 0,
                      **search) -> Iterator[tuple[Path, dict | None, str | None]]:
        """Caption many files in batches. Yields (path, result, None) or (path, None, error line):
        an unreadable file is reported and skipped, never fatal."""
        ds = ImageDataset(paths, self.transform)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate_with_errors)
        for idx, x, err_idx, errors in loader:
            for i, e in zip(err_idx, errors):
                yield ds.paths[i], None, e
            if x is not None:
                for i, r in zip(idx, self.caption_tensor(x, beam_size, **search)):
                    yield ds.paths[i], r, None


def _collate_with_errors(batch):
    idx, x, errors = collate_images(batch)
    err_idx = [i for i, item in batch if isinstance(item, str)]
    return idx, x, err_idx, errors
