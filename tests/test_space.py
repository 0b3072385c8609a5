"""The search space (model/embedding.py): it learns, measures both ways, saves and loads with the
model folder, is indexed and searched, and a folder or library without it still works."""

import json
import shutil
import sqlite3
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner
from captioner.errors import CaptionerWarning, ConfigError, LibraryError, ModelError
from captioner.library import index_folders, search, similar
from captioner.library.store import point_blocks
from captioner.model.embedding import EmbeddingConfig, JointEmbedding, SpaceEnsemble, build_space
from captioner.model.network import SPACE_CONFIG, SPACE_WEIGHTS, load_space, read_config, save_space
from captioner.train.data import Captions, FeatureRows
from captioner.train.embedding import fit, recall_both, retrieval_ranks, word_rows


@pytest.fixture
def cap(trained):
    return Captioner.load(trained / "best", device="cpu")


def truth(name: str) -> str:
    c, s, b, _ = name.split("_")
    return f"a {c} {s} on a {b} background"


def test_the_trained_model_has_a_space_that_ranks_held_out_captions(trained, cap, photos):
    """`captioner train` adds the space to best/ and last/; on photos it was not trained on, each
    one's true description finds it first far more often than chance (1 in 12)."""
    for sub in ("best", "last"):
        assert (trained / sub / SPACE_CONFIG).is_file() and (trained / sub / SPACE_WEIGHTS).is_file()
    files = sorted(photos.glob("*.png"))
    img = cap.embed(files)
    txt = cap.embed_text([truth(f.stem) for f in files])
    assert img.shape == txt.shape == (12, cap.space.cfg.point_dim)
    assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-3)
    t2i, i2t = retrieval_ranks(torch.from_numpy(img), torch.from_numpy(txt), torch.arange(12))
    assert (t2i == 1).mean() >= 0.5 and (i2t == 1).mean() >= 0.5, (t2i, i2t)
    assert cap.embed(files[0]).shape == (1, cap.space.cfg.point_dim)  # one image -> one row
    assert not cap.embed_text("zxqv").any()  # no known word: matches nothing


def test_the_space_reranks_the_beams_by_their_match_with_the_photo(cap, photos, monkeypatch):
    """Decoding.space_rerank: every alternative gets its "match" (the cosine of its point and the
    photo's), and they come in the order of score + weight x match, the first being the caption;
    0 leaves the search's order and adds nothing; a huge weight puts the best match first."""
    from captioner.decoding import Decoding

    files = sorted(photos.glob("*.png"))[:4]
    plain = cap.decoding.replace(beam_size=4, space_rerank=0.0)
    before = cap.caption(files, decoding=plain, details=True)
    assert all("match" not in a for r in before for a in r["alternatives"])
    images = cap.embed(files)
    for weight in (0.5, 100.0):
        after = cap.caption(files, decoding=plain.replace(space_rerank=weight), details=True)
        for r0, r, image in zip(before, after, images):
            assert sorted(a["caption"] for a in r["alternatives"]) == sorted(a["caption"] for a in r0["alternatives"])
            matches = cap.embed_text([a["caption"] for a in r["alternatives"]]) @ image
            assert [a["match"] for a in r["alternatives"]] == pytest.approx(matches.tolist(), abs=2e-4)
            total = [a["score"] + weight * a["match"] for a in r["alternatives"]]
            assert total == sorted(total, reverse=True)
            assert r["caption"] == r["alternatives"][0]["caption"] and r["match"] == r["alternatives"][0]["match"]
        if weight == 100.0:  # the match outweighs the score: the space's best caption first, bar near-ties
            spread = [max(a["score"] for a in r["alternatives"]) - min(a["score"] for a in r["alternatives"])
                      for r in after]
            assert all(r["match"] >= max(a["match"] for a in r["alternatives"]) - d / weight
                       for r, d in zip(after, spread))
    assert any(r["caption"] != r0["caption"] for r, r0 in zip(after, before))  # the weight changed something
    monkeypatch.setattr(cap, "space", None)  # a model without a space: the search's order, and it says so
    with pytest.warns(CaptionerWarning, match="no search space"):
        alone = cap.caption(files, decoding=plain.replace(space_rerank=0.5), details=True)
    assert [r["caption"] for r in alone] == [r["caption"] for r in before]
    assert "re-ranked by the search space x 0.3" in Decoding(beam_size=5, space_rerank=0.3).describe()
    assert Decoding(space_rerank=0.3).saved()["space_rerank"] == 0.3 and "space_rerank" not in Decoding().saved()
    for bad in (-0.1, float("nan"), 101, "x", True):
        with pytest.raises(ConfigError):
            Decoding(space_rerank=bad)


