"""Greedy and beam search: exactness on a tiny Markov model, beam 1 == greedy, batching, no <end>."""

import itertools
import math

import pytest
import torch

from captioner.decode import beam_search, greedy
from captioner.inference.plan import InferencePlan
from captioner.model.show_tell import ShowTellDecoder

FP32_CPU = InferencePlan(torch.device("cpu"), "fp32")  # how these tests run the model

BOS, EOS = 1, 2


class Markov:
    """A decoder whose next-word distribution depends only on the last word (and the image row)."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # (B, V, V) logits of the next word given the last one, per image

    def start(self, feats):
        return torch.arange(feats.shape[0])  # state = image row

    def step(self, tokens, rows):
        return self.table[rows, tokens], rows

    @staticmethod
    def select(rows, index):
        return rows[index]

    @staticmethod
    def keep_images(rows, images, k):
        return rows.view(-1, k)[images].view(-1)


def exhaustive_best(table_b: torch.Tensor, max_len: int, length_norm: float = 0.0, sets=()):
    """Best caption of one image by enumerating every word sequence (words = ids >= 3); with
    `sets`, the best of those that say a word of every set (constrained search's answer)."""
    logp = table_b.log_softmax(-1)
    V = table_b.shape[0]
    best, best_score = None, -float("inf")
    for n in range(max_len + 1):
        for words in itertools.product(range(3, V), repeat=n):
            if not all(any(w in s for w in words) for s in sets):
                continue
            seq = [BOS, *words, EOS]
            lp = sum(float(logp[a, b]) for a, b in zip(seq, seq[1:]))
            s = lp / (n + 1) ** length_norm if length_norm else lp
            if s > best_score:
                best, best_score = list(words), s
    return best


@pytest.mark.parametrize("length_norm", [0.0, 1.0])
def test_wide_beam_finds_the_exhaustive_best(length_norm):
    g = torch.Generator().manual_seed(0)
    B, V, L = 3, 6, 3
    table = torch.randn(B, V, V, generator=g) * 2
    table[:, :, 0] = table[:, :, BOS] = -1e4  # never <pad>/<start>
    hyp = beam_search(Markov(table), torch.zeros(B, 1), BOS, EOS, L, beam_size=(V - 3) ** L + 1,
                      length_norm=length_norm)
    for b in range(B):
        words = [t for t in hyp.tokens[b, 0].tolist() if t != EOS]
        assert words == exhaustive_best(table[b], L, length_norm)


def test_beam_1_is_exactly_greedy():
    torch.manual_seed(0)
    dec = ShowTellDecoder(vocab_size=30, feat_dim=16, embed_dim=8, hidden_dim=16).eval()
    feats = torch.randn(7, 16)
    g = greedy(dec, feats, BOS, EOS, max_len=12)
    b = beam_search(dec, feats, BOS, EOS, max_len=12, beam_size=1)
    assert torch.equal(g.tokens[:, 0], b.tokens[:, 0])
    assert torch.allclose(g.logprob, b.logprob)


def test_batched_beam_equals_one_image_at_a_time():
    torch.manual_seed(1)
    dec = ShowTellDecoder(vocab_size=40, feat_dim=16, embed_dim=8, hidden_dim=16).eval()
    feats = torch.randn(5, 16)
    batched = beam_search(dec, feats, BOS, EOS, max_len=10, beam_size=4, length_norm=0.7)
    for i in range(5):
        one = beam_search(dec, feats[i:i + 1], BOS, EOS, max_len=10, beam_size=4, length_norm=0.7)
        assert torch.equal(one.tokens[0], batched.tokens[i])
        assert torch.allclose(one.score[0], batched.score[i], atol=1e-5)


def test_no_end_ever_still_returns_captions():
    B, V, L = 2, 8, 5
    table = torch.zeros(B, V, V)
    table[:, :, EOS] = -1e9  # the model never wants to stop
    for search in (lambda m, f: greedy(m, f, BOS, EOS, L),
                   lambda m, f: beam_search(m, f, BOS, EOS, L, beam_size=3)):
        hyp = search(Markov(table), torch.zeros(B, 1))
        assert hyp.tokens.shape[-1] == L + 1
        assert (hyp.tokens[:, 0, :L] != EOS).all() and (hyp.tokens[:, 0, L] == EOS).all()
        assert torch.isfinite(hyp.logprob[:, 0]).all()


def test_alternatives_are_sorted_and_distinct():
    torch.manual_seed(2)
    dec = ShowTellDecoder(vocab_size=25, feat_dim=8, embed_dim=8, hidden_dim=16).eval()
    hyp = beam_search(dec, torch.randn(3, 8), BOS, EOS, max_len=8, beam_size=5)
    assert (hyp.score[:, :-1] >= hyp.score[:, 1:]).all()
    for b in range(3):
        rows = {tuple(r) for r in hyp.tokens[b].tolist()}
        assert len(rows) == 5


def test_banned_words_and_trigram_blocking():
    B, V, L = 1, 6, 12
    table = torch.full((B, V, V), -5.0)
    table[0, :, 3] = 5.0  # "3" is always the most likely word
    table[0, 3, 4] = 4.9
    table[0, 4, 3] = 4.9
    hyp = greedy(Markov(table), torch.zeros(B, 1), BOS, EOS, L, banned=[3])
    assert 3 not in hyp.tokens[0, 0].tolist()
    hyp = beam_search(Markov(table), torch.zeros(B, 1), BOS, EOS, L, beam_size=2, block_trigrams=True)
    words = [t for t in hyp.tokens[0, 0].tolist() if t != EOS]
    trigrams = list(zip(words, words[1:], words[2:]))
    assert len(trigrams) == len(set(trigrams))


def test_trigram_blocking_bans_exactly_the_words_that_would_repeat_a_trigram():
    """Checked against a plain loop, on rows where a word both would and would not repeat a
    trigram (the scatter that does it without asking the device how many matches there are must
    let a ban win)."""
    from captioner.decode import _block_repeated_trigrams

    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 4, (200, 9), generator=g)  # 4 words: many repeats
    logp = torch.randn(200, 6, generator=g)
    want = logp.clone()
    for n, row in enumerate(seqs.tolist()):
        for j in range(len(row) - 2):
            if row[j:j + 2] == row[-2:]:
                want[n, row[j + 2]] = float("-inf")
    _block_repeated_trigrams(logp, seqs)
    assert torch.equal(logp, want) and torch.isinf(want).any() and torch.isfinite(want[:, :4]).any()


