"""Batch captioning into a file, and the photo library: incremental indexing, search, interruptions."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from PIL import Image

from captioner import Captioner
from captioner.batch import caption_to_file
from captioner.cli import main
from captioner.library import connect, fts_query, index_folders, search


@pytest.fixture
def photos(tmp_path, shapes):
    """A folder of 12 synthetic photos (in two levels) plus a corrupt file and a text file."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    src = sorted(p for p in shapes.parent.glob("*.png") if p.stem.endswith("_4"))[:12]  # val images
    for i, p in enumerate(src):
        Image.open(p).save(folder / ("sub" if i % 3 == 0 else "") / p.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture
def cap(trained):
    return Captioner.load(trained / "best", device="cpu")


def consistent(db):
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.execute("INSERT INTO photos_fts(photos_fts) VALUES ('integrity-check')")
        n_photos = con.execute("SELECT count(*) FROM photos").fetchone()[0]
        ids = {r[0] for r in con.execute("SELECT id FROM photos")}
        fts = {r[0] for r in con.execute("SELECT rowid FROM photos_fts")}
        assert ids == fts
        return n_photos
    finally:
        con.close()


def test_index_then_search(cap, photos, tmp_path):
    db = tmp_path / "lib.sqlite"
    r = index_folders(cap, [photos], db, batch_size=4, progress=False)
    assert r.captioned == 12 and len(r.failed) == 1 and "broken.jpg" in r.failed[0]
    assert consistent(db) == 12
    hits = search(db, "red circles", limit=5).hits  # plural: Porter stemming matches "circle"
    assert hits and all("circle" in h["caption"] or "red" in h["caption"] for h in hits)
    assert hits[0]["score"] >= hits[-1]["score"]
    top = search(db, hits[0]["caption"], limit=1).hits[0]
    assert top["caption"] == hits[0]["caption"]
    assert search(db, "zebra").hits == [] and search(db, "").hits == []


def test_a_new_library_has_large_pages_and_an_old_one_keeps_its_own(cap, photos, tmp_path, monkeypatch):
    """A new library is made of 64 KB pages (a search reads every block of points: 2 MB rows in
    fewer overflow pages); one made before, of SQLite's default 4 KB, keeps them, and indexes again
    and searches."""
    from captioner.library import store

    new, old = tmp_path / "new.sqlite", tmp_path / "old.sqlite"
    with monkeypatch.context() as m:
        m.setattr(store, "PAGE_SIZE", 4096)  # as libraries were made before
        index_folders(cap, [photos], old, batch_size=4, progress=False)
    PAGE_SIZE = store.PAGE_SIZE  # noqa: N806
    for db in (new, old):
        index_folders(cap, [photos], db, batch_size=4, progress=False)
        assert search(db, "red circles", limit=3).hits
    page = {db: sqlite3.connect(db).execute("PRAGMA page_size").fetchone()[0] for db in (new, old)}
    assert page == {new: PAGE_SIZE, old: 4096}


def test_incremental_reindex(cap, photos, tmp_path):
    db = tmp_path / "lib.sqlite"
    index_folders(cap, [photos], db, progress=False)
    again = index_folders(cap, [photos], db, progress=False)
    assert (again.captioned, again.unchanged, again.removed) == (0, 13, 0)  # 12 photos + the known-bad file

    files = sorted(photos.rglob("*.png"))
    os.utime(files[0], (time.time() + 100, time.time() + 100))  # touched, same bytes
    Image.new("RGB", (96, 96), (30, 60, 220)).save(files[1])  # changed
    files[2].unlink()  # deleted
    r = index_folders(cap, [photos], db, progress=False)
    assert (r.touched, r.captioned, r.removed) == (1, 1, 1)
    assert consistent(db) == 11
    con = connect(db)
    assert con.execute("SELECT count(*) FROM photos WHERE path = ?", (str(files[2]),)).fetchone()[0] == 0
    con.close()


@pytest.mark.slow
def test_killed_index_run_leaves_a_consistent_database(cap, trained, shapes, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    src = sorted(shapes.parent.glob("*.png"))
    for i in range(400):
        Image.open(src[i % len(src)]).save(folder / f"{i:04d}.png")
    db = tmp_path / "lib.sqlite"
    cmd = [sys.executable, "-m", "captioner", "index", str(folder), "--db", str(db), "--model", str(trained / "best"),
           "--batch-size", "2", "--quiet", "--beam-size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            time.sleep(0.05)
            if db.is_file():
                try:
                    con = sqlite3.connect(db, timeout=1)
                    n = con.execute("SELECT count(*) FROM photos").fetchone()[0]
                    con.close()
                except sqlite3.OperationalError:
                    continue
                if n >= 10:
                    break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done = consistent(db)
    assert 10 <= done < 400, "the run should have been killed half-way"
    assert main(["index", str(folder), "--db", str(db), "--model", str(trained / "best"), "--quiet",
                 "--beam-size", "1"]) == 0
    assert consistent(db) == 400


def test_search_cli_json(cap, photos, tmp_path, capsys):
    db = tmp_path / "lib.sqlite"
    index_folders(cap, [photos], db, progress=False)
    capsys.readouterr()
    assert main(["search", "circle", "--db", str(db), "--json", "--limit", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert 1 <= len(lines) <= 3 and set(lines[0]) == {"path", "caption", "score", "relevance"}
    assert main(["search", "circle", "--db", str(tmp_path / "none.sqlite")]) == 2
    assert "no such database" in capsys.readouterr().err


def test_fts_query_drops_stopwords_and_quotes_words():
    assert fts_query("a dog running on the beach") == '"dog" OR "running" OR "beach"'
    assert fts_query("the") == '"the"'
    assert fts_query('dog" OR 1=1 --') == '"dog" OR "1"'  # quotes and operators never reach FTS5


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_batch_caption_to_file_resumes(cap, photos, tmp_path, suffix):
    out = tmp_path / f"captions{suffix}"
    paths = sorted(p for p in photos.rglob("*") if p.suffix in (".png", ".jpg"))
    r = caption_to_file(cap, paths, out, batch_size=4, progress=False)
    assert (r.captioned, r.skipped, len(r.failed)) == (12, 0, 1)
    with out.open("a") as f:
        f.write('{"image": "half-written')  # an interruption mid-line
    again = caption_to_file(cap, paths, out, progress=False)
    assert (again.captioned, again.skipped) == (0, 12)
    Image.new("RGB", (96, 96), (220, 30, 30)).save(paths[0])
    third = caption_to_file(cap, paths, out, progress=False)
    assert (third.captioned, third.skipped) == (1, 11)
    text = out.read_text()
    assert "half-written" not in text and text.count(str(paths[0])) == 1


def test_caption_cli_out_file(trained, photos, tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    assert main(["caption", str(photos), "-r", "--out", str(out), "--model", str(trained / "best"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "12 captioned" in err and "broken.jpg" in err
    assert len(out.read_text().splitlines()) == 12


def test_a_caption_out_rerun_with_nothing_to_do_loads_no_model(trained, photos, tmp_path, capsys, monkeypatch):
    out = tmp_path / "c.jsonl"
    good = [str(p) for p in sorted(photos.rglob("*.png"))]
    args = ["caption", *good, "--out", str(out), "--model", str(trained / "best"), "--quiet"]
    assert main(args) == 0
    first = out.read_text()

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded for nothing")

    monkeypatch.setattr(Captioner, "load", no_load)
    capsys.readouterr()
    assert main(args) == 0
    assert f"0 captioned, {len(good)} already in" in capsys.readouterr().err and out.read_text() == first
    Image.new("RGB", (96, 96), (20, 30, 220)).save(good[0])  # changed: now there is work, and a model
    with pytest.raises(AssertionError, match="loaded for nothing"):
        main(args)


def test_an_index_rerun_with_nothing_to_do_loads_no_model(trained, photos, tmp_path, capsys, monkeypatch):
    """Issue 30, item 4: the library remembers which model files made which fingerprint, so a re-run
    over unchanged photos answers without torch or the model; anything to do still loads it."""
    import shutil

    db, model = tmp_path / "lib.db", tmp_path / "model"
    shutil.copytree(trained / "best", model)
    args = ["index", str(photos), "--db", str(db), "--model", str(model), "--quiet"]
    real, loads = Captioner.load, []
    monkeypatch.setattr(Captioner, "load", lambda *a, **k: loads.append(1) or real(*a, **k))

    def run(*extra: str) -> str:
        loads.clear()
        capsys.readouterr()
        assert main([*args, *extra]) == 0
        return capsys.readouterr().err

    from captioner.data.images import list_images

    n = len(list_images([photos], recursive=True))  # one of them broken.jpg, unreadable
    assert f"{n - 1} captioned" in run() and loads == [1]
    assert f"0 captioned, {n} unchanged, 0 touched, 0 removed" in run() and loads == []
    Image.new("RGB", (96, 96), (20, 30, 220)).save(photos / "new.png")  # a new photo: work
    assert "1 captioned" in run() and loads == [1]
    assert f"{n + 1} unchanged" in run() and loads == []
    (photos / "new.png").unlink()  # a photo gone: work
    assert "1 removed" in run() and loads == [1]
    os.utime(next(p for p in list_images([photos], recursive=True) if p.suffix == ".png"))  # touched, same bytes
    assert "1 touched" in run() and loads == [1]
    with sqlite3.connect(db) as con:  # word counts damaged in the library: repaired
        con.execute("UPDATE vectors SET words = ? WHERE id = (SELECT min(id) FROM vectors)", (b"\x00" * 5,))
    assert "1 captioned (1 of them damaged" in run() and loads == [1]
    assert f"0 captioned, {n} unchanged" in run() and loads == []
    decoding = json.loads((model / "decoding.json").read_text())  # the model's files changed: another model
    (model / "decoding.json").write_text(json.dumps({**decoding, "beam_size": 2}))
    assert f"{n - 1} captioned" in run() and loads == [1]


def test_search_works_while_an_index_run_is_writing(cap, photos, tmp_path):
    import sqlite3

    db = tmp_path / "lib.sqlite"
    index_folders(cap, [photos], db, progress=False)
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    writer = sqlite3.connect(db, isolation_level=None, timeout=0)
    writer.execute("BEGIN IMMEDIATE")  # an indexer in the middle of a batch holds the write lock
    writer.execute("DELETE FROM photos")  # its uncommitted work is invisible to readers
    try:
        hits = search(db, "circle", limit=50).hits
        assert hits and len(hits) == len({h["path"] for h in hits})
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_queries_are_bounded_possessives_match_and_ids_past_sqlite_are_no_photo(cap, photos, tmp_path):
    """Issue 32, items 2, 21 and 10: a 10 MB query took minutes, "dog's" found nothing in any mode,
    and /api/search/like/9223372036854775808 was an OverflowError."""
    from captioner.errors import LibraryError
    from captioner.library import similar

    db = tmp_path / "lib.sqlite"
    index_folders(cap, [photos], db, progress=False)
    with pytest.raises(LibraryError, match="bytes long: at most 1,000"):
        search(db, "dog " * 5000, mode="hybrid", captioner=cap)
    with pytest.raises(LibraryError, match="101 words: at most 100"):
        search(db, " ".join(["dog"] * 101), mode="keyword")
    word = next(w for w in ("circle", "square", "triangle") if search(db, w, mode="keyword").hits)
    for mode in ("keyword", "model", "hybrid"):
        plain = search(db, word, mode=mode, captioner=cap).hits
        owned = search(db, f"the {word}'s colour", mode=mode, captioner=cap).hits
        assert owned and {h["id"] for h in owned[:3]} & {h["id"] for h in plain[:3]}, mode
    for bad in (2**63, 2**70, 0, -1):
        with pytest.raises(LibraryError, match="no photo"):
            similar(db, None, 5, captioner=cap, photo_id=bad)