def test_the_rarity_penalty_holds_the_beams_to_common_words(cap, photos, monkeypatch):
    """Decoding.rarity_penalty: every alternative gets its "rarity" (Vocabulary.rarity) and they come
    in the order of score + space_rerank x match - penalty x rarity; a huge penalty puts the
    commonest-worded caption first; it works without a space too (no warning: no match asked for)."""
    import warnings

    from captioner.decoding import Decoding

    files = sorted(photos.glob("*.png"))[:4]
    plain = cap.decoding.replace(beam_size=4, space_rerank=0.0)
    before = cap.caption(files, decoding=plain, details=True)
    assert all("rarity" not in a for r in before for a in r["alternatives"])
    for weight, penalty in ((0.5, 0.3), (0.0, 10.0)):
        after = cap.caption(files, decoding=plain.replace(space_rerank=weight, rarity_penalty=penalty), details=True)
        for r0, r in zip(before, after):
            assert sorted(a["caption"] for a in r["alternatives"]) == sorted(a["caption"] for a in r0["alternatives"])
            assert [a["rarity"] for a in r["alternatives"]] == pytest.approx(
                [cap.vocab.rarity(a["caption"]) for a in r["alternatives"]], abs=1e-4)
            assert all(("match" in a) == bool(weight) for a in r["alternatives"])
            total = [a["score"] + weight * a.get("match", 0) - penalty * a["rarity"] for a in r["alternatives"]]
            assert total == sorted(total, reverse=True) and r["caption"] == r["alternatives"][0]["caption"]
    spread = [max(a["score"] for a in r["alternatives"]) - min(a["score"] for a in r["alternatives"]) for r in after]
    assert all(r["rarity"] <= min(a["rarity"] for a in r["alternatives"]) + d / 10.0 for r, d in zip(after, spread))
    # the synthetic captions' commonest words are in their likeliest beams; a rarity that calls long
    # captions common shows the penalty choosing
    monkeypatch.setattr(type(cap.vocab), "rarity", lambda self, text: 20.0 - len(text.split()))
    longest = cap.caption(files, decoding=plain.replace(rarity_penalty=10.0), details=True)
    assert [len(r["caption"].split()) for r in longest] == [max(len(a["caption"].split()) for a in r["alternatives"])
                                                            for r in longest]
    assert any(r["caption"] != r0["caption"] for r, r0 in zip(longest, before))
    monkeypatch.setattr(cap, "space", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alone = cap.caption(files, decoding=plain.replace(rarity_penalty=10.0), details=True)
    assert [r["caption"] for r in alone] == [r["caption"] for r in longest]
    assert "rare words x -0.25" in Decoding(beam_size=5, rarity_penalty=0.25).describe()
    assert Decoding(rarity_penalty=0.25).saved()["rarity_penalty"] == 0.25
    assert "rarity_penalty" not in Decoding().saved()
    for bad in (-0.1, float("nan"), 11, "x", True):
        with pytest.raises(ConfigError):
            Decoding(rarity_penalty=bad)


def test_retrieval_ranks_both_ways_by_hand():
    """Three photos, four captions (photo 0 has two): each caption's rank of its photo, each
    photo's best rank of its own captions, and rsum as the papers add it."""
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0, 0.2, 1], [0, 1, 0], [0.9, 0.1, 0]])  # captions 1 and 3 are wrong
    owner = torch.tensor([0, 0, 1, 2])
    t2i, i2t = retrieval_ranks(img, txt, owner)
    assert t2i.tolist() == [1, 3, 1, 3]  # caption 3 is nearer photos 0 and 1 than its own
    assert i2t.tolist() == [1, 1, 3]  # photo 2's own caption: after caption 1, tied with 0 and 2 (places 2-4)
    assert retrieval_ranks(img, torch.zeros(1, 3), torch.tensor([1]))[0].tolist() == [2]  # no words: the middle
    r = recall_both(t2i, i2t)
    assert r["text_to_image"]["R@1"] == 50 and r["image_to_text"]["R@1"] == pytest.approx(66.67)
    assert r["rsum"] == pytest.approx(50 + 100 + 100 + 66.67 + 100 + 100)


