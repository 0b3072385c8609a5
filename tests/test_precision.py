"""Precision chosen per device and per kind of CPU (runtime.py, inference/plan.py): the rules the benchmarks
measured."""

import pytest
import torch

from captioner import runtime
from captioner.inference.plan import InferencePlan
from captioner.runtime import resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
XEON_AMX = frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
EPYC_ZEN4 = frozenset({"avx512f", "avx512_bf16"})
EPYC_OLDER = frozenset({"avx2", "fma"})


@pytest.fixture
def cpu_kind(monkeypatch):
    def use(flags: frozenset[str]) -> None:
        monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    return use


@pytest.mark.parametrize("flags, auto", [(XEON_AMX, "bf16"), (EPYC_ZEN4, "bf16"), (EPYC_OLDER, "fp32")])
def test_auto_precision_is_bf16_only_with_native_bf16(cpu_kind, flags, auto):
    cpu_kind(flags)
    assert resolve_precision("auto", CPU) == auto
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"


@pytest.mark.parametrize("flags, one_image", [(XEON_AMX, "bf16"), (EPYC_ZEN4, "bf16"), (EPYC_OLDER, "fp32")])
def test_small_batches_decode_in_bf16_only_where_that_was_measured_faster(cpu_kind, flags, one_image):
    cpu_kind(flags)
    for images in (1, 3):
        assert InferencePlan(CPU, "bf16").decoder_precision(images) == one_image
    assert InferencePlan(CPU, "bf16").decoder_precision(4) == "bf16"  # batches: bf16 wherever it was asked for
    assert InferencePlan(CPU, "fp32").decoder_precision(1) == "fp32"
    assert InferencePlan(CPU, "int8").decoder_precision(64) == "int8"
    assert InferencePlan(CUDA, "fp16").decoder_precision(1) == "fp16"  # the rule is the CPU's


def test_cpu_flags_reads_the_flags_line(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16\n\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path,
                                                                         *a, **k))
    runtime.cpu_flags.cache_clear()
    try:
        assert runtime.cpu_flags() == {"fpu", "avx512f", "avx512_bf16"}
        assert runtime.cpu_has_fast_bf16() and not runtime.cpu_has_amx()
    finally:
        runtime.cpu_flags.cache_clear()


@pytest.mark.parametrize("flags, encoder", [(XEON_AMX, "bf16"), (EPYC_ZEN4, "bf16"), (EPYC_OLDER, "fp32")])
def test_int8_runs_its_encoder_at_the_cpus_own_precision(cpu_kind, flags, encoder):
    cpu_kind(flags)
    assert InferencePlan(CPU, "int8").encoder_precision == encoder
    assert [InferencePlan(CPU, p).encoder_precision for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
