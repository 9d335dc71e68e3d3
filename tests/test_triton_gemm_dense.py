"""The dense NVFP4 GEMMs (moe_nvfp4_gemm's DENSE mode) in Triton's interpreter against the reference
ops they run: `linear` with an NVFP4 weight (W4A16: bf16 or fp32 x) and `quant_linear
{act_format nvfp4}` (W4A4: x quantized to NVFP4 on load under the static input_scale).

Fresh random inputs per case, NaN-poisoned outputs (and split-K workspaces), rows 1 / 3 / 17 / 64 /
130 (decode, ragged, several M tiles), a K that BLOCK_K does not divide (80: the last K step masks
codes and block scales to 0), an N that BLOCK_N does not divide (72), with and without a bias.
Tolerance: bf16 outputs within 2 bf16 ulps of max(|reference|, 2**-8 of the largest output); fp32
outputs (fp32 x, or W4A4's exactness check) within a relative 2e-6 of the output's largest
magnitude. Kernel and reference multiply the same exact values (E2M1 x E4M3 is exact in bf16 and
fp32; the W4A4 activation quantization is bit-exact: test_dense_w4a4_quantizes_bit_exactly) and
differ in the order of the fp32 sums and in where the global scale multiplies (the reference
scales each weight, the kernel the accumulator): about 1e-6 relative, then the one bf16 rounding.
In the interpreter both operands are upcast to fp32 (its bf16 dot and its dot_scaled with E4M3
scales are wrong: tests/test_triton_gemm.py); the compiled wgmma / tcgen05 paths are checked on a
GPU by bench/gpu_check.py and their PTX by tests/test_triton_aot.py."""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="the Triton kernels need the triton package (the [triton] extra)")

import torch

from nemocompile.codegen.triton import templates_catalog as catalog
from nemocompile.runtime.formats import quantize_nvfp4
from nemocompile.runtime.kernels import triton_gemm
from nemocompile.runtime.kernels.triton_loader import TritonKernels
from nemocompile.runtime.reference.fused import linear_any, quant_linear_on_load
from tests.triton_kernels import assert_within_bf16_ulps, interpreted, poisoned

N, K = 72, 80  # BLOCK_N 64 and BLOCK_K 64 divide neither
K_DEEP = 256  # four BLOCK_K 64 steps: two per split-K slice
ROWS = (1, 3, 17, 64, 130)


def _kernels() -> list[catalog.KernelInstance]:
    w4a16 = {"op": "linear", "n": N, "k": K, "act_format": "bf16", "block_k": 64}
    w4a4 = {"op": "quant_linear", "n": N, "k": K, "act_format": "nvfp4", "block_k": 64}
    return [
        catalog.nvfp4_linear("w4a16_swap", **w4a16),
        catalog.nvfp4_linear("w4a16_swap_bias", has_bias=True, **w4a16),
        catalog.nvfp4_linear("w4a16_tile64_bias", has_bias=True, block_m=64, swap_ab=False, **w4a16),
        catalog.nvfp4_linear("w4a16_fp32", x_dtype="fp32", out_dtype="fp32", has_bias=True, **w4a16),
        catalog.nvfp4_linear("w4a16_splitk", "linear", n=N, k=K_DEEP, act_format="bf16", block_k=64, split_k=2,
                             has_bias=True),
        catalog.nvfp4_linear("w4a4", **w4a4),
        catalog.nvfp4_linear("w4a4_bias", has_bias=True, **w4a4),
        catalog.nvfp4_linear("w4a4_fp32_x", x_dtype="fp32", **w4a4),
        catalog.nvfp4_linear("w4a4_splitk", "quant_linear", n=N, k=K_DEEP, act_format="nvfp4", block_k=64, split_k=2,
                             has_bias=True),
        catalog.nvfp4_linear("w4a4_exact", "quant_linear", n=64, k=64, act_format="nvfp4", block_k=64,
                             out_dtype="fp32"),
    ]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> TritonKernels:
    return interpreted(catalog.with_split_k_reduces(_kernels()), tmp_path_factory.mktemp("engine"))


def _reduce(name: str) -> str | None:
    return name + catalog.REDUCE_SUFFIX if name.endswith("splitk") else None


def _poisoned_alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _floor(reference: torch.Tensor) -> float:
    return float(reference.float().abs().max()) * 2.0**-8


def _input_scale(x: torch.Tensor) -> torch.Tensor:
    """A static NVFP4 input scale a little under amax / (6 * 448): the largest blocks saturate."""
    return torch.tensor(float(x.float().abs().max()) / (6 * 448) * 0.8)


