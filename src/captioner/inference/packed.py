"""Captioning on the CPU with the model's weights packed once: the decoder's products and the
encoder's convolutions.

At every word, captioning multiplies a few rows (one image's beams) by each of the decoder's
weight matrices. nn.Linear hands the CPU library the weights in their stored (out, in) layout at
every call, and for a handful of rows the library then spends longer on that layout than on the
arithmetic (MKL's fp32 product on AMD EPYCs most of all: 3 rows by the LSTM's 1024 x 2048 weights
take as long as 18 single rows). oneDNN, with the weights reordered once into its own blocked
layout, does the same product 2-5x faster for 3 rows and 1.1-1.9x faster for batches. The
encoder's convolutions pay the same re-layout at every call: packed, one photo's encoder runs
1.16x (bf16) to 1.24x (fp32) faster; batches gain nothing (docs/EXPERIMENTS.md, "Packed weights").
Two passes over the encoder's activations then took 30% of its time, and the packed convolutions
do without both: each ReLU6 runs inside the convolution before it (fuse_relu6), and a depthwise
convolution with TensorFlow's asymmetric "same" padding gets it from oneDNN rather than from a
padded copy of its input (PackedConv2d._same_padding): batches 1.2x (bf16) and 1.3x (fp32) faster,
the same features bit for bit.

The results are the same: in bf16 bit for bit (autocast's bf16 linear and convolution reach the
same oneDNN kernels, only re-laying out the weights first), in fp32 up to rounding (another order
of summation; no val caption changed). The layers keep the original parameters under their
original names, so state_dicts and Captioner.fingerprint do not change. A packed copy is taken per
dtype on first use and taken again if the weights change in place; with gradients enabled, on
another device, for inputs not laid out as packing expects, where this torch lacks oneDNN, or for
a layer oneDNN refuses, the layers compute exactly as nn.Linear, nn.Conv2d and nn.LSTMCell do.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import get_same_padding, pad_same
from torch import nn

from captioner.model.encoder import conv_norm_pairs
from captioner.runtime import cpu_has_amx

PACKED_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def packable_dtypes() -> frozenset[torch.dtype]:
    """The dtypes this machine's torch can pack and multiply (checked once on a small product):
    none where torch was built without oneDNN or has renamed its private packing ops, and no bf16
    where oneDNN has no bf16 kernel for this CPU."""
    ok = set()
    gen = torch.Generator().manual_seed(0)
    w, b, x = (torch.randn(*shape, generator=gen) for shape in ((16, 32), (16,), (3, 32)))
    conv = nn.Conv2d(3, 4, 3, padding=1)
    image = torch.randn(1, 3, 8, 8, generator=gen).contiguous(memory_format=torch.channels_last)
    for dtype in PACKED_DTYPES:
        try:
            with torch.no_grad():
                y = packed_linear(x.to(dtype), w.to(dtype), b.to(dtype), _Packs(), force=True)
                z = PackedConv2d(conv)(image.to(dtype), force=True)
                ok_here = (torch.allclose(y.float(), F.linear(x, w, b), rtol=0.02, atol=0.05)
                           and torch.allclose(z.float(), conv(image), rtol=0.02, atol=0.05))
        except (AttributeError, RuntimeError, NotImplementedError):
            ok_here = False
        if ok_here:
            ok.add(dtype)
    return frozenset(ok)


class _Packs(dict):
    """dtype (a convolution: dtype and padding) -> (weight's version, packed weight, bias in that
    dtype). A copy of a layer starts with none (oneDNN's packed tensors cannot be copied) and packs
    again on use. `refused`: oneDNN refused this layer once (a shape or dtype it has no kernel for
    here), so it runs plain from then on."""

    refused = False

    def __deepcopy__(self, memo) -> _Packs:
        return _Packs()


def _packed_dtype(x: torch.Tensor, packs: _Packs, force: bool = False) -> torch.dtype | None:
    """The dtype a packed product of `x` computes in (autocast's, else x's own), or None where the
    plain layer must run: another device, gradients wanted, a dtype this torch cannot pack, or a
    layer oneDNN refused. `force`: the check of packable_dtypes() itself."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if force:
        return dtype
    if (x.device.type != "cpu" or torch.is_grad_enabled() or packs.refused
            or dtype not in packable_dtypes()):
        return None
    return dtype


def _packed(packs: _Packs, dtype: torch.dtype, weight: torch.Tensor, bias: torch.Tensor | None, pack,
            key: tuple | None = None) -> tuple:
    """(packed weight, bias) in `dtype`, packed with `pack` on first use and again after the weight
    changed in place. `key` (default: the dtype) names the packing where it depends on more (a
    convolution's padding)."""
    key = dtype if key is None else key
    hit = packs.get(key)
    if hit is None or hit[0] != weight._version:
        hit = packs[key] = (weight._version, pack(weight.detach().to(dtype).contiguous()),
                            None if bias is None else bias.detach().to(dtype))
    return hit[1], hit[2]


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packs: _Packs,
                  force: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias) under the current autocast, through oneDNN with `weight` packed
    once per dtype (kept in `packs`) where it can; x (..., in) -> (..., out)."""
    dtype = _packed_dtype(x, packs, force)
    if dtype is not None:
        try:
            w, b = _packed(packs, dtype, weight, bias, torch.ops.mkldnn._reorder_linear_weight)
            flat = x.reshape(-1, weight.shape[1]).to(dtype).contiguous()  # (N, in)
            y = torch.ops.mkldnn._linear_pointwise(flat, w, b, "none", [], "")  # (N, out)
            return y.reshape(*x.shape[:-1], weight.shape[0])
        except RuntimeError:
            if force:
                raise
            packs.refused = True  # then the plain product, which says what is wrong if anything is
    return F.linear(x, weight, bias)


class PackedLinear(nn.Module):
    """nn.Linear with its product through `packed_linear`; the same parameters, by the same names."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self._packs = _Packs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight, self.bias, self._packs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def lstm_gates(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An LSTM cell after its products: gates (N, 4H) = W_ih x + b_ih + W_hh h + b_hh in PyTorch's
    order (i, f, g, o), and the cell state c (N, H) -> (h, c). The same operations in the same order
    as PyTorch's own CPU LSTMCell, so the results are the same bit for bit."""
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gru_gates(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """A GRU cell after its products: gi = W_ih x + b_ih, gh = W_hh h + b_hh (N, 3H), PyTorch's
    order (r, z, n), and h (N, H) -> the new h, in the order of PyTorch's own CPU GRUCell."""
    ir, iz, i_n = gi.chunk(3, dim=1)
    hr, hz, hn = gh.chunk(3, dim=1)
    r, z = torch.sigmoid(hr + ir), torch.sigmoid(hz + iz)
    n = torch.tanh(i_n + hn * r)
    return (h - n) * z + n


class _PackedCell(nn.Module):
    """An nn.LSTMCell's or nn.GRUCell's parameters, by the same names, and packs for its two products."""

    def __init__(self, cell: nn.LSTMCell | nn.GRUCell):
        super().__init__()
        self.input_size, self.hidden_size = cell.input_size, cell.hidden_size
        self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh = (cell.weight_ih, cell.weight_hh,
                                                                      cell.bias_ih, cell.bias_hh)
        self._ih, self._hh = _Packs(), _Packs()


class PackedLSTMCell(_PackedCell):
    """nn.LSTMCell with its two products through `packed_linear`; the same parameters and names."""

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        gates = packed_linear(h, self.weight_hh, self.bias_hh, self._hh) + packed_linear(
            x, self.weight_ih, self.bias_ih, self._ih)  # (N, 4H)
        return lstm_gates(gates, c)


class PackedGRUCell(_PackedCell):
    """nn.GRUCell with its two products through `packed_linear`; the same parameters and names."""

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        gi = packed_linear(x, self.weight_ih, self.bias_ih, self._ih)  # (N, 3H)
        gh = packed_linear(h, self.weight_hh, self.bias_hh, self._hh)
        return gru_gates(gi, gh, h)


class PackedConv2d(nn.Module):
    """nn.Conv2d (or timm's Conv2dSame, TensorFlow's "same" padding) through oneDNN with its weights
    packed once per dtype, for channels-last inputs (what captioning feeds the encoder; oneDNN's
    results for other layouts are not the plain layer's bits); the same parameters, by the same names.
    `relu6`: a ReLU6 that followed the layer runs inside it (see fuse_relu6)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.same = isinstance(conv, Conv2dSame)  # pads each input itself, asymmetrically where it must
        self.relu6 = False
        self._packs = _Packs()

    def forward(self, x: torch.Tensor, force: bool = False) -> torch.Tensor:
        shifted = self.same and self.weight.shape[1] == 1  # depthwise "same": padded by oneDNN (_same_padding)
        if self.same and not shifted:
            x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)  # a padded copy, as timm makes
        dtype = _packed_dtype(x, self._packs, force)
        if dtype is not None and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            try:
                return self._packed_forward(x, dtype, shifted)
            except RuntimeError:
                if force:
                    raise
                self._packs.refused = True  # then the plain convolution, as for packed_linear
        if shifted:
            x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.relu6(y) if self.relu6 else y

    def _packed_forward(self, x: torch.Tensor, dtype: torch.dtype, shifted: bool) -> torch.Tensor:
        padding, shift = self._same_padding(x) if shifted else (list(self.padding), [0, 0])
        size = _pack_size(x, dtype)
        key = (dtype, *padding) if size is None else (dtype, *padding, *size, torch.get_num_threads())
        w, b = _packed(self._packs, dtype, self.weight, self.bias, functools.partial(self._pack, padding, size),
                       key=key)
        y = torch.ops.mkldnn._convolution_pointwise(
            x.to(dtype), w, b, padding, list(self.stride), list(self.dilation), self.groups,
            "hardtanh" if self.relu6 else "none", [0.0, 6.0] if self.relu6 else [], "")
        if any(shift):  # drop the first output row / column (see _same_padding)
            h, w_ = (-(-n // s) for n, s in zip(x.shape[-2:], self.stride))  # ceil(n / s), as "same" gives
            y = y[:, :, shift[0]:shift[0] + h, shift[1]:shift[1] + w_].contiguous(memory_format=torch.channels_last)
        return y

    def _same_padding(self, x: torch.Tensor) -> tuple[list[int], list[int]]:
        """TensorFlow's "same" padding for `x` as oneDNN's: (padding per side, output rows / columns
        to drop first), for height and width. oneDNN pads both sides alike, while "same" pads one more
        after than before where the total is odd (a stride-2 convolution of an even size). There the
        convolution pads one stride more on both sides, which starts its windows one output earlier,
        and drops that first output: the same windows, and no padded copy of the input (making that
        copy, as timm does, was 14% of EfficientNet-Lite0's time on the CPU). For depthwise
        convolutions only: each of their sums is over one channel's taps, and came out bit for bit
        the same; a full convolution's (the stem's) summed in another order at some input sizes."""
        padding, shift = [], []
        for n, k, s, d in zip(x.shape[-2:], self.weight.shape[-2:], self.stride, self.dilation):
            total = get_same_padding(n, k, s, d)
            padding.append(total // 2 + s * (total % 2))
            shift.append(total % 2)
        return padding, shift

    def _pack(self, padding: list[int], size: list[int] | None, weight: torch.Tensor) -> torch.Tensor:
        return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), padding, list(self.stride),
                                                         list(self.dilation), self.groups, size)

    def extra_repr(self) -> str:
        return (f"{tuple(self.weight.shape)}, stride={self.stride}, groups={self.groups}, packed"
                + (", relu6" if self.relu6 else ""))


def _pack_size(x: torch.Tensor, dtype: torch.dtype) -> list[int] | None:
    """The input shape a convolution's weights are packed for: None (oneDNN's general layout) but
    in bf16 on a CPU with AMX. There oneDNN lays the weights out for the matrix tiles only when told
    the input's shape, and the layout it wants differs between one image and several and between
    thread counts; given another, it lays them out again at every call. So there a convolution is
    packed for one image or for several (two), at the number of threads it runs on (threads.py
    changes it under load): at most two packs a thread count. Measured on an Intel Xeon with AMX,
    Lite0, bf16, ms a photo at 1 / 8 / 32 photos, two threads: general layout 43-46 / 7.5 / 7.5, the
    plain convolutions 7.8-8.4 / 6.3-6.6 / 5.3-5.7, packed for the shape 6.6-7.4 / 3.0 / 3.1-3.2; one
    thread: about 8 / 4.4 / 5 both packed ways; a pack for two threads used on one: 140 ms for one
    photo. The same bits in every case. fp32 there gained nothing, and the AMD CPUs were not
    measured with it: they keep the general layout."""
    if dtype != torch.bfloat16 or not cpu_has_amx():
        return None
    return [min(x.shape[0], 2), *x.shape[1:]]


def fuse_relu6(encoder: nn.Module) -> None:
    """Each ReLU6 right after a packed convolution of a folded EfficientNet (encoder.conv_norm_pairs:
    after folding, the norm's place holds its activation) runs inside the convolution, as oneDNN's
    clip of its output: one pass less over every activation map (those passes were 15% of
    EfficientNet-Lite0's time on the CPU). The same bits: rounding keeps order and 0 and 6 are
    exact in bf16, so clipping before the rounding or after it gives the same numbers."""
    for module, conv, act in conv_norm_pairs(encoder):
        layer = getattr(module, conv)
        if isinstance(layer, PackedConv2d) and isinstance(getattr(module, act), nn.ReLU6):
            layer.relu6 = True
            setattr(module, act, nn.Identity())


SWAPS = {nn.Linear: PackedLinear, nn.LSTMCell: PackedLSTMCell, nn.GRUCell: PackedGRUCell}


def packed_decoder(decoder: nn.Module) -> nn.Module:
    """`decoder` with its nn.Linear, nn.LSTMCell and nn.GRUCell layers swapped in place for packed
    ones (a multi-layer nn.LSTM, as in Show and Tell, stays as it is). Where this torch cannot pack
    (packable_dtypes() is empty) it is returned unchanged."""
    if packable_dtypes():
        swap_layers(decoder, SWAPS, _packable)
    return decoder


def packed_encoder(encoder: nn.Module) -> nn.Module:
    """`encoder` (folded: encoder.fold_batchnorm) with its convolutions swapped in place for packed
    ones (those with numeric zero padding: a string or another padding mode stays as it is), and the
    ReLU6 after each run inside it (fuse_relu6); unchanged where this torch cannot pack."""
    if packable_dtypes():
        swap_layers(encoder, {nn.Conv2d: PackedConv2d, Conv2dSame: PackedConv2d}, _packable)
        fuse_relu6(encoder)
    return encoder


def swap_layers(module: nn.Module, swaps: dict, can_swap=lambda layer: True) -> None:
    """Replace, in place and at any depth, each child of a type in `swaps` for which `can_swap` holds
    by `swaps[type](child)`; the one walker for packing and int8 (inference/int8.py)."""
    for name, child in module.named_children():
        swap = swaps.get(type(child))
        if swap is not None and can_swap(child):
            setattr(module, name, swap(child))
        else:
            swap_layers(child, swaps, can_swap)


def _packable(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Conv2d):
        return not isinstance(layer.padding, str) and layer.padding_mode == "zeros"
    return True