def test_banned_words_are_removed_before_normalising():
    """The distribution over allowed words sums to 1 even when the model prefers a banned word (else
    self-critical training pushes mass onto the banned word until sampling breaks down)."""
    from captioner.decode import log_probs

    logits = torch.zeros(2, 6)
    logits[:, 3] = 60.0  # the model is sure of the banned word
    logp = log_probs(logits, banned=[3])
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2))
    assert logp[0, 3] == float("-inf") and torch.allclose(logp[0, [0, 1, 2, 4, 5]], torch.full((5,), -math.log(5)))
    logits.requires_grad_(True)
    log_probs(logits, banned=[3])[:, 4].sum().backward()
    assert (logits.grad[:, 3] == 0).all()  # the banned word's logit is never pushed


def test_alternatives_carry_the_score_they_are_ranked_by():
    from captioner.data.vocab import Vocabulary
    from captioner.decode import caption_features
    from captioner.decoding import Decoding

    class Model(Markov):
        def eval(self):
            return self

    vocab = Vocabulary.build(["a b c d e"], min_count=1)  # ids 1 and 2 are <start> and <end>, as BOS, EOS
    torch.manual_seed(0)
    out = caption_features(Model(torch.randn(4, len(vocab), len(vocab)) * 2), vocab, torch.zeros(4, 1),
                           Decoding(beam_size=4, length_norm=1.0, max_len=6), FP32_CPU)
    out_of_logprob_order = 0
    for r in out:
        alts = r["alternatives"]
        assert r["caption"] == alts[0]["caption"] and r["score"] == alts[0]["score"]
        assert [a["score"] for a in alts] == sorted((a["score"] for a in alts), reverse=True)
        for a in alts:  # score = logprob / length, length counting <end>
            assert a["score"] == pytest.approx(a["logprob"] / (len(a["caption"].split()) + 1), abs=1e-3)
        out_of_logprob_order += [a["logprob"] for a in alts] != sorted((a["logprob"] for a in alts), reverse=True)
    assert out_of_logprob_order  # why the score is shown: with length norm, logprob order differs


def test_pad_and_start_are_never_said():
    from captioner.data.vocab import Vocabulary
    from captioner.decode import search
    from captioner.decoding import Decoding

    vocab = Vocabulary.build(["a b c"], min_count=1)
    table = torch.zeros(1, len(vocab), len(vocab))
    table[0, :, [vocab.pad, vocab.start, vocab.unk]] = 5.0  # the model prefers the non-words
    for beam in (1, 3):
        hyp = search(Markov(table), torch.zeros(1, 1), vocab, Decoding(beam_size=beam, max_len=4))
        words = set(hyp.tokens.flatten().tolist())
        assert not words & {vocab.pad, vocab.start, vocab.unk}


@pytest.mark.parametrize("every", [2, 4, 100])
@pytest.mark.parametrize("end_bias, rows", [(1.0, [0, 1, 2, 3, 4, 5]), (2.0, [0, 2, 3, 4, 5]),
                                            (2.5, [0, 1, 2, 3, 4, 5])])
