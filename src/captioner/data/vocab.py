"""Tokenizer and vocabulary, saved as JSON.

Tokenization is deliberately plain: Unicode-normalised (NFKC) and lowercased, keep runs of letters
and digits of any script (with inner apostrophes: "dog's", "l'été"), drop punctuation. Chinese and
Japanese, written without spaces, become one token per character. On ASCII text (Flickr8k, COCO)
this is exactly the tokenizer of earlier versions: the same vocabulary. Ids 0-3 are the special
tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana and Han characters
_WORD = re.compile(rf"[{CJK}]|[^\W_{CJK}]+(?:'[^\W\d_{CJK}]+)?")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'", "\u2018": "'"})


def tokenize(text: str) -> list[str]:
    """'A dog, running!' -> ['a', 'dog', 'running']; 'Un élève à Zürich' -> ['un', 'élève', 'à', 'zürich']"""
    return _WORD.findall(unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower())


_CJK_ONE = re.compile(rf"[{CJK}]")


def join_words(words: Iterable[str]) -> str:
    """Words -> text: spaces between words, none between two Chinese or Japanese characters (each
    is a token, see `tokenize`): ['a', 'dog'] -> 'a dog'; ['一', '只', '狗'] -> '一只狗'. Metrics
    split them again (metrics.py), so scores are unchanged."""
    out: list[str] = []
    for w in words:
        if out and not (_CJK_ONE.fullmatch(w) and _CJK_ONE.fullmatch(out[-1][-1])):
            out.append(" ")
        out.append(w)
    return "".join(out)


class Vocabulary:
    """Word <-> id mapping. ``pad=0, start=1, end=2, unk=3``."""

    def __init__(self, words: Iterable[str]):
        self.itos: list[str] = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.pad, self.start, self.end, self.unk = (self.stoi[t] for t in SPECIALS)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> Vocabulary:
        """Words seen at least `min_count` times, most frequent first (ties alphabetical)."""
        counts = Counter(w for c in captions for w in tokenize(c))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_words: int | None = None) -> list[int]:
        """Text -> ``[start, w1, ..., wn, end]`` (words beyond `max_words` cut)."""
        words = tokenize(text)[:max_words]
        return [self.start] + [self.stoi.get(w, self.unk) for w in words] + [self.end]

    def rarity(self, text: str) -> float:
        """How rare the words of `text` are: the mean of log(rank) over its words, rank 1 the
        vocabulary's most frequent word (`build` orders them so; Zipf's law makes the log rank a
        stand-in for the word's log frequency). A word the vocabulary lacks (a tag word borrowed in,
        tags.py) counts as one rarer than all it holds; no words: 0."""
        rare = len(self.itos) - len(SPECIALS) + 1
        ranks = [self.stoi[w] - len(SPECIALS) + 1 if self.stoi.get(w, 0) >= len(SPECIALS) else rare
                 for w in tokenize(text)]
        return sum(map(math.log, ranks)) / len(ranks) if ranks else 0.0

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, stopping at ``<end>`` and skipping ``<start>``/``<pad>``."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end:
                break
            if i in (self.start, self.pad):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return join_words(words)

    def to_json(self) -> dict:
        return {"itos": self.itos}

    def digest(self) -> str:
        """The words in their order, hashed: saved with a model's weights, whose rows follow that order,
        so that a vocab.json edited or swapped in from another model is caught at load."""
        return hashlib.sha256("\n".join(self.itos).encode("utf-8")).hexdigest()[:16]

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=0, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        itos = data.get("itos") if isinstance(data, dict) else None
        if not isinstance(itos, list) or not all(isinstance(w, str) for w in itos):
            raise ValueError(f"{path}: 'itos' must be a list of words")
        if itos[:4] != list(SPECIALS):
            raise ValueError(f"{path}: the first four words must be {SPECIALS}")
        if len(set(itos)) != len(itos):
            raise ValueError(f"{path}: a word is listed twice")
        return cls(itos[4:])