@pytest.mark.parametrize("text,pool,loss", [("gru", "attention", "infonce"), ("bag", "mean", "hardest")])
def test_every_variant_learns_and_training_is_repeatable(text, pool, loss):
    """Synthetic pairs whose features carry their caption's words: every variant learns to match
    them (R@1 far above chance), and the same seed gives the same weights, bit for bit (a killed
    run's space is trained again from the start, to the same result)."""
    gen = torch.Generator().manual_seed(0)
    n, vocab, feat = 64, 24, 16
    words = torch.randint(4, vocab, (n, 3), generator=gen)
    basis = torch.randn(vocab, feat, generator=gen)
    feats = torch.relu(basis[words].sum(dim=1)[:, None, :] + 0.1 * torch.randn(n, 4, feat, generator=gen))
    tokens = [torch.tensor([1, *w.tolist(), 2]) for w in words]
    caps = Captions(tokens, torch.arange(n), [5] * n)
    rows = FeatureRows(feats.half().numpy(), list(range(n)))
    cfg = EmbeddingConfig(vocab_size=vocab, feat_dim=feat, dim=16, word_dim=16, text=text, pool=pool, loss=loss)

    def train():
        torch.manual_seed(0)
        space = JointEmbedding(cfg)
        result = fit(space, (rows, caps), (rows, caps), start=1, end=2, epochs=25, batch_size=16, lr=3e-3,
                     progress=False, log=lambda *a: None)
        return space, result

    space, result = train()
    assert result["val"]["text_to_image"]["R@1"] >= 40, result["val"]  # chance: 1.6
    again, _ = train()
    for (k, a), b in zip(space.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def random_pairs(n: int, vocab: int, feat: int):
    """n synthetic captions of three words (ids 4.. vocab-1) and random (4, feat) features, a photo
    each -> (words (n, 3), features (n, 4, feat), Captions, FeatureRows)."""
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(4, vocab, (n, 3), generator=gen)
    feats = torch.rand(n, 4, feat, generator=gen)
    caps = Captions([torch.tensor([1, *w.tolist(), 2]) for w in words], torch.arange(n), [5] * n)
    return words, feats, caps, FeatureRows(feats.half().numpy(), list(range(n)))


def test_half_the_captions_meet_their_photo_mirrored_with_left_and_right_swapped(monkeypatch):
    """fit(flipped=...): each caption of a batch is paired with its photo as it is or mirrored (about
    half of each), and a mirrored photo's caption has the words of `mirror` swapped; the same seed
    pairs them the same way."""
    n, vocab, feat, left, right = 64, 24, 16, 4, 5
    words, feats, caps, rows = random_pairs(n, vocab, feat)
    mirrored = FeatureRows((feats + 100).half().numpy(), list(range(n)))  # told apart by their size
    cfg = EmbeddingConfig(vocab_size=vocab, feat_dim=feat, dim=16, word_dim=16)

    def pairs():
        torch.manual_seed(0)
        space, seen = JointEmbedding(cfg), []
        images, texts = space.images, space.texts
        monkeypatch.setattr(space, "images", lambda f: seen.append([f.clone()]) or images(f))
        monkeypatch.setattr(space, "texts", lambda w: seen[-1].append(w.clone()) or texts(w))
        fit(space, (rows, caps), (rows, caps), start=1, end=2, epochs=2, batch_size=16, flipped=mirrored,
            mirror={left: right, right: left}, progress=False, log=lambda *a: None)
        return [(f, w) for f, w in (s for s in seen if len(s) == 2) if f.shape[0] == 16 and w.shape[0] == 16]

    seen = pairs()
    flips = torch.cat([f.float().mean(dim=(1, 2)) > 50 for f, _ in seen])
    assert 0.3 < flips.float().mean() < 0.7  # training steps only (validation embeds all 64 at once)
    by_text = {tuple(w.tolist()): i for i, w in enumerate(words)}
    swap = {left: right, right: left}
    for f, w in seen:
        for fi, wi in zip(f, w):
            wi = [int(x) for x in wi if x != 0]
            flip = fi.float().mean() > 50
            plain = [swap.get(x, x) for x in wi] if flip else wi
            i = by_text[tuple(plain)]
            assert torch.allclose(fi.float(), feats[i] + (100 if flip else 0), atol=0.1)  # its own photo
    assert any(left in w or right in w for _, w in seen)  # the swap was exercised
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(seen, pairs()))


