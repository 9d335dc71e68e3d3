"""The layout the runtime prepares for quantized GEMMs (block denominators ahead, a byte-pair table)
reads back exactly what the reference dequantizers give, and a grouped GEMM dequantizes only the
experts that receive rows."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nemocompile.runtime import quantized_ops
from nemocompile.runtime.formats import (
    FP8Tensor,
    NVFP4Tensor,
    dequantize_fp8,
    dequantize_nvfp4,
    quantize_fp8,
    quantize_fp8_stacked,
    quantize_nvfp4,
    quantize_nvfp4_stacked,
)
from nemocompile.runtime.quantized_ops import (
    PreparedFP8,
    PreparedNVFP4,
    expert_weight,
    prepare,
    quant_grouped_gemm,
    quant_linear,
)


def _stacked(seed: int = 0) -> torch.Tensor:
    return torch.randn(6, 24, 64, generator=torch.Generator().manual_seed(seed)) * 3


def test_prepared_nvfp4_reads_back_bit_for_bit() -> None:
    stacked = quantize_nvfp4_stacked(_stacked())
    prepared = prepare(stacked)
    assert isinstance(prepared, PreparedNVFP4) and isinstance(prepared, NVFP4Tensor)
    assert prepare(prepared) is prepared
    full = dequantize_nvfp4(stacked)
    assert prepared.values.dtype == torch.bfloat16 and prepared.values.shape == (6, 24, 64)  # held on the CPU
    table_only = PreparedNVFP4(prepared.packed, prepared.block_scale, prepared.global_scale, prepared.denominators)
    for expert in range(6):
        assert torch.equal(expert_weight(prepared, expert), full[expert])
        assert torch.equal(expert_weight(table_only, expert), full[expert])  # the lookup used off the CPU
        assert torch.equal(expert_weight(stacked, expert), full[expert])
    dense = quantize_nvfp4(torch.randn(24, 64, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(quantized_ops.dequantized(prepare(dense)), dequantize_nvfp4(dense))
    assert torch.equal(quant_linear(x, prepare(dense), None), quant_linear(x, dense, None))


def test_prepared_fp8_reads_back_bit_for_bit() -> None:
    stacked = quantize_fp8_stacked(_stacked(3))
    prepared = prepare(stacked)
    assert isinstance(prepared, PreparedFP8) and isinstance(prepared, FP8Tensor)
    full = dequantize_fp8(stacked)
    for expert in range(6):
        assert torch.equal(expert_weight(stacked, expert), full[expert])
        assert torch.equal(expert_weight(prepared, expert), full[expert])
    every_code = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = every_code[~every_code.float().isnan()]
    assert torch.equal(finite.to(torch.bfloat16).float(), finite.float())  # bf16 holds every E4M3 value
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    for per_channel in (False, True):
        dense = quantize_fp8(torch.randn(24, 64, generator=torch.Generator().manual_seed(1)), per_channel=per_channel)
        assert torch.equal(quantized_ops.dequantized(prepare(dense)), dequantize_fp8(dense))
        assert torch.equal(quant_linear(x, prepare(dense), None), quant_linear(x, dense, None))


@pytest.mark.parametrize("kind", ["nvfp4", "fp8"])
def test_grouped_gemm_dequantizes_only_experts_with_rows(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = _stacked(4)
    stacked: Any = prepare(quantize_nvfp4_stacked(weights) if kind == "nvfp4" else quantize_fp8_stacked(weights))
    offsets = torch.tensor([0, 0, 3, 3, 3, 4, 4])  # experts 1 and 4 have rows
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    touched: list[int] = []
    original = quantized_ops.expert_weight

    def spy(weight: Any, expert: int) -> torch.Tensor:
        touched.append(expert)
        return original(weight, expert)

    monkeypatch.setattr(quantized_ops, "expert_weight", spy)
    got = quant_grouped_gemm(x, offsets, stacked, torch.float32)
    assert touched == [1, 4]
    full = dequantize_nvfp4(stacked) if kind == "nvfp4" else dequantize_fp8(stacked)
    assert torch.equal(got[:3], x[:3] @ full[1].T) and torch.equal(got[3:], x[3:] @ full[4].T)


@pytest.mark.parametrize("act_format", ["nvfp4", "fp8"])
def test_grouped_activation_quantize_is_each_experts_own(act_format: str) -> None:
    """`quantize` / `quantize_dynamic` with offsets round all rows in one call; each expert's rows
    must come out exactly as quantizing that expert's rows alone (its static scale, or its own
    dynamic scale), an expert with no rows and a row holding NaN included."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 32, generator=g) * 4
    x[5, 3] = float("nan")
    offsets = torch.tensor([0, 2, 2, 6, 9])  # expert 1 has no rows
    static = torch.rand(4, generator=g) * 0.01 + 1e-3
    expected_static, expected_dynamic = torch.zeros_like(x), torch.zeros_like(x)
    for expert in range(4):
        rows = x[offsets[expert]:offsets[expert + 1]]
        if len(rows):
            span = slice(int(offsets[expert]), int(offsets[expert + 1]))
            expected_static[span] = quantized_ops.quantize_activations(rows, act_format, static[expert])
            expected_dynamic[span] = quantized_ops.quantize_activations(
                rows, act_format, quantized_ops.dynamic_scale(rows, act_format))
    assert torch.allclose(quantized_ops.quantize(x, act_format, static, offsets), expected_static, rtol=0, atol=0,
                          equal_nan=True)
    assert torch.allclose(quantized_ops.quantize_dynamic(x, act_format, offsets), expected_dynamic, rtol=0, atol=0,
                          equal_nan=True)
