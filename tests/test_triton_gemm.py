"""The GEMM kernels in Triton's interpreter against the composition of reference ops they mean.

Every case uses fresh random inputs and NaN-poisoned outputs; the routings include ragged expert
loads, an expert with no tokens, more rows than one BLOCK_M tile, and batch-1 decode.

The reference is the composition of reference ops the fused op means (runtime/reference/fused.py):
the expert GEMM's output in the op's dtype (bf16), then relu2, or the routing-weighted fp32 combine,
cast to bf16. The kernels round where it does.
Tolerance (bf16 outputs): 2 bf16 ulps of max(|reference|, 2**-8 times the output's largest
magnitude), per element; the up-GEMM 3 (a GEMM output that rounds the other way before relu2 moves
the square by 2 of its ulps); the down-GEMM adds one bf16 ulp of each of the token's expert rows,
times its routing weight (tests/triton_kernels.row_rounding_bound: a row that rounds the other way).
Kernel and reference multiply the same exact values (E2M1 times E4M3 is
exact in bf16; the activation quantization is bit-exact, checked separately by identity-weight
tests with fp32 outputs) and accumulate in fp32 in different orders (~1e-6 relative); the rest
is the final bf16 rounding (the interpreter's cast truncates, so the templates round to nearest
even on the bits first in interpreter mode).
The interpreter paths: bf16 tl.dot is wrong in the interpreter (Triton issue 11584) and dot_scaled
decodes E4M3 scales as E8M0, so in interpreter mode the kernels upcast both operands to fp32
(INTERPRET constexpr); the FP8 GEMM reading E4M3 codes runs its fp8 x fp8 dot there as it is (the
interpreter's fp8 dot is exact: test_fp8_codes_enter_the_dot_exactly). The compiled tensor-core
paths are checked on a GPU by bench/gpu_check.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the Triton kernels need the triton package (the [triton] extra)")

import torch

from nemocompile.codegen.triton import templates_catalog as catalog
from nemocompile.runtime.formats import FP8Tensor, quantize_fp8, quantize_nvfp4_stacked
from nemocompile.runtime.kernels import triton_gemm
from nemocompile.runtime.kernels.triton_loader import TritonKernels
from nemocompile.runtime.quantized_ops import quant_grouped_gemm, quant_linear, quantize
from nemocompile.runtime.reference.elementwise import relu2
from nemocompile.runtime.reference.moe import moe_combine, moe_dispatch
from tests.triton_kernels import assert_within_bf16_ulps, interpreted, poisoned, row_rounding_bound

EXPERTS, TOP_K = 6, 2
EMPTY_EXPERT = 4
HIDDEN, INTER = 64, 128  # W4A16 / FP8 shapes (BLOCK_K 64)
HIDDEN4, INTER4 = 128, 256  # W4A4 shapes (dot_scaled wants BLOCK_K 128)
ROUTINGS = {"decode-1": 1, "ragged-13": 13, "multi-tile-40": 40}
# K values BLOCK_K 64 does not divide (the last K step is padded with masked loads: codes and block
# scales 0 beyond K), as the demo engine's latent (32) and expert (48) sizes are.
PADDED_K = (16, 32, 48, 80)
PADDED_N = 48


def _kernels() -> list:
    common = {"experts": EXPERTS, "top_k": TOP_K, "block_k": 64}
    up = {"n": INTER, "k": HIDDEN, "act_format": "bf16", "activation": "relu2", "gather": True, **common}
    down = {"n": HIDDEN, "k": INTER, "act_format": "bf16", "combine": True, **common}
    w4a4 = {"experts": EXPERTS, "top_k": TOP_K, "act_format": "nvfp4", "block_m": 128, "block_n": 128,
            "block_k": 128}
    return [
        catalog.moe_gemm("up_swap", "moe_expert_up", block_m=16, **up),
        catalog.moe_gemm("up_tile64", "moe_expert_up", block_m=64, swap_ab=False, **up),
        catalog.moe_gemm("down_swap", "moe_expert_down", block_m=16, **down),
        catalog.moe_combine("combine", "moe_expert_down", n=HIDDEN, top_k=TOP_K, block_n=32),
        catalog.moe_gemm("up_w4a4", "moe_expert_up", n=INTER4, k=HIDDEN4, activation="relu2", gather=True, **w4a4),
        catalog.moe_gemm("down_w4a4", "moe_expert_down", n=HIDDEN4, k=INTER4, combine=True, **w4a4),
        catalog.moe_gemm("up_w4a4_fp32", "moe_expert_up", n=HIDDEN4, k=HIDDEN4, gather=True, out_dtype="fp32",
                         **w4a4),
        catalog.moe_combine("combine4", "moe_expert_down", n=HIDDEN4, top_k=TOP_K, block_n=64),
        catalog.fp8_linear("fp8_w8a8", "linear", n=INTER, k=HIDDEN, quant_act=True, block_k=64),
        catalog.fp8_linear("fp8_w8a8_bias", "linear", n=INTER, k=HIDDEN, quant_act=True, has_bias=True,
                           per_channel=True, block_m=64, swap_ab=False, block_k=64),
        catalog.fp8_linear("fp8_w8a16", "linear", n=INTER, k=HIDDEN, quant_act=False, block_k=64),
        catalog.fp8_linear("fp8_exact", "linear", n=HIDDEN, k=HIDDEN, quant_act=True, out_dtype="fp32",
                           block_k=64),
        catalog.fp8_linear("fp8_codes_input", "quant_linear", n=INTER, k=HIDDEN, quant_act=True, per_channel=True,
                           has_bias=True, x_dtype="fp8e4nv", block_k=64),
        catalog.fp8_linear("fp8_codes_exact", "quant_linear", n=HIDDEN, k=HIDDEN, quant_act=True, out_dtype="fp32",
                           x_dtype="fp8e4nv", block_k=64),
        catalog.moe_combine("combine_padded", "moe_expert_down", n=PADDED_N, top_k=TOP_K, block_n=64),
        *(kernel for k in PADDED_K for kernel in _padded_kernels(k)),
    ]


def _padded_kernels(k: int) -> list:
    """W4A4 up/down, W4A16 up and FP8 at a K that BLOCK_K does not divide."""
    w4a4 = {"experts": EXPERTS, "top_k": TOP_K, "act_format": "nvfp4", "block_m": 128, "block_n": 128,
            "block_k": 64}
    return [
        catalog.moe_gemm(f"up_w4a4_k{k}", "moe_expert_up", n=PADDED_N, k=k, activation="relu2", gather=True, **w4a4),
        catalog.moe_gemm(f"down_w4a4_k{k}", "moe_expert_down", n=PADDED_N, k=k, combine=True, **w4a4),
        catalog.moe_gemm(f"up_w4a16_k{k}", "moe_expert_up", n=PADDED_N, k=k, experts=EXPERTS, top_k=TOP_K,
                         act_format="bf16", activation="relu2", gather=True, block_m=16, block_k=64),
        catalog.fp8_linear(f"fp8_k{k}", "linear", n=PADDED_N, k=k, quant_act=True, block_k=32 if k < 32 else 64),
    ]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> TritonKernels:
    return interpreted(_kernels(), tmp_path_factory.mktemp("engine"))


def _routing(tokens: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids [tokens, k] (skewed towards expert 0, never EMPTY_EXPERT) and routing weights."""
    probs = torch.tensor([8.0, 1, 1, 1, 0, 2])
    ids = torch.stack([torch.multinomial(probs, TOP_K, generator=generator) for _ in range(tokens)])
    return ids, torch.rand(tokens, TOP_K, generator=generator) + 0.1