def test_a_killed_fit_goes_on_from_its_last_epoch_to_the_same_weights():
    """fit(save=...) hands over where it stands after every epoch; fit(state=...) from the state of
    epoch 2 (through a file, as add_space keeps it) ends where an unbroken run ends, bit for bit:
    the order of the captions, the mirrored draws, dropout, the schedule and the best epoch."""
    import io

    n, vocab, feat = 48, 20, 12
    _, feats, caps, rows = random_pairs(n, vocab, feat)
    mirrored = FeatureRows(feats.flip(1).half().numpy(), list(range(n)))
    cfg = EmbeddingConfig(vocab_size=vocab, feat_dim=feat, dim=8, word_dim=8, dropout=0.2)

    def run(state=None, stop=None):
        torch.manual_seed(0)
        space, saved = JointEmbedding(cfg), []

        def save(s):
            buffer = io.BytesIO()
            torch.save(s, buffer)
            saved.append(buffer.getvalue())
            if len(saved) == stop:
                raise KeyboardInterrupt

        result = fit(space, (rows, caps), (rows, caps), start=1, end=2, epochs=4, batch_size=8, lr=3e-3,
                     flipped=mirrored, mirror={4: 5, 5: 4}, state=state, save=save, progress=False,
                     log=lambda *a: None)
        return space, result, saved

    whole, result, saved = run()
    assert len(saved) == 4
    with pytest.raises(KeyboardInterrupt):
        run(stop=2)
    state = torch.load(io.BytesIO(saved[1]), weights_only=True)  # what the killed run had saved
    again, result2, saved2 = run(state=state)
    assert len(saved2) == 2 and result2 == result
    for (k, a), b in zip(whole.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_a_killed_space_only_run_resumes_to_the_same_space(trained, shapes, tmp_path, capsys, monkeypatch):
    """train --space-only killed during its second member's training: --resume continues from its
    space.pt (the first member not trained again) to the space an unbroken run makes; space.pt is
    gone at the end; resuming with other settings is refused in one line."""
    from safetensors.torch import load_file

    import captioner.train.embedding as training
    from captioner.cli import main

    common = ["train", "--space-only", "--init", str(trained / "best"), "--data", str(shapes), "--space-epochs",
              "2", "--space-members", "2", "--workers", "0", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    saves, real = [], training.save_checkpoint

    def killed_on_the_third(path, state):
        real(path, state)
        saves.append(state["current"]["epoch"])
        if len(saves) == 3:  # member 2, epoch 1
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", killed_on_the_third)
    out = tmp_path / "killed"
    assert main([*common, "--out", str(out)]) == 130
    assert "the search space's training so far is in" in capsys.readouterr().err
    assert (out / "space.pt").is_file() and not (out / "best" / SPACE_CONFIG).exists()
    monkeypatch.setattr(training, "save_checkpoint", real)
    assert main([*common, "--out", str(out), "--resume", "--space-epochs", "3"]) == 2
    assert "a search space's training with other settings or data (epochs 3 here, 2 there)" in (
        capsys.readouterr().err)
    fits = []
    monkeypatch.setattr(training, "fit", lambda *a, **k: fits.append(k["state"]["epoch"]) or fit(*a, **k))
    assert main([*common, "--out", str(out), "--resume"]) == 0
    assert fits == [1]  # member 2 alone, after its first epoch
    assert "1 of 2 members finished, member 2 after epoch 1 of 2" in capsys.readouterr().out
    assert not (out / "space.pt").exists()
    a, b = (load_file(tmp_path / x / "best" / SPACE_WEIGHTS) for x in ("whole", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mirrored_words_are_swapped_in_every_language_the_vocabulary_has_both_of():
    from captioner.train.embedding import mirror_words

    stoi = {w: i for i, w in enumerate(["<pad>", "left", "right", "左", "右", "links", "gauche", "droite", "a"])}
    assert mirror_words(stoi) == {1: 2, 2: 1, 3: 4, 4: 3, 6: 7, 7: 6}  # "links" alone (golf links) stays


def test_an_ensemble_scores_the_mean_of_its_members_cosines():
    """A point of an ensemble is a unit vector whose dot product is the mean of its members' cosines;
    a sentence with no word stays a row of zeros (it matches nothing)."""
    torch.manual_seed(0)
    cfg = EmbeddingConfig(vocab_size=20, feat_dim=8, dim=16, word_dim=8, members=3)
    space = build_space(cfg).eval()
    assert isinstance(space, SpaceEnsemble) and cfg.point_dim == 48
    feats, tokens = torch.rand(4, 5, 8), torch.randint(1, 20, (6, 7))
    tokens[0] = 0
    with torch.no_grad():
        img, txt = space.images(feats), space.texts(tokens)
        mean = sum(m.texts(tokens) @ m.images(feats).t() for m in space.members) / 3
    assert img.shape == (4, 48) and torch.allclose(img.norm(dim=1), torch.ones(4))
    assert torch.allclose(txt @ img.t(), mean, atol=1e-6) and not txt[0].any()
    assert isinstance(build_space(EmbeddingConfig(vocab_size=20, feat_dim=8, dim=16, word_dim=8)), JointEmbedding)


def test_a_one_member_space_still_loads_as_it_was_saved(trained, tmp_path):
    """Folders written before ensembles hold one pair of towers and no "members" in embedding.json:
    they load as that, and embed as that pair does."""
    folder = tmp_path / "one"
    shutil.copytree(trained / "best", folder)
    one = load_space(folder, read_config(folder)).members[0]
    one.cfg = EmbeddingConfig.from_json(one.cfg.to_json() | {"members": 1})
    save_space(one, folder)
    older = {k: v for k, v in json.loads((folder / SPACE_CONFIG).read_text()).items() if k != "members"}
    (folder / SPACE_CONFIG).write_text(json.dumps(older))
    loaded = Captioner.load(folder, device="cpu")
    assert isinstance(loaded.space, JointEmbedding) and loaded.space.cfg.point_dim == one.cfg.dim
    with torch.no_grad():
        want = one.texts(torch.tensor([[loaded.vocab.stoi[w] for w in ("a", "red", "circle")]]))
    assert np.allclose(loaded.embed_text("a red circle"), want.numpy(), atol=2e-3)  # fp16 weights on disk


def test_word_rows_drop_start_and_end():
    rows = word_rows([torch.tensor([1, 5, 6, 2]), torch.tensor([1, 7, 2])], start=1, end=2, pad=0)
    assert rows.tolist() == [[5, 6], [7, 0]]


def test_a_folder_without_a_space_loads_and_says_so(trained, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(trained / "best", folder)
    (folder / SPACE_CONFIG).unlink()
    (folder / SPACE_WEIGHTS).unlink()
    plain = Captioner.load(folder, device="cpu")
    assert plain.space is None and plain.caption(np.zeros((96, 96, 3), np.uint8))
    with pytest.raises(ModelError, match="no search space.*--space-only"):
        plain.embed_text("a red circle")


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / SPACE_WEIGHTS).unlink(), "embedding.safetensors is missing"),
    (lambda f: (f / SPACE_WEIGHTS).write_bytes(b"junk"), "not a readable safetensors"),
    (lambda f: (f / SPACE_CONFIG).write_text("[1]"), "bad embedding.json"),
    (lambda f: (f / SPACE_CONFIG).write_text(json.dumps(
        {**json.loads((f / SPACE_CONFIG).read_text()), "dim": 12})), "does not fit embedding.json"),
    (lambda f: (f / SPACE_CONFIG).write_text(json.dumps(
        {**json.loads((f / SPACE_CONFIG).read_text()), "vocab_size": 7})), "is for 7 words"),
    (lambda f: (f / SPACE_CONFIG).write_text(json.dumps(
        {**json.loads((f / SPACE_CONFIG).read_text()), "pool": "max"})), "pool must be one of"),
])
def test_a_damaged_space_is_a_one_line_model_error(trained, tmp_path, damage, message):
    folder = tmp_path / "m"
    shutil.copytree(trained / "best", folder)
    damage(folder)
    with pytest.raises(ModelError, match=message) as e:
        load_space(folder, read_config(folder))
    assert "\n" not in str(e.value)


def test_save_space_round_trips_and_changes_the_fingerprint(trained, tmp_path, cap):
    folder = tmp_path / "m"
    shutil.copytree(trained / "best", folder)
    before = Captioner.load(folder, device="cpu").fingerprint
    space = load_space(folder, read_config(folder))
    assert isinstance(space, SpaceEnsemble) and len(space.members) == 2  # the default: two members
    with torch.no_grad():
        space.members[1].image_linear.bias.add_(0.5)  # the second member, so that their order is kept too
    save_space(space, folder)
    again = load_space(folder, read_config(folder))
    assert torch.equal(again.members[1].image_linear.bias, space.members[1].image_linear.bias.half().float())
    assert torch.equal(again.members[0].image_linear.bias, space.members[0].image_linear.bias)
    assert Captioner.load(folder, device="cpu").fingerprint != before


# -- the library ------------------------------------------------------------------------------------


@pytest.fixture
def library(cap, photos, tmp_path):
    db = tmp_path / "lib.sqlite"
    index_folders(cap, [photos], db, batch_size=5, progress=False)
    return db


def test_index_stores_a_point_per_photo(cap, library, photos):
    con = sqlite3.connect(library)
    blocks = list(point_blocks(con, cap.fingerprint))
    ids = np.concatenate([i for i, _ in blocks])
    assert len(ids) == 12 and list(ids) == sorted(ids) and all(b.shape[1] == cap.space.cfg.point_dim for _, b in blocks)
    assert {r[0] for r in con.execute("SELECT id FROM photos")} == set(ids.tolist())
    assert con.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0] == "5"
    stored = blocks[0][1][0].astype(np.float32)
    path = con.execute("SELECT path FROM photos WHERE id = ?", (int(ids[0]),)).fetchone()[0]
    assert np.abs(stored - cap.embed(path)[0]).max() < 2e-3  # float16 of what embed() gives


