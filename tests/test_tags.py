"""ImageNet tags (tags.py, assets/imagenet_words.json): the class-to-words table, the words and
scores a photo gets, the words guidance asks a caption to say, and tags wherever a caption goes."""

from __future__ import annotations

import json

import pytest
import torch

from captioner.decoding import NAMING_PRIOR, Naming
from captioner.tags import Tagger, naming_of, table

NAMES = {c["name"]: k for k, c in enumerate(table()["classes"])}


@pytest.fixture(scope="module")
def tagger() -> Tagger:
    t = table()
    return Tagger(torch.zeros(len(t["classes"]), 8), torch.zeros(len(t["classes"])))


def probs_of(**named: float) -> torch.Tensor:
    """Class probabilities (1, 1000) with the named classes (underscores for spaces) as given."""
    p = torch.zeros(1, 1000)
    for name, value in named.items():
        p[0, NAMES[name.replace("_", " ")]] = value
    return p


def test_every_class_has_words_and_hypernyms_that_end_at_the_root():
    data = table()
    assert len(data["classes"]) == 1000 and len({c["id"] for c in data["classes"]}) == 1000
    for c in data["classes"]:
        assert c["words"] and all(w and w == w.lower() for w in c["words"]), c
        assert c["hypernyms"][-1] == "entity" or "entity" in c["hypernyms"], c  # the chain reaches the root
        for w in c["words"] + c["hypernyms"]:
            assert w in data["forms"] and data["forms"][w][0] == w
    by_name = {c["name"]: c for c in data["classes"]}
    assert "cat" in by_name["Egyptian cat"]["words"] and "animal" in by_name["Egyptian cat"]["hypernyms"]
    assert "coffee" in by_name["espresso"]["words"]
    assert "dog" in by_name["Tibetan terrier"]["words"]
    assert data["forms"]["cat"] == ["cat", "cats"] and data["forms"]["mouse"] == ["mouse", "mice"]


def test_a_word_scores_the_probability_of_all_its_classes(tagger):
    p = probs_of(Egyptian_cat=0.8, tabby=0.1, tiger_cat=0.05, espresso=0.05)
    tags = tagger.tags(p)[0]
    assert tags[0]["word"] == "cat" and tags[0]["score"] == pytest.approx(0.95, abs=1e-3)
    assert [t["word"] for t in tags][:2] == ["cat", "egyptian cat"]
    assert all(t["score"] >= 0.1 for t in tags)
    terms = tagger.terms_of(p)[0]
    assert terms["animal"] == pytest.approx(0.95, abs=1e-3) and terms["feline"] >= 0.95 - 1e-3
    assert "coffee" not in terms  # 0.05: under the floor


class Vocab:
    def __init__(self, words):
        self.itos = ["<pad>", "<start>", "<end>", "<unk>", *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}


def test_confident_tags_become_sets_of_caption_words(tagger):
    vocab = Vocab(["a", "cat", "cats", "dog", "coffee", "on", "table"])
    p = torch.cat([probs_of(Egyptian_cat=0.7, tabby=0.2), probs_of(espresso=0.9), probs_of(tripod=0.95),
                   probs_of(Egyptian_cat=0.2)])
    sets = tagger.constraints(p, vocab, threshold=0.5, most=2)
    cat, cats, coffee = vocab.stoi["cat"], vocab.stoi["cats"], vocab.stoi["coffee"]
    assert sets[0] == [{cat, cats}]  # Egyptian cat and tabby name the same word: one set
    assert sets[1] == [{coffee}]  # "espresso" is not a caption word; "coffee" is
    assert sets[2] == []  # "tripod": the vocabulary lacks it
    assert sets[3] == []  # not confident


def test_a_tag_word_the_vocabulary_lacks_borrows_the_nearest_it_has(tagger):
    vocab = Vocab(["a", "horse", "horses", "dog", "cat", "in", "field"])
    borrowed = tagger.borrowed(vocab)
    assert borrowed["zebra"] == "horse"  # both equines
    assert "horse" not in borrowed and "dog" not in borrowed  # only words the vocabulary lacks
    p = probs_of(zebra=0.95)
    assert tagger.wanted(p, vocab, 0.5, 1) == [[]]  # not unless asked
    ((ids, swaps),) = tagger.wanted(p, vocab, 0.5, 1, borrow=True)[0]
    horse, horses = vocab.stoi["horse"], vocab.stoi["horses"]
    assert ids == {horse, horses} and swaps == {horse: "zebra", horses: "zebras"}
    unborrowed = tagger.unborrowed(vocab)  # how a caption is read back as the words the search said
    assert unborrowed["zebra"] == "horse" and unborrowed["zebras"] == "horses"
    assert tagger.borrowed(vocab) is borrowed  # worked out once per vocabulary


