"""Show, Attend and Tell: attention is a distribution, search works on it, and it learns."""

import pytest
import torch
from conftest import TINY

from captioner import Captioner
from captioner.cli import main
from captioner.data.records import load_records
from captioner.decode import beam_search, greedy
from captioner.model.attention import AttentionDecoder

BOS, EOS = 1, 2


@pytest.fixture
def decoder():
    torch.manual_seed(0)
    return AttentionDecoder(vocab_size=30, feat_dim=24, embed_dim=16, hidden_dim=32, attention_dim=16).eval()


def test_attention_weights_sum_to_one(decoder):
    feats = torch.randn(4, 9, 24)
    s = decoder.start(feats)
    logits, s = decoder.step(torch.full((4,), BOS), s)
    assert logits.shape == (4, 30) and s.alpha.shape == (4, 9)
    assert torch.allclose(s.alpha.sum(-1), torch.ones(4), atol=1e-5) and (s.alpha >= 0).all()
    logits, penalty = decoder(feats, torch.randint(3, 30, (4, 7)))
    assert logits.shape == (4, 7, 30) and penalty.ndim == 0 and penalty >= 0


def test_teacher_forcing_matches_step_by_step(decoder):
    feats, tokens = torch.randn(3, 9, 24), torch.randint(3, 30, (3, 6))
    full, _ = decoder(feats, tokens)
    s = decoder.start(feats)
    for t in range(6):
        step, s = decoder.step(tokens[:, t], s)
        assert torch.allclose(step, full[:, t], atol=1e-5)


def test_captions_sharing_their_images_train_as_if_each_had_its_own(decoder):
    """Image-major batches hand each image's cells to its captions inside the decoder (`rows`):
    the same logits, penalty and gradients as repeating the features for every caption first."""
    torch.manual_seed(1)
    images = torch.randn(3, 9, 24)
    rows = torch.tensor([2, 0, 0, 1, 2, 0, 1])  # 7 captions of 3 images, in no order
    lengths = torch.tensor([4, 6, 2, 5, 3, 6, 1])  # words per padded row
    tokens = torch.randint(3, 30, (7, 6))
    assert AttentionDecoder.shares_images
    results = []
    for shared in (True, False):
        feats = images.clone().requires_grad_(True)
        decoder.zero_grad()
        if shared:
            logits, penalty = decoder(feats, tokens, lengths, rows)
        else:
            logits, penalty = decoder(feats.index_select(0, rows), tokens, lengths)
        (logits.square().mean() + penalty).backward()
        results.append((logits, penalty, feats.grad, decoder.proj[0].weight.grad.clone()))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5)
    assert results[0][0][2, 2:].abs().sum() == 0  # padding past a caption's words stays zero


def test_beam_on_attention(decoder):
    feats = torch.randn(5, 9, 24)
    g = greedy(decoder, feats, BOS, EOS, max_len=10)
    b1 = beam_search(decoder, feats, BOS, EOS, max_len=10, beam_size=1)
    assert torch.equal(g.tokens[:, 0], b1.tokens[:, 0])
    batched = beam_search(decoder, feats, BOS, EOS, max_len=10, beam_size=3)
    for i in range(5):
        one = beam_search(decoder, feats[i:i + 1], BOS, EOS, max_len=10, beam_size=3)
        assert torch.equal(one.tokens[0], batched.tokens[i])


@pytest.mark.slow
def test_attention_model_learns_shapes(tmp_path, shapes):
    out = tmp_path / "att"
    assert main(["train", "--data", str(shapes), "--out", str(out), "--decoder", "attention", "--epochs", "12",
                 "--attention-dim", "64", *TINY]) == 0
    cap = Captioner.load(out / "best", device="cpu")
    val = [r for r in load_records(shapes) if r.split == "val"]
    texts = cap.caption([r.image for r in val], beam_size=3)
    right = sum(t.split()[:3] == ["a", *r.image.stem.split("_")[:2]] and f"{r.image.stem.split('_')[2]} background"
                in t for r, t in zip(val, texts))
    assert right / len(val) >= 0.8, texts

    # where it looked: one map per word (and <end>), each a distribution over the grid; drawn as a PNG
    caption, words, alpha = cap.attention(val[0].image)
    assert words == caption.split() + ["<end>"] and alpha.shape[0] == len(words)
    assert torch.allclose(alpha.flatten(1).sum(-1), torch.ones(len(words)), atol=1e-3)
    png = tmp_path / "map.png"
    assert main(["caption", str(val[0].image), "--model", str(out / "best"), "--attention-map", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # with --out too: the captions go to the file and the maps are still drawn
    maps = tmp_path / "maps" / "m.png"
    maps.parent.mkdir()
    args = ["caption", *(str(r.image) for r in val[:2]), "--model", str(out / "best"), "--attention-map", str(maps)]
    assert main([*args, "--out", str(tmp_path / "c.jsonl"), "--quiet"]) == 0
    assert sorted(p.name for p in maps.parent.iterdir()) == sorted(f"m-{r.image.stem}.png" for r in val[:2])
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 2


def test_attention_map_of_a_show_tell_model_is_a_clear_error(trained, shapes, tmp_path, capsys):
    img = next(shapes.parent.glob("*.png"))
    args = ["caption", str(img), "--model", str(trained / "best"), "--attention-map", str(tmp_path / "m.png")]
    assert main(args) == 2
    assert "no attention to show" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "c.jsonl")]) == 2  # refused before any work
    assert "no attention to show" in capsys.readouterr().err and not (tmp_path / "c.jsonl").exists()
