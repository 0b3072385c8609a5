"""Packed decoder layers (inference/packed.py): the same results as nn.Linear / nn.LSTMCell / nn.GRUCell
(bf16 bit for bit, fp32 up to rounding), the same parameters and fingerprint, the same captions,
and the plain layers' arithmetic wherever packing does not apply."""

import copy
import itertools

import pytest
import torch
from torch import nn

from captioner import Captioner
from captioner.data.records import load_records
from captioner.inference import packed
from captioner.inference.packed import PackedGRUCell, PackedLinear, PackedLSTMCell, packable_dtypes, packed_decoder
from captioner.inference.plan import InferencePlan
from captioner.model.attention import AttentionDecoder
from captioner.model.network import load_model, load_space

pytestmark = pytest.mark.skipif(not packable_dtypes(), reason="this torch cannot pack weights for oneDNN")
BF16 = torch.bfloat16 in packable_dtypes()


def outputs(y) -> tuple[torch.Tensor, ...]:
    return y if isinstance(y, tuple) else (y,)


def layers():
    """(plain layer, its packed twin, inputs) for each kind, the twin on a copy of the parameters."""
    torch.manual_seed(0)
    x, h, c = torch.randn(3, 96), torch.randn(3, 64), torch.randn(3, 64)
    lin, lstm, gru = nn.Linear(96, 200), nn.LSTMCell(96, 64), nn.GRUCell(96, 64)
    return [(lin, PackedLinear(copy.deepcopy(lin)), (x,)),
            (lin, PackedLinear(copy.deepcopy(lin)), (x.view(1, 3, 1, 96),)),  # attention's 4-D scores
            (lstm, PackedLSTMCell(copy.deepcopy(lstm)), (x, (h, c))),
            (gru, PackedGRUCell(copy.deepcopy(gru)), (x, h))]


@pytest.mark.parametrize("bf16", [False, True])
@torch.no_grad()
def test_packed_layers_compute_what_the_plain_layers_do(bf16):
    if bf16 and not BF16:
        pytest.skip("no bf16 kernel in oneDNN for this CPU")
    for plain, twin, args in layers():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            want, got = outputs(plain(*args)), outputs(twin(*args))
        for a, b in zip(want, got):
            assert a.shape == b.shape and a.dtype == b.dtype
            if bf16:  # the same oneDNN kernel autocast reaches: bit for bit
                assert torch.equal(a, b), type(twin).__name__
            else:  # another order of summation
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        packs = twin._packs if isinstance(twin, PackedLinear) else twin._ih
        assert set(packs) == {torch.bfloat16 if bf16 else torch.float32}  # it did take the packed road


def test_with_gradients_the_layers_are_the_plain_ones_bit_for_bit():
    for plain, twin, args in layers():
        for a, b in zip(outputs(plain(*args)), outputs(twin(*args))):
            assert torch.equal(a, b)
        sum(y.sum() for y in outputs(twin(*args))).backward()
        assert all(p.grad is not None for p in twin.parameters())
        assert not getattr(twin, "_packs", getattr(twin, "_ih", None))  # nothing packed for training


@torch.no_grad()
def test_a_weight_changed_in_place_is_packed_again_and_copies_pack_their_own():
    plain, twin, (x,) = layers()[0]
    assert torch.equal(twin(x), twin(x))
    twin.weight.mul_(2)
    plain.weight.mul_(2)
    torch.testing.assert_close(twin(x), plain(x), rtol=1e-5, atol=1e-5)
    clone = copy.deepcopy(twin)  # oneDNN's packed tensors cannot be copied: the copy packs again
    assert not clone._packs and torch.equal(clone(x), twin(x))


@torch.no_grad()
def test_a_decoder_keeps_its_parameters_and_names():
    torch.manual_seed(0)
    dec = AttentionDecoder(vocab_size=300, feat_dim=512, embed_dim=256, hidden_dim=256, attention_dim=128).eval()
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    feats, tokens = torch.randn(3, 9, 512), torch.randint(3, 300, (3, 8))
    want = dec.teacher_forced(feats, tokens)[0]
    same = packed_decoder(dec)
    assert same is dec and isinstance(dec.cell, PackedLSTMCell) and isinstance(dec.proj[0], PackedLinear)
    assert isinstance(dec.att_score, PackedLinear) and type(dec.embed) is nn.Embedding
    after = dec.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(dec.teacher_forced(feats, tokens)[0], want, rtol=1e-4, atol=1e-4)


def test_where_torch_cannot_pack_the_decoder_stays_as_it_is(monkeypatch):
    monkeypatch.setattr(packed, "packable_dtypes", lambda: frozenset())
    dec = AttentionDecoder(vocab_size=50, feat_dim=32, embed_dim=16, hidden_dim=16, attention_dim=8)
    assert packed_decoder(dec) is dec and type(dec.cell) is nn.LSTMCell
    lin = PackedLinear(nn.Linear(8, 4))  # a layer packed before: computes as nn.Linear does
    with torch.no_grad():
        torch.testing.assert_close(lin(torch.ones(2, 8)), nn.functional.linear(torch.ones(2, 8), lin.weight, lin.bias))
    assert not lin._packs


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_captioning_gives_the_captions_and_fingerprint_of_the_plain_decoder(trained, shapes, precision):
    if precision == "bf16" and not BF16:
        pytest.skip("no bf16 kernel in oneDNN for this CPU")
    cap = Captioner.load(trained / "best", device="cpu", precision=precision)
    assert isinstance(cap.model.decoder.out, PackedLinear)
    model, vocab = load_model(trained / "best", torch.device("cpu"))  # the decoder as trained
    plan = InferencePlan(torch.device("cpu"), precision)
    space = load_space(trained / "best", model.cfg, vocab.pad)
    plain = Captioner(model, vocab, plan, encoder=plan.encoder_for(model), space=space)  # the decoder left unprepared
    assert type(plain.model.decoder.out) is nn.Linear and plain.fingerprint == cap.fingerprint
    images = [r.image for r in load_records(shapes) if r.split == "val"][:12]
    for beam in (1, 3):
        assert cap.caption(images, beam_size=beam) == plain.caption(images, beam_size=beam)
        assert [cap.caption(i, beam_size=beam) for i in images[:4]] == [
            plain.caption(i, beam_size=beam) for i in images[:4]]


