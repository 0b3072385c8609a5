"""`Decoding`: the settings of a search, one frozen, validated value (no torch, so the command line
can check its options before anything is loaded).

A model folder keeps its own in decoding.json (chosen on val at the end of training; like a
generation config beside a model's config); callers change it (`--beam-size` & co., the API's
arguments), and pass it to everything that captions (decode.caption_features). Each limit is
declared here once; the command line's option types and help, the model folder's checks and the
search all read it from here.

`Naming` is what a model folder's naming.json holds (how often its training captions said their
photos' tag words), which tag guidance reads beside `tag_named`: data of the folder, torch-free
like the settings.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from captioner.errors import ConfigError

MAX_BEAM = 100  # wider beams score no better and need memory in proportion (100,000 asked for 10 GB)
MAX_LENGTH_NORM = 10.0  # logprob / length**10 already ranks by length alone
MAX_WORDS = 1000  # the longest caption a search may be asked for
MAX_SPACE_RERANK = 100.0  # a cosine (-1 to 1) x 100 outweighs any score: the order is the space's alone
MAX_RARITY_PENALTY = 10.0  # a rarity (the mean log rank of the words, 0 to about 9) x 10 outweighs any score
MAX_TAG_WORDS = 3  # words one caption may be asked to say: the search keeps 2**3 sets of beams
NAMING_FLOOR = 0.3  # a tag counts for naming.json from this score (the guidance threshold it was chosen with)
NAMING_PRIOR = 5  # photos' worth of the average naming rate every word starts from (a word seen twice is not
                  # sure of anything)


@dataclass(frozen=True)
class Decoding:
    """How to decode: built once (from the model's config.json, with the user's changes) and passed
    to everything that captions. Every value is checked here, whoever builds it."""

    beam_size: int = 1  # 1 = greedy
    length_norm: float = 0.0  # rank finished beams by logprob / length**length_norm (0 = off)
    block_trigrams: bool = False  # never repeat a word trigram within a caption
    max_len: int = 20  # longest caption, in words
    # tag guidance (tags.py): the caption must say the words of the encoder's ImageNet tags that score
    # at least tag_threshold (0 = off), at most tag_words of them
    tag_threshold: float = 0.0
    tag_words: int = 2
    tag_borrow: bool = False  # a tag word the vocabulary lacks is said as the nearest word it has (tags.py)
    # ... and only the words the model's training captions said at least this often when the tag was
    # there (naming.json, `Naming` below; 0 = every word, as for a folder without it)
    tag_named: float = 0.0
    # order the search's alternatives by score + space_rerank x how well each matches the photo in the
    # model's search space (the cosine of their points, model/embedding.py); 0 = by score alone, as
    # for a model without a space
    space_rerank: float = 0.0
    # ... minus rarity_penalty x how rare each one's words are (Vocabulary.rarity: the mean log of their
    # rank in the vocabulary, most frequent first); 0 = off. The space, trained to tell photos apart,
    # favours the rare words that do; this holds it back to the words captions commonly say
    rarity_penalty: float = 0.0

    def __post_init__(self):
        for name in ("beam_size", "length_norm"):  # text is the command line's to convert, not a value's
            if isinstance(getattr(self, name), str):
                raise ConfigError(f"{name.replace('_', ' ')} must be a number, not {getattr(self, name)!r}")
        beam_size(self.beam_size)
        length_norm(self.length_norm)
        if type(self.block_trigrams) is not bool:
            raise ConfigError(f"blocking repeated trigrams is true or false, not {self.block_trigrams!r}")
        if type(self.max_len) is not int or not 1 <= self.max_len <= MAX_WORDS:
            raise ConfigError(f"the longest caption must be 1 to {MAX_WORDS} words, not {self.max_len!r}")
        tag_threshold(self.tag_threshold)
        tag_named(self.tag_named)
        space_rerank(self.space_rerank)
        rarity_penalty(self.rarity_penalty)
        if type(self.tag_borrow) is not bool:
            raise ConfigError(f"borrowing tag words is true or false, not {self.tag_borrow!r}")
        if type(self.tag_words) is not int or not 1 <= self.tag_words <= MAX_TAG_WORDS:
            raise ConfigError(f"tag words must be 1 to {MAX_TAG_WORDS}, not {self.tag_words!r}")

    @property
    def guided(self) -> bool:
        """Whether confident tags become words the caption must say."""
        return self.tag_threshold > 0

    @classmethod
    def from_json(cls, data: dict) -> Decoding:
        """A decoding from a dict that holds its fields (a row of choose_decoding, a saved result);
        other keys (scores) are ignored, missing ones take the defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def saved(self) -> dict:
        """What a model folder's decoding.json holds: all but the longest caption, which is the
        model's own (config.json's max_len: training left longer captions out). Tag guidance, the
        space's re-ranking and the rarity penalty only when on, so a folder from before them keeps
        its fingerprint (Captioner.fingerprint)."""
        skip = ({"max_len"} | (set() if self.guided else {"tag_threshold", "tag_words", "tag_borrow"})
                | (set() if self.tag_named and self.guided else {"tag_named"})  # saved only when it does something
                | (set() if self.space_rerank else {"space_rerank"})
                | (set() if self.rarity_penalty else {"rarity_penalty"}))
        return {k: v for k, v in self.to_json().items() if k not in skip}

    def changed(self, **changes) -> Decoding:
        """This decoding with each setting in `changes` that is not None replaced (the caller's
        options over the model's own)."""
        return self.replace(**{k: v for k, v in changes.items() if v is not None})

    def replace(self, **changes) -> Decoding:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """'greedy' or 'beam 3, length norm 1.0' (for logs and config notes)."""
        tags = (f", tag words >= {self.tag_threshold:g} (at most {self.tag_words}"
                + (f", said >= {self.tag_named:g} in training" if self.tag_named else "")
                + (", borrowed when missing)" if self.tag_borrow else ")")) if self.guided else ""
        if self.beam_size == 1:
            return "greedy" + tags
        return (f"beam {self.beam_size}, length norm {self.length_norm}"
                + (", no repeated trigrams" if self.block_trigrams else "") + tags
                + (f", re-ranked by the search space x {self.space_rerank:g}" if self.space_rerank else "")
                + (f", rare words x -{self.rarity_penalty:g}" if self.rarity_penalty else ""))