def test_point_blocks_stay_whole_through_deletes_and_reindexing(cap, photos, tmp_path, monkeypatch):
    """Blocks of 4 points: photos indexed in batches of 5, some deleted, some changed and indexed
    again (a new id each, appended), one with an id below the stored ones (rewritten in order):
    every photo keeps exactly its own point, ascending, no block over the size."""
    from captioner.library.store import _add_points, point_of

    store = sys.modules["captioner.library.store"]
    monkeypatch.setattr(store, "POINT_BLOCK", 4)
    db = tmp_path / "lib.sqlite"
    index_folders(cap, [photos], db, batch_size=5, progress=False)
    files = sorted(photos.glob("*.png"))
    files[0].unlink()
    files[5].unlink()
    with Image.open(files[7]) as im:  # changed: indexed again
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(files[7])
    index_folders(cap, [photos], db, batch_size=5, progress=False)

    con = sqlite3.connect(db)
    blocks = list(point_blocks(con, cap.fingerprint))
    ids = np.concatenate([i for i, _ in blocks])
    assert all(len(i) <= 4 for i, _ in blocks) and list(ids) == sorted(ids) and len(ids) == 10
    by_path = dict(con.execute("SELECT path, id FROM photos"))
    assert set(by_path.values()) == set(ids.tolist())
    for f in files[1:5] + files[6:]:
        point = point_of(con, cap.fingerprint, by_path[str(f)]).astype(np.float32)
        assert np.abs(point - cap.embed(f)[0]).max() < 2e-3, f.name
    assert point_of(con, cap.fingerprint, 10**6) is None and point_of(con, "another model", int(ids[0])) is None

    low = blocks[0][1][0].tobytes()  # an id below the stored ones: the model's blocks are rewritten in order
    with con:
        _add_points(con, cap.fingerprint, [int(ids[0]) - 1 if ids[0] > 1 else 0], [low])
    again = np.concatenate([i for i, _ in point_blocks(con, cap.fingerprint)])
    assert list(again) == sorted(again) and len(again) == 11
    con.close()


