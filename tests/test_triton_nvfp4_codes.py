"""The W4A4 dense GEMM reading NVFP4 codes a fused norm wrote (moe_nvfp4_gemm's DENSE mode with a
uint8 x: CODES), in Triton's interpreter against the `quant_linear` reference op on the same
NVFP4Tensor (packed E2M1 codes, E4M3 block scales, input_scale as global scale), and the whole
hand-off: the add_rms_norm kernel's codes straight into this kernel against add_rms_norm then
quant_linear by reference.

Fresh random inputs per case, NaN-poisoned outputs (and split-K workspaces), rows 1 / 3 / 17 / 130
(decode, ragged, several M tiles), a K that BLOCK_K does not divide (80: the last K step masks the
codes and block scales to 0), an N that BLOCK_N does not divide (72), with and without a bias.
Tolerance as tests/test_triton_gemm_dense.py: bf16 outputs within 2 bf16 ulps of max(|reference|,
2**-8 of the largest output); the fp32 identity-weight case within a relative 4e-7 (the codes
reach the dot unchanged). In the interpreter the codes are decoded to fp32 (E2M1 value times block
scale, exact), as its dot_scaled decodes E4M3 scales as E8M0; the compiled tl.dot_scaled is checked
by its PTX (tests/test_triton_aot.py: tcgen05 mxf4nvf4 on sm_100a)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="the Triton kernels need the triton package (the [triton] extra)")

import torch

from nemocompile.codegen.triton import templates_catalog as catalog
from nemocompile.runtime.formats import NVFP4Tensor, dequantize_nvfp4, nvfp4_codes, quantize_nvfp4
from nemocompile.runtime.kernels import triton_gemm, triton_ops
from nemocompile.runtime.kernels.triton_loader import TritonKernels
from nemocompile.runtime.reference.fused import add_rms_norm, quant_linear_on_load
from tests.triton_kernels import assert_within_bf16_ulps, interpreted, poisoned

N, K = 72, 80  # BLOCK_N 64 and BLOCK_K 64 divide neither
K_DEEP = 256  # four BLOCK_K 64 steps: two per split-K slice
ROWS = (1, 3, 17, 130)
NORM_WIDTH = 64


def _kernels() -> list[catalog.KernelInstance]:
    codes = {"op": "quant_linear", "act_format": "nvfp4", "x_dtype": "u8", "block_k": 64}
    return [
        catalog.nvfp4_linear("codes", n=N, k=K, **codes),
        catalog.nvfp4_linear("codes_bias", n=N, k=K, has_bias=True, **codes),
        catalog.nvfp4_linear("codes_splitk", n=N, k=K_DEEP, split_k=2, has_bias=True, **codes),
        catalog.nvfp4_linear("codes_exact", n=64, k=64, out_dtype="fp32", **codes),
        catalog.nvfp4_linear("codes_norm", n=N, k=NORM_WIDTH, **codes),
        catalog.add_rms_norm("norm_nvfp4", "add_rms_norm", width=NORM_WIDTH, dtype="bf16", act_format="nvfp4"),
    ]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> TritonKernels:
    return interpreted(catalog.with_split_k_reduces(_kernels()), tmp_path_factory.mktemp("engine"))


def _poisoned_alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _codes(x: torch.Tensor) -> NVFP4Tensor:
    """x's NVFP4 codes under a static input scale a little under amax / (6 * 448) (the largest
    blocks saturate), as the norm writes them."""
    return nvfp4_codes(x, torch.tensor(float(x.float().abs().max()) / (6 * 448) * 0.8))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("kernel", ["codes", "codes_bias", "codes_splitk"])
def test_w4a4_reads_nvfp4_codes_as_they_are(kernels: TritonKernels, kernel: str, rows: int) -> None:
    g = torch.Generator().manual_seed(hash((kernel, rows)) % 2**31)
    k = K_DEEP if kernel == "codes_splitk" else K
    x = torch.randn(rows, 2, k, generator=g) * torch.logspace(-2, 1, k)  # [rows, 2, K]: leading dims kept
    codes = _codes(x)
    weight = quantize_nvfp4(torch.randn(N, k, generator=g))
    bias = torch.randn(N, generator=g).bfloat16() if kernel != "codes" else None
    out = triton_gemm.nvfp4_linear(kernels, kernel, codes, weight, codes.global_scale, bias,
                                   out=poisoned(rows * 2, N),
                                   reduce_name=kernel + catalog.REDUCE_SUFFIX if kernel == "codes_splitk" else None,
                                   alloc=_poisoned_alloc)
    expected = quant_linear_on_load(codes, weight, codes.global_scale, bias, act_format="nvfp4",
                                    out_dtype=torch.bfloat16)
    assert out.shape == expected.shape == (rows, 2, N)
    assert_within_bf16_ulps(out, expected, 2, float(expected.float().abs().max()) * 2.0**-8)


def test_codes_reach_the_dot_unchanged(kernels: TritonKernels) -> None:
    """An identity weight: the fp32 output is the activation the kernel multiplied, which must be the
    codes' own values (dequantize_nvfp4) for every element: zero and saturated blocks, E2M1 ties,
    tiny and negative values."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(9, 64, generator=g) * torch.logspace(-3, 2, 64)
    x[0, :16] = 0.0
    x[1, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25] * 2)
    codes = _codes(x.bfloat16())
    out = triton_gemm.nvfp4_linear(kernels, "codes_exact", codes, quantize_nvfp4(torch.eye(64)), codes.global_scale,
                                   out=poisoned(9, 64, dtype=torch.float32))
    torch.testing.assert_close(out, dequantize_nvfp4(codes), rtol=4e-7, atol=0.0)


@pytest.mark.parametrize("rows", [1, 19])
def test_norm_kernel_codes_feed_the_gemm_kernel(kernels: TritonKernels, rows: int) -> None:
    """The hand-off as an engine runs it: the add_rms_norm kernel's packed codes and block scales go
    to the GEMM kernel as they are; against add_rms_norm then quant_linear by reference."""
    g = torch.Generator().manual_seed(5 + rows)
    x, residual = (torch.randn(rows, NORM_WIDTH, generator=g).bfloat16() for _ in range(2))
    norm_weight = (torch.rand(NORM_WIDTH, generator=g) + 0.5).bfloat16()
    scale = torch.tensor(2.5 / (6 * 448))
    weight = quantize_nvfp4(torch.randn(N, NORM_WIDTH, generator=g))
    (packed, block_scale), _ = triton_ops.add_rms_norm(kernels, "norm_nvfp4", x, residual, norm_weight, 1e-5, scale)
    codes = NVFP4Tensor(packed, block_scale, scale)
    want_codes, _ = add_rms_norm(x, residual, norm_weight, scale, eps=1e-5, act_format="nvfp4")
    assert isinstance(want_codes, NVFP4Tensor) and torch.equal(codes.packed, want_codes.packed)
    out = triton_gemm.nvfp4_linear(kernels, "codes_norm", codes, weight, scale, out=poisoned(rows, N))
    expected = quant_linear_on_load(want_codes, weight, scale, None, act_format="nvfp4", out_dtype=torch.bfloat16)
    assert_within_bf16_ulps(out, expected, 2, float(expected.float().abs().max()) * 2.0**-8)