def beam_size(value) -> int:
    """`value` as a beam size (1 = greedy, at most MAX_BEAM), else a one-line ConfigError. Also the
    command line's type for --beam-size, so a bad one is refused before a model is loaded."""
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ConfigError(f"beam size must be a whole number, not {value!r}") from None
    if type(value) is not int or not 1 <= value <= MAX_BEAM:
        raise ConfigError(f"beam size must be 1 (greedy) to {MAX_BEAM}, not {value!r}")
    return value


def length_norm(value) -> float:
    """`value` as a length normalisation exponent (0 = off, at most MAX_LENGTH_NORM), else a one-line
    ConfigError (NaN and infinity included). Also the command line's type for --length-norm."""
    return _number(value, "length normalisation", "off", MAX_LENGTH_NORM)


def tag_threshold(value) -> float:
    """`value` as a tag guidance threshold (0 = off, up to 1), else a one-line ConfigError. Also the
    command line's type for --tag-threshold."""
    return _number(value, "tag threshold", "off", 1)


def tag_named(value) -> float:
    """`value` as the least naming rate of a tag word guidance asks for (0 = every word, up to 1),
    else a one-line ConfigError. Also the command line's type for --tag-named."""
    return _number(value, "tag naming rate", "every word", 1)


def space_rerank(value) -> float:
    """`value` as the weight of the search space's match in the order of the alternatives (0 = off,
    at most MAX_SPACE_RERANK), else a one-line ConfigError. Also the command line's type for
    --space-rerank."""
    return _number(value, "the space's re-ranking weight", "off", MAX_SPACE_RERANK)


def rarity_penalty(value) -> float:
    """`value` as the weight of how rare an alternative's words are, subtracted in the order of the
    alternatives (0 = off, at most MAX_RARITY_PENALTY), else a one-line ConfigError. Also the command
    line's type for --rarity-penalty."""
    return _number(value, "the rarity penalty", "off", MAX_RARITY_PENALTY)


def _number(value, name: str, zero: str, top: float) -> float:
    """`value` (a number or its text) as a number from 0 (`zero`) to `top`, else a one-line
    ConfigError (NaN and infinity included)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, not {value!r}") from None
    if type(value) not in (int, float) or not (math.isfinite(value) and 0 <= value <= top):
        raise ConfigError(f"{name} must be a number from 0 ({zero}) to {top:g}, not {value!r}")
    return float(value)


@dataclass(frozen=True)
class Naming:
    """How often a model's training captions said the words of their photos' tags (a model folder's
    naming.json, counted by tags.naming_of; tag guidance asks only for words said at least
    `Decoding.tag_named` of the time).

    words: word -> (photos tagged with it, at NAMING_FLOOR or above; the share of their reference
    captions that said it, summed over those photos). prior: that share over every tagged photo."""

    words: dict[str, tuple[int, float]]
    prior: float
    floor: float = NAMING_FLOOR

    def rate(self, word: str | None) -> float:
        """The share of captions that say `word` when its tag is there, pulled towards the prior by
        NAMING_PRIOR photos (a word no training photo carried, or None, has the prior)."""
        photos, said = self.words.get(word, (0, 0.0)) if word is not None else (0, 0.0)
        return (said + NAMING_PRIOR * self.prior) / (photos + NAMING_PRIOR)

    def to_json(self) -> dict:
        return {"floor": self.floor, "prior": self.prior, "words": {w: list(v) for w, v in self.words.items()}}

    @classmethod
    def from_json(cls, data: dict) -> Naming:
        """naming.json's content, checked (a ValueError says what is wrong)."""
        if not isinstance(data, dict) or not isinstance(data.get("words"), dict):
            raise ValueError("not an object with 'words'")
        numbers = [data.get("floor"), data.get("prior")]
        if not all(type(x) in (int, float) and math.isfinite(x) and 0 <= x <= 1 for x in numbers):
            raise ValueError(f"floor and prior must be numbers from 0 to 1, not {numbers}")
        words = {}
        for w, v in data["words"].items():
            if not (isinstance(v, list) and len(v) == 2 and type(v[0]) is int and type(v[1]) in (int, float)
                    and 0 <= v[1] <= v[0]):
                raise ValueError(f"{w!r} must be [photos, said], said from 0 to photos, not {v!r}")
            words[w] = (v[0], float(v[1]))
        return cls(words, float(data["prior"]), float(data["floor"]))