def test_a_schema_4_library_is_searched_as_it_is_and_moved_into_blocks_by_indexing(cap, library, photos):
    """Schema 4 kept a point a row (space(id, data)): read-only it is searched as it is; indexing
    moves its points into blocks in one transaction, and every search answers the same."""
    before = {m: search(library, "a red circle", 12, mode=m, captioner=cap).hits for m in ("embedding", "hybrid")}
    like = similar(library, sorted(photos.glob("*.png"))[0], 5, captioner=cap).hits
    con = sqlite3.connect(library)
    blocks = list(point_blocks(con, cap.fingerprint))
    with con:
        con.execute("CREATE TABLE space (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        for ids, block in blocks:
            con.executemany("INSERT INTO space VALUES (?, ?)", [(int(i), p.tobytes()) for i, p in zip(ids, block)])
        con.execute("DELETE FROM points")  # there, empty: as a move into blocks cut short leaves it
        con.execute("UPDATE meta SET value = '4' WHERE key = 'schema'")
    con.close()
    for _ in range(2):  # as schema 4, then moved by indexing (nothing to caption again)
        for mode, hits in before.items():
            assert search(library, "a red circle", 12, mode=mode, captioner=cap).hits == hits
        assert similar(library, sorted(photos.glob("*.png"))[0], 5, captioner=cap).hits == like
        assert index_folders(cap, [photos], library, progress=False).unchanged == 12
    con = sqlite3.connect(library)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "space" not in tables and con.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0] == "5"
    assert sum(len(i) for i, _ in point_blocks(con, cap.fingerprint)) == 12
    con.close()


def test_embedding_mode_finds_photos_by_their_description(cap, library, photos):
    hits = 0
    for f in sorted(photos.glob("*.png")):
        found = search(library, truth(f.stem), 3, mode="embedding", captioner=cap)
        assert found.mode == "embedding" and found.note is None
        hits += found.hits[0]["path"].endswith(f.name)
    assert hits >= 6  # chance: 1


def test_hybrid_with_only_the_space_weighed_is_the_embedding_order(cap, library, monkeypatch):
    """Fusion with every other weight at zero gives exactly the embedding mode's order, and with the
    space's weight at zero (every photo re-ranked) exactly hybrid's order without a space."""
    mod = sys.modules["captioner.library.search"]
    query = "a red circle on a blue background"
    embedding = [h["id"] for h in search(library, query, 12, mode="embedding", captioner=cap).hits]
    for name, value in (("WORDS_WEIGHT", 0.0), ("SPACE_WORDS_WEIGHT", 0.0), ("TAG_WEIGHT_MODEL", 0.0),
                        ("KEYWORD_WEIGHT", 0.0), ("KEYWORD_WEIGHT_FIRST", 0.0)):
        monkeypatch.setattr(mod, name, value)
    monkeypatch.setattr("captioner.retrieval.query_logprob",
                        lambda decoder, feats, tokens: torch.zeros(feats.shape[0]))  # log p weighed 0
    fused = [h["id"] for h in search(library, query, 12, mode="hybrid", captioner=cap).hits]
    assert fused == embedding
    monkeypatch.undo()

    monkeypatch.setattr(mod, "SPACE_WEIGHT", 0.0)
    monkeypatch.setattr(mod, "SPACE_WORDS_WEIGHT", mod.WORDS_WEIGHT)  # the word score as without a space
    with_zero = search(library, query, 12, mode="hybrid", captioner=cap).hits
    monkeypatch.setattr(cap, "space", None)  # as a model without a space ranks
    without = search(library, query, 12, mode="hybrid", captioner=cap)
    assert [h["id"] for h in with_zero] == [h["id"] for h in without.hits]


