"""Files from strangers: model folders, weights files and checkpoints are read as JSON and
safetensors (or torch.load with weights_only=True where a pickle is unavoidable); a malicious
pickle is refused and its code never runs; a folder whose parts do not fit is one clear line."""

import json
import pathlib
import pickle
import shutil
import warnings

import pytest
import torch
from conftest import TINY

from captioner.cli import main

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "coffee.jpg"


class Evil:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def one_line_error(capsys, code, expected):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [x for x in err.strip().splitlines() if x.startswith("captioner: error")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def test_malicious_pickles_never_run(tmp_path, shapes, trained, capsys):
    marker = tmp_path / "PWNED"
    payload = {"decoder.weight": Evil(marker)}

    # 1. a model folder that holds a pickle instead of safetensors
    folder = tmp_path / "model"
    folder.mkdir()
    torch.save(payload, folder / "model.pt")
    msg = one_line_error(capsys, main(["caption", str(EXAMPLE), "--model", str(folder)]), "never loads")
    assert "model.pt" in msg

    # 2. a pickle renamed to model.safetensors, beside a valid config and vocabulary
    shipped = pathlib.Path(__file__).resolve().parent.parent / "src" / "captioner" / "assets" / "model"
    fake = tmp_path / "fake"
    shutil.copytree(shipped, fake)
    torch.save(payload, fake / "model.safetensors")
    one_line_error(capsys, main(["caption", str(EXAMPLE), "--model", str(fake)]), "not a readable safetensors")

    # 3. an encoder weights file: only plain tensors are accepted
    torch.save(payload, tmp_path / "resnet.pth")
    one_line_error(capsys, main(["train", "--data", str(shapes), "--out", str(tmp_path / "r"), "--encoder", "resnet50",
                                 "--encoder-weights", str(tmp_path / "resnet.pth"), *TINY]), "resnet.pth")

    # 4. a checkpoint planted in a run folder, then --resume
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"epoch": 1, "model": payload}, run / "checkpoint.pt")
    one_line_error(capsys, main(["train", "--data", str(shapes), "--out", str(run), "--resume", "--epochs", "2",
                                 "--max-images", "8", "--val-images", "2", *TINY]), "checkpoint.pt")
    # 5. the search space's checkpoint planted in a --space-only run folder, pickled as Python does
    # (protocol 4: torch's note about it is not shown either), then --resume
    space_run = tmp_path / "space_run"
    space_run.mkdir()
    with open(space_run / "space.pt", "wb") as f:
        pickle.dump({"settings": payload, "done": [], "current": None}, f)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code = main(["train", "--space-only", "--init", str(trained / "best"), "--data", str(shapes), "--out",
                     str(space_run), "--resume", "--space-epochs", "1", "--workers", "0", "--quiet"])
    one_line_error(capsys, code, "space.pt: holds objects other than tensors")
    assert not [w for w in seen if "pickle protocol" in str(w.message)]
    assert not marker.exists(), "unpickling ran the payload"

    # the payload does work when unpickled without the guard, so the checks above mean something
    torch.load(run / "checkpoint.pt", weights_only=False)
    assert marker.exists()


def spoil(folder, how):
    if how == "vocab_short":
        v = json.loads((folder / "vocab.json").read_text())
        v["itos"] = v["itos"][:-3]
        (folder / "vocab.json").write_text(json.dumps(v))
    elif how == "config_sizes":
        c = json.loads((folder / "config.json").read_text())
        c["hidden_dim"] = c["hidden_dim"] * 2
        (folder / "config.json").write_text(json.dumps(c))
    elif how == "config_not_json":
        (folder / "config.json").write_text("{ this is not json")
    elif how == "config_unknown_encoder":
        c = json.loads((folder / "config.json").read_text())
        c["encoder"] = "alexnet9000"
        (folder / "config.json").write_text(json.dumps(c))
    elif how == "weights_truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif how == "vocab_missing":
        (folder / "vocab.json").unlink()
    elif how == "vocab_specials":
        v = json.loads((folder / "vocab.json").read_text())
        v["itos"][0], v["itos"][5] = v["itos"][5], v["itos"][0]
        (folder / "vocab.json").write_text(json.dumps(v))


@pytest.mark.parametrize("how,expected", [
    ("vocab_short", "vocab.json has"),
    ("config_sizes", "does not fit config.json"),
    ("config_not_json", "bad config.json"),
    ("config_unknown_encoder", "alexnet9000"),
    ("weights_truncated", "not a readable safetensors"),
    ("vocab_missing", "missing vocab.json"),
    ("vocab_specials", "first four words"),
])
def test_mismatched_model_folders_are_one_line(trained, tmp_path, capsys, how, expected):
    folder = tmp_path / "m"
    shutil.copytree(trained / "best", folder)
    spoil(folder, how)
    msg = one_line_error(capsys, main(["caption", str(EXAMPLE), "--model", str(folder)]), expected)
    assert str(folder) in msg
