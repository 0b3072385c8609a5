"""The command line as a user meets it: JSON output, folders with broken files, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from captioner import Captioner
from captioner.cli import main
from captioner.errors import ConfigError

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "captioner", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_caption_json_lines_and_broken_file_is_skipped(trained, shapes, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    src = sorted(shapes.parent.glob("*.png"))
    Image.open(src[0]).save(folder / "one.png")
    Image.open(src[1]).save(folder / "sub" / "two.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    code = main(["caption", str(folder), "-r", "--model", str(trained / "best"), "--json", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0
    lines = [json.loads(x) for x in out.splitlines()]
    assert sorted(x["image"].split("/")[-1] for x in lines) == ["one.png", "two.jpg"]
    assert all(x["caption"] for x in lines)
    assert "broken.jpg" in err and "skipped" in err


def test_caption_beam_json_has_alternatives(trained, shapes, capsys):
    img = sorted(shapes.parent.glob("*.png"))[0]
    assert main(["caption", str(img), "--model", str(trained / "best"), "--json", "--beam-size", "3"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert len(obj["alternatives"]) == 3 and obj["caption"] == obj["alternatives"][0]["caption"]


def test_trigram_blocking_follows_the_model_unless_the_options_say():
    """The shipped model blocks repeated trigrams by default (decoding.json); --no-block-trigrams and
    --block-trigrams change only that setting."""
    from captioner.cli.parser import build_parser, decoding_from
    from captioner.decoding import Decoding

    cfg = Decoding(beam_size=5, length_norm=1.5, block_trigrams=True)  # a model's own
    parse = build_parser().parse_args
    assert decoding_from(parse(["caption", "x.jpg"]), cfg).block_trigrams
    assert not decoding_from(parse(["caption", "x.jpg", "--no-block-trigrams"]), cfg).block_trigrams
    plain = Decoding(beam_size=3)
    assert decoding_from(parse(["index", "x", "--db", "y", "--block-trigrams"]), plain).block_trigrams
    assert decoding_from(parse(["evaluate", "--data", "d"]), cfg) == decoding_from(parse(["caption", "x.jpg"]), cfg)
    changed = decoding_from(parse(["caption", "x.jpg", "--space-rerank", "1.2", "--rarity-penalty", "0.25"]), cfg)
    assert (changed.space_rerank, changed.rarity_penalty) == (1.2, 0.25)
    assert decoding_from(parse(["index", "x", "--db", "y", "--rarity-penalty", "0"]), cfg.replace(rarity_penalty=0.3)
                         ).rarity_penalty == 0.0  # 0 turns the model's own off



@pytest.mark.parametrize("option, value", [("--length-norm", "-3"), ("--length-norm", "nan"), ("--length-norm", "inf"),
                                           ("--beam-size", "0"), ("--beam-size", "101"), ("--beam-size", "two"),
                                           ("--rarity-penalty", "-1"), ("--rarity-penalty", "nan")])
def test_decoding_options_are_checked_before_anything_is_loaded(option, value, capsys):
    """The command line takes its decoding options through decoding.py's checks (the limits the search and
    model folders use): a bad one is argparse's one-line usage error, at once."""
    from captioner.decoding import Decoding

    with pytest.raises(SystemExit) as e:
        main(["caption", "no/such/photo.jpg", option, value])
    assert e.value.code == 2
    assert f"argument {option}: " in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(ConfigError):  # and from Python, whoever builds the value
        Decoding(**{option.lstrip("-").replace("-", "_"): float(value) if "norm" in option else value})


@pytest.mark.slow  # starts a Python process per case
@pytest.mark.parametrize("args,message", [
    (["caption", "no/such/photo.jpg"], "no/such/photo.jpg: no such file"),
    (["caption", EXAMPLES, "--model", "no/such/model"], "no/such/model: not a model folder"),
    (["train", "--data", "no/such/data", "--out", "x"], "no/such/data: no such file or folder"),
    (["evaluate", "--data", "no/such/data"], "no/such/data: no such file or folder"),
    (["caption", EXAMPLES, "--nproc", "2"], "--nproc N needs --out FILE"),
])
def test_user_mistakes_are_one_line_no_traceback(args, message, tmp_path):
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == f"captioner: error: {message}" or message in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_pickle_model_folder_is_refused(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.pt").write_bytes(b"\x80\x04pickle")
    assert main(["caption", str(EXAMPLES / "coffee.jpg"), "--model", str(tmp_path / "m")]) == 2
    assert "never loads" in capsys.readouterr().err


def test_train_with_missing_images_fails_clearly_then_skips(tmp_path, shapes, capsys):
    lines = shapes.read_text().splitlines()
    data = tmp_path / "captions.jsonl"
    data.write_text("\n".join(lines) + '\n{"image": "gone.png", "caption": "a lost one", "split": "train"}\n')
    for p in shapes.parent.glob("*.png"):
        (tmp_path / p.name).symlink_to(p)
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--max-images", "8",
            "--val-images", "2", "--quiet", "--image-size", "64", "--hidden-dim", "32", "--embed-dim", "16"]
    assert main(args) == 2
    assert "1 of 145 listed images are missing (first: " in capsys.readouterr().err
    with pytest.warns(UserWarning, match="left out"):
        assert main([*args, "--skip-missing"]) == 0


def test_save_load_gives_identical_captions(trained, shapes, tmp_path):
    from captioner.model.network import load_model, save_model

    imgs = sorted(shapes.parent.glob("*.png"))[:6]
    a = Captioner.load(trained / "best", device="cpu")
    model, vocab = load_model(trained / "best")
    save_model(model, vocab, tmp_path / "copy")
    b = Captioner.load(tmp_path / "copy", device="cpu")
    assert a.caption(imgs) == b.caption(imgs)
    assert a.caption(imgs, beam_size=3) == b.caption(imgs, beam_size=3)


def test_python_api_accepts_paths_pil_and_lists(trained, shapes):
    cap = Captioner.load(trained / "best", device="cpu")
    path = sorted(shapes.parent.glob("*.png"))[0]
    one = cap.caption(path)
    assert isinstance(one, str) and one
    assert cap.caption(str(path)) == one
    assert cap.caption(Image.open(path)) == one
    assert cap.caption([path, Image.open(path)]) == [one, one]


def test_embeddings_map_and_neighbours(trained, tmp_path, capsys):
    out = tmp_path / "words.png"
    assert main(["embeddings", "--model", str(trained / "best"), "--out", str(out), "--words", "20",
                 "--neighbours", "circle"]) == 0
    printed = capsys.readouterr().out
    assert out.stat().st_size > 5000 and Image.open(out).format == "PNG"
    line = printed.strip().splitlines()[0]
    assert line.startswith("circle: ") and len(line.split(",")) == 5
    assert main(["embeddings", "--model", str(trained / "best"), "--out", str(out), "--layer", "input"]) == 0
    assert main(["embeddings", "--model", str(trained / "best"), "--out", str(out), "--neighbours", "zebra"]) == 2
    assert "'zebra' is not in the model's vocabulary" in capsys.readouterr().err