@pytest.mark.parametrize("bf16, amx", [(False, False), (True, False), (True, True)])
@torch.no_grad()
def test_packed_convolutions_compute_what_the_plain_ones_do(bf16, amx, monkeypatch):
    """Plain, strided, depthwise, and timm's TensorFlow-"same" convolutions (asymmetric padding on
    an odd input), channels-last as captioning feeds them: bf16 bit for bit, fp32 up to rounding.
    `amx`: the weights packed for one image and for several, as on a CPU with AMX (_pack_size),
    wherever the test runs."""
    from timm.layers.conv2d_same import Conv2dSame

    if bf16 and not BF16:
        pytest.skip("no bf16 kernel in oneDNN for this CPU")
    monkeypatch.setattr(packed, "cpu_has_amx", lambda: amx)
    torch.manual_seed(0)
    convs = [nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 1), nn.Conv2d(8, 8, 5, padding=2, groups=8),
             nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), Conv2dSame(8, 16, 3, stride=2),
             Conv2dSame(8, 8, 3, stride=2, groups=8), Conv2dSame(8, 8, 5, stride=2, groups=8),  # depthwise "same"
             Conv2dSame(8, 8, 4, stride=1, groups=8, bias=False)]
    for x in (torch.randn(2, 8, 15, 15), torch.randn(2, 8, 16, 16), torch.randn(1, 8, 15, 16), torch.randn(1, 8, 6, 6)):
        x = x.contiguous(memory_format=torch.channels_last)  # odd, even and mixed sizes: symmetric or not
        for conv, relu6 in itertools.product(convs, (False, True)):
            twin = packed.PackedConv2d(copy.deepcopy(conv))
            twin.relu6 = relu6  # a ReLU6 after it, run inside (fuse_relu6)
            plain = nn.Sequential(conv, nn.ReLU6()) if relu6 else conv
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                want, got = plain(x), twin(x)
                plain_layout, plain_want = twin(x.contiguous()), plain(x.contiguous())  # not channels-last: plain
            assert {key[0] for key in twin._packs} == {torch.bfloat16 if bf16 else torch.float32}
            # (dtype, padding, and on AMX the input's shape with one image or two, and the threads)
            assert all(len(key) == (8 if amx else 3) and (not amx or key[3:5] == (min(x.shape[0], 2), 8))
                       for key in twin._packs)
            assert got.shape == want.shape and got.dtype == want.dtype
            assert got.is_contiguous(memory_format=torch.channels_last)
            if bf16:
                assert torch.equal(got, want), (conv, x.shape, relu6)
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(plain_layout, plain_want)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_captioning_encoder_is_packed_and_gives_the_plain_features(precision):
    """InferencePlan.encoder_for packs the folded copy's convolutions on the CPU; its features are the
    unpacked copy's (bf16 bit for bit), and with gradients it is the plain encoder's arithmetic."""
    from captioner.model.encoder import build_backbone, fold_batchnorm
    from captioner.model.network import CaptionModel, ModelConfig

    if precision == "bf16" and not BF16:
        pytest.skip("no bf16 kernel in oneDNN for this CPU")
    cfg = ModelConfig.for_encoder("tf_efficientnet_lite0", 20, decoder="attention", embed_dim=16, hidden_dim=16,
                                  attention_dim=8)
    model = CaptionModel(cfg, build_backbone("tf_efficientnet_lite0", "default")).eval()
    enc = InferencePlan(torch.device("cpu"), precision).encoder_for(model)
    kinds = {type(m).__name__ for m in enc.modules()}
    assert "PackedConv2d" in kinds and "Conv2d" not in kinds and "Conv2dSame" not in kinds
    assert "ReLU6" not in kinds and sum(getattr(m, "relu6", False) for m in enc.modules()) == 33  # all run inside
    plain = fold_batchnorm(model.encoder).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0)).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        got, want = model.features(x, encoder=enc), model.features(x, encoder=plain)
    if precision == "bf16":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_layer_onednn_refuses_runs_plain_from_then_on(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("could not create a primitive descriptor")  # what oneDNN says for a shape it lacks

    monkeypatch.setattr(packed, "_packed", refuse)
    lin, conv = PackedLinear(nn.Linear(8, 4)), packed.PackedConv2d(nn.Conv2d(3, 4, 3, padding=1))
    x, image = torch.randn(2, 8), torch.randn(1, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(lin(x), nn.functional.linear(x, lin.weight, lin.bias))
            assert torch.equal(conv(image), nn.functional.conv2d(image, conv.weight, conv.bias, padding=1))
    assert lin._packs.refused and conv._packs.refused and len(calls) == 2  # asked once each, then plain
