"""Search by meaning: the model's own scores, stored features, hybrid ranking, search by example
photo, and the retrieval evaluation."""

import json
import sqlite3

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner, retrieval
from captioner.cli import main
from captioner.data import wordcounts
from captioner.evaluate import rank_of, recall
from captioner.library import index_folders, search, similar
from captioner.library.store import point_blocks
from captioner.model.attention import AttentionDecoder
from captioner.model.network import load_model, save_model


@pytest.fixture
def cap(trained):
    return Captioner.load(trained / "best", device="cpu")


@pytest.fixture
def library(cap, photos, tmp_path):
    db = tmp_path / "lib.sqlite"
    index_folders(cap, [photos], db, batch_size=5, progress=False)
    return db


def truth(name: str) -> str:
    c, s, b, _ = name.split("_")
    return f"a {c} {s} on a {b} background"


def test_model_search_finds_a_photo_whose_caption_lacks_the_words(cap, library, photos):
    """The model reads the photo's stored features, not its caption: a photo whose caption says
    nothing of the query is still found first by the model, and not at all by the keywords."""
    target = sorted(photos.glob("*.png"))[3]
    con = sqlite3.connect(library)
    pid = con.execute("SELECT id FROM photos WHERE path LIKE ?", (f"%{target.name}",)).fetchone()[0]
    with con:  # as if its caption had come out wrong
        con.execute("UPDATE photos SET caption = 'something' WHERE id = ?", (pid,))
        con.execute("DELETE FROM photos_fts WHERE rowid = ?", (pid,))
        con.execute("INSERT INTO photos_fts (rowid, caption, alternatives) VALUES (?, 'something', '')", (pid,))
    con.close()
    query = truth(target.stem)
    c, s, b, _ = target.stem.split("_")
    distinct = f"{c} {s} on a {b} background"  # one of the synthetic captions' templates, not the caption's
    assert pid not in [h["id"] for h in search(library, f"{c} {s}", 50).hits if h["caption"] == "something"]
    for mode in ("model", "hybrid"):
        found = search(library, query, 5, mode=mode, captioner=cap)
        assert found.mode == mode and found.hits[0]["id"] == pid, (mode, found.hits[:3])
    assert search(library, distinct, 5, mode="model", captioner=cap).hits[0]["id"] == pid


def test_every_photo_is_found_first_by_its_true_description(cap, library, photos):
    for p in sorted(photos.glob("*.png")):
        top = search(library, truth(p.stem), 1, mode="model", captioner=cap).hits[0]
        assert top["path"].endswith(p.name), (p.name, top)


def test_like_leaves_out_the_query_photo_and_finds_its_copies(cap, library, photos, tmp_path):
    """The photo searched with is not an answer (by path, bytes or id); a copy of it elsewhere, with
    other bytes, is found first, at a cosine near 1."""
    for p in sorted(photos.glob("*.png"))[:4]:
        found = similar(library, p, 3, captioner=cap)
        assert found.mode == "like" and not any(h["path"].endswith(p.name) for h in found.hits)
        assert all(h["score"] < 0.999 for h in found.hits)
        assert [h["id"] for h in similar(library, p.read_bytes(), 3, captioner=cap).hits] == [
            h["id"] for h in found.hits]
        copy = tmp_path / f"copy-{p.stem}.png"
        Image.open(p).save(copy, compress_level=0)  # other bytes, the same pixels
        assert copy.read_bytes() != p.read_bytes()
        first = similar(library, copy, 3, captioner=cap).hits[0]
        assert first["path"].endswith(p.name) and first["score"] == pytest.approx(1.0, abs=2e-3)


def test_only_unknown_words_fall_back_to_keywords_with_a_note(cap, library):
    found = search(library, "zebra xylophone", 5, mode="hybrid", captioner=cap)
    assert found.mode == "keyword" and "zebra" in found.note and found.hits == []
    some = search(library, "a red zebra", 5, mode="model", captioner=cap)
    assert some.mode == "model" and "'zebra'" in some.note and some.hits


def test_a_model_change_refreshes_every_stored_vector(cap, trained, library, photos, tmp_path):
    model, vocab = load_model(trained / "best")
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(0.01)
    other = Captioner.load(save_model(model, vocab, tmp_path / "other"), device="cpu")
    assert other.fingerprint != cap.fingerprint
    found = search(library, "red circle", 3, mode="model", captioner=other)  # the keywords still answer
    assert found.mode == "keyword" and "no photo was indexed by this model" in found.note and found.hits
    with pytest.raises(Exception, match="no photo in it was indexed by this model"):
        similar(library, photos / sorted(p.name for p in photos.glob("*.png"))[0], 3, captioner=other)
    again = index_folders(other, [photos], library, progress=False)
    assert again.captioned == 12 and again.unchanged == 0
    con = sqlite3.connect(library)
    assert {r[0] for r in con.execute("SELECT model FROM vectors")} == {other.fingerprint}
    assert con.execute("SELECT count(*) FROM vectors").fetchone()[0] == 12
    con.close()
    assert index_folders(other, [photos], library, progress=False).unchanged == 12


