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


def test_sharded_across_ranks_once_each_with_equal_steps():
    rng = random.Random(2)
    lengths = [rng.randint(3, 12) for _ in range(777)]
    for world in (2, 3, 4):
        for epoch in range(3):
            shards = []
            for rank in range(world):
                s = LengthBucketSampler(lengths, batch_size=32, seed=5, rank=rank, world=world)
                s.set_epoch(epoch)
                shards.append(list(s))
            assert len({len(b) for b in shards}) == 1  # the same number of steps on every rank
            assert len(shards[0]) == len(LengthBucketSampler(lengths, 32, seed=5, rank=0, world=world))
            flat = [i for shard in shards for b in shard for i in b]
            assert sorted(flat) == list(range(777))  # nothing lost, nothing twice
            assert all(len({lengths[i] for i in b}) == 1 for shard in shards for b in shard)


def test_accumulation_groups_are_the_batches_of_one_distributed_step():
    rng = random.Random(4)
    lengths = [rng.randint(3, 12) for _ in range(501)]
    one = LengthBucketSampler(lengths, batch_size=16, seed=5, accum=3)
    one.set_epoch(2)
    batches = list(one)
    assert len(batches) % 3 == 0 and len(batches) == len(one)
    assert sorted(i for b in batches for i in b) == list(range(501))
    ranks = []
    for rank in range(3):
        s = LengthBucketSampler(lengths, batch_size=16, seed=5, rank=rank, world=3)
        s.set_epoch(2)
        ranks.append(list(s))
    # step k of 3 processes uses the batches of step k of 1 process accumulating 3
    for k in range(len(batches) // 3):
        assert sorted(map(sorted, batches[3 * k:3 * k + 3])) == sorted(sorted(r[k]) for r in ranks)
    two = LengthBucketSampler(lengths, batch_size=16, seed=5, rank=1, world=2, accum=2)
    two.set_epoch(0)
    assert len(list(two)) % 2 == 0 and len(list(two)) == len(two)