def _scale_floor(reference: torch.Tensor) -> float:
    return float(reference.float().abs().max()) * 2.0**-8


@pytest.mark.parametrize("kernel", ["up_swap", "up_tile64"])
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_w4a16_expert_up(kernels: TritonKernels, kernel: str, routing: str) -> None:
    g = torch.Generator().manual_seed(hash((kernel, routing)) % 2**31)
    tokens = ROUTINGS[routing]
    ids, _ = _routing(tokens, g)
    x = torch.randn(tokens, HIDDEN, generator=g).bfloat16()
    weight = quantize_nvfp4_stacked(torch.randn(EXPERTS, INTER, HIDDEN, generator=g) * 0.5)
    x_sorted, offsets, order = moe_dispatch(x, ids, EXPERTS)
    assert offsets[EMPTY_EXPERT] == offsets[EMPTY_EXPERT + 1]
    out = triton_gemm.moe_expert_up(kernels, kernel, x, order, offsets, weight, out=poisoned(tokens * TOP_K, INTER))
    expected = relu2(quant_grouped_gemm(x_sorted, offsets, weight, torch.bfloat16))
    assert_within_bf16_ulps(out, expected, 3, _scale_floor(expected))


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_w4a16_expert_down(kernels: TritonKernels, routing: str) -> None:
    g = torch.Generator().manual_seed(hash(("down", routing)) % 2**31)
    tokens = ROUTINGS[routing]
    ids, routing_weights = _routing(tokens, g)
    _, offsets, order = moe_dispatch(torch.zeros(tokens, 1), ids, EXPERTS)
    hidden = torch.randn(tokens * TOP_K, INTER, generator=g).bfloat16()
    weight = quantize_nvfp4_stacked(torch.randn(EXPERTS, HIDDEN, INTER, generator=g))
    out = triton_gemm.moe_expert_down(kernels, "down_swap", "combine", hidden, order, offsets, weight,
                                      routing_weights, out=poisoned(tokens, HIDDEN),
                                      pairs=poisoned(tokens * TOP_K, HIDDEN, dtype=torch.float32))
    rows = quant_grouped_gemm(hidden, offsets, weight, torch.bfloat16)
    expected = moe_combine(rows, order, routing_weights, tokens)
    assert_within_bf16_ulps(out, expected, 2, _scale_floor(expected), row_rounding_bound(rows, order, routing_weights))