def test_deleted_photos_leave_every_mode(cap, library, photos):
    gone = sorted(photos.glob("*.png"))[0]
    gone.unlink()
    assert index_folders(cap, [photos], library, progress=False).removed == 1
    con = sqlite3.connect(library)
    counts = [con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("vectors", "features")]
    assert counts == [11] * 2
    assert sum(len(i) for i, _ in point_blocks(con, cap.fingerprint)) == 11
    con.close()
    for mode in ("keyword", "model", "hybrid"):
        hits = search(library, truth(gone.stem), 50, mode=mode, captioner=cap).hits
        assert hits and not any(h["path"].endswith(gone.name) for h in hits)
    like = similar(library, Image.new("RGB", (96, 96), (220, 30, 30)), 50, captioner=cap).hits
    assert len(like) == 11 and not any(h["path"].endswith(gone.name) for h in like)


def test_keyword_and_tag_scores_of_some_photos_are_those_of_all(library):
    """Hybrid with a space reads BM25 and the tags for the photos it re-ranks only: the same scores."""
    from captioner.library.search import keyword_scores, tag_scores

    con = sqlite3.connect(library)
    ids = [r[0] for r in con.execute("SELECT id FROM photos ORDER BY id")]
    with con:
        con.executemany("INSERT INTO terms (word, id, score) VALUES (?, ?, ?)",
                        [("circle", i, 0.1 * k) for k, i in enumerate(ids)] + [("red circle", ids[0], 0.5)])
    some = ids[::3]
    for scores in (keyword_scores, tag_scores):
        whole = scores(con, "a red circle")
        assert set(whole) - set(some) and set(whole) & set(some)
        assert scores(con, "a red circle", some) == {i: s for i, s in whole.items() if i in some}
        assert scores(con, "a red circle", []) == {}
    con.close()


def test_schema_1_library_is_searchable_by_keyword_and_upgraded_by_indexing(cap, library, photos):
    con = sqlite3.connect(library)
    with con:  # what a library made before model search looked like
        for table in ("vectors", "pooled", "features", "points"):
            con.execute(f"DROP TABLE {table}")
        con.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    con.close()
    assert search(library, "red", 3).hits
    found = search(library, "red circle", 3, mode="model", captioner=cap)
    assert found.mode == "keyword" and "run captioner index again" in found.note
    assert index_folders(cap, [photos], library, progress=False).captioned == 12
    assert search(library, "red circle", 3, mode="model", captioner=cap).hits