def _assert_fp32_close(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert not torch.isnan(out).any(), "the kernel left elements unwritten (NaN poison) or produced NaN"
    torch.testing.assert_close(out, expected, rtol=0.0, atol=2e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("kernel", ["w4a16_swap", "w4a16_swap_bias", "w4a16_tile64_bias", "w4a16_splitk"])
def test_dense_w4a16_linear(kernels: TritonKernels, kernel: str, rows: int) -> None:
    g = torch.Generator().manual_seed(hash((kernel, rows)) % 2**31)
    k = K_DEEP if kernel.endswith("splitk") else K
    x = (torch.randn(rows, k, generator=g) * 2).bfloat16()
    weight = quantize_nvfp4(torch.randn(N, k, generator=g))
    bias = torch.randn(N, generator=g).bfloat16() if "bias" in kernel or "splitk" in kernel else None
    out = triton_gemm.nvfp4_linear(kernels, kernel, x, weight, bias=bias, out=poisoned(rows, N),
                                   reduce_name=_reduce(kernel), alloc=_poisoned_alloc)
    expected = linear_any(x, weight, bias, torch.bfloat16)
    assert_within_bf16_ulps(out, expected, 2, _floor(expected))


@pytest.mark.parametrize("rows", [1, 17])
def test_dense_w4a16_fp32_input(kernels: TritonKernels, rows: int) -> None:
    """fp32 x (an fp32 engine): the kernel keeps an exact fp32 dot, so the fp32 result follows the
    reference to the order of its sums."""
    g = torch.Generator().manual_seed(40 + rows)
    x = torch.randn(rows, K, generator=g)
    weight = quantize_nvfp4(torch.randn(N, K, generator=g))
    bias = torch.randn(N, generator=g)
    out = triton_gemm.nvfp4_linear(kernels, "w4a16_fp32", x, weight, bias=bias,
                                   out=poisoned(rows, N, dtype=torch.float32))
    _assert_fp32_close(out, linear_any(x, weight, bias, torch.float32))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("kernel", ["w4a4", "w4a4_bias", "w4a4_fp32_x", "w4a4_splitk"])
def test_dense_w4a4_quant_linear(kernels: TritonKernels, kernel: str, rows: int) -> None:
    g = torch.Generator().manual_seed(hash((kernel, rows)) % 2**31)
    k = K_DEEP if kernel.endswith("splitk") else K
    x = torch.randn(rows, k, generator=g) * torch.logspace(-2, 1, k)  # blocks of very different amax
    x = x if kernel == "w4a4_fp32_x" else x.bfloat16()
    weight = quantize_nvfp4(torch.randn(N, k, generator=g))
    bias = torch.randn(N, generator=g).bfloat16() if "bias" in kernel or "splitk" in kernel else None
    input_scale = _input_scale(x)
    out = triton_gemm.nvfp4_linear(kernels, kernel, x, weight, input_scale, bias, out=poisoned(rows, N),
                                   reduce_name=_reduce(kernel), alloc=_poisoned_alloc)
    expected = quant_linear_on_load(x, weight, input_scale, bias, act_format="nvfp4", out_dtype=torch.bfloat16)
    assert_within_bf16_ulps(out, expected, 2, _floor(expected))


def test_dense_w4a4_quantizes_bit_exactly(kernels: TritonKernels) -> None:
    """An identity weight (dequantized to 1 within an fp32 ulp): the fp32 output is the kernel's
    quantized activation, which must be the `quantize` op's value for every
    element (saturated and all-zero blocks, E2M1 ties, tiny values)."""
    from nemocompile.runtime.quantized_ops import quantize

    g = torch.Generator().manual_seed(11)
    x = torch.randn(9, 64, generator=g) * torch.logspace(-3, 2, 64)
    x[0, :16] = 0.0
    x[1, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25] * 2)
    x = x.bfloat16()
    weight = quantize_nvfp4(torch.eye(64))
    input_scale = _input_scale(x)
    out = triton_gemm.nvfp4_linear(kernels, "w4a4_exact", x, weight, input_scale,
                                   out=poisoned(9, 64, dtype=torch.float32))
    torch.testing.assert_close(out, quantize(x, "nvfp4", input_scale), rtol=4e-7, atol=0.0)


def test_dense_w4a4_needs_its_input_scale(kernels: TritonKernels) -> None:
    weight = quantize_nvfp4(torch.randn(N, K))
    with pytest.raises(ValueError, match="input_scale"):
        triton_gemm.nvfp4_linear(kernels, "w4a4", torch.randn(2, K).bfloat16(), weight)
