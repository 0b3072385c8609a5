"""Build src/captioner/assets/imagenet_words.json: each ImageNet class as the words people use.

    apt-get install wordnet-base          # WordNet 3.0 (Debian), about 30 MB; not shipped
    python scripts/imagenet_words.py      # reads /usr/share/wordnet and timm's class ids

ImageNet's class ids are WordNet 3.0 noun offsets (timm ships them in the classifier's order,
data/_info/imagenet_synsets.txt). For every class the table holds:

  name       the class's first lemma ("Egyptian cat")
  words      the words a caption or a person would use for it, most specific first: the class's own
             one-word lemmas ("espresso"), then the first familiar word up its hypernym chain
             ("coffee"), if any within four levels. "Familiar" means the sense is tagged at least
             FAMILIAR times in SemCor (WordNet's cntlist): "cat" (18) is, "tabby" is not; a word
             SemCor tags more often as a verb ("stand") is left out, since a caption would say the
             verb, and so is one of another lexicographer file than the class's (an artifact's
             word is an artifact).
  hypernyms  every lemma on the chain above it, up to "entity", for search: "animal" finds the cat.

and "forms": each word's plural ("cat": ["cat", "cats"]; noun.exc's irregular ones, "mouse":
["mouse", "mice"]), so a caption or a query in either form matches. Classes without a familiar
word keep their own name alone; `words` is never empty.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import timm

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "captioner" / "assets" / "imagenet_words.json"
FAMILIAR = 1  # SemCor tags of a sense for its word to count as one people use (SemCor is small)
BASIC = 10  # tags for a word above to be added as well, as the everyday one ("terrier" -> also "dog")
LEVELS = 4  # hypernym levels searched for a familiar word
# words too general to tell anyone what is in a photo (still in `hypernyms`, for search)
ABSTRACT = {"entity", "physical entity", "object", "whole", "thing", "unit", "artifact", "artefact", "organism",
            "being", "living thing", "animate thing", "matter", "substance", "instrumentality", "instrumentation",
            "device", "structure", "construction", "covering", "commodity", "merchandise", "material", "stuff",
            "food", "nutrient", "abstraction", "group", "part", "portion", "equipment", "implement", "container",
            "system", "form", "shape", "creation", "product", "article", "causal agent", "cause", "agent",
            "placental", "chordate", "vertebrate", "craniate", "invertebrate", "mechanism", "mechanical device",
            "solid", "fluid", "liquid", "way", "conveyance", "transport", "vehicle", "protective covering",
            "geological formation", "formation", "natural object", "plant part", "plant organ", "organ",
            "reproductive structure", "body part", "person", "individual", "someone", "somebody", "mortal", "soul",
            "adult", "produce", "instrument", "transducer", "claw", "signal", "signaling"}


VERBS: set[str] = set()  # words used more as verbs than as nouns ("stand"): never a class's everyday word


def read_wordnet(folder: Path) -> tuple[dict, dict, dict]:
    """data.noun -> ({offset: (lemmas, hypernym offsets)}, {(lemma, lexfile, lex_id): offset},
    cntlist -> {(lemma, lexfile, lex_id): count})."""
    synsets, senses = {}, {}
    for line in (folder / "data.noun").read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):
            continue  # the licence at the top
        f = line.split(" | ")[0].split()
        offset, lexfile, n = f[0], f[1], int(f[3], 16)
        lemmas = []
        for k in range(n):
            word, lex_id = f[4 + 2 * k], f[5 + 2 * k]
            word = re.sub(r"\(.*\)$", "", word)  # adjective markers such as (a) are not part of it
            lemmas.append(word.replace("_", " "))
            senses[(word.lower(), lexfile, int(lex_id, 16))] = offset
        p = 4 + 2 * n
        hypernyms = [f[p + 1 + 4 * j + 1] for j in range(int(f[p])) if f[p + 1 + 4 * j] in ("@", "@i")]
        synsets[offset] = (lemmas, hypernyms, lexfile)
    counts, as_verb, as_noun = {}, {}, {}
    for line in (folder / "cntlist.rev").read_text(encoding="utf-8").splitlines():
        key, _, count = line.split()
        lemma, rest = key.split("%", 1)
        ss_type, lexfile, lex_id = rest.split(":")[:3]
        if ss_type == "1":
            counts[(lemma, lexfile, int(lex_id))] = int(count)
            as_noun[lemma] = as_noun.get(lemma, 0) + int(count)
        elif ss_type == "2":
            as_verb[lemma] = as_verb.get(lemma, 0) + int(count)
    VERBS.update(w.replace("_", " ") for w, n in as_verb.items() if n > as_noun.get(w, 0))
    familiar = {}  # offset -> {lemma: count}
    for (lemma, lexfile, lex_id), offset in senses.items():
        familiar.setdefault(offset, {})[lemma.replace("_", " ")] = counts.get((lemma, lexfile, lex_id), 0)
    return synsets, familiar, read_exceptions(folder)


def read_exceptions(folder: Path) -> dict[str, str]:
    """noun.exc: irregular plural -> singular, as {singular: plural} (the first plural of each)."""
    out = {}
    for line in (folder / "noun.exc").read_text(encoding="utf-8").splitlines():
        plural, singular = line.split()[:2]
        out.setdefault(singular.replace("_", " "), plural.replace("_", " "))
    return out


def plural(word: str, irregular: dict[str, str]) -> str:
    head, _, last = word.rpartition(" ")
    if last in irregular:
        p = irregular[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        p = last + "es"
    elif re.search(r"[^aeiou]y$", last):
        p = last[:-1] + "ies"
    else:
        p = last + "s"
    return f"{head} {p}" if head else p


def chain(offset: str, synsets: dict) -> list[str]:
    """The synsets above `offset` along first hypernyms, nearest first, up to the root."""
    out, seen = [], {offset}
    while synsets[offset][1]:
        offset = synsets[offset][1][0]
        if offset in seen:
            raise ValueError(f"hypernym cycle at {offset}")
        seen.add(offset)
        out.append(offset)
    return out


def all_above(offset: str, synsets: dict) -> list[str]:
    """Every synset above `offset` along every hypernym (WordNet has a few with two), nearest first."""
    out, frontier, seen = [], [offset], {offset}
    while frontier:
        nxt = []
        for o in frontier:
            for h in synsets[o][1]:
                if h not in seen:
                    seen.add(h)
                    out.append(h)
                    nxt.append(h)
        frontier = nxt
    return out


def class_entry(wnid: str, synsets: dict, familiar: dict) -> dict:
    offset = wnid[1:]
    lemmas = synsets[offset][0]
    name = lemmas[0].lower()
    # animals are named by nouns in captions even when the word is also a verb ("bear")
    unwanted = ABSTRACT | (VERBS if synsets[offset][2] != "05" else set())
    words = [name] + [w.lower() for w, c in familiar.get(offset, {}).items()
                      if c >= FAMILIAR and " " not in w and w.lower() not in unwanted]
    known = []  # (level, count, word) of the familiar one-word lemmas above, within LEVELS
    for level, o in enumerate(chain(offset, synsets)[:LEVELS]):
        if synsets[o][2] != synsets[offset][2]:
            continue  # another kind of thing (lexicographer file): traffic light (artifact) -> communication
        known += [(level, c, w.lower()) for w, c in familiar.get(o, {}).items()
                  if c >= FAMILIAR and " " not in w and w.lower() not in unwanted]
    if known:
        nearest = min(k[0] for k in known)
        words.append(max((c, w) for lv, c, w in known if lv == nearest)[1])  # the nearest familiar word
        basic = max(known, key=lambda k: k[1])  # and the most familiar one, when common
        if basic[1] >= BASIC:
            words.append(basic[2])
    hypernyms = [w.lower() for o in all_above(offset, synsets) for w in synsets[o][0]]
    words = list(dict.fromkeys(words))
    return {"id": wnid, "name": lemmas[0], "words": words,
            "hypernyms": list(dict.fromkeys(h for h in hypernyms if h not in words))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"), help="WordNet 3.0's dict folder")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    synsets, familiar, irregular = read_wordnet(args.wordnet)
    ids = (Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt").read_text().split()
    assert len(ids) == 1000, f"expected 1000 ImageNet classes, got {len(ids)}"
    classes = [class_entry(wnid, synsets, familiar) for wnid in ids]
    words = sorted({w for c in classes for w in c["words"] + c["hypernyms"]})
    table = {"source": "WordNet 3.0 (Princeton University; WordNet licence) via scripts/imagenet_words.py; "
                       "ImageNet class order as timm's data/_info/imagenet_synsets.txt",
             "classes": classes, "forms": {w: [w, plural(w, irregular)] for w in words}}
    args.out.write_text(json.dumps(table, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(classes)} classes, {len(words)} words, {args.out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