def test_naming_counts_what_the_captions_say_and_guidance_asks_only_for_words_said(tagger):
    """naming.json: of three cat photos, captions said "cat" in 1, 1/2 and 0 of theirs; of two ski
    photos, never "ski". Guidance with a least rate asks for the cat and not the ski; a word no
    training photo carried (coffee) has the average rate, as a borrowed word does."""
    vocab = Vocab(["a", "cat", "cats", "man", "ski", "snow", "coffee", "horse", "horses"])
    ids = {w: vocab.stoi[w] for w in vocab.itos}
    probs = torch.cat([probs_of(Egyptian_cat=0.9)] * 3 + [probs_of(ski=0.8)] * 2 + [probs_of(Egyptian_cat=0.2)])
    refs = [[{ids["a"], ids["cat"]}, {ids["cats"]}], [{ids["cat"]}, {ids["man"]}], [{ids["man"]}],
            [{ids["man"], ids["snow"]}], [{ids["man"]}], [{ids["cat"]}]]  # the last photo's tag is not confident
    naming = naming_of(tagger, probs, refs, vocab)
    assert naming.words == {"cat": (3, 1.5), "ski": (2, 0.0)} and naming.prior == pytest.approx(1.5 / 5)
    assert naming.rate("cat") == pytest.approx((1.5 + NAMING_PRIOR * 0.3) / (3 + NAMING_PRIOR))
    assert naming.rate("coffee") == naming.rate(None) == pytest.approx(0.3)
    assert Naming.from_json(json.loads(json.dumps(naming.to_json()))) == naming

    p = torch.cat([probs_of(Egyptian_cat=0.9), probs_of(ski=0.9), probs_of(espresso=0.9)])
    everything = [[ids_ for ids_, _ in sets] for sets in tagger.wanted(p, vocab, 0.5, 1)]
    assert everything == [[{ids["cat"], ids["cats"]}], [{ids["ski"]}], [{ids["coffee"]}]]
    gated = [[ids_ for ids_, _ in sets] for sets in tagger.wanted(p, vocab, 0.5, 1, naming=naming, named=0.25)]
    assert gated == [[{ids["cat"], ids["cats"]}], [], [{ids["coffee"]}]]
    assert tagger.wanted(probs_of(zebra=0.9), vocab, 0.5, 1, borrow=True, naming=naming, named=0.3)[0]  # the prior
    assert not tagger.wanted(probs_of(zebra=0.9), vocab, 0.5, 1, borrow=True, naming=naming, named=0.31)[0]
    assert tagger.wanted(p, vocab, 0.5, 1, naming=naming, named=0.0) == tagger.wanted(p, vocab, 0.5, 1)


@pytest.mark.parametrize("bad", [[], {"words": {}}, {"floor": 0.3, "prior": 2, "words": {}},
                                 {"floor": 0.3, "prior": 0.5, "words": {"cat": [2, 3.0]}},
                                 {"floor": 0.3, "prior": 0.5, "words": {"cat": "often"}}])
def test_a_bad_naming_json_is_refused(bad):
    with pytest.raises(ValueError):
        Naming.from_json(bad)


def test_training_writes_naming_and_a_folder_keeps_it_or_does_without(trained, tmp_path):
    """`captioner train` counts naming.json into best/; a folder without it loads with none (every
    confident word asked for); a damaged one is a one-line ModelError."""
    import shutil

    from captioner.errors import ModelError
    from captioner.model.network import NAMING, copy_model, load_model

    assert (trained / "best" / NAMING).is_file()
    model, _ = load_model(trained / "best")
    assert isinstance(model.naming, Naming)
    copy = copy_model(trained / "best", tmp_path / "copy")  # --init and --space-only start from a copy
    assert (copy / NAMING).read_bytes() == (trained / "best" / NAMING).read_bytes()
    folder = tmp_path / "m"
    shutil.copytree(trained / "best", folder)
    (folder / NAMING).unlink()
    assert load_model(folder)[0].naming is None
    (folder / NAMING).write_text('{"floor": 0.3, "prior": 0.5, "words": {"cat": [1, 5]}}')
    with pytest.raises(ModelError, match="bad naming.json") as e:
        load_model(folder)
    assert "\n" not in str(e.value)


def test_decoding_checks_the_naming_rate_and_saves_it_only_when_used():
    from captioner.decoding import Decoding
    from captioner.errors import ConfigError

    for bad in (-0.1, 1.5, float("nan"), "often"):
        with pytest.raises(ConfigError, match="tag naming rate"):
            Decoding(tag_named=bad)
    assert "tag_named" not in Decoding(tag_threshold=0.8).saved()  # a folder from before it keeps its fingerprint
    assert Decoding(tag_threshold=0.3, tag_named=0.4).saved()["tag_named"] == 0.4
    assert "said >= 0.4" in Decoding(beam_size=5, tag_threshold=0.3, tag_named=0.4).describe()


