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


def test_encode_cuts_long_captions():
    v = Vocabulary(["a", "b"])
    assert len(v.encode("a b a b a b", max_words=3)) == 5