def _input_scales(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-expert static NVFP4 input scales near amax / (6 * 448), some smaller (so blocks saturate)."""
    base = float(x.float().abs().max()) / (6 * 448)
    return base * (0.5 + torch.rand(EXPERTS, generator=generator))


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_w4a4_expert_up_and_down(kernels: TritonKernels, routing: str) -> None:
    """The sm_100 path through the interpreter's explicit-dequant branch (see the module doc)."""
    g = torch.Generator().manual_seed(hash(("w4a4", routing)) % 2**31)
    tokens = ROUTINGS[routing]
    ids, routing_weights = _routing(tokens, g)
    x = torch.randn(tokens, HIDDEN4, generator=g).bfloat16()
    up_weight = quantize_nvfp4_stacked(torch.randn(EXPERTS, INTER4, HIDDEN4, generator=g))
    down_weight = quantize_nvfp4_stacked(torch.randn(EXPERTS, HIDDEN4, INTER4, generator=g))
    x_sorted, offsets, order = moe_dispatch(x, ids, EXPERTS)
    up_scale = _input_scales(x, g)
    hidden = triton_gemm.moe_expert_up(kernels, "up_w4a4", x, order, offsets, up_weight, up_scale,
                                       out=poisoned(tokens * TOP_K, INTER4))
    expected_hidden = relu2(quant_grouped_gemm(quantize(x_sorted, "nvfp4", up_scale, offsets), offsets, up_weight,
                                               torch.bfloat16))
    assert_within_bf16_ulps(hidden, expected_hidden, 3, _scale_floor(expected_hidden))
    down_scale = _input_scales(expected_hidden, g)
    out = triton_gemm.moe_expert_down(kernels, "down_w4a4", "combine4", expected_hidden, order, offsets, down_weight,
                                      routing_weights, down_scale, out=poisoned(tokens, HIDDEN4),
                                      pairs=poisoned(tokens * TOP_K, HIDDEN4, dtype=torch.float32))
    rows = quant_grouped_gemm(quantize(expected_hidden, "nvfp4", down_scale, offsets), offsets, down_weight,
                              torch.bfloat16)
    expected = moe_combine(rows, order, routing_weights, tokens)
    assert_within_bf16_ulps(out, expected, 2, _scale_floor(expected), row_rounding_bound(rows, order, routing_weights))


@pytest.mark.parametrize("k", PADDED_K)
def test_gemms_pad_a_k_that_block_k_does_not_divide(kernels: TritonKernels, k: int) -> None:
    """The b200 demo's expert K (32, 48) is below tl.dot_scaled's 64-element step: every GEMM template
    masks the elements beyond K. Ragged routing with an empty expert, NaN-poisoned outputs."""
    g = torch.Generator().manual_seed(1000 + k)
    tokens = 13
    ids, routing_weights = _routing(tokens, g)
    x = torch.randn(tokens, k, generator=g).bfloat16()
    x_sorted, offsets, order = moe_dispatch(x, ids, EXPERTS)
    assert offsets[EMPTY_EXPERT] == offsets[EMPTY_EXPERT + 1]
    weight = quantize_nvfp4_stacked(torch.randn(EXPERTS, PADDED_N, k, generator=g))
    # W4A4 up-GEMM
    scale = _input_scales(x, g)
    hidden = triton_gemm.moe_expert_up(kernels, f"up_w4a4_k{k}", x, order, offsets, weight, scale,
                                       out=poisoned(tokens * TOP_K, PADDED_N))
    expected = relu2(quant_grouped_gemm(quantize(x_sorted, "nvfp4", scale, offsets), offsets, weight, torch.bfloat16))
    assert_within_bf16_ulps(hidden, expected, 3, _scale_floor(expected))
    # W4A16 up-GEMM
    hidden16 = triton_gemm.moe_expert_up(kernels, f"up_w4a16_k{k}", x, order, offsets, weight,
                                         out=poisoned(tokens * TOP_K, PADDED_N))
    expected16 = relu2(quant_grouped_gemm(x_sorted, offsets, weight, torch.bfloat16))
    assert_within_bf16_ulps(hidden16, expected16, 3, _scale_floor(expected16))
    # W4A4 down-GEMM (its K is the hidden width) with the routing-weight combine
    rows_in = torch.randn(tokens * TOP_K, k, generator=g).bfloat16()
    down_scale = _input_scales(rows_in, g)
    out = triton_gemm.moe_expert_down(kernels, f"down_w4a4_k{k}", "combine_padded", rows_in, order, offsets, weight,
                                      routing_weights, down_scale, out=poisoned(tokens, PADDED_N),
                                      pairs=poisoned(tokens * TOP_K, PADDED_N, dtype=torch.float32))
    rows = quant_grouped_gemm(quantize(rows_in, "nvfp4", down_scale, offsets), offsets, weight, torch.bfloat16)
    expected_out = moe_combine(rows, order, routing_weights, tokens)
    assert_within_bf16_ulps(out, expected_out, 2, _scale_floor(expected_out),
                            row_rounding_bound(rows, order, routing_weights))
    # FP8 W8A8
    fp8_weight = quantize_fp8(torch.randn(PADDED_N, k, generator=g))
    input_scale = torch.tensor(float(x.float().abs().max()) / 448)
    fp8_out = triton_gemm.fp8_linear(kernels, f"fp8_k{k}", x, fp8_weight, input_scale, out=poisoned(tokens, PADDED_N))
    fp8_expected = quant_linear(quantize(x, "fp8", input_scale), fp8_weight, None, torch.float32).bfloat16()
    assert_within_bf16_ulps(fp8_out, fp8_expected, 2, _scale_floor(fp8_expected))


def _identity_nvfp4(experts: int, size: int) -> torch.Tensor:
    return torch.eye(size).expand(experts, size, size).contiguous()


def test_w4a4_quantizes_activations_bit_exactly(kernels: TritonKernels) -> None:
    """With identity weights (dequantized to 1 within an fp32 ulp) the fp32 output is the kernel's
    quantized activation: it must equal the `quantize` op's value for every element, including
    saturated blocks, all-zero blocks, ties and tiny values."""
    g = torch.Generator().manual_seed(7)
    tokens = 9
    ids, _ = _routing(tokens, g)
    x = torch.randn(tokens, HIDDEN4, generator=g) * torch.logspace(-3, 2, HIDDEN4)
    x[0, :16] = 0.0
    x[1, :32] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25] * 4)  # ties on the E2M1 grid at scale 1
    x = x.bfloat16()
    weight = quantize_nvfp4_stacked(_identity_nvfp4(EXPERTS, HIDDEN4))
    x_sorted, offsets, order = moe_dispatch(x, ids, EXPERTS)
    scale = _input_scales(x, g)
    out = triton_gemm.moe_expert_up(kernels, "up_w4a4_fp32", x, order, offsets, weight, scale,
                                    out=poisoned(tokens * TOP_K, HIDDEN4, dtype=torch.float32))
    expected = quantize(x_sorted, "nvfp4", scale, offsets)
    torch.testing.assert_close(out, expected, rtol=4e-7, atol=0.0)


