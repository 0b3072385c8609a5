"""Int8 decoding on the CPU (`--precision int8`): the decoder's matrix products with 8-bit weights.

Captioning one image spends most of its time in the decoder's matrix products of a few rows (the
beams) by the LSTM's, attention's and output layer's weights: about 22 MB of fp32 weights read
once per word, which the CPU streams from memory rather than computes. Stored as int8 they are a
quarter of that. Each layer's weights get one scale per output row (symmetric, per channel); each
call quantizes its input with a scale of its own (dynamic quantization) and runs FBGEMM's int8
kernel, which returns fp32. The encoder, the embedding and everything between the products stay
fp32. Weights are quantized when the model is loaded, so model folders are the same as ever.

Captions change a little (rounding moves some near-ties between words): measured on Flickr8k val,
see docs/EXPERIMENTS.md. For inference only: there is nothing to train in a packed layer.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from captioner.errors import ConfigError
from captioner.inference.packed import gru_gates, lstm_gates, swap_layers

# FBGEMM's int8 kernel multiplies unsigned 8-bit inputs by signed 8-bit weights and adds pairs of the
# products in 16 bits, which can saturate: 7-bit inputs (reduce_range) keep every sum in range, as
# PyTorch's own dynamic quantization does on x86.
REDUCE_RANGE = True


def int8_available() -> str | None:
    """None when int8 decoding can run here, else why not (one line). PyTorch has deprecated its
    quantized tensors, on which these kernels' packing rests; where a release has dropped them,
    --precision int8 says so rather than failing inside."""
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm")):
        return f"int8 decoding needs PyTorch's x86 int8 kernels (FBGEMM); this machine's torch has {engines}"
    ops = torch.ops.quantized
    if not all(hasattr(ops, name) for name in ("linear_prepack", "linear_dynamic")) or not hasattr(
            torch, "quantize_per_channel"):
        return f"int8 decoding needs quantized::linear_dynamic, which torch {torch.__version__} no longer has"
    return None


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights (one scale per output row) and a dynamically quantized input."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with warnings.catch_warnings():  # the deprecation of quantized tensors: see int8_available
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(q, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float().contiguous()  # (N, in)
        y = torch.ops.quantized.linear_dynamic(flat, self._packed, REDUCE_RANGE)  # (N, out) fp32
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8LSTMCell(nn.Module):
    """nn.LSTMCell with its two products in int8; the gates (i, f, g, o, PyTorch's order) in fp32."""

    def __init__(self, cell: nn.LSTMCell):
        super().__init__()
        self.ih, self.hh = _linear(cell.weight_ih, cell.bias_ih), _linear(cell.weight_hh, cell.bias_hh)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        return lstm_gates(self.hh(h) + self.ih(x), c)


class Int8GRUCell(nn.Module):
    """nn.GRUCell with its two products in int8; the gates (r, z, n, PyTorch's order) in fp32."""

    def __init__(self, cell: nn.GRUCell):
        super().__init__()
        self.ih, self.hh = _linear(cell.weight_ih, cell.bias_ih), _linear(cell.weight_hh, cell.bias_hh)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return gru_gates(self.ih(x), self.hh(h), h)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight.data, lin.bias.data = weight.detach(), bias.detach() if bias is not None else None
    return Int8Linear(lin)


SWAPS = {nn.Linear: Int8Linear, nn.LSTMCell: Int8LSTMCell, nn.GRUCell: Int8GRUCell}
MIN_WEIGHTS = 65536  # smaller layers (the attention's 512 -> 1 score) read little and stay fp32


def int8_decoder(decoder: nn.Module) -> nn.Module:
    """A copy of `decoder` for CPU inference with its nn.Linear, nn.LSTMCell and nn.GRUCell layers of
    MIN_WEIGHTS weights or more in int8. Other layers (the embedding, a multi-layer nn.LSTM such as
    Show-and-Tell's) stay fp32. The original is left as it was."""
    why = int8_available()
    if why:
        raise ConfigError(why)
    out = copy.deepcopy(decoder).float().eval()
    swap_layers(out, SWAPS, lambda layer: sum(p.numel() for p in layer.parameters()) >= MIN_WEIGHTS)
    return out