def test_cli_search_modes_and_like(library, photos, trained, capsys):
    target = sorted(photos.glob("*.png"))[5]
    model = str(trained / "best")
    assert main(["search", truth(target.stem), "--db", str(library), "--model", model, "--json", "--limit", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0]["path"].endswith(target.name)
    assert main(["search", "--like", str(target), "--db", str(library), "--model", model, "--limit", "2"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) == 2 and not any(target.name in line for line in shown)  # the query photo is left out
    assert main(["search", "--db", str(library)]) == 2
    assert "give words to look for" in capsys.readouterr().err


# -- the pieces --------------------------------------------------------------------------------------


def test_packed_features_are_close_and_word_blobs_exact():
    x = torch.rand(3, 49, 40) * 6
    back = retrieval.unpack_features(retrieval.pack_features(x), (49, 40))
    assert back.shape == x.shape and (back - x).abs().max() <= 6 / 510 + 1e-5
    ids = np.array([[5, 9, 7], [4, 6, 8]], np.int32)
    counts = np.array([[1.5, 0.25, 0.125], [2.0, 0.5, 0.0]], np.float16)
    i2, c2 = wordcounts.unpack_words(wordcounts.pack_words(ids, counts))
    assert (i2 == ids).all() and (c2 == counts.astype(np.float32)).all()


def test_word_scores_by_hand():
    ids = np.array([[5, 6], [6, 7], [8, 9]], np.int32)
    counts = np.array([[1.0, 0.5], [0.2, 1.0], [1.0, 1.0]], np.float32)
    got = retrieval.word_scores(ids, counts, [6])
    c = np.array([0.5, 0.2, 0.0])
    want = np.log(c + retrieval.EPS) - np.log(c.mean() + retrieval.EPS)
    assert np.allclose(got, want, atol=1e-6)
    assert (retrieval.word_scores(ids, counts, []) == 0).all()


def test_query_logprob_is_the_teacher_forced_log_likelihood():
    torch.manual_seed(0)
    dec = AttentionDecoder(vocab_size=30, feat_dim=24, embed_dim=16, hidden_dim=32, attention_dim=16).eval()
    feats = torch.randn(5, 9, 24)
    tokens = [1, 7, 12, 4, 2]
    got = retrieval.query_logprob(dec, feats, tokens)
    with torch.no_grad():
        logits, _ = dec.teacher_forced(feats, torch.tensor([tokens[:-1]] * 5))
    want = logits.log_softmax(-1).gather(2, torch.tensor([tokens[1:]] * 5)[..., None]).squeeze(-1).sum(1)
    assert torch.allclose(got, want, atol=1e-5)
    retrieval.PAIRS_PER_CALL, old = 2, retrieval.PAIRS_PER_CALL
    try:
        assert torch.allclose(retrieval.query_logprob(dec, feats, tokens), want, atol=1e-5)
    finally:
        retrieval.PAIRS_PER_CALL = old


def test_expected_words_are_the_words_the_model_says():
    from captioner.data.vocab import Vocabulary

    vocab = Vocabulary([f"w{i}" for i in range(26)])
    torch.manual_seed(0)
    dec = AttentionDecoder(vocab_size=len(vocab), feat_dim=24, embed_dim=16, hidden_dim=32, attention_dim=16).eval()
    with torch.no_grad():
        dec.out.bias.fill_(-20)
        dec.out.bias[vocab.stoi["w3"]] = 10  # says w3, w3, ... until max_len
    ids, counts = retrieval.expected_words(dec, torch.randn(2, 9, 24), vocab, max_len=4, keep=3)
    assert (ids[:, 0] == vocab.stoi["w3"]).all() and np.allclose(counts[:, 0], 4, atol=0.01)
    assert not np.isin(ids, [vocab.pad, vocab.start, vocab.end, vocab.unk]).any() or (counts[:, 1:] < 0.01).all()


def test_retrieval_figures_by_hand():
    # 4 photos; photo 7 ranked 2nd among 3 scored, two unranked photos after them
    assert rank_of([(3, 0.9), (7, 0.5), (1, 0.1)], 7, total=5, scored=3) == 2
    assert rank_of([(3, 0.9), (7, 0.5), (1, 0.5)], 7, total=5, scored=3) == 2.5  # tie: mean of places 2 and 3
    assert rank_of([(3, 0.9)], 7, total=5, scored=1) == 1 + (5 - 1 + 1) / 2  # unranked: places 2..5 -> 3.5
    assert rank_of([(3, 0.9), (5, 0.2), (7, 0.2)], 7, total=3, scored=1) == 2.5  # tie in the rest
    r = recall([1, 2, 5, 6, 11, 3.5])
    assert r == {"R@1": 16.67, "R@5": 66.67, "R@10": 83.33, "median_rank": 4.25}


def test_evaluate_retrieval_on_the_shapes(trained, shapes, tmp_path, capsys):
    assert main(["evaluate", "--task", "retrieval", "--data", str(shapes), "--model", str(trained / "best"),
                 "--split", "val", "--max-images", "12", "--json"]) == 0
    out = capsys.readouterr().out
    r = json.loads(out.strip().splitlines()[-1])
    assert r["images"] == 12 and r["queries"] == 60 and set(r["modes"]) == {"keyword", "embedding", "model", "hybrid"}
    assert r["default_mode"] == "hybrid" and r["R@1"] == r["modes"]["hybrid"]["R@1"]
    # every photo is a different combination and the model learned them: its own photo comes first
    assert r["modes"]["model"]["R@1"] == 100.0 and r["modes"]["model"]["median_rank"] == 1
    assert "R@10" in r and "median_rank" in r
    assert "keyword" in out and "(default)" in out
    # the search space, both ways: each photo finds its own captions among the 60
    assert r["modes"]["embedding"]["R@1"] >= 50 and r["image_to_text"]["R@1"] >= 50
    both = [r["modes"]["hybrid"][k] + r["image_to_text"][k] for k in ("R@1", "R@5", "R@10")]
    assert r["rsum"] == pytest.approx(sum(both))
    assert "image to text" in out


def test_evaluate_retrieval_never_measures_in_or_adds_to_a_library_of_other_photos(trained, shapes, library, tmp_path,
                                                                                   capsys):
    """`--db` keeps the split's library for the next run; a library holding other photos is refused
    (its photos would be ranked by every query, and the split added to it for good)."""
    con = sqlite3.connect(library)
    before = con.execute("SELECT count(*) FROM photos").fetchone()[0]
    con.close()
    args = ["evaluate", "--task", "retrieval", "--data", str(shapes), "--model", str(trained / "best"),
            "--split", "val", "--max-images", "4", "--modes", "keyword", "--json"]
    assert main([*args, "--db", str(library)]) == 2
    err = capsys.readouterr().err
    assert f"{library}: holds {before} photos that are not in the 'val' split" in err
    con = sqlite3.connect(library)
    assert con.execute("SELECT count(*) FROM photos").fetchone()[0] == before
    con.close()
    kept = tmp_path / "val.sqlite"
    for _ in range(2):  # its own library, made then reused
        assert main([*args, "--db", str(kept)]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 4