@pytest.mark.parametrize("rows", [1, 7, 70])
@pytest.mark.parametrize("kernel", ["fp8_w8a8", "fp8_w8a8_bias", "fp8_w8a16"])
def test_fp8_linear(kernels: TritonKernels, kernel: str, rows: int) -> None:
    g = torch.Generator().manual_seed(hash((kernel, rows)) % 2**31)
    x = (torch.randn(rows, HIDDEN, generator=g) * 3).bfloat16()
    per_channel = kernel == "fp8_w8a8_bias"
    weight = quantize_fp8(torch.randn(INTER, HIDDEN, generator=g), per_channel=per_channel)
    bias = torch.randn(INTER, generator=g).bfloat16() if kernel == "fp8_w8a8_bias" else None
    quant_act = kernel != "fp8_w8a16"
    input_scale = torch.tensor(float(x.float().abs().max()) / 448 * 0.8) if quant_act else None  # some saturate
    out = triton_gemm.fp8_linear(kernels, kernel, x, weight, input_scale, bias, out=poisoned(rows, INTER))
    activations = quantize(x, "fp8", input_scale) if input_scale is not None else x.float()
    expected = quant_linear(activations, weight, bias, torch.float32).bfloat16()
    assert_within_bf16_ulps(out, expected, 2, _scale_floor(expected))


