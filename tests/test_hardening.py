"""What a careless user or an attacker tried, and what must happen instead: nothing a user already
had is lost, one bad file never stops a job, the server cannot be flooded or read from another
site, and no result is silently wrong. (Each case is a row of docs/RELIABILITY.md.)"""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from captioner.cli import main


@pytest.fixture
def photos(shapes, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted(shapes.parent.glob("*_4.png"))[:3]:
        shutil.copy(p, folder / p.name)
    return folder


# -- data loss --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,text", [
    ("captions.csv", "image,caption\nphotos/a.jpg,a dog runs on the beach\n"),
    ("captions.jsonl", '{"image": "a.jpg", "caption": "a dog runs on the beach"}\n'),
    ("notes.jsonl", "my own notes, not JSON\n"),
])
def test_caption_out_never_rewrites_a_file_it_did_not_write(photos, trained, tmp_path, capsys, name, text):
    out = tmp_path / name
    out.write_text(text)
    args = ["caption", str(photos), "--model", str(trained / "best"), "--out", str(out), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "was not written by captioner caption" in err and "--force" in err
    assert out.read_text() == text  # untouched
    assert main([*args, "--force"]) == 0
    assert "a dog runs on the beach" not in out.read_text()
    assert main(args) == 0  # now it is ours: a re-run skips what is done
    assert "0 captioned, 3 already" in capsys.readouterr().err


def test_only_our_own_part_files_are_folded_in(photos, trained, tmp_path):
    out = tmp_path / "c.jsonl"
    mine = tmp_path / "c.jsonl.partial"
    mine.write_text("a user's own file\n")
    first = sorted(photos.iterdir())[0]
    from captioner.files import file_digest

    part = tmp_path / "c.jsonl.part1.jsonl"  # what an interrupted run of two processes left
    part.write_text(json.dumps({"image": str(first), "sha1": file_digest(first), "caption": "from the part"}) + "\n")
    assert main(["caption", str(photos), "--model", str(trained / "best"), "--out", str(out), "--quiet"]) == 0
    assert mine.read_text() == "a user's own file\n" and not part.exists()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3 and lines[0]["caption"] == "from the part"


# -- security ---------------------------------------------------------------------------------------


def test_csv_cells_never_become_formulas(photos, trained, tmp_path, monkeypatch, capsys):
    evil = photos / '=HYPERLINK("x.example";"click").png'
    shutil.copy(sorted(photos.iterdir())[0], evil)
    monkeypatch.chdir(photos)
    args = ["caption", evil.name, "--model", str(trained / "best"), "--out", str(tmp_path / "c.csv"), "--quiet"]
    assert main(args) == 0
    rows = list(csv.DictReader((tmp_path / "c.csv").open()))
    assert rows[0]["image"] == "'" + evil.name  # shown as text by a spreadsheet, never run
    assert main(args) == 0 and "0 captioned, 1 already" in capsys.readouterr().err  # and read back as the path


def test_index_never_changes_a_database_it_did_not_make(photos, trained, tmp_path, capsys):
    import hashlib
    import sqlite3

    db = tmp_path / "contacts.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE contacts (name TEXT, phone TEXT)")
    con.execute("INSERT INTO contacts VALUES ('Ada', '555')")
    con.commit()
    con.close()
    before = hashlib.sha1(db.read_bytes()).hexdigest()
    model = ["--model", str(trained / "best"), "--quiet"]
    assert main(["index", str(photos), "--db", str(db), *model]) == 2
    err = capsys.readouterr().err
    assert "not a captioner photo database (it holds contacts)" in err and "left as it is" in err
    assert main(["search", "dog", "--db", str(db)]) == 2
    assert hashlib.sha1(db.read_bytes()).hexdigest() == before and not (tmp_path / "contacts.db-wal").exists()

    notes = tmp_path / "notes.db"
    notes.write_text("my notes")
    assert main(["index", str(photos), "--db", str(notes), *model]) == 2
    assert "not an SQLite database" in capsys.readouterr().err and notes.read_text() == "my notes"

    ours = tmp_path / "photos.db"
    assert main(["index", str(photos), "--db", str(ours), *model]) == 0
    con = sqlite3.connect(ours)
    con.execute("UPDATE meta SET value = '0' WHERE key = 'schema'")  # as an older captioner would have left it
    con.commit()
    con.close()
    capsys.readouterr()
    for args in (["index", str(photos), "--db", str(ours), *model], ["search", "circle", "--db", str(ours)]):
        assert main(args) == 2
        assert "made by another version of captioner (schema 0" in capsys.readouterr().err