def test_a_caption_naming_an_animal_the_encoder_does_not_see_is_flagged(tagger):
    p = probs_of(Egyptian_cat=0.8, tabby=0.15)[0]
    flag = tagger.disagreement("a brown dog is playing with a yellow toy", p)
    assert flag == {"caption_says": "dog", "encoder_sees": "cat", "score": pytest.approx(0.95, abs=1e-3)}
    assert tagger.disagreement("two dogs play with a cat", p)["caption_says"] == "dogs"
    assert tagger.disagreement("a cat on a sofa", p) is None
    assert tagger.disagreement("a brown dog", probs_of(Egyptian_cat=0.3)[0]) is None  # not confident


def test_the_shipped_encoder_names_the_readme_examples():
    from captioner.model.encoder import imagenet_classifier

    weight, bias = imagenet_classifier("tf_efficientnet_lite0")
    assert weight.shape == (1000, 1280) and bias.shape == (1000,)


def test_tags_travel_with_every_caption_and_guidance_can_be_turned_off(trained, shapes, tmp_path, capsys):
    from captioner import Captioner
    from captioner.cli import main

    cap = Captioner.load(trained / "best", device="cpu", precision="fp32")
    img = next(shapes.parent.glob("*.png"))
    r = cap.caption(img, details=True)
    assert isinstance(r["tags"], list) and all({"word", "score"} == set(t) for t in r["tags"])
    assert cap.caption(img, details=True, guided=False)["tags"] == r["tags"]  # still reported
    out = tmp_path / "caps.jsonl"
    assert main(["caption", str(img), "--model", str(trained / "best"), "--out", str(out), "--device", "cpu",
                 "--precision", "fp32"]) == 0
    entry = json.loads(out.read_text().splitlines()[0])
    assert entry["tags"] == r["tags"]
    assert main(["caption", str(img), "--model", str(trained / "best"), "--out", str(out), "--device", "cpu",
                 "--precision", "fp32"]) == 0
    assert [json.loads(x)["tags"] for x in out.read_text().splitlines()] == [r["tags"]]  # a re-run keeps them
    capsys.readouterr()
    assert main(["caption", str(img), "--model", str(trained / "best"), "--json", "--no-tags", "--device", "cpu",
                 "--precision", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["tags"] == r["tags"]


def test_a_csv_out_carries_tags_and_an_older_csv_without_them_is_resumed(trained, shapes, tmp_path, capsys):
    import csv

    from captioner import Captioner
    from captioner.cli import main

    imgs = sorted(shapes.parent.glob("*.png"))[:2]
    run = ["--model", str(trained / "best"), "--device", "cpu", "--precision", "fp32"]
    want = [Captioner.load(trained / "best", device="cpu", precision="fp32").caption(i, details=True)["tags"]
            for i in imgs]
    assert all(want)  # the test means something only if the photos have tags
    cell = ["; ".join(f"{t['word']} {t['score']:.3f}" for t in tags) for tags in want]
    out = tmp_path / "caps.csv"
    assert main(["caption", *map(str, imgs), *run, "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["tags"] for r in rows] == cell and float(rows[0]["tags"].split("; ")[0].rsplit(" ", 1)[1]) > 0
    # a file written before the tags column: still ours, resumed, and rewritten with the column
    out.write_text("image,sha1,caption\n" + f"{rows[0]['image']},{rows[0]['sha1']},{rows[0]['caption']}\n")
    capsys.readouterr()
    assert main(["caption", *map(str, imgs), *run, "--out", str(out)]) == 0
    assert "1 captioned, 1 already" in capsys.readouterr().err
    assert out.read_text().splitlines()[0] == "image,sha1,caption,tags"
    assert [r["tags"] for r in csv.DictReader(out.open())] == ["", cell[1]]


def test_guidance_makes_the_caption_say_a_confident_tag(trained, shapes, monkeypatch):
    """The tiny model's shapes are not ImageNet's: let the tags ask for a shape word the caption
    does not say, and the guided caption says it; a caption that says it already stays as it was."""
    from captioner import Captioner

    cap = Captioner.load(trained / "best", device="cpu", precision="fp32")
    shapes_words = [w for w in ("square", "circle", "triangle") if w in cap.vocab.stoi]
    guided = cap.decoding.replace(tag_threshold=0.5, beam_size=3)
    img = next(p for p in sorted(shapes.parent.glob("*.png"))
               if shapes_words[0] not in cap.caption(p, decoding=guided, guided=False))
    plain = cap.caption(img, decoding=guided, guided=False)
    said = next(w for w in plain.split() if w in shapes_words)
    for word, expected in ((shapes_words[0], None), (said, plain)):
        monkeypatch.setattr(cap.tagger, "wanted", lambda probs, vocab, threshold, most, *rest, w=word: [
            [({vocab.stoi[w]}, {})] for _ in range(probs.shape[0])])
        got = cap.caption(img, decoding=guided)
        assert word in got.split()
        if expected is not None:
            assert got == expected


@pytest.mark.slow
def test_keyword_search_finds_the_examples_by_their_tags(tmp_path):
    """The issue's check, with the shipped model: "cat", "coffee" and "animal" in a library of
    examples/ find the right photos, "animal" by a hypernym the caption does not say."""
    from pathlib import Path

    from captioner import Captioner
    from captioner.library import index_folders, search

    examples = Path(__file__).resolve().parent.parent / "examples"
    db = tmp_path / "lib.db"
    index_folders(Captioner.load(device="cpu"), [examples], db, progress=False)
    for query, photo in (("cat", "chelsea.jpg"), ("coffee", "coffee.jpg"), ("animal", "chelsea.jpg"),
                         ("tripod", "camera.jpg"), ("espresso", "coffee.jpg")):
        hits = search(db, query, mode="keyword").hits
        assert hits and Path(hits[0]["path"]).name == photo, (query, hits)


def test_a_library_from_before_tags_still_searches(tmp_path):
    import sqlite3

    from captioner.library import connect, search

    db = tmp_path / "old.db"
    con = connect(db)
    con.execute("INSERT INTO photos (path, sha1, size, mtime, caption, model, indexed_at) "
                "VALUES ('/p/cat.jpg', 'x', 1, 1.0, 'a cat on a sofa', 'shipped', 0)")
    con.execute("INSERT INTO photos_fts (rowid, caption, alternatives) VALUES (1, 'a cat on a sofa', '')")
    con.execute("DROP TABLE terms")
    con.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")  # as schema 2 left it
    con.commit()
    con.close()
    hits = search(db, "cat", mode="keyword").hits
    assert [h["path"] for h in hits] == ["/p/cat.jpg"]
    assert "terms" not in {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master")}  # unchanged


def test_tags_survive_the_librarys_reindex(trained, shapes, tmp_path):
    from captioner import Captioner
    from captioner.library import index_folders, search

    cap = Captioner.load(trained / "best", device="cpu", precision="fp32")
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted(shapes.parent.glob("*.png"))[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    db = tmp_path / "lib.db"
    index_folders(cap, [folder], db, progress=False)

    def terms() -> dict:
        import sqlite3

        with sqlite3.connect(db) as con:
            return {(w, i): s for w, i, s in con.execute("SELECT word, id, score FROM terms")}

    first = terms()
    assert first and all(0 < s <= 1 for s in first.values())
    word = max(first, key=first.get)[0]
    assert search(db, word, mode="keyword").hits  # a photo found by a tag word
    index_folders(cap, [folder], db, progress=False)  # nothing changed: kept as they are
    assert terms() == first
    victim = sorted(folder.iterdir())[0]
    victim.write_bytes(sorted(shapes.parent.glob("*.png"))[5].read_bytes())  # changed: captioned again
    index_folders(cap, [folder], db, progress=False)
    import sqlite3

    with sqlite3.connect(db) as con:
        photos = {i for (i,) in con.execute("SELECT id FROM photos")}
    after = terms()
    assert {i for _, i in after} == photos and len(photos) == 3  # the old photo's terms went with it
    assert {k: v for k, v in after.items() if k[1] in {i for _, i in first}} != first  # one photo's are new


def test_a_borrowed_word_is_written_as_the_tag(trained, shapes, monkeypatch):
    """Guidance with borrowing: the search says the vocabulary's word, the caption the tag's."""
    from captioner import Captioner

    cap = Captioner.load(trained / "best", device="cpu", precision="fp32")
    word = next(w for w in ("circle", "square", "triangle") if w in cap.vocab.stoi)
    img = sorted(shapes.parent.glob("*.png"))[0]
    monkeypatch.setattr(cap.tagger, "wanted", lambda probs, vocab, threshold, most, *rest: [
        [({vocab.stoi[word]}, {vocab.stoi[word]: "rhombus"})] for _ in range(probs.shape[0])])
    d = cap.decoding.replace(tag_threshold=0.5, beam_size=3, tag_borrow=True)
    got = cap.caption(img, decoding=d, details=True)
    assert "rhombus" in got["caption"].split() and word not in got["caption"].split()
    assert got["alternatives"][0]["caption"] == got["caption"]
