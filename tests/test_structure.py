"""The shape of the code: floors without upward imports, one decoding value, one road from features
to captions, a declared decoder contract that a third decoder can keep, and training from Python."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import TINY
from torch import nn

import captioner.decode as decode_module
from captioner import Captioner
from captioner.cli import build_parser, main
from captioner.data.records import load_records
from captioner.decoding import Decoding
from captioner.errors import ConfigError
from captioner.model.attention import AttentionDecoder
from captioner.model.base import Decoder
from captioner.model.network import DECODERS, ModelConfig
from captioner.model.show_tell import ShowTellDecoder
from captioner.train import TrainConfig, fit
from captioner.train.epoch import DECODING_CANDIDATES

SRC = Path(__file__).resolve().parent.parent / "src" / "captioner"

# data -> model -> inference -> decode -> train/api -> cli/server: a module imports only from its floor or below
FLOORS = [
    ("base", ["errors", "files", "names", "decoding", "options", "runtime", "threads", "distributed"]),
    ("data", ["data", "metrics"]),
    ("model", ["model"]),
    ("inference", ["inference"]),
    ("decode", ["decode", "retrieval", "tags"]),
    ("work", ["train", "evaluate", "api", "batch", "library", "export", "viz"]),
    ("front", ["cli", "server", "__init__", "__main__"]),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" and len(rel.parts) > 1 else rel.parts
    return ".".join(parts)


def _floor(module: str) -> int:
    for i, (_, tops) in enumerate(FLOORS):
        if module.split(".")[0] in tops:
            return i
    raise AssertionError(f"captioner.{module} is on no floor: add it to FLOORS (and docs/ARCHITECTURE.md)")


def _imports() -> dict[str, set[str]]:
    """captioner module -> the captioner modules it imports (at any depth in the file)."""
    graph = {}
    for path in SRC.rglob("*.py"):
        name = _module_name(path)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("captioner"):
                deps.add(node.module.removeprefix("captioner").lstrip("."))
            elif isinstance(node, ast.Import):
                deps |= {a.name.removeprefix("captioner").lstrip(".") for a in node.names
                         if a.name.startswith("captioner")}
        graph[name] = {d for d in deps if d} - {name}
    return graph


def test_no_module_imports_upward():
    upward = [f"captioner.{m} ({FLOORS[_floor(m)][0]}) imports captioner.{d} ({FLOORS[_floor(d)][0]})"
              for m, deps in _imports().items() if m not in ("__init__", "__main__")
              for d in deps if _floor(d) > _floor(m)]
    assert not upward, upward


def test_no_import_cycles():
    graph = _imports()
    graph = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(d):], d]))
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_no_module_over_450_lines_and_no_function_over_80():
    """A file a newcomer can read in one sitting, a function on one screen (docstrings aside)."""
    long = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > 450:
            long.append(f"{path.relative_to(SRC)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.body[0]
                doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                lines = node.end_lineno - (first.end_lineno + 1 if doc else node.lineno) + 1
                if lines > 80:
                    long.append(f"{path.relative_to(SRC)}: {node.name}() {lines} lines")
    assert not long, long


# -- the decoder contract -------------------------------------------------------------------------


class BagDecoder(Decoder):
    """A third decoder, as a user would add one: the image and the last word, no recurrence."""

    feature_kind = "pooled"
    state_batch_axis = 0

    def __init__(self, vocab_size: int, feat_dim: int, hidden_dim: int):
        super().__init__()
        self.img = nn.Linear(feat_dim, hidden_dim)
        self.embed = nn.Embedding(vocab_size, hidden_dim)
        self.out = nn.Linear(hidden_dim, vocab_size)

    @classmethod
    def from_config(cls, cfg) -> BagDecoder:
        return cls(cfg.vocab_size, cfg.feat_dim, cfg.hidden_dim)

    def forward(self, feats, tokens, lengths=None):
        h = torch.tanh(self.img(feats)[:, None] + self.embed(tokens))  # (B, T, H)
        return self.out(h), h.new_zeros(())

    def start(self, feats):
        return (self.img(feats),)

    def step(self, tokens, state):
        return self.out(torch.tanh(state[0] + self.embed(tokens))), state

    @staticmethod
    def select(state, index):
        return (state[0].index_select(0, index),)

    @property
    def state_names(self):
        return ("image",)

    def flatten_state(self, state):
        return tuple(state)

    def unflatten_state(self, tensors):
        return tuple(tensors)

    def word_vectors(self, layer="output"):
        return (self.out.weight if layer == "output" else self.embed.weight).detach()


@pytest.mark.parametrize("cls,rnn", [(ShowTellDecoder, "lstm"), (ShowTellDecoder, "gru"),
                                     (AttentionDecoder, "lstm"), (AttentionDecoder, "gru")])
def test_decoders_keep_the_contract(cls, rnn):
    cfg = ModelConfig(vocab_size=11, feat_dim=8, embed_dim=6, hidden_dim=10, attention_dim=7, rnn=rnn,
                      decoder="show_tell" if cls is ShowTellDecoder else "attention")
    dec = DECODERS[cfg.decoder].from_config(cfg).eval()
    assert isinstance(dec, Decoder) and type(dec) is cls
    feats = torch.randn(2, 8) if dec.feature_kind == "pooled" else torch.randn(2, 4, 8)
    state = dec.start(feats)
    flat = dec.flatten_state(state)
    assert len(flat) == len(dec.state_names) and all(t.shape[dec.state_batch_axis] == 2 for t in flat)
    logits, new = dec.step(torch.tensor([1, 1]), dec.unflatten_state(flat))
    logits2, _ = dec.step(torch.tensor([1, 1]), state)
    assert logits.shape == (2, 11) and torch.equal(logits, logits2)
    assert [t.shape for t in dec.flatten_state(new)] == [t.shape for t in flat]
    assert dec.word_vectors("output").shape[0] == dec.word_vectors("input").shape[0] == 11
    # keep_images: image 1's block of 3 beams alone steps exactly as it does beside image 0
    beams = dec.select(state, torch.tensor([0, 0, 0, 1, 1, 1]))
    words = torch.tensor([4, 5, 6, 7, 8, 9])
    both, _ = dec.step(words, beams)
    alone, _ = dec.step(words[3:], dec.keep_images(beams, torch.tensor([1]), 3))
    assert torch.allclose(alone, both[3:], atol=1e-6)
    if dec.has_attention:
        assert dec.attention_maps(feats, torch.tensor([[1, 5, 6], [1, 7, 8]])).shape == (2, 3, 4)
    else:
        with pytest.raises(NotImplementedError):
            dec.attention_maps(feats, torch.tensor([[1, 5]]))


@pytest.mark.slow
def test_a_third_decoder_is_one_class_and_one_registry_line(tmp_path, shapes, monkeypatch):
    """Registered in DECODERS, a new decoder trains from Python with fit(TrainConfig(...)), saves,
    loads, captions (greedy and beam), exports to ONNX and draws word vectors, untouched code all."""
    monkeypatch.setitem(DECODERS, "bag", BagDecoder)
    import captioner.train.epoch

    roads, real = [], decode_module.caption_features
    monkeypatch.setattr(captioner.train.epoch, "caption_features", lambda *a, **k: roads.append(a[3]) or real(*a, **k))
    out = tmp_path / "bag"
    result = fit(TrainConfig(data=shapes, out=out, decoder="bag", epochs=2, max_images=40, val_images=6,
                             image_size=96, hidden_dim=64, min_count=1, batch_size=32, lr=3e-3, workers=0,
                             quiet=True))
    assert result["best_CIDEr"] > 0 and len(result["history"]) == 2
    assert len(roads) == 2 + len(DECODING_CANDIDATES)  # validation after each epoch, then each candidate decoding
    cap = Captioner.load(out / "best", device="cpu")
    assert type(cap.model.decoder) is BagDecoder
    img = sorted(shapes.parent.glob("*.png"))[0]
    assert cap.caption(img, beam_size=1) and cap.caption(img, beam_size=3)
    with pytest.raises(Exception, match="no attention"):
        cap.attention(img)
    pytest.importorskip("onnxruntime")
    from captioner.export import OnnxCaptioner, export_model

    export_model(out / "best", tmp_path / "onnx")
    onnx = OnnxCaptioner(tmp_path / "onnx")
    assert onnx.caption([img]) == [cap.caption(img, beam_size=1)]
    assert main(["embeddings", "--model", str(out / "best"), "--out", str(tmp_path / "w.png"), "--words", "8"]) == 0


# -- training config ------------------------------------------------------------------------------


def test_cli_train_defaults_are_the_config_defaults():
    a = build_parser().parse_args(["train", "--data", "d", "--out", "o"])
    from_cli = TrainConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)})
    assert from_cli == TrainConfig(data=Path("d"), out=Path("o"))


def test_the_model_options_are_declared_once():
    """A training run's options and a model folder's config share the architecture fields by being
    both ModelOptions, not by copying them: each field is the one declaration, default and help."""
    from captioner.options import ModelOptions

    shared = dataclasses.fields(ModelOptions)
    assert len(shared) >= 10
    for cls in (TrainConfig, ModelConfig):
        assert issubclass(cls, ModelOptions)
        for f in shared:
            assert cls.__dataclass_fields__[f.name] is ModelOptions.__dataclass_fields__[f.name], (cls, f.name)
    own = {f.name for f in dataclasses.fields(TrainConfig)} - {f.name for f in shared}
    assert not own & {f.name for f in dataclasses.fields(ModelConfig)} - {"encoder_weights", "image_size"}


def test_every_option_of_every_command_has_help():
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [(name, a.option_strings or a.dest) for name, parser in sub.choices.items() for a in parser._actions
               if not a.help and not isinstance(a, argparse._HelpAction)]
    assert not missing, missing


def test_every_train_option_has_help_and_says_its_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f.name
        if f.default not in (None, False, dataclasses.MISSING) and f.name not in ("data", "out"):
            shown = "[on]" if f.default is True else f"[{f.default}]"
            assert shown in text or f.metadata.get("default_text"), f.name


def test_the_torch_free_names_are_the_registries():
    """names.py lists what the options accept without importing torch: each list must be what the
    code behind it takes, no more and no less."""
    from captioner import names
    from captioner.model.encoder import BACKBONES, build_head
    from captioner.runtime import resolve_precision

    assert names.ENCODERS == tuple(BACKBONES) and names.DECODERS == tuple(DECODERS)
    for head in names.HEADS:
        assert isinstance(build_head(head, 8, 4), nn.Module)
    with pytest.raises(ConfigError, match="unknown head"):
        build_head("no_such_head", 8, 4)
    cpu = torch.device("cpu")
    for precisions, inference in ((names.PRECISIONS, False), (names.INFERENCE_PRECISIONS, True)):
        resolved = {resolve_precision(p, cpu, inference=inference) for p in precisions}
        assert resolved <= {"fp32", "bf16", "fp16", "int8"} and ("int8" in resolved) == inference
        with pytest.raises(ConfigError, match="precision must be one of"):
            resolve_precision("fp8", cpu, inference=inference)


def test_layout_option_and_its_old_name():
    p = build_parser()
    assert p.parse_args(["train", "--data", "d", "--out", "o", "--layout", "csv"]).layout == "csv"
    assert p.parse_args(["evaluate", "--data", "d", "--format", "coco"]).layout == "coco"
    assert p.parse_args(["export", "--out", "x", "--format", "torchscript"]).format == "torchscript"


def test_clashing_options_are_a_config_error(tmp_path, shapes):
    with pytest.raises(ConfigError, match="--fine-tune-encoder"):
        fit(TrainConfig(data=shapes, out=tmp_path, scst=True, fine_tune_encoder=True))


def test_user_mistakes_are_one_line_but_bugs_keep_their_traceback(monkeypatch, capsys):
    from captioner.cli import commands as cli

    def mistake(a):
        raise ConfigError("--words must be 1 or more")

    def bug(a):
        raise ValueError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "search", mistake)
    assert main(["search", "x", "--db", "y"]) == 2
    assert capsys.readouterr().err == "captioner: error: --words must be 1 or more\n"
    monkeypatch.setitem(cli.COMMANDS, "search", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["search", "x", "--db", "y"])


# -- one decoding value, one road from features to captions -----------------------------------------


def test_decoding_value():
    own = Decoding(3, 1.5, False, 16)  # a model's own: its decoding.json, with config.json's max_len
    assert own.changed() == Decoding(3, 1.5, False, 16)
    assert own.changed(beam_size=1, block_trigrams=True) == Decoding(1, 1.5, True, 16)
    blocking = Decoding(5, 1.5, True)  # the shipped kind
    assert blocking.changed().block_trigrams
    assert not blocking.changed(block_trigrams=False).block_trigrams
    with pytest.raises(ValueError, match="block_trigrams must be true or false"):
        ModelConfig.from_json({"vocab_size": 10, "block_trigrams": "yes"})
    cfg, older = ModelConfig.split_json({"vocab_size": 10})  # a config.json from before the key
    assert not Decoding.from_json({**older, "max_len": cfg.max_len}).block_trigrams
    with pytest.raises(dataclasses.FrozenInstanceError):
        Decoding().beam_size = 2
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="beam size"):
            Decoding(beam_size=bad)


def test_a_model_folder_keeps_its_decoding_in_decoding_json_and_older_folders_still_load(trained, shapes, tmp_path,
                                                                                         capsys):
    """decoding.json beside config.json (like a generation config); a folder written before it, with
    the settings in config.json, loads with the same decoding and the same fingerprint (a photo
    library it indexed stays its own); a damaged decoding.json is one line."""
    import json
    import shutil

    from captioner.model.network import read_decoding

    new = tmp_path / "new"
    shutil.copytree(trained / "best", new)
    saved = json.loads((new / "decoding.json").read_text())
    assert set(saved) == {"beam_size", "length_norm", "block_trigrams"}
    assert not {"beam_size", "length_norm", "block_trigrams"} & set(json.loads((new / "config.json").read_text()))
    old = tmp_path / "old"
    shutil.copytree(new, old)
    (old / "decoding.json").unlink()
    cfg = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**cfg, **saved, "beam_size": 2}))
    a, b = Captioner.load(new, device="cpu"), Captioner.load(old, device="cpu")
    assert b.decoding == read_decoding(old) == a.decoding.replace(beam_size=2)
    (old / "config.json").write_text(json.dumps({**cfg, **saved}))
    assert Captioner.load(old, device="cpu").fingerprint == a.fingerprint
    (new / "decoding.json").write_text('{"beam_size": 3, "beam": 5}')
    assert main(["caption", str(sorted(shapes.parent.glob("*.png"))[0]), "--model", str(new)]) == 2
    assert "bad decoding.json (unknown keys ['beam'])" in capsys.readouterr().err


def _record_searches(monkeypatch) -> list[tuple[Decoding, bool]]:
    """Every search run from now on: (its decoding, whether bf16 autocast was on)."""
    seen, real = [], decode_module.search

    def spy(decoder, feats, vocab, decoding=None, **policy):
        seen.append((decoding, torch.is_autocast_enabled("cpu")))
        return real(decoder, feats, vocab, decoding, **policy)

    monkeypatch.setattr(decode_module, "search", spy)
    return seen


@pytest.fixture(scope="module")
def attention_model(tmp_path_factory, shapes) -> Path:
    out = tmp_path_factory.mktemp("att")
    assert main(["train", "--data", str(shapes), "--out", str(out), "--decoder", "attention", "--epochs", "4",
                 "--max-images", "60", "--val-images", "6", *TINY]) == 0
    return out / "best"


@pytest.mark.slow
def test_attention_map_uses_every_decoding_setting(attention_model, shapes, tmp_path, monkeypatch, capsys):
    """--block-trigrams (and every other setting) reaches the attention map's search too."""
    seen = _record_searches(monkeypatch)
    img = sorted(shapes.parent.glob("*.png"))[0]
    assert main(["caption", str(img), "--model", str(attention_model), "--attention-map", str(tmp_path / "a.png"),
                 "--beam-size", "2", "--length-norm", "0.7", "--block-trigrams", "--device", "cpu"]) == 0
    assert (tmp_path / "a.png").is_file()
    assert len(seen) == 2 and seen[0][0] == seen[1][0] == Decoding(2, 0.7, True, 20)