@pytest.mark.parametrize("rows", [1, 7, 70])
def test_fp8_linear_reads_the_codes_a_norm_wrote(kernels: TritonKernels, rows: int) -> None:
    """`quant_linear` reading a fused norm's FP8 output (E4M3 codes, 1 byte each, with the norm's
    input_scale) against the reference op (runtime/reference/fused.quant_linear_on_load)."""
    from nemocompile.runtime.formats import fp8_codes
    from nemocompile.runtime.reference.fused import quant_linear_on_load

    g = torch.Generator().manual_seed(500 + rows)
    x = torch.randn(rows, HIDDEN, generator=g) * 3
    input_scale = torch.tensor(float(x.abs().max()) / 448 * 0.8)
    codes = fp8_codes(x, input_scale)  # some saturated at +-448
    assert codes.dtype == torch.float8_e4m3fn and codes.float().abs().max() == 448
    weight = quantize_fp8(torch.randn(INTER, HIDDEN, generator=g), per_channel=True)
    bias = torch.randn(INTER, generator=g).bfloat16()
    out = triton_gemm.fp8_linear(kernels, "fp8_codes_input", codes, weight, input_scale, bias,
                                 out=poisoned(rows, INTER))
    expected = quant_linear_on_load(codes, weight, input_scale, bias, act_format="fp8", out_dtype=torch.bfloat16)
    assert_within_bf16_ulps(out, expected, 2, _scale_floor(expected))


def test_fp8_quantizes_activations_bit_exactly(kernels: TritonKernels) -> None:
    """Identity FP8 weight with scale 1 (exactly 1.0 after dequantization): the output is Q(x) itself."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, HIDDEN, generator=g) * torch.logspace(-4, 3, HIDDEN)
    input_scale = torch.tensor(1.0 / 64)
    weight = quantize_fp8(torch.eye(HIDDEN), scale=torch.tensor(1.0))
    assert isinstance(weight, FP8Tensor) and bool((weight.data.float() == torch.eye(HIDDEN)).all())
    out = triton_gemm.fp8_linear(kernels, "fp8_exact", x, weight, input_scale, out=poisoned(5, HIDDEN, dtype=torch.float32))
    torch.testing.assert_close(out, quantize(x, "fp8", input_scale), rtol=0.0, atol=0.0)


def test_fp8_codes_enter_the_dot_exactly(kernels: TritonKernels) -> None:
    """Every finite E4M3 code through the fp8 x fp8 dot of the codes path (which the interpreter runs
    as it is, without the fp32 upcast of the other paths), times an identity weight: out == codes."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # the two NaN codes (the norm never writes them)
    x = codes.view(torch.float8_e4m3fn).reshape(256 // HIDDEN, HIDDEN)
    weight = quantize_fp8(torch.eye(HIDDEN), scale=torch.tensor(1.0))
    out = triton_gemm.fp8_linear(kernels, "fp8_codes_exact", x, weight, torch.tensor(1.0),
                                 out=poisoned(x.shape[0], HIDDEN, dtype=torch.float32))
    torch.testing.assert_close(out, x.float(), rtol=0.0, atol=0.0)


def test_loader_refuses_missing_index(tmp_path: Path) -> None:
    from nemocompile.base.errors import EngineError

    with pytest.raises(EngineError, match=r"kernels\.json"):
        TritonKernels.from_files({}, "cpu")