def test_a_library_indexed_without_the_space_still_searches_and_says_what_it_lacks(trained, photos, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(trained / "best", folder)
    (folder / SPACE_CONFIG).unlink()
    plain = Captioner.load(folder, device="cpu")
    db = tmp_path / "old.sqlite"
    index_folders(plain, [photos], db, batch_size=6, progress=False)
    assert sqlite3.connect(db).execute("SELECT count(*) FROM points").fetchone()[0] == 0
    found = search(db, "a red circle", 5, mode="embedding", captioner=plain)
    assert found.mode == "hybrid" and "no search space" in found.note and found.hits
    assert search(db, "a red circle", 5, mode="hybrid", captioner=plain).hits
    example = sorted(photos.glob("*.png"))[1]  # by example photo: through the pooled features
    copy = tmp_path / "copy.png"
    Image.open(example).save(copy, compress_level=0)  # other bytes (the photo itself is left out), same pixels
    assert similar(db, copy, 3, captioner=plain).hits[0]["path"].endswith(example.name)
    with_space = Captioner.load(trained / "best", device="cpu")  # another fingerprint: index again
    found = search(db, "a red circle", 5, mode="embedding", captioner=with_space)
    assert found.mode == "keyword" and "index again" in found.note


def test_search_by_example_goes_through_the_space(cap, library, photos):
    target = sorted(photos.glob("*.png"))[2]
    found = similar(library, target, 3, captioner=cap)
    assert not any(h["path"].endswith(target.name) for h in found.hits)  # the query is not an answer
    con = sqlite3.connect(library)
    own = con.execute("SELECT id FROM photos WHERE path LIKE ?", (f"%{target.name}",)).fetchone()[0]
    con.close()
    by_id = similar(library, None, 3, captioner=cap, photo_id=own).hits
    assert [h["id"] for h in by_id] == [h["id"] for h in found.hits]
    point = cap.embed(target)[0]
    assert found.hits[0]["score"] == pytest.approx(float(point @ cap.embed(found.hits[0]["path"])[0]), abs=3e-3)
    with pytest.raises(LibraryError, match="no photo 999"):
        similar(library, None, 3, captioner=cap, photo_id=999)


def test_the_best_few_are_the_first_of_the_whole_ranking(cap, library):
    """What a search shows (the best `limit`, found without ranking every photo) is the head of
    the ranking evaluate measures, in every mode."""
    from captioner.library import ModelView, rank, reading

    with reading(library) as con:
        view = ModelView(con, cap)
        for query in ("a red circle", "green square on a yellow background", "blue"):
            whole = rank(con, view, query, ("embedding", "model", "hybrid"))
            for limit in (1, 3, 12):
                head = rank(con, view, query, ("embedding", "model", "hybrid"), limit, every=False)
                for mode in head:
                    assert head[mode][:limit] == whole[mode][:limit], (query, mode, limit)


def test_a_library_without_features_still_ranks_by_meaning(cap, photos, tmp_path, library):
    """index --no-features keeps no encoder features, and hybrid search still finds photos by the
    space, the words and the tags, saying that the captioning model's log p was left out."""
    from captioner.cli import main

    db = tmp_path / "small.sqlite"
    assert main(["index", str(photos), "--db", str(db), "--model", str(cap.source), "--no-features", "--quiet"]) == 0
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*) FROM features").fetchone()[0] == 0
    assert sum(len(i) for i, _ in point_blocks(con, cap.fingerprint)) == 12
    con.close()
    target = sorted(photos.glob("*.png"))[4]
    found = search(db, truth(target.stem), 3, mode="hybrid", captioner=cap)
    assert "log p" in found.note and found.mode == "hybrid"
    assert found.hits[0]["path"].endswith(target.name)
    assert search(library, truth(target.stem), 3, mode="hybrid", captioner=cap).note is None  # with features


def test_space_only_adds_a_space_to_a_model_as_it_is(trained, shapes, tmp_path, capsys):
    """train --space-only --init M copies M byte for byte and adds a space trained for it."""
    from captioner.cli import main

    plain = tmp_path / "plain"
    shutil.copytree(trained / "best", plain)
    for name in (SPACE_CONFIG, SPACE_WEIGHTS):
        (plain / name).unlink()
    out = tmp_path / "space"
    assert main(["train", "--space-only", "--init", str(plain), "--data", str(shapes), "--out", str(out),
                 "--space-epochs", "3", "--workers", "0", "--quiet"]) == 0
    assert "search space added: val text->image R@1/5/10" in capsys.readouterr().out
    for name in ("config.json", "vocab.json", "model.safetensors", "decoding.json"):
        assert (out / "best" / name).read_bytes() == (plain / name).read_bytes(), name
    assert Captioner.load(out / "best", device="cpu").space is not None
    assert main(["train", "--space-only", "--data", str(shapes), "--out", str(tmp_path / "x")]) == 2
    assert "--space-only adds a search space to the model given by --init" in capsys.readouterr().err


def test_the_api_searches_by_the_space_and_by_example_through_it(cap, library, photos):
    from fastapi.testclient import TestClient

    from captioner.server.app import create_app

    c = TestClient(create_app(cap, library), base_url="http://localhost")
    target = sorted(photos.glob("*.png"))[5]
    r = c.get("/api/search", params={"q": truth(target.stem), "limit": 3, "mode": "embedding"})
    assert r.status_code == 200 and r.json()["mode"] == "embedding", r.text
    assert r.json()["results"][0]["path"].endswith(target.name)
    own = r.json()["results"][0]["id"]
    like = c.get(f"/api/search/like/{own}", params={"limit": 2}).json()
    assert len(like["results"]) == 2 and own not in [h["id"] for h in like["results"]]
    assert all("relevance" in h for h in r.json()["results"])
    assert c.get("/api/search", params={"q": "circle", "mode": "nearest"}).status_code == 422


def test_stage_one_reads_the_points_in_blocks_with_flat_memory(tmp_path, monkeypatch):
    """The million-photo path at a small size: 20,000 photos' points, written as index writes them
    and scored a block at a time, give the cosines of the whole matrix, and the memory held is a
    block's, not the library's."""
    import tracemalloc
    from types import SimpleNamespace

    from captioner.library import ModelView, connect
    from captioner.library.store import POINT_BLOCK, _add_points

    n, dim = 20_000, 256
    rng = np.random.default_rng(0)
    points = rng.normal(size=(n, dim))
    points = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float16)  # unit length, as stored
    monkeypatch.setattr(sys.modules["captioner.library.store"], "POINT_BLOCK", 256)
    con = connect(tmp_path / "big.sqlite")
    with con:
        con.executemany("INSERT INTO photos (id, path, sha1, size, mtime, caption, model, indexed_at) "
                        "VALUES (?, ?, '', 0, 0, '', 'm', 0)", [(i + 1, f"/p/{i}.jpg") for i in range(n)])
        con.executemany("INSERT INTO vectors (id, model, words) VALUES (?, 'fp', x'')", [(i + 1,) for i in range(n)])
        for start in range(0, n, 100):  # batches of 100, as write_batch appends them
            _add_points(con, "fp", list(range(start + 1, start + 101)),
                        [p.tobytes() for p in points[start:start + 100]])
    assert con.execute("SELECT count(*) FROM points").fetchone()[0] == n // 256 + 1
    fake = SimpleNamespace(fingerprint="fp", source="m", space=object())
    view = ModelView(con, fake)
    query = rng.normal(size=dim)
    query = (query / np.linalg.norm(query)).astype(np.float32)
    whole = points.astype(np.float32) @ query
    tracemalloc.start()
    blocked = view.space_scores(query)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-4)
    assert peak < 4 * 2**20, peak  # the float32 matrix alone would be 20 MB
    assert POINT_BLOCK >= 1024  # the shipped block: a million photos are a thousand rows
    con.close()


