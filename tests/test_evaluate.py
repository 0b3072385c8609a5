"""`captioner evaluate`: free-running captions of a split, scored; files written; one-split folders."""

import json
import shutil

import captioner.metrics as metrics_module
from captioner.cli import main

KEYS = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "images", "beam_size", "seconds"}


def test_evaluate_json_and_files(trained, shapes, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(trained / "best"), "--data", str(shapes), "--split", "val",
                 "--beam-size", "3", "--json", "--out", str(out), "--no-meteor"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert KEYS <= set(result) and result["images"] == 36 and result["beam_size"] == 3
    assert 0 < result["BLEU-4"] <= 1 and result["CIDEr"] > 1  # a model that learned the shapes
    captions = json.loads((out / "captions.json").read_text())
    assert len(captions) == 36 and set(captions[0]) == {"image_id", "caption"}
    assert json.loads((out / "metrics.json").read_text())["CIDEr"] == result["CIDEr"]


def test_a_folder_with_only_one_split(trained, shapes, tmp_path, capsys):
    """A test set on its own: captions.csv without split lists or a split column."""
    folder = tmp_path / "test_only"
    folder.mkdir()
    rows = ["image,caption"]
    for line in shapes.read_text().splitlines():
        obj = json.loads(line)
        if obj["split"] == "val":
            shutil.copy(shapes.parent / obj["image"], folder / obj["image"])
            rows += [f"{obj['image']},{c}" for c in obj["captions"]]
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    assert main(["evaluate", "--model", str(trained / "best"), "--data", str(folder), "--split", "test", "--json",
                 "--no-meteor"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 36


def test_without_java_meteor_is_skipped_and_said(trained, shapes, monkeypatch, capsys):
    monkeypatch.setattr(metrics_module, "java_available", lambda: False)
    assert main(["evaluate", "--model", str(trained / "best"), "--data", str(shapes), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["METEOR"] is None and "Java" in result["meteor_skipped"]
    assert result["tokenizer"].startswith("python") and result["CIDEr"] > 1
    assert "METEOR skipped" in out[-2]
