"""Tags: what the encoder's ImageNet classifier recognises in a photo, as the words people use.

EfficientNet-Lite's weights come with their 1000-class ImageNet classifier (a linear layer over the
pooled features the captioner computes anyway), so naming what the encoder sees costs one small
matrix product, not a second pass. assets/imagenet_words.json (scripts/imagenet_words.py, from
WordNet 3.0) gives each class its everyday words ("Egyptian cat" -> cat) and the words above it
("feline", "animal"). A word's score is the probability of all the classes it names: "cat" sums
Egyptian cat, tabby and tiger cat, "animal" every animal class.

Not every confident tag is a word people say: Flickr8k's captions call a "ski" photo "a skier in the
snow" and an "athlete" "a man". A model folder's naming.json (decoding.Naming, counted on its training
captions by `naming_of`) says how often the captions of the training photos that carried a tag said its word;
guidance asks only for words said often enough (`Decoding.tag_named`). A word the training photos
never carried (bed, for a model of Flickr8k) is taken to be said as often as the average tag word.

Tags serve three ends: they are reported with every caption; confident ones become words the
caption must say (constrained beam search, decode.search), so that a model trained on
Flickr8k's dogs calls a cat a cat; and the photo library indexes them with their hypernyms for search.

With an encoder fine-tuned in captioning (encoder_weights "folder"), its features are no longer
the ones the classifier was trained on: the tags then come from the pretrained encoder run again
on the same images (Captioner does this), so they stay right at the cost of a second pass.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from captioner.decoding import NAMING_FLOOR, Naming
from captioner.errors import ModelError

TABLE = Path(__file__).parent / "assets" / "imagenet_words.json"
SHOWN = 0.1  # the least score a tag is reported with
NEAR_ZERO = 0.02  # a caption's animal word below this, while a tag is confident, disagrees with the encoder
BORROW_LEVELS = 3  # hypernym levels searched for a word to borrow (zebra: equine, 1 level up)


@functools.cache
def table() -> dict:
    """The class -> words table (assets/imagenet_words.json)."""
    try:
        data = json.loads(TABLE.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{TABLE}: the ImageNet word table cannot be read ({e}); reinstall captioner") from None
    if len(data.get("classes", ())) != 1000:
        raise ModelError(f"{TABLE}: expected 1000 ImageNet classes")
    return data


class Tagger:
    """The encoder's ImageNet classifier and the words of its classes.

    probs(pooled) -> class probabilities; tags(probs) -> the words to show; terms(probs) -> the
    words to index (tags and hypernyms); constraints(probs, vocab, ...) -> the words a caption must
    say; disagreement(caption, probs) -> when the caption names an animal the encoder does not see."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        data = table()
        self.weight, self.bias = weight.float(), bias.float()  # (1000, C), (1000,)
        self.classes = data["classes"]
        self.forms: dict[str, list[str]] = data["forms"]
        self.words = sorted({w for c in self.classes for w in c["words"]})  # what is shown
        self.terms = sorted({w for c in self.classes for w in c["words"] + c["hypernyms"]})  # what is indexed
        self._shown = self._membership(self.words, lambda c: c["words"])
        self._indexed = self._membership(self.terms, lambda c: c["words"] + c["hypernyms"])
        self._word_index = {w: i for i, w in enumerate(self.words)}
        self._borrowed: tuple[object, dict[str, str]] | None = None  # (vocabulary, its borrowed())
        self.animals = {w for w in self.words  # words whose every class is an animal
                        if all("animal" in c["hypernyms"] for c in self.classes if w in c["words"])}

    def _membership(self, vocab: list[str], words_of) -> torch.Tensor:
        """(1000, W) 0/1: class k is named by word w (so probs @ it sums the classes of each word)."""
        index = {w: i for i, w in enumerate(vocab)}
        m = torch.zeros(len(self.classes), len(vocab))
        for k, c in enumerate(self.classes):
            m[k, [index[w] for w in words_of(c)]] = 1.0
        return m

    @classmethod
    def for_encoder(cls, name: str) -> Tagger | None:
        """The tagger of the ImageNet weights of encoder `name`, or None when they hold no classifier
        captioner can read (the torchvision encoders' files are user-given)."""
        if not name.startswith("tf_efficientnet_lite"):
            return None
        from captioner.model.encoder import imagenet_classifier

        weight, bias = imagenet_classifier(name)
        return cls(weight, bias)

    def to(self, device: torch.device) -> Tagger:
        self.weight, self.bias = self.weight.to(device), self.bias.to(device)
        self._shown, self._indexed = self._shown.to(device), self._indexed.to(device)
        return self

    def probs(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, C) of the pretrained encoder -> class probabilities (B, 1000), fp32."""
        return torch.softmax(pooled.float() @ self.weight.T + self.bias, dim=-1)

    def word_scores(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, 1000) -> (B, len(words)): each shown word's score, the probability of its classes."""
        return (probs @ self._shown).clamp_(max=1.0)

    def tags(self, probs: torch.Tensor, floor: float = SHOWN, top: int = 5) -> list[list[dict]]:
        """The words to show for each image, best first: [{"word": "cat", "score": 0.96}, ...],
        at most `top`, each at least `floor`."""
        scores = self.word_scores(probs).cpu()
        out = []
        for row in scores:
            best = row.topk(min(top, len(self.words)))
            out.append([{"word": self.words[i], "score": round(float(s), 3)}
                        for s, i in zip(best.values.tolist(), best.indices.tolist()) if s >= floor])
        return out

    def terms_of(self, probs: torch.Tensor, floor: float = SHOWN) -> list[dict[str, float]]:
        """What the library indexes: every word and hypernym scoring at least `floor`, and its
        plural ({"cat": 0.96, "cats": 0.96, "feline": 0.97, "animal": 0.99, ...}), per image."""
        scores = (probs @ self._indexed).clamp_(max=1.0).cpu()
        out = []
        for row in scores:
            keep = (row >= floor).nonzero().squeeze(1).tolist()
            out.append({form: round(float(row[i]), 3) for i in keep for form in self.forms.get(self.terms[i],
                                                                                               [self.terms[i]])})
        return out

    def constraints(self, probs: torch.Tensor, vocab, threshold: float, most: int) -> list[list[set[int]]]:
        """For each image, at most `most` sets of caption-word ids, one word of each to be said (see
        `wanted`, without the words it writes in place of borrowed ones)."""
        return [[ids for ids, _ in sets] for sets in self.wanted(probs, vocab, threshold, most)]

    def wanted(self, probs: torch.Tensor, vocab, threshold: float, most: int, borrow: bool = False,
               naming: Naming | None = None, named: float = 0.0) -> list[list[tuple[set[int], dict[int, str]]]]:
        """For each image, at most `most` (set of caption-word ids, swaps): for each confident class,
        best first, the forms of its words that the caption vocabulary has ("cat", "cats"), when its
        best word scores at least `threshold` and names something the sets before did not.

        With `borrow`, a class none of whose words the vocabulary has (zebra, for a model trained on
        Flickr8k) borrows the nearest word it has in WordNet (`borrowed`: zebra -> horse, both equines): the
        set is the borrowed word's forms, and `swaps` maps each of their ids to the word to write in
        its place ({id of "horse": "zebra", id of "horses": "zebras"}). The language model then
        places the word where it would place "horse", as deep compositional captioning does by
        copying the nearer word's weights (Hendricks et al. 2016), without changing the model.

        With `naming` and `named` > 0, a word the training captions said less often than `named`
        (Naming.rate) is not asked for; a borrowed word was never said, and counts as the average."""
        scores = self.word_scores(probs).cpu()
        order = probs.topk(10, dim=-1).indices.cpu().tolist()  # a word scoring >= 0.1 has a class in the top 10
        borrowed = self.borrowed(vocab) if borrow else {}
        out = []
        for b, classes in enumerate(order):
            sets: list[tuple[set[int], dict[int, str]]] = []
            for k in classes:
                if len(sets) >= most:
                    break
                words = [w for w in self.classes[k]["words"] if " " not in w]
                if not words or max(float(scores[b, self._word_index[w]]) for w in words) < threshold:
                    continue
                ids = {i for w in words for form in self.forms.get(w, [w]) if (i := vocab.stoi.get(form)) is not None}
                swaps: dict[int, str] = {}
                if not ids and (w := next((w for w in words if w in borrowed), None)):
                    source = borrowed[w]
                    for form, own in zip(self.forms.get(source, [source]), self.forms.get(w, [w])):
                        if (i := vocab.stoi.get(form)) is not None:
                            ids.add(i)
                            swaps[i] = own
                if named and naming and ids and naming.rate(None if swaps else key_word(ids, vocab)) < named:
                    continue
                if ids and not any(ids & s for s, _ in sets):
                    sets.append((ids, swaps))
            out.append(sets)
        return out

    def borrowed(self, vocab) -> dict[str, str]:
        """Each one-word tag word the caption vocabulary lacks -> the word it has that is nearest in
        WordNet: a word of another class under the nearest shared hypernym, the most frequent in
        training if several (vocabularies list words by frequency). Within BORROW_LEVELS levels;
        beyond that, none (better no word than "object")."""
        if self._borrowed is not None and self._borrowed[0] is vocab:
            return self._borrowed[1]
        # a hypernym is named by its words and the three above it: "vessel" alone is both a boat's
        # and a basin's, (vessel, watercraft, craft, vehicle) only a boat's
        def above(c: dict, i: int) -> tuple[str, ...]:
            return tuple(c["hypernyms"][i:i + 4])

        under: dict[tuple[str, ...], list[int]] = {}  # hypernym -> the classes under it
        for k, c in enumerate(self.classes):
            for i in range(len(c["hypernyms"])):
                under.setdefault(above(c, i), []).append(k)
        known = [[w for w in c["words"] if " " not in w and w in vocab.stoi] for c in self.classes]
        out = {}
        for c in self.classes:
            for w in (w for w in c["words"] if " " not in w and w not in vocab.stoi and w not in out):
                for i in range(min(BORROW_LEVELS, len(c["hypernyms"]))):
                    near = [v for k in under.get(above(c, i), ()) for v in known[k]]
                    if near:
                        out[w] = min(near, key=vocab.stoi.get)
                        break
        self._borrowed = (vocab, out)
        return out

    def unborrowed(self, vocab) -> dict[str, str]:
        """The other way: each form of a borrowed word, as a caption writes it, -> the vocabulary's
        word the search said ("zebras" -> "horses"), to read a caption back as the model's words."""
        return {own: theirs for w, source in self.borrowed(vocab).items()
                for own, theirs in zip(self.forms.get(w, [w]), self.forms.get(source, [source]))}

    def disagreement(self, caption: str, probs_row: torch.Tensor, confident: float = 0.5) -> dict | None:
        """When the caption names an animal the encoder gives almost no chance to (under NEAR_ZERO)
        while it is confident (>= `confident`) of something else: {"caption_says": "dog",
        "encoder_sees": "cat", "score": 0.96}. Else None."""
        scores = self.word_scores(probs_row[None])[0].cpu()
        top = int(scores.argmax())
        if float(scores[top]) < confident:
            return None
        for word in caption.split():
            singular = self._singular(word)
            if singular in self.animals and float(scores[self._word_index[singular]]) < NEAR_ZERO:
                return {"caption_says": word, "encoder_sees": self.words[top], "score": round(float(scores[top]), 3)}
        return None

    @functools.cached_property
    def _plural_of(self) -> dict[str, str]:
        return {forms[1]: w for w, forms in self.forms.items() if len(forms) > 1}

    def _singular(self, word: str) -> str:
        return word if word in self._word_index else self._plural_of.get(word, word)


