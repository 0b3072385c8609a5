"""`Captioner`: load a model folder (or the shipped one) and caption images."""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from captioner.data.images import draft_size, eval_transform, image_batches, image_name, one_or_many, open_rgb
from captioner.decode import caption_features
from captioner.decoding import Decoding
from captioner.errors import CaptionerWarning, ConfigError, ImageError, ModelError
from captioner.inference.plan import InferencePlan
from captioner.model.network import load_model, load_space, model_dir
from captioner.names import SHIPPED, shipped_model_dir
from captioner.tags import Tagger, pooled
from captioner.threads import fit_threads

ImageLike = str | Path | bytes | Image.Image | np.ndarray

__all__ = ["Captioner", "shipped_model_dir"]


class Captioner:
    """A loaded captioning model.

    >>> from captioner import Captioner
    >>> Captioner.load().caption("photo.jpg")
    'a dog runs through the grass'

    Every method takes an optional `decoding` (see `decode.Decoding`); without one, the model's own
    settings from its config.json apply (`self.decoding`).
    """

    def __init__(self, model, vocab, plan: InferencePlan, source: str = "", encoder: torch.nn.Module | None = None,
                 space=None, fingerprint: str | None = None):
        self.model, self.vocab, self.plan = model, vocab, plan
        self._fingerprint = fingerprint  # load's: of the weights as saved, before any fast layers swap in
        self.space = space  # the folder's joint image-sentence space (model/embedding.py), or None
        self.encoder = model.encoder if encoder is None else encoder  # what features() runs (load: a faster copy)
        self.source = source  # where the model came from: its folder, or "shipped"
        cfg = model.cfg
        self.transform = eval_transform(cfg.image_size, cfg.mean, cfg.std)
        self.draft_size = draft_size(cfg.image_size)  # big JPEGs decode at a reduced scale: see open_rgb
        self.decoding = model.decoding  # the model's own (its folder's decoding.json)
        self.batch_size = plan.batch_size  # images per batch unless a caller says

    @property
    def device(self) -> torch.device:
        return self.plan.device

    @property
    def precision(self) -> str:
        return self.plan.precision

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "auto", precision: str = "auto",
             plan: InferencePlan | None = None) -> Captioner:
        """Load the model folder at `path`, or the shipped model when `path` is None or "shipped", to
        caption on `device` at `precision` (or as `plan` says: see inference/plan.py)."""
        plan = plan or InferencePlan.resolve(device, precision)
        model, vocab = load_model(model_dir(path), plan.device)
        space = load_space(model_dir(path), model.cfg, vocab.pad, plan.device)
        # int8 swaps in a decoder of other weights: its fingerprint is taken first (40 ms, so only then), so
        # that a library indexed at one precision is searched at any other
        fingerprint = _fingerprint(model, vocab, space) if plan.precision == "int8" else None
        encoder = plan.prepare(model)
        return cls(model, vocab, plan, str(path) if path else SHIPPED, encoder, space, fingerprint)

    # -- captioning ------------------------------------------------------------------------------

    def caption(self, images: ImageLike | Sequence[ImageLike], beam_size: int | None = None,
                decoding: Decoding | None = None, *, batch_size: int | None = None, errors: str = "raise",
                details: bool = False, guided: bool = True) -> str | dict | None | list[str | dict | None]:
        """Caption one image -> its caption, or a list of images -> a list in the same order.

        An image is a path, the bytes of a file, a PIL image, or a numpy array of uint8 pixels
        (HxWx3 RGB, HxWx4 RGBA, HxW grey; a 4-D array is a list of such images). A list is read
        and captioned `batch_size` images at a time (default: `self.batch_size`, by device), so memory
        stays flat however long it is.

        `beam_size` (1 = greedy) changes only that setting of `decoding` (default: the model's own).
        `errors="raise"` stops at the first image that cannot be read (an ImageError naming it);
        `errors="skip"` gives None in its place and a CaptionerWarning with the reason. An item of
        the list that is not an image (None, a number, a tensor) is such an image; `images` itself
        neither an image nor a list of them is a TypeError, whatever `errors` says.
        `details=True` gives dicts instead of strings: {"caption", "logprob", "score",
        "alternatives": [{"caption", "logprob", "score"}, ...] (the beams, best first), "tags":
        [{"word", "score"}, ...] (what the encoder recognises, tags.py), and "disagrees" when the
        caption names an animal the encoder does not see}, or {"caption": None, "error": reason}
        for a skipped image. `guided=False` leaves the tags out of the search (they are still
        reported): the caption the language model alone prefers.
        """
        if errors not in ("raise", "skip"):
            raise ConfigError(f"errors must be 'raise' or 'skip', not {errors!r}")
        batch_size = self.batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise ConfigError(f"batch_size must be 1 or more, not {batch_size}")
        single, batch = one_or_many(images)
        decoding = decoding or self.decoding
        if beam_size is not None:
            decoding = decoding.replace(beam_size=beam_size)
        if not guided:
            decoding = decoding.replace(tag_threshold=0.0)
        results: list = []
        for start in range(0, len(batch), batch_size):
            tensors, read, failed = [], [], {}
            for i, image in enumerate(batch[start:start + batch_size], start):
                try:
                    tensors.append(self.read(image, name=image_name(image, i, single)))
                    read.append(i)
                except ImageError as e:
                    if errors == "raise":
                        raise
                    failed[i] = str(e)
                    warnings.warn(str(e), CaptionerWarning, stacklevel=2)
            captioned = dict(zip(read, self.caption_tensor(torch.stack(tensors), decoding) if tensors else []))
            for i in range(start, min(start + batch_size, len(batch))):
                r = captioned.get(i)
                if details:
                    results.append(r if r else {"caption": None, "error": failed[i]})
                else:
                    results.append(r["caption"] if r else None)
        return results[0] if single else results

    def read(self, image: ImageLike, name: str | None = None) -> torch.Tensor:
        """One image (see `caption`) -> the model's input (3, S, S), as captioning reads it: a big
        JPEG decoded at a reduced scale (images.draft_size), then resized and normalised. Raises an
        ImageError naming it (`name`, else the path) when it cannot be read."""
        return self.transform(open_rgb(image, name=name, min_size=self.draft_size))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, S, S) -> what the decoder takes (see CaptionModel.features)."""
        return self.plan.encode(self.model, x, self.encoder)

    # -- the search space ------------------------------------------------------------------------

    def require_space(self) -> None:
        """Raise a one-line ModelError unless the model folder has a search space."""
        if self.space is None:
            raise ModelError(f"this model ({self.source}) has no search space (embedding.json): add one with "
                             f"captioner train --space-only --init {self.source} --data DATA --out FOLDER")

    @torch.no_grad()
    def embed(self, images: ImageLike | Sequence[ImageLike], batch_size: int | None = None) -> np.ndarray:
        """Images (as `caption` takes them, one or a list) -> their points in the search space,
        unit vectors (N, D) float32, one row per image: the dot product of two rows, or of a row
        and an `embed_text` row, says how well they match. Raises an ImageError naming an image
        that cannot be read."""
        self.require_space()
        _, items = one_or_many(images)
        out = []
        for start in range(0, len(items), batch_size or self.batch_size):
            part = items[start:start + (batch_size or self.batch_size)]
            x = torch.stack([self.read(im) for im in part]).to(self.device)
            out.append(self.embed_features(self.features(x)))
        return np.concatenate(out) if out else np.zeros((0, self.space.cfg.point_dim), np.float32)

    @torch.no_grad()
    def embed_features(self, feats: torch.Tensor) -> np.ndarray:
        """Encoder features (B, ...) -> points in the search space (B, D) float32 (see `embed`)."""
        self.require_space()
        return self.space.images(feats.to(self.device)).float().cpu().numpy()

    @torch.no_grad()
    def embed_text(self, texts: str | Sequence[str]) -> np.ndarray:
        """Sentences -> their points in the search space, unit vectors (N, D) float32 (see `embed`).
        Words the vocabulary lacks are left out; a sentence with none it knows is a row of zeros,
        which matches nothing."""
        self.require_space()
        texts = [texts] if isinstance(texts, str) else list(texts)
        v, cut = self.vocab, self.model.cfg.max_len
        rows = [torch.tensor([i for i in v.encode(t, cut)[1:-1] if i != v.unk] or [v.pad]) for t in texts]
        if not rows:
            return np.zeros((0, self.space.cfg.point_dim), np.float32)
        tokens = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=v.pad).to(self.device)
        return self.space.texts(tokens).float().cpu().numpy()

    @torch.no_grad()
    def caption_tensor(self, x: torch.Tensor, decoding: Decoding | None = None, features: bool = False
                       ) -> list[dict]:
        """Preprocessed images (B, 3, S, S) -> [{"caption", "logprob", "score", "alternatives": [...],
        "tags": [...]}] (see caption_features), with `features`: also "features", the encoder's output
        for that image (a float tensor on the CPU), and "terms", its tags with their hypernyms
        (tags.Tagger.terms_of): what the photo library stores."""
        if self.device.type == "cpu":
            fit_threads()  # the cores other processes leave free (threads.py); at most every 10 s, in this thread
        feats = self.features(x)
        probs = self.tag_probs(x, feats)
        results = self.caption_features(feats, decoding, probs)
        if features:
            for r, f in zip(results, feats.float().cpu()):
                r["features"] = f
            if probs is not None:
                for r, terms in zip(results, self.tagger.terms_of(probs)):
                    r["terms"] = terms  # the tags and their hypernyms, for search
        return results

    def caption_features(self, feats: torch.Tensor, decoding: Decoding | None = None,
                         probs: torch.Tensor | None = None) -> list[dict]:
        """The decoder's input (B, ...) -> results (see decode.caption_features), each with "tags"
        ([{"word", "score"}], tags.py) and, when the caption names an animal the encoder does not
        see, "disagrees" ({"caption_says", "encoder_sees", "score"}). `probs`: the encoder's ImageNet
        class probabilities (tag_probs); without them they are computed from `feats` when those are
        the pretrained encoder's (else no tags). With a guided decoding, the confident tags' words
        are words the caption must say. With `decoding.space_rerank` and a model with a search space,
        each alternative has a "match" too, with `decoding.rarity_penalty` a "rarity", and they are
        in the order `_rerank` gives."""
        decoding = decoding or self.decoding
        if probs is None and self.tagger is not None and not self.tags_need_own_pass:
            probs = self.tagger.probs(pooled(feats.to(self.device)))
        results = caption_features(self.model.decoder, self.vocab, feats, decoding, self.plan,
                                   batch_size=feats.shape[0])
        if probs is not None and decoding.guided:
            self._guide(results, feats, decoding, probs)
        if decoding.space_rerank and self.space is None:
            warnings.warn(f"the model ({self.source}) has no search space: its match does not reorder the beams",
                          CaptionerWarning, stacklevel=2)
        weight = decoding.space_rerank if self.space is not None else 0.0
        if weight or decoding.rarity_penalty:
            self._rerank(results, feats, weight, decoding.rarity_penalty)
        if probs is not None:
            for r, t, row in zip(results, self.tagger.tags(probs), probs):
                r["tags"] = t
                if flag := self.tagger.disagreement(r["caption"], row):
                    r["disagrees"] = flag
        return results

    def _guide(self, results: list[dict], feats: torch.Tensor, decoding: Decoding, probs: torch.Tensor) -> None:
        """Caption again, as constrained search, the images whose caption misses a word of a confident
        tag, so that it says it. A caption that already says them stays as it is: a constrained
        search keeps other beams and can end elsewhere (on coco240 that cost what it gained,
        docs/EXPERIMENTS.md). With `decoding.tag_borrow`, a tag word the vocabulary lacks is asked for
        as the word it borrows, which is then written as the tag's ("horse" -> "zebra": Tagger.wanted)."""
        wanted = self.tagger.wanted(probs, self.vocab, decoding.tag_threshold, decoding.tag_words, decoding.tag_borrow,
                                    self.model.naming, decoding.tag_named)
        missing = []
        for r, sets in zip(results, wanted):
            said = {self.vocab.stoi.get(w) for w in r["caption"].split()}
            missing.append([ids for ids, _ in sets if not ids & said])
        again = [i for i, sets in enumerate(missing) if sets]
        if again:
            rows = torch.tensor(again)
            redone = caption_features(self.model.decoder, self.vocab, feats[rows], decoding, self.plan,
                                      batch_size=len(again), constraints=[missing[i] for i in again])
            for i, r in zip(again, redone):
                results[i] = r
        for r, sets in zip(results, wanted):
            swaps = {k: v for _, sw in sets for k, v in sw.items()}
            if swaps:
                for alt in [r, *r["alternatives"]]:
                    alt["caption"] = self._swap(alt["caption"], swaps)

    def _rerank(self, results: list[dict], feats: torch.Tensor, weight: float, penalty: float) -> None:
        """Order each image's alternatives by score + `weight` x match - `penalty` x rarity (the
        decoding's space_rerank, 0 without a space, and rarity_penalty); the first is the caption.
        "match" is the cosine of the alternative's point and its image's in the search space: the
        language model's score ranks the beams by how likely the words are, the space, trained apart
        to tell which caption goes with which photo, prefers the one that says what this photo shows.
        Telling photos apart, it leans to rare words; "rarity" (Vocabulary.rarity) holds it back.
        Measured on Flickr8k val and coco240, docs/EXPERIMENTS.md."""
        if all(len(r["alternatives"]) < 2 for r in results):
            return
        if weight:
            images = self.embed_features(feats)  # (B, D)
            texts = self.embed_text([a["caption"] for r in results for a in r["alternatives"]])  # (sum of K, D)
            at = 0
            for r, image in zip(results, images):
                for a, match in zip(r["alternatives"], texts[at:at + len(r["alternatives"])] @ image):
                    a["match"] = round(float(match), 4)
                at += len(r["alternatives"])
        for i, r in enumerate(results):
            alts = r["alternatives"]
            if penalty:
                for a in alts:
                    a["rarity"] = round(self.vocab.rarity(a["caption"]), 4)
            # stable: ties keep the search's order
            alts.sort(key=lambda a: -(a["score"] + weight * a.get("match", 0.0) - penalty * a.get("rarity", 0.0)))
            results[i] = {**r, **alts[0], "alternatives": alts}

    def _swap(self, caption: str, swaps: dict[int, str]) -> str:
        """`caption` with its first word whose id is in `swaps` written as swaps says."""
        words = caption.split()
        for j, w in enumerate(words):
            if self.vocab.stoi.get(w) in swaps:
                words[j] = swaps[self.vocab.stoi[w]]
                return " ".join(words)
        return caption

    @functools.cached_property
    def tagger(self) -> Tagger | None:
        """The encoder's ImageNet classifier and its words (tags.py), or None for an encoder without one."""
        tagger = Tagger.for_encoder(self.model.cfg.encoder)
        return tagger.to(self.device) if tagger else None

    @property
    def tags_need_own_pass(self) -> bool:
        """Whether the encoder was trained in captioning, so that its features no longer fit the
        ImageNet classifier: tags then come from the pretrained encoder, run again."""
        return self.model.cfg.encoder_weights != "default"

    @functools.cached_property
    def _pretrained_encoder(self) -> torch.nn.Module:
        from captioner.model.encoder import build_backbone, fold_batchnorm

        return fold_batchnorm(build_backbone(self.model.cfg.encoder, "default")).to(self.device).eval()

    @torch.no_grad()
    def tag_probs(self, x: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor | None:
        """Preprocessed images (B, 3, S, S) -> the encoder's ImageNet class probabilities (B, 1000),
        from `feats` (this model's features of `x`) when its encoder is the pretrained one, else from
        the pretrained encoder run on `x`. None when the encoder has no classifier."""
        if self.tagger is None:
            return None
        if self.tags_need_own_pass:
            with self.plan.encoder_autocast():
                feats = self._pretrained_encoder(x.to(self.device)).mean(dim=(2, 3))  # (B, C): global average pool
        elif feats is None:
            feats = self.features(x)
        return self.tagger.probs(pooled(feats))

    def tag_probs_of_files(self, paths: Sequence[Path]) -> torch.Tensor:
        """tag_probs of image files (B, 1000), read as caption_files reads them (for evaluation from
        cached features when the tags need their own pass); an unreadable file gets a row of zeros."""
        out = torch.zeros(len(paths), 1000, device=self.device)
        cfg = self.model.cfg
        for idx, x, _, _ in image_batches(list(paths), cfg.image_size, cfg.mean, cfg.std, self.device,
                                          batch_size=self.batch_size, workers=0, jpegs_on_device=False):
            if x is not None:
                out[torch.as_tensor(idx, device=self.device)] = self.tag_probs(x)
        return out

    @functools.cached_property
    def fingerprint(self) -> str:
        """Names this exact model (weights, vocabulary, config): a photo library keeps it beside what
        the model computed, so that two models' numbers are never mixed. The weights as saved: a
        precision (int8 included) does not change it, as it does not change what is stored."""
        return self._fingerprint or _fingerprint(self.model, self.vocab, self.space)

    def require_attention(self) -> None:
        """Raise a one-line ModelError unless the model has attention maps to show."""
        if not self.model.decoder.has_attention:
            raise ModelError(f"this model's decoder ({self.model.cfg.decoder}) has no attention to show; "
                             "train one with --decoder attention")

    @torch.no_grad()
    def attention(self, image: ImageLike, decoding: Decoding | None = None) -> tuple[str, list[str], torch.Tensor]:
        """Caption one image and say where the model looked for each word: (caption, words,
        weights (T, H, W)), one map per word and one for <end>. Attention models only. The
        caption is the one `caption()` gives with the same decoding."""
        m, v = self.model, self.vocab
        self.require_attention()
        x = self.read(image)[None]
        feats = self.features(x)  # (1, P, C)
        caption = self.caption_features(feats, decoding, self.tag_probs(x, feats))[0]["caption"]
        said = self.tagger.unborrowed(v) if self.tagger and (decoding or self.decoding).tag_borrow else {}
        ids = [v.stoi[said.get(w, w)] for w in caption.split()]  # a borrowed word as the search said it
        tokens = torch.tensor([[v.start, *ids]], device=self.device)  # the words as inputs, <start> first
        with self.plan.decoder_autocast(1):  # as the search ran
            alpha = m.decoder.attention_maps(feats.float(), tokens)  # (1, T, P)
        side = round(alpha.shape[-1] ** 0.5)
        return caption, caption.split() + ["<end>"], alpha[0].float().cpu().view(-1, side, side)

    def caption_files(self, paths: Sequence[Path], batch_size: int | None = None, decoding: Decoding | None = None,
                      workers: int | None = None, features: bool = False, jpegs_on_device: bool | None = None
                      ) -> Iterator[tuple[Path, dict | None, str | None]]:
        """Caption many files in batches, in their order. Yields (path, result, None) or (path, None,
        error line): an unreadable file is reported and skipped, never fatal. `features`: see
        caption_tensor. `workers`: processes reading images while the model runs (default:
        InferencePlan.workers). `jpegs_on_device`: decode plain JPEGs on the model's device, a
        batch in one call (default: the plan's, on CUDA; see data/jpeg.py)."""
        paths = list(paths)
        batch_size = batch_size or self.batch_size
        if workers is None:
            workers = self.plan.workers(len(paths), batch_size)
        if jpegs_on_device is None:
            jpegs_on_device = self.plan.jpegs_on_device
        cfg = self.model.cfg
        loader = image_batches(paths, cfg.image_size, cfg.mean, cfg.std, self.device, batch_size=batch_size,
                               workers=workers, jpegs_on_device=jpegs_on_device)
        for idx, x, err_idx, errors in loader:
            for i, e in zip(err_idx, errors):
                yield paths[i], None, e
            if x is not None:
                for i, r in zip(idx, self.caption_tensor(x, decoding, features)):
                    yield paths[i], r, None


def _fingerprint(model, vocab, space) -> str:
    # the config and the decoding as one JSON object, as config.json held both before decoding.json:
    # a library indexed then keeps its fingerprint
    h = hashlib.sha1(json.dumps({**model.cfg.to_json(), **model.decoding.saved()}, sort_keys=True).encode())
    h.update("\n".join(vocab.itos).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    if space is not None:  # a library indexed before the space was added gets its points
        for name, t in sorted(space.state_dict().items()):  # (the names and shapes say its architecture)
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]