def test_the_fast_scan_is_exact_for_every_photo_it_can_rank():
    """Cosines(query, best), the float16 products, computes exactly every point that can be among
    the `best` highest of all blocks, whatever their order and sizes: hundreds of points within its
    error of one another (and exact ties) at the border, a damaged point (NaN, ten times too long)
    still past 1.01 where search.py looks for it. The others are off by at most `error`."""
    from captioner.library.view import Cosines

    rng = np.random.default_rng(3)
    dim = 96
    query = rng.normal(size=dim)
    query /= np.linalg.norm(query)
    # 600 points at cosines 0.3 to 0.301, half towards the way the query's float16 errs and half away
    # from it: their float16 products are out of order by more than their differences
    rounding = query.astype(np.float16).astype(np.float64) - query
    side = rng.normal(size=(600, dim))
    side = 0.3 * side / np.linalg.norm(side, axis=1, keepdims=True) + np.where(np.arange(600) % 2, 1, -1)[:, None] * (
        rounding / np.linalg.norm(rounding))
    side -= np.outer(side @ query, query)
    side /= np.linalg.norm(side, axis=1, keepdims=True)
    cos = rng.uniform(0.3, 0.301, size=(600, 1))
    near = cos * query + np.sqrt(1 - cos**2) * side
    points = np.concatenate([rng.normal(size=(6000, dim)), near, near[:50]])  # exact ties too
    points = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float16)
    points[17], points[4000] = np.nan, points[6000] * 10
    truth = points.astype(np.float64) @ query
    order = rng.permutation(len(points))
    cuts = np.sort(rng.choice(np.arange(1, len(points)), 40, replace=False))
    for best in (1, 7, 100, 400):
        scan = Cosines(query.astype(np.float32), best)
        assert 0 < scan.error < 2e-3
        scores = np.empty(len(points), np.float32)
        for part in np.split(order, cuts):
            scores[part] = scan(points[part])
        assert np.isnan(scores[17]) and abs(scores[4000]) > 1.01  # still found damaged by search.py
        sound = np.isfinite(truth) & (np.abs(truth) <= 1.01)
        assert np.all(np.abs(scores[sound] - truth[sound]) <= scan.error)
        shown = np.argsort(-np.where(sound, scores, -2), kind="stable")[:best]
        np.testing.assert_allclose(scores[shown], truth[shown], rtol=0, atol=1e-6)  # exact where it ranks
        assert truth[shown].min() >= np.sort(truth[sound])[-best] - 1e-6  # and no better photo left behind
    every = Cosines(query.astype(np.float32))
    np.testing.assert_allclose(every(points[:500]), truth[:500], rtol=0, atol=1e-6)
    more = Cosines(query.astype(np.float32), 10**6)  # more wanted than there are: every point exact
    np.testing.assert_allclose(more(points[1000:1500]), truth[1000:1500], rtol=0, atol=1e-6)
    assert more(points[:0]).shape == (0,)


def test_hits_have_a_relevance_and_a_weak_best_says_no_good_match(cap, library, photos, monkeypatch):
    """The space's calibration (what right answers scored on val) turns a hit's cosine into a
    relevance; when no hit reaches NO_GOOD_MATCH the note says there is no good match."""
    from captioner.model.embedding import EmbeddingConfig as Cfg

    cal = cap.space.cfg.calibration
    assert len(cal) == 21 and list(cal) == sorted(cal)  # measured when the fixture's model was trained
    assert Cfg(calibration=(0.0, 0.5, 1.0)).relevance(np.array([0.25, 2.0])).tolist() == [0.25, 1.0]
    target = sorted(photos.glob("*.png"))[7]
    found = search(library, truth(target.stem), 3, mode="hybrid", captioner=cap)
    assert all(0 <= h["relevance"] <= 1 for h in found.hits) and found.note is None
    monkeypatch.setattr(cap.space.cfg, "calibration", (0.999, 0.9995, 1.0))  # as if matches scored near 1
    found = search(library, truth(target.stem), 3, mode="embedding", captioner=cap)
    assert found.note.startswith("no good match") and max(h["relevance"] for h in found.hits) < 0.05
    assert "relevance" not in search(library, "circle", 3, mode="keyword").hits[0]
    with pytest.raises(ValueError, match="calibration must be"):
        Cfg.from_json({"calibration": [0.5, 0.1]})