def key_word(ids: set[int], vocab) -> str:
    """The word a set of caption-word ids ("cat", "cats") is known by in naming.json: its most
    frequent form in training (vocabularies list words by frequency)."""
    return vocab.itos[min(ids)]


def naming_of(tagger: Tagger, probs: torch.Tensor, captions: list[list[set[int]]], vocab,
              floor: float = NAMING_FLOOR) -> Naming:
    """How often training captions said their photos' tag words: probs (N, 1000) of N training
    photos, captions[i] the word ids of each reference caption of photo i -> naming.json's Naming."""
    photos: dict[str, int] = {}
    said: dict[str, float] = {}
    for sets, refs in zip(tagger.wanted(probs, vocab, floor, len(tagger.classes)), captions):
        for ids, _ in sets:
            if refs:
                word = key_word(ids, vocab)
                photos[word] = photos.get(word, 0) + 1
                said[word] = said.get(word, 0.0) + sum(bool(ids & r) for r in refs) / len(refs)
    total = sum(photos.values())
    return Naming({w: (photos[w], round(said[w], 4)) for w in sorted(photos)},
                  round(sum(said.values()) / total, 4) if total else 0.0, floor)


def pooled(feats: torch.Tensor) -> torch.Tensor:
    """What the decoder takes, (B, C) or (B, P, C) -> the classifier's input (B, C): the mean over
    positions, as the network's own global average pooling."""
    return feats.mean(dim=1) if feats.dim() == 3 else feats