@pytest.mark.slow
def test_attention_caption_is_the_printed_caption(attention_model, shapes, monkeypatch):
    """The caption drawn on an attention map comes from the same search, under the same precision
    rule (InferencePlan.decoder_precision), as the caption printed."""
    seen = _record_searches(monkeypatch)
    cap = Captioner.load(attention_model, device="cpu", precision="bf16")
    val = [r.image for r in load_records(shapes) if r.split == "val"][:4]
    for img in val:
        caption, words, alpha = cap.attention(img)
        assert caption == cap.caption(img) and words[:-1] == caption.split()
        assert alpha.shape[0] == len(words)
    assert len({autocast for _, autocast in seen}) == 1, seen


def test_every_caller_takes_the_one_road(trained, shapes, monkeypatch):
    """The API and evaluation decode through decode.caption_features (evaluation by way of
    Captioner.caption_features, which adds the tags; training's validation too: see
    test_a_third_decoder_is_one_class_and_one_registry_line)."""
    calls, real = [], decode_module.caption_features

    def spy(*args, **kw):
        calls.append(args[3])
        return real(*args, **kw)

    import captioner.api
    import captioner.evaluate
    import captioner.train.epoch

    for module in (captioner.api, captioner.train.epoch):
        monkeypatch.setattr(module, "caption_features", spy)
    cap = Captioner.load(trained / "best", device="cpu")
    cap.caption(sorted(shapes.parent.glob("*.png"))[:2])
    assert calls == [cap.decoding]
    from captioner.evaluate import evaluate

    evaluate(trained / "best", shapes, "val", decoding=Decoding(beam_size=2), meteor=False, progress=False)
    assert calls[-1] == Decoding(beam_size=2)
