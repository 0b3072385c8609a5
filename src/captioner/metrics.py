"""The standard COCO caption metrics, computed by pycocoevalcap, with Java optional.

With Java: Stanford PTB tokenizer, BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D, exactly as the COCO
caption evaluation server. Without Java: a pure-Python PTB-like tokenizer, BLEU/ROUGE-L/CIDEr-D,
and METEOR reported as skipped with the reason. SPICE is not offered: it downloads models at run
time (Stanford CoreNLP), which an offline machine cannot do.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

from captioner.data.vocab import CJK
from captioner.errors import DataError

KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
# pycocoevalcap drops these tokens after PTB tokenization (brackets come out as -lrb- and stay).
_PUNCT = {"''", "'", '"', "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CJK_CHAR = re.compile(f"([{CJK}])")
_PY_TOKEN = re.compile(r"n't|'s|'re|'ve|'ll|'d|'m|[a-z0-9]+(?:\.[a-z0-9]+)+\.?|[a-z0-9]+(?:[-/][a-z0-9]+)*|\S")


def java_available() -> bool:
    return shutil.which("java") is not None


def python_tokenize(text: str) -> str:
    """A Java-free stand-in for the PTB tokenizer as pycocoevalcap runs it: lowercase, clitics
    split off ("is n't", "dog 's"), brackets as -lrb-/-rrb-, punctuation dropped."""
    text = re.sub(r"n't\b", " n't", text.lower().replace("\n", " "))
    toks = (_BRACKETS.get(t, t) for t in _PY_TOKEN.findall(text))
    return " ".join(t for t in toks if t not in _PUNCT)


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """Stanford PTBTokenizer (the jar pycocoevalcap ships), as the COCO evaluation runs it.

    pycocoevalcap's own wrapper writes its temporary file into its package folder (which fails
    on a read-only install) and lets Java print to the terminal; this calls the same jar with the
    same options from a temporary folder of our own.
    """
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    jar = Path(ptb.__file__).parent / ptb.STANFORD_CORENLP_3_4_1_JAR
    # One sentence per line; an empty line would be dropped and shift every later caption.
    text = "\n".join(" ".join(s.split()) or "." for s in sentences)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sentences.txt").write_text(text, encoding="utf-8")
        out = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                              "-preserveLines", "-lowerCase", "sentences.txt"], cwd=tmp,
                             capture_output=True, check=True).stdout.decode("utf-8")
    lines = out.split("\n")[: len(sentences)]
    if len(lines) != len(sentences):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(sentences)} sentences")
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in _PUNCT) for line in lines]


def _space_cjk(text: str) -> str:
    """Chinese and Japanese are written without spaces: one token a character, as the vocabulary
    splits them (see data/vocab.py), so references and captions are scored alike. A no-op on
    other scripts."""
    return _CJK_CHAR.sub(r" \1 ", text)


def tokenize_all(captions: Mapping[Hashable, Sequence[str]], use_java: bool) -> dict:
    """{id: [caption, ...]} -> {id: [tokenized caption, ...]} with PTB (Java) or the Python stand-in."""
    captions = {k: [_space_cjk(c) for c in v] for k, v in captions.items()}
    if not use_java:
        return {k: [python_tokenize(c) for c in v] for k, v in captions.items()}
    flat = ptb_tokenize([c for v in captions.values() for c in v])
    out, i = {}, 0
    for k, v in captions.items():
        out[k] = flat[i:i + len(v)]
        i += len(v)
    return out


class Scorer:
    """Scores captions against fixed references, which are tokenized once (validation scores the
    same val references every epoch)."""

    def __init__(self, references: Mapping[Hashable, Sequence[str]], use_java: bool | None = None):
        empty = [k for k, v in references.items() if not v]
        if empty:
            raise DataError(f"{len(empty)} images have no reference captions (first: {empty[0]})")
        self.java = java_available() if use_java is None else use_java
        self.tokenizer = "ptb (java)" if self.java else "python (no java)"
        self.refs = tokenize_all({k: list(v) for k, v in references.items()}, self.java)

    def __call__(self, hypotheses: Mapping[Hashable, str], meteor: bool = True, per_image: bool = False) -> dict:
        """Score one caption per image. Returns the keys of `KEYS` (METEOR is None when skipped),
        ``tokenizer`` and, when METEOR was skipped, ``meteor_skipped`` with the reason. With
        `per_image`, also ``CIDEr_per_image``: each caption's CIDEr-D in the order of `hypotheses`
        (their mean is CIDEr), what a paired comparison of two decodings on the same images needs."""
        missing = [k for k in hypotheses if k not in self.refs]
        if missing:
            raise DataError(f"{len(missing)} images have no reference captions (first: {missing[0]})")
        refs = {k: self.refs[k] for k in hypotheses}
        hyps = tokenize_all({k: [v] for k, v in hypotheses.items()}, self.java)
        # pycocoevalcap asserts a non-empty hypothesis; an empty caption scores as one unknown word.
        hyps = {k: [v[0] if v[0].strip() else "<empty>"] for k, v in hyps.items()}

        # Imported here, not at the top: training steps and captioning import this module (for the
        # Scorer type) and must not need pycocoevalcap, whose Java jars make it 100 MB.
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        out: dict = {"tokenizer": self.tokenizer}
        bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
        for n in range(4):
            out[f"BLEU-{n + 1}"] = float(bleu[n])
        out["METEOR"] = None
        if meteor and self.java:
            try:
                from pycocoevalcap.meteor.meteor import Meteor

                out["METEOR"] = float(Meteor().compute_score(refs, hyps)[0])
            except Exception as e:  # the Java process failed to start or died
                out["meteor_skipped"] = f"METEOR failed to run ({type(e).__name__}: {e})"
        elif meteor:
            out["meteor_skipped"] = "METEOR needs Java (the 'java' command was not found); install a JRE to get it"
        else:
            out["meteor_skipped"] = "not requested"
        out["ROUGE-L"] = float(Rouge().compute_score(refs, hyps)[0])
        cider, each = Cider().compute_score(refs, hyps)
        out["CIDEr"] = float(cider)
        if per_image:
            out["CIDEr_per_image"] = [float(x) for x in each]
        return out


def score(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str],
          meteor: bool = True, use_java: bool | None = None) -> dict:
    """Score one hypothesis per image against all of that image's references (see `Scorer`)."""
    missing = [k for k in hypotheses if not references.get(k)]
    if missing:
        raise DataError(f"{len(missing)} images have no reference captions (first: {missing[0]})")
    return Scorer({k: references[k] for k in hypotheses}, use_java)(hypotheses, meteor)


def format_scores(s: Mapping) -> str:
    parts = [f"{k} {s[k]:.3f}" for k in KEYS if s.get(k) is not None]
    if s.get("METEOR") is None and s.get("meteor_skipped") and s["meteor_skipped"] != "not requested":
        parts.append(f"(METEOR skipped: {s['meteor_skipped']})")
    return "  ".join(parts)