def test_export_never_writes_into_a_folder_of_other_things(trained, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    assert main(["export", "--model", str(trained / "best"), "--out", str(tmp_path / "mine")]) == 2
    assert "not a captioner export" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]
    assert main(["export", "--model", str(trained / "best"), "--out", str(tmp_path / "x")]) == 0
    assert main(["export", "--model", str(trained / "best"), "--out", str(tmp_path / "x")]) == 0  # its own: redone


def test_a_kill_between_the_two_renames_of_a_model_save_loses_nothing(trained, tmp_path, shapes, capsys):
    from captioner.model.folder import load_model, save_model

    best = tmp_path / "run" / "best"
    shutil.copytree(trained / "best", best)
    photo = str(sorted(shapes.parent.glob("*_4.png"))[0])
    assert main(["caption", photo, "--model", str(best)]) == 0
    want = capsys.readouterr().out
    # what SIGKILL leaves after the first rename: the old folder moved aside, the new one half-built
    best.rename(best.with_name(".best.old"))
    half = tmp_path / "run" / ".best.k1ll3d"
    half.mkdir()
    (half / "config.json").write_text("{")
    assert main(["caption", photo, "--model", str(best)]) == 0  # the complete old version is back
    assert capsys.readouterr().out == want and best.is_dir() and not best.with_name(".best.old").exists()
    model, vocab = load_model(best)
    save_model(model, vocab, best)  # the next save clears what the killed one left
    assert sorted(p.name for p in best.parent.iterdir()) == ["best"]


@pytest.mark.parametrize("bad_line,message", [
    ('b.jpg,"a dog runs on the beach', "records.csv:3: a field runs over"),  # the quote is never closed
    ("b.jpg," + "x" * 200_000, "records.csv:3:"),  # past the csv module's field limit
    ('b.jpg,"' + "y" * 20_000 + '"', "records.csv:3: a field of more than 10,000 characters"),
])
def test_a_stray_quote_in_a_caption_csv_never_swallows_rows_silently(tmp_path, bad_line, message):
    from captioner.data.records import load_records
    from captioner.errors import DataError

    rows = ["image,caption", "a.jpg,a cat on a mat", bad_line] + [f"c{i}.jpg,a bird on a wire" for i in range(40)]
    (tmp_path / "records.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=message):
        load_records(tmp_path / "records.csv")


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 0 lineto 16 16 lineto closepath fill showpage\n%%EOF\n")


def test_postscript_named_jpg_never_reaches_ghostscript(tmp_path, trained, monkeypatch, capsys):
    from fastapi.testclient import TestClient
    from PIL import EpsImagePlugin

    from captioner import Captioner
    from captioner.data.images import open_rgb
    from captioner.errors import ImageError
    from captioner.server.app import create_app

    def no_ghostscript(*a, **k):
        raise AssertionError("Ghostscript was called")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    evil = tmp_path / "holiday.jpg"
    evil.write_bytes(EPS)
    with pytest.raises(ImageError, match="holiday.jpg: not a readable image"):
        open_rgb(evil)
    with pytest.raises(ImageError, match="not a readable image"):
        open_rgb(b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n")
    assert main(["caption", str(evil), "--model", str(trained / "best")]) == 1  # reported, no traceback
    assert "holiday.jpg: not a readable image" in capsys.readouterr().err
    client = TestClient(create_app(Captioner.load(trained / "best", device="cpu")))
    r = client.post("/api/caption", files={"file": ("x.jpg", EPS, "image/jpeg")})
    assert r.status_code == 415 and "not a readable image" in r.json()["detail"]
