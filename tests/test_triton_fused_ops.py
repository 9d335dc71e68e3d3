"""The codegen builders and runtime launchers of the fused-op kernels (moe_expert_up/down, W4A16
and W4A4, and the FP8 quant_linear), end to end without a model: an op as the fusion passes write
it, specialised by codegen/triton/plan.py, emitted, loaded by the runtime's Triton backend, and
run in the interpreter against the composition of reference ops (the expert GEMM output in bf16, as
the fused op's reference rounds it; tolerances as in test_triton_gemm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the Triton kernels need the triton package (the [triton] extra)")

import torch

from nemocompile.codegen.triton.emit import emit
from nemocompile.codegen.triton.plan import BUILDERS, _named
from nemocompile.graph.ir import Attrs, Op, Value
from nemocompile.graph.types import TensorType, dtype_named
from nemocompile.runtime.formats import fp8_codes, quantize_fp8, quantize_nvfp4_stacked
from nemocompile.runtime.kernels.triton_backend import TritonBackend
from nemocompile.runtime.kernels.triton_loader import TritonKernels
from nemocompile.runtime.quantized_ops import quant_grouped_gemm, quant_linear, quantize
from nemocompile.runtime.reference.elementwise import relu2
from nemocompile.runtime.reference.moe import moe_combine, moe_dispatch
from tests.triton_kernels import assert_within_bf16_ulps, row_rounding_bound

EXPERTS, TOP_K, TOKENS = 4, 2, 5


def _t(dtype: str, *shape: int) -> TensorType:
    return TensorType(dtype_named(dtype), shape)


def _run(tmp_path: Path, kernel: str, opname: str, operand_types: list[TensorType | None], result: TensorType,
         attrs: dict[str, object], args: list[object], arch: str = "sm_90") -> torch.Tensor:
    operands = tuple(f"v{i}" if t is not None else None for i, t in enumerate(operand_types))
    types = {f"v{i}": t for i, t in enumerate(operand_types) if t is not None}
    op = Op(opname, operands, (Value("out", result),), Attrs.of({**attrs, "kernel": kernel}))  # type: ignore[arg-type]
    instances = [_named(i) for i in BUILDERS[kernel](op, types, arch, False)]
    emit(instances, tmp_path, arch, tmp_path / "cache", compile_binaries=False,
         bindings={"prefill": {"out": [i.name for i in instances]}})
    backend = TritonBackend(TritonKernels.from_directory(tmp_path, "cpu"),
                            {"prefill": {"out": [i.name for i in instances]}})
    resolution = backend.resolver("prefill")(op, "cpu")
    assert resolution.kernel == kernel and resolution.fallback is None
    (out,) = resolution(op, args)
    return out


def _routing(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(EXPERTS - 1, generator=generator)[:TOP_K] for _ in range(TOKENS)])  # expert 3 idle
    return ids, torch.rand(TOKENS, TOP_K, generator=generator) + 0.1


def _floor(reference: torch.Tensor) -> float:
    return float(reference.float().abs().max()) * 2.0**-8


@pytest.mark.parametrize("act_format", [None, "nvfp4"])
def test_moe_expert_up_and_down(tmp_path: Path, act_format: str | None) -> None:
    g = torch.Generator().manual_seed(11)
    d, i = (64, 128) if act_format is None else (128, 256)
    arch = "sm_90" if act_format is None else "sm_100"
    suffix = "w4a16" if act_format is None else "w4a4"
    ids, routing = _routing(g)
    x = torch.randn(1, TOKENS, d, generator=g).bfloat16()
    x_sorted, offsets, order = moe_dispatch(x[0], ids, EXPERTS)
    up_w = quantize_nvfp4_stacked(torch.randn(EXPERTS, i, d, generator=g))
    down_w = quantize_nvfp4_stacked(torch.randn(EXPERTS, d, i, generator=g))
    up_scale = torch.full((EXPERTS,), float(x.float().abs().max()) / 2688) if act_format else None
    scale_type = _t("f32", EXPERTS) if act_format else None
    attrs: dict[str, object] = {"top_k": TOP_K, "out_dtype": "bf16", **({"act_format": act_format} if act_format else {})}
    index = _t("i64", TOKENS * TOP_K)
    hidden = _run(tmp_path / "up", f"triton_moe_up_{suffix}", "moe_expert_up",
                  [_t("bf16", 1, TOKENS, d), index, _t("i64", EXPERTS + 1), _t("nvfp4", EXPERTS, i, d), scale_type],
                  _t("bf16", TOKENS * TOP_K, i), {**attrs, "activation": "relu2"},
                  [x, order, offsets, up_w, up_scale], arch)
    rows = quantize(x_sorted, "nvfp4", up_scale, offsets) if up_scale is not None else x_sorted
    expected_hidden = relu2(quant_grouped_gemm(rows, offsets, up_w, torch.bfloat16))
    assert_within_bf16_ulps(hidden, expected_hidden, 3, _floor(expected_hidden))
    down_scale = torch.full((EXPERTS,), float(expected_hidden.float().abs().max()) / 2688) if act_format else None
    out = _run(tmp_path / "down", f"triton_moe_down_{suffix}", "moe_expert_down",
               [_t("bf16", TOKENS * TOP_K, i), index, _t("i64", EXPERTS + 1), _t("nvfp4", EXPERTS, d, i),
                _t("f32", 1, TOKENS, TOP_K), scale_type],
               _t("bf16", 1, TOKENS, d), attrs,
               [expected_hidden, order, offsets, down_w, routing.view(1, TOKENS, TOP_K), down_scale], arch)
    rows = quantize(expected_hidden, "nvfp4", down_scale, offsets) if down_scale is not None else expected_hidden
    expert_rows = quant_grouped_gemm(rows, offsets, down_w, torch.bfloat16)
    expected = moe_combine(expert_rows, order, routing, TOKENS)
    assert out.shape == (1, TOKENS, d)
    assert_within_bf16_ulps(out[0], expected, 2, _floor(expected), row_rounding_bound(expert_rows, order, routing))


@pytest.mark.parametrize(("with_bias", "codes"), [(False, False), (True, False), (True, True)])
def test_fp8_quant_linear(tmp_path: Path, with_bias: bool, codes: bool) -> None:
    """bf16 activations quantized on load, or (codes) the E4M3 codes a fused norm wrote with the same
    scale: both mean quant_linear(quantize(x, scale))."""
    g = torch.Generator().manual_seed(5)
    n, k = 96, 64
    x = (torch.randn(2, 3, k, generator=g) * 2).bfloat16()
    weight = quantize_fp8(torch.randn(n, k, generator=g))
    scale = torch.tensor(float(x.float().abs().max()) / 448)
    bias = torch.randn(n, generator=g).bfloat16() if with_bias else None
    x_operand = fp8_codes(x, scale) if codes else x
    out = _run(tmp_path, "triton_fp8_quant_linear", "quant_linear",
               [_t("fp8e4m3" if codes else "bf16", 2, 3, k), _t("fp8", n, k), _t("f32"),
                _t("bf16", n) if with_bias else None],
               _t("bf16", 2, 3, n), {"act_format": "fp8", "out_dtype": "bf16"}, [x_operand, weight, scale, bias])
    expected = quant_linear(quantize(x, "fp8", scale), weight, bias, torch.float32).bfloat16()
    assert out.shape == (2, 3, n)
    assert_within_bf16_ulps(out, expected, 2, _floor(expected))
