"""The COCO caption metrics on hand-made examples whose values are known."""

import pytest

from captioner.metrics import java_available, python_tokenize, score


def test_bleu_rouge_on_one_pair_by_hand():
    s = score({"x": ["a dog sits"]}, {"x": "a dog runs"}, meteor=False, use_java=False)
    # unigram precision 2/3, bigram 1/2, no brevity penalty; LCS 2 of 3 words both ways
    assert s["BLEU-1"] == pytest.approx(2 / 3, abs=1e-6)
    assert s["BLEU-2"] == pytest.approx((2 / 3 * 1 / 2) ** 0.5, abs=1e-6)
    assert s["BLEU-3"] < 1e-3  # no shared trigram
    assert s["ROUGE-L"] == pytest.approx(2 / 3, abs=1e-6)


def test_brevity_penalty():
    s = score({"x": ["a big brown dog runs"]}, {"x": "a big"}, meteor=False, use_java=False)
    import math
    assert s["BLEU-1"] == pytest.approx(math.exp(1 - 5 / 2), abs=1e-6)


def test_perfect_captions_score_cider_10_and_bleu_1():
    refs = {1: ["a red car on the road"] * 2, 2: ["two dogs play in snow"] * 2, 3: ["a man riding waves"] * 2}
    hyps = {k: v[0] for k, v in refs.items()}
    s = score(refs, hyps, meteor=False, use_java=False)
    assert s["CIDEr"] == pytest.approx(10.0, rel=1e-6)
    # a 3-word caption has no 4-grams: its CIDEr-D is (1 + 1 + 1 + 0) / 4 * 10 = 7.5
    short = score(refs | {3: ["man riding waves"] * 2}, hyps | {3: "man riding waves"}, meteor=False,
                  use_java=False)
    assert short["CIDEr"] == pytest.approx((10 + 10 + 7.5) / 3, rel=1e-6)
    assert s["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert s["ROUGE-L"] == pytest.approx(1.0, abs=1e-6)
    worse = score(refs, {1: "a red car", 2: "two cats play in snow", 3: "a man"}, meteor=False, use_java=False)
    assert 0 < worse["CIDEr"] < 10 and worse["BLEU-4"] < 1


def test_without_java_meteor_is_reported_skipped():
    s = score({"x": ["a dog"]}, {"x": "a dog"}, use_java=False)
    assert s["METEOR"] is None
    assert "Java" in s["meteor_skipped"]
    assert s["tokenizer"].startswith("python")


def test_empty_hypothesis_scores_zero_not_crash():
    s = score({"x": ["a dog runs"], "y": ["a cat"]}, {"x": "", "y": "a cat"}, meteor=False, use_java=False)
    assert 0 <= s["BLEU-1"] < 1


def test_python_tokenizer_drops_punctuation_and_splits_clitics():
    assert python_tokenize("A dog's ball, (red)!") == "a dog 's ball -lrb- red -rrb-"
    assert python_tokenize("The man isn't on a T-shirt.") == "the man is n't on a t-shirt"


@pytest.mark.slow
@pytest.mark.skipif(not java_available(), reason="METEOR and the PTB tokenizer need Java")
def test_meteor_and_ptb_with_java():
    refs = {1: ["A dog runs on the grass."], 2: ["Two children play in the snow ."]}
    same = score(refs, {1: "a dog runs on the grass", 2: "two children play in the snow"})
    other = score(refs, {1: "a cat sleeps", 2: "a man"})
    assert same["tokenizer"].startswith("ptb")
    assert same["METEOR"] > 0.9 and other["METEOR"] < 0.3
    assert same["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.skipif(not java_available(), reason="the PTB tokenizer needs Java")
def test_python_tokenizer_agrees_with_ptb():
    from captioner.metrics import tokenize_all

    sentences = ["A dog's ball, (red)!", "The man isn't on a T-shirt in 3.5 U.S. cities...",
                 "Two kids -- one in red -- play; a third watches.", "A black-and-white dog jumps over a log .",
                 "Someone's \"bike\" leans on a wall", "a girl in a pink dress is climbing up a set of stairs"]
    ptb = tokenize_all({i: [c] for i, c in enumerate(sentences)}, use_java=True)
    for i, c in enumerate(sentences):
        assert python_tokenize(c) == ptb[i][0], c
