"""The vocabulary: words of any script, ids, and text again."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import TINY

from captioner.cli import main
from captioner.data.vocab import SPECIALS, Vocabulary, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Dog, running!  It's 2 dogs.") == ["a", "dog", "running", "it's", "2", "dogs"]


def test_build_min_count_and_specials_first():
    v = Vocabulary.build(["a dog runs", "a dog sits", "a cat"], min_count=2)
    assert v.itos[:4] == list(SPECIALS)
    assert v.itos[4:] == ["a", "dog"]  # most frequent first
    assert (v.pad, v.start, v.end, v.unk) == (0, 1, 2, 3)


def test_encode_decode_round_trip(tmp_path):
    v = Vocabulary.build(["a dog runs on the grass", "a dog runs"], min_count=1)
    ids = v.encode("A dog runs on the grass.")
    assert ids[0] == v.start and ids[-1] == v.end
    assert v.decode(ids) == "a dog runs on the grass"
    assert v.decode(v.encode("a zebra runs")) == "a <unk> runs"
    v.save(tmp_path / "vocab.json")
    w = Vocabulary.load(tmp_path / "vocab.json")
    assert w.itos == v.itos
    assert w.encode("a dog runs") == v.encode("a dog runs")


def test_decode_stops_at_end_and_skips_pad():
    v = Vocabulary(["a", "dog"])
    assert v.decode([v.start, 4, 5, v.end, 4, 4]) == "a dog"
    assert v.decode([4, v.pad, 5]) == "a dog"


def test_rarity_is_the_mean_log_rank_of_the_words_by_hand():
    """Vocabulary.rarity: rank 1 is the most frequent word (build's order), a word it lacks is one
    rarer than the rarest it holds, the specials are words it lacks, no words is 0."""
    import math

    v = Vocabulary.build(["a dog", "a dog", "a cat"], min_count=1)  # a: 3, dog: 2, cat: 1
    assert v.itos[4:] == ["a", "dog", "cat"]
    assert v.rarity("a") == 0.0  # log 1
    assert v.rarity("A cat!") == pytest.approx((math.log(1) + math.log(3)) / 2)
    assert v.rarity("a zebra") == pytest.approx(math.log(4) / 2)  # zebra: rank 4
    assert v.rarity("<unk>") == pytest.approx(math.log(4))
    assert v.rarity("") == 0.0
    assert v.rarity("a dog") < v.rarity("a cat")


def test_encode_cuts_long_captions():
    v = Vocabulary(["a", "b"])
    assert len(v.encode("a b a b a b", max_words=3)) == 5


@pytest.mark.slow
def test_a_model_trained_on_chinese_captions_writes_chinese_without_spaces(shapes, tmp_path, capsys):
    """Issue 30, item 8: a model trained on Chinese captions printed "一 只 狗" (the characters the
    tokenizer splits, joined back with spaces). Trained on the shapes with Chinese captions, it
    writes them as Chinese is written; its words are still the characters."""
    from captioner.data.vocab import join_words

    assert join_words(tokenize("一只狗在草地上跑")) == "一只狗在草地上跑"
    assert join_words(tokenize("犬が dog と走る")) == "犬が dog と走る" and join_words(["a", "dog"]) == "a dog"
    colour = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"}
    shape = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
    rows = []
    for line in shapes.read_text().splitlines():
        row = json.loads(line)
        c, s, b = Path(row["image"]).stem.split("_")[:3]
        row["image"] = str(shapes.parent / row["image"])
        row["captions"] = [f"{colour[b]}背景上有一个{colour[c]}的{shape[s]}", f"一个{colour[c]}{shape[s]}",
                           f"{colour[b]}的背景上画着{colour[c]}{shape[s]}"]
        rows.append(json.dumps(row, ensure_ascii=False))
    data = tmp_path / "captions_zh.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--epochs", "8", "--space-epochs", "0", *TINY]) == 0
    capsys.readouterr()
    photo = shapes.parent / json.loads(rows[0])["image"]
    assert main(["caption", str(photo), "--model", str(out / "best"), "--quiet"]) == 0
    caption = capsys.readouterr().out.strip().split("\t")[-1]
    han = "[\u4e00-\u9fff]"
    assert re.search(han * 2, caption) and not re.search(f"{han} {han}", caption), caption