def test_asking_the_device_less_often_gives_the_same_captions(every, end_bias, rows):
    """On a GPU the searches ask whether every caption has ended only every few steps, and beam search
    merges finished candidates without asking whether there are any (InferencePlan.check_every):
    the same captions, log-probabilities and scores as asking at every step. The tables make some
    captions end early and some run to the limit, or all end early (so the early stop is hit)."""
    g = torch.Generator().manual_seed(5)
    table = torch.randn(6, 12, 12, generator=g)[rows] * 2
    table[:, :, 0] = table[:, :, BOS] = -1e4
    table[:, :, EOS] += end_bias
    m, feats = Markov(table), torch.zeros(len(rows), 1)
    a, b = greedy(m, feats, BOS, EOS, 9), greedy(m, feats, BOS, EOS, 9, check_every=every)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprob, b.logprob)
    for beam, norm, block in [(3, 0.0, False), (5, 1.5, True)]:
        a = beam_search(m, feats, BOS, EOS, 9, beam, norm, block)
        b = beam_search(m, feats, BOS, EOS, 9, beam, norm, block, check_every=every)
        kept = torch.isfinite(a.score)
        assert torch.equal(kept, torch.isfinite(b.score))
        assert torch.equal(a.tokens[kept], b.tokens[kept])
        assert torch.equal(a.logprob[kept], b.logprob[kept]) and torch.equal(a.score[kept], b.score[kept])


class Counting(Markov):
    """Markov, recording how many rows each step computes."""

    def __init__(self, table):
        super().__init__(table)
        self.rows = []

    def step(self, tokens, rows):
        self.rows.append(len(tokens))
        return super().step(tokens, rows)


@pytest.mark.parametrize("every", [1, 4])
def test_ended_captions_leave_the_batch_and_change_nothing(every):
    """Images whose search has ended leave the batch (decoder.keep_images): the later steps compute
    fewer rows, and every image gets exactly what it gets searched alone, in its own place."""
    g = torch.Generator().manual_seed(7)
    B = 6
    table = torch.randn(B, 12, 12, generator=g) * 2
    table[:, :, 0] = table[:, :, BOS] = -1e4
    table[:, :, EOS] += torch.tensor([4.0, -3.0, 2.0, -9.0, 1.0, 3.0])[:, None]  # images end early or late
    for beam, norm, block in [(1, 0.0, False), (3, 0.0, False), (4, 1.5, True)]:
        m = Counting(table)
        if beam == 1:
            batched = greedy(m, torch.zeros(B, 1), BOS, EOS, 9, check_every=every)
        else:
            batched = beam_search(m, torch.zeros(B, 1), BOS, EOS, 9, beam, norm, block, check_every=every)
        assert m.rows[0] == B * beam and m.rows[-1] < B * beam, m.rows  # the batch shrank
        for b in range(B):
            one_m = Markov(table[b:b + 1])
            if beam == 1:
                one = greedy(one_m, torch.zeros(1, 1), BOS, EOS, 9)
            else:
                one = beam_search(one_m, torch.zeros(1, 1), BOS, EOS, 9, beam, norm, block)
            kept = torch.isfinite(one.score[0])
            assert torch.equal(kept, torch.isfinite(batched.score[b]))
            assert torch.equal(one.tokens[0][kept], batched.tokens[b][kept])
            assert torch.equal(one.logprob[0][kept], batched.logprob[b][kept])
            assert torch.equal(one.score[0][kept], batched.score[b][kept])


