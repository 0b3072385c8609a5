import random

from captioner.data.batching import LengthBucketSampler


def test_every_caption_once_and_equal_lengths():
    rng = random.Random(1)
    lengths = [rng.randint(3, 15) for _ in range(1000)]
    s = LengthBucketSampler(lengths, batch_size=16, seed=3)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(1000))
        assert all(len({lengths[i] for i in b}) == 1 for b in batches)
        assert all(1 <= len(b) <= 16 for b in batches)
        assert len(batches) == len(s)


def test_shuffled_per_epoch_and_repeatable():
    lengths = [5] * 100 + [7] * 100
    s = LengthBucketSampler(lengths, batch_size=10, seed=0)
    s.set_epoch(1)
    e1 = list(s)
    s.set_epoch(2)
    e2 = list(s)
    assert e1 != e2
    t = LengthBucketSampler(lengths, batch_size=10, seed=0)
    t.set_epoch(1)
    assert list(t) == e1


def test_no_shuffle_is_ordered():
    s = LengthBucketSampler([3, 4, 3, 4], batch_size=8, shuffle=False)
    assert list(s) == [[0, 2], [1, 3]]
