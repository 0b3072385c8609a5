"""Self-critical training: the reward is CIDEr-D exactly, sampling is sound, and SCST improves the reward."""

import csv

import numpy as np
import pytest
import torch
from conftest import TINY
from pycocoevalcap.cider.cider import Cider

from captioner import Captioner
from captioner.cli import main
from captioner.data.records import load_records
from captioner.data.vocab import tokenize
from captioner.decode import sample
from captioner.model.attention import AttentionDecoder
from captioner.train.scst import CiderD

pytestmark = pytest.mark.slow

REFS = [["a dog runs on the grass", "a brown dog running through grass", "the dog is running outside"],
        ["two children play in the snow", "kids playing in snow", "two kids in the snow having fun"],
        ["a man rides a wave on a surfboard", "a surfer on a big wave", "man surfing a wave in the ocean"]]


def test_cider_d_matches_pycocoevalcap_when_document_frequencies_agree():
    hyps = ["a dog running on grass", "two kids play in the snow", "a man on a surfboard riding a wave"]
    ours = CiderD(REFS)([h for h in hyps], [0, 1, 2])
    # pycocoevalcap takes the document frequencies from the references it is given: the same three images
    _, theirs = Cider().compute_score({i: [" ".join(tokenize(r)) for r in REFS[i]] for i in range(3)},
                                      {i: [h] for i, h in enumerate(hyps)})
    assert np.allclose(ours, theirs, atol=1e-6)


def test_cider_d_rewards_the_right_image():
    c = CiderD(REFS)
    assert c.score("a dog runs on the grass", 0) > 3 * c.score("a dog runs on the grass", 1)


def test_sample_shapes_masks_and_log_probabilities():
    torch.manual_seed(0)
    dec = AttentionDecoder(vocab_size=20, feat_dim=8, embed_dim=8, hidden_dim=16, attention_dim=8).eval()
    tokens, logp, mask = sample(dec, torch.randn(3, 4, 8), 1, 2, max_len=6, n=4, banned=[3])
    assert tokens.shape[0] == 12 and tokens.shape == logp.shape == mask.shape
    assert (tokens != 3).all()
    assert torch.isfinite(logp[mask.bool()]).all() and (logp[mask.bool()] <= 0).all()
    for row, m in zip(tokens.tolist(), mask.tolist()):  # the mask covers the words and the first <end>
        n = int(sum(m))
        assert 2 not in row[: n - 1] and (n == len(row) or row[n - 1] == 2)
    assert logp.requires_grad


def test_scst_raises_the_reward_on_shapes(tmp_path, shapes):
    """From a weak cross-entropy model, SCST must raise the CIDEr-D of the model's own greedy
    captions of the training images (what it optimises), measured before and after."""
    xe, sc = tmp_path / "xe", tmp_path / "sc"
    args = [a for a in TINY if a not in ("--lr", "3e-3")]
    assert main(["train", "--data", str(shapes), "--out", str(xe), "--epochs", "1", "--lr", "3e-3", *args]) == 0
    assert main(["train", "--data", str(shapes), "--out", str(sc), "--scst", "--init", str(xe / "best"),
                 "--epochs", "6", "--lr", "2e-3", *args]) == 0
    train = [r for r in load_records(shapes) if r.split == "train"]
    reward = CiderD([r.captions for r in train])

    def greedy_reward(folder):
        texts = Captioner.load(folder, device="cpu").caption([r.image for r in train], beam_size=1)
        return reward(texts, range(len(train))).mean()

    before, after = greedy_reward(xe / "best"), greedy_reward(sc / "last")
    assert after > 1.15 * before, (before, after)
    rewards = [float(r["reward"]) for r in csv.DictReader((sc / "metrics.csv").open())]
    assert rewards[-1] > 1.5 * rewards[0], rewards


def test_scst_refuses_fine_tuning(tmp_path, shapes, capsys):
    assert main(["train", "--data", str(shapes), "--out", str(tmp_path), "--scst", "--fine-tune-encoder",
                 *TINY]) == 2
    assert "--scst" in capsys.readouterr().err


@pytest.mark.parametrize("baseline", ["greedy"])
def test_greedy_baseline_runs(tmp_path, shapes, baseline):
    xe = tmp_path / "xe"
    assert main(["train", "--data", str(shapes), "--out", str(xe), "--epochs", "1", "--max-images", "20",
                 "--val-images", "4", *TINY]) == 0
    assert main(["train", "--data", str(shapes), "--out", str(tmp_path / "sc"), "--scst", "--init", str(xe / "best"),
                 "--baseline", baseline, "--epochs", "1", "--max-images", "20", "--val-images", "4", *TINY]) == 0


def test_sampling_batches_shard_every_image_once_with_equal_steps():
    from captioner.train.scst import sampling_batches

    for n, world, bs in [(101, 2, 10), (7, 3, 2), (3, 2, 1), (50, 1, 50)]:
        shards = [sampling_batches(n, bs, seed=4, rank=r, world=world) for r in range(world)]
        assert len({len(s) for s in shards}) == 1
        assert sorted(i for s in shards for b in s for i in b) == list(range(n))
        assert all(len(b) <= bs for s in shards for b in s)


def test_sample_forced_end_with_a_vanishing_end_probability():
    """After max_len words <end> is forced even when exp(log p(<end>)) underflows to 0."""

    class NeverEnds:
        def start(self, feats):
            return torch.arange(feats.shape[0])

        def step(self, tokens, rows):
            logits = torch.zeros(rows.shape[0], 6)
            logits[:, 2] = -200.0  # <end>: log p about -200, exp() == 0 in float32
            return logits, rows

        @staticmethod
        def select(rows, index):
            return rows[index]

    tokens, logp, mask = sample(NeverEnds(), torch.zeros(2, 1), 1, 2, max_len=4, n=3)
    assert (tokens[:, -1] == 2).all() and (mask.sum(1) == 5).all()
    assert torch.isfinite(logp).all() and (logp[:, -1] < -150).all()


def test_scst_with_a_cross_entropy_term(tmp_path, shapes):
    xe = tmp_path / "xe"
    args = [a for a in TINY if a not in ("--lr", "3e-3")]
    assert main(["train", "--data", str(shapes), "--out", str(xe), "--epochs", "1", "--lr", "3e-3", *args]) == 0
    out = tmp_path / "mixed"
    assert main(["train", "--data", str(shapes), "--out", str(out), "--scst", "--init", str(xe / "best"),
                 "--scst-xe", "0.5", "--epochs", "3", "--lr", "2e-3", *args]) == 0
    rewards = [float(r["reward"]) for r in csv.DictReader((out / "metrics.csv").open())]
    assert rewards[-1] > rewards[0], rewards