@pytest.mark.parametrize("rnn, seed, end_bias", [("lstm", 3, -0.5), ("gru", 5, 0.5)])
def test_attention_searches_give_the_same_captions_with_and_without_dropping_finished_images(rnn, seed, end_bias):
    """The attention decoder keeps each image's cells once (not per beam): keep_images must drop
    those too. Searches that drop ended images give what searches keeping them to the end give."""
    from captioner.model.attention import AttentionDecoder

    torch.manual_seed(seed)
    dec = AttentionDecoder(vocab_size=30, feat_dim=12, embed_dim=8, hidden_dim=16, attention_dim=8, rnn=rnn).eval()
    with torch.no_grad():
        dec.out.bias[EOS] += end_bias  # so that in each search some images end well before others
    feats = torch.randn(9, 5, 12) * 3
    rows = []
    step = dec.step
    dec.step = lambda tokens, state: rows.append(len(tokens)) or step(tokens, state)
    for beam, norm, block in [(1, 0.0, False), (3, 1.0, False), (5, 1.5, True)]:
        rows.clear()
        if beam == 1:
            a = greedy(dec, feats, BOS, EOS, 12)
            assert min(rows) < 9  # images did leave
            b = greedy(dec, feats, BOS, EOS, 12, drop_finished=False)
        else:
            a = beam_search(dec, feats, BOS, EOS, 12, beam, norm, block)
            assert min(rows) < 9 * beam
            b = beam_search(dec, feats, BOS, EOS, 12, beam, norm, block, drop_finished=False)
        assert torch.equal(a.tokens, b.tokens)
        assert torch.allclose(a.logprob, b.logprob, atol=1e-5) and torch.allclose(a.score, b.score, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# constrained beam search (words each caption must say)


class MarkovByImage(Markov):
    """Markov, its image named by the feature (searches of a subset of the batch keep their tables)."""

    def start(self, feats):
        return feats[:, 0].long()


class Vocab:
    start, end, pad, unk = BOS, EOS, 0, 0

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size


@pytest.mark.parametrize("length_norm", [0.0, 1.0])
def test_wide_constrained_beam_finds_the_exhaustive_best(length_norm):
    from captioner.decode import search
    from captioner.decoding import Decoding

    g = torch.Generator().manual_seed(3)
    B, V, L = 4, 7, 3
    table = torch.randn(B, V, V, generator=g) * 2
    table[:, :, 0] = table[:, :, BOS] = -1e4
    sets = [[{4}], [{5, 6}], [{3}, {6}], []]  # one set, a disjunction, two sets, none
    d = Decoding(beam_size=(V - 3) ** L + 1, length_norm=length_norm, max_len=L)
    hyp = search(MarkovByImage(table), torch.arange(B)[:, None].float(), Vocab(V), d, constraints=sets)
    for b in range(B):
        words = [t for t in hyp.tokens[b, 0].tolist() if t != EOS]
        assert words == exhaustive_best(table[b], L, length_norm, sets[b])
        assert all(any(w in s for w in words) for s in sets[b])


def test_no_constraint_gives_exactly_the_unconstrained_search():
    from captioner.decode import search
    from captioner.decoding import Decoding

    torch.manual_seed(4)
    dec = ShowTellDecoder(vocab_size=30, feat_dim=16, embed_dim=8, hidden_dim=16).eval()
    feats = torch.randn(6, 16)
    for d in (Decoding(beam_size=1, max_len=10), Decoding(beam_size=4, length_norm=1.0, block_trigrams=True,
                                                          max_len=10)):
        plain = search(dec, feats, Vocab(30), d)
        empty = search(dec, feats, Vocab(30), d, constraints=[[] for _ in range(6)])
        assert torch.equal(plain.tokens, empty.tokens) and torch.equal(plain.score, empty.score)
        mixed = search(dec, feats, Vocab(30), d, constraints=[[], [{7}], [], [{8, 9}, {10}], [], []])
        for b in (0, 2, 4, 5):  # images without constraints: as searched alone
            assert torch.equal(mixed.tokens[b], plain.tokens[b])
        for b, sets in ((1, [{7}]), (3, [{8, 9}, {10}])):
            words = mixed.tokens[b, 0].tolist()
            assert all(any(w in s for w in words) for s in sets)
            assert mixed.score[b, 0] <= plain.score[b, 0] + 1e-6  # a constraint can only cost


@pytest.mark.parametrize("every", [1, 4])
def test_constrained_search_with_blocking_batches_and_dropping(every):
    from captioner.decode import search
    from captioner.decoding import Decoding

    torch.manual_seed(5)
    dec = ShowTellDecoder(vocab_size=40, feat_dim=16, embed_dim=8, hidden_dim=16).eval()
    feats = torch.randn(5, 16)
    sets = [[{11}], [{12, 13}], [{14}], [{15}], [{16}, {17}]]
    d = Decoding(beam_size=3, length_norm=1.5, block_trigrams=True, max_len=12)
    batched = search(dec, feats, Vocab(40), d, constraints=sets, check_every=every)
    kept = search(dec, feats, Vocab(40), d, constraints=sets, drop_finished=False)
    assert torch.equal(batched.tokens, kept.tokens)
    for i in range(5):
        one = search(dec, feats[i:i + 1], Vocab(40), d, constraints=sets[i:i + 1])
        assert torch.equal(one.tokens[0], batched.tokens[i])
        words = batched.tokens[i, 0].tolist()
        assert all(any(w in s for w in words) for s in sets[i])


def test_too_many_constraints_are_refused():
    from captioner.decode import search
    from captioner.decoding import Decoding
    from captioner.errors import ConfigError

    dec = ShowTellDecoder(vocab_size=30, feat_dim=16, embed_dim=8, hidden_dim=16).eval()
    with pytest.raises(ConfigError, match="at most 3"):
        search(dec, torch.randn(1, 16), Vocab(30), Decoding(beam_size=2), constraints=[[{5}, {6}, {7}, {8}]])
