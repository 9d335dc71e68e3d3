"""NVFP4 and FP8 bit for bit against NVIDIA ModelOpt, the tool that writes the checkpoints we read.

ModelOpt's quantizers run on CPU, except the Triton kernel its Four-Over-Six calibration uses
for fake quantization; the test for that recipe swaps in a CPU twin of the kernel
(``_static_blockwise_fp4_fake_quant`` below, written from its source) and runs everything
else of ModelOpt as it is: max calibration, the MSE search, the export.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip(
    "modelopt.torch.quantization.qtensor.nvfp4_tensor",
    reason="ModelOpt is the oracle here: pip install nvidia-modelopt requests huggingface_hub",
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # ModelOpt warns about untested transformers versions on import
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import quant_utils
    from modelopt.torch.quantization import tensor_quant
    from modelopt.torch.quantization.qtensor.fp8_tensor import FP8QTensor
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

from nemocompile.runtime.formats import (
    NVFP4Tensor,
    dequantize_fp8,
    dequantize_nvfp4,
    fake_quantize_nvfp4,
    quantize_fp8,
    quantize_fp8_measured,
    quantize_nvfp4,
    quantize_nvfp4_measured,
    quantize_nvfp4_stacked,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(7, 64), (33, 128), (1, 16), (3, 5, 32)]
PATTERNS = ["gaussian", "outliers", "zero_blocks", "tiny_blocks", "mixed"]


def _weight(shape: tuple[int, ...], dtype: torch.dtype, pattern: str, seed: int = 0) -> torch.Tensor:
    """A test weight: gaussian, or with outliers, all-zero blocks, blocks of ~1e-6 (their scales
    underflow E4M3), or all of these on rows whose magnitudes span 1e-4..1e2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.02
    blocks = x.view(-1, 16)
    pick = torch.rand(blocks.shape[0], generator=g)
    if pattern in ("outliers", "mixed"):
        spikes = torch.rand(x.shape, generator=g) < 0.01
        x[spikes] *= 300
    if pattern in ("zero_blocks", "mixed"):
        blocks[pick < 0.2] = 0
    if pattern in ("tiny_blocks", "mixed"):
        blocks[pick > 0.8] = torch.randn(int((pick > 0.8).sum()), 16, generator=g) * 1e-6
    if pattern == "mixed":
        x *= torch.logspace(-2, 4, x.shape[-2], dtype=torch.float32).unsqueeze(-1)
    return x.clamp(-6e4, 6e4).to(dtype)  # float16 ends at 65504


def _modelopt_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | None = None) -> NVFP4Tensor:
    qtensor, block_scale, scale_2 = NVFP4QTensor.quantize(
        x.clone(), 16, weights_scaling_factor_2=global_scale
    )
    return NVFP4Tensor(qtensor._quantized_data, block_scale, scale_2)


def _modelopt_dequantize(t: NVFP4Tensor, dtype: torch.dtype) -> torch.Tensor:
    qtensor = NVFP4QTensor(torch.Size(t.shape), dtype, t.packed)
    out: torch.Tensor = qtensor.dequantize(
        dtype=dtype, scale=t.block_scale, double_scale=t.global_scale, block_sizes={-1: 16}
    )
    return out


def _assert_same_nvfp4(ours: NVFP4Tensor, theirs: NVFP4Tensor) -> None:
    assert torch.equal(ours.packed, theirs.packed), (ours.packed != theirs.packed).sum()
    assert torch.equal(ours.block_scale.view(torch.uint8), theirs.block_scale.view(torch.uint8))
    assert ours.global_scale.dtype == theirs.global_scale.dtype == torch.float32
    assert torch.equal(ours.global_scale, theirs.global_scale)


def _assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


# ------------------------------------------------------------------------------------------ NVFP4


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nvfp4_quantize_and_dequantize_match_modelopt(
    shape: tuple[int, ...], dtype: torch.dtype, pattern: str
) -> None:
    x = _weight(shape, dtype, pattern)
    ours, theirs = quantize_nvfp4(x), _modelopt_nvfp4(x)
    _assert_same_nvfp4(ours, theirs)
    for out_dtype in (torch.float32, dtype):
        _assert_bitwise_equal(dequantize_nvfp4(ours, out_dtype), _modelopt_dequantize(theirs, out_dtype))


def _error_sums(weight: torch.Tensor, dequantized: torch.Tensor) -> tuple[float, float]:
    exact = weight.double()
    return float(exact.square().sum()), float((exact - dequantized.double()).square().sum())


@pytest.mark.parametrize("pattern", ["gaussian", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_builds_measured_quantizers_match_modelopt_over_several_steps(dtype: torch.dtype, pattern: str) -> None:
    """What the streaming build writes: the same bytes as ModelOpt on a weight of several cache-sized
    steps (33,600 blocks), -0.0 and tiny negatives included, with the error sums of the dequantized
    weight, and a float32 weight left as it was."""
    weight = _weight((2100, 256), dtype, pattern, seed=3)
    weight[0, :3] = torch.tensor([-0.0, -1e-30, 0.0], dtype=dtype)
    before = weight.clone()
    nvfp4, errors = quantize_nvfp4_measured(weight)
    _assert_same_nvfp4(nvfp4, _modelopt_nvfp4(weight))
    assert len(errors) == 3  # 16384 blocks a step
    expected = _error_sums(weight, dequantize_nvfp4(nvfp4))
    assert [sum(parts) for parts in zip(*errors, strict=True)] == pytest.approx(expected, rel=1e-5)
    fp8, errors = quantize_fp8_measured(weight)
    data, scale, _ = _modelopt_export(weight, mtq.FP8_DEFAULT_CFG)
    assert torch.equal(fp8.scale, scale.view(())) and torch.equal(fp8.data.view(torch.uint8), data.view(torch.uint8))
    assert [sum(parts) for parts in zip(*errors, strict=True)] == pytest.approx(
        _error_sums(weight, dequantize_fp8(fp8)), rel=1e-5)
    _assert_bitwise_equal(weight, before)


@pytest.mark.parametrize("seed", range(8))
def test_nvfp4_matches_modelopt_on_values_at_rounding_midpoints(seed: int) -> None:
    # Values exactly on E2M1 midpoints (and one float32 ulp either side) times 2**k: with the
    # global scale 2**(k-3) and block amax 6 * 2**k every block scale is 8 and every divisor 2**k,
    # exactly, so each tie rule is exercised.
    g = torch.Generator().manual_seed(seed)
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    picks = midpoints[torch.randint(0, 7, (40, 15), generator=g)]
    picks = picks * torch.where(torch.rand(40, 15, generator=g) < 0.5, -1.0, 1.0)
    nudge = torch.randint(-1, 2, (40, 15), generator=g)
    picks = torch.where(nudge == 0, picks, torch.nextafter(picks, picks + nudge.float()))
    k = float(seed - 4)
    x = torch.cat([picks, torch.full((40, 1), 6.0)], dim=1).view(5, 128) * 2.0**k
    global_scale = torch.tensor(2.0 ** (k - 3))
    ours = quantize_nvfp4(x, global_scale)
    assert (ours.block_scale.float() == 8.0).all()
    _assert_same_nvfp4(ours, _modelopt_nvfp4(x, global_scale))
    _assert_same_nvfp4(quantize_nvfp4(x), _modelopt_nvfp4(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nvfp4_with_a_given_global_scale_and_fake_quantize_match_modelopt(dtype: torch.dtype) -> None:
    x = _weight((9, 64), dtype, "mixed", seed=3)
    for global_scale in (torch.tensor(1e-3), torch.tensor(0.37), torch.tensor(3e-7)):
        ours, theirs = quantize_nvfp4(x, global_scale), _modelopt_nvfp4(x, global_scale)
        _assert_same_nvfp4(ours, theirs)
        _assert_bitwise_equal(fake_quantize_nvfp4(x, global_scale), _modelopt_dequantize(theirs, dtype))


def test_nvfp4_stacked_matches_modelopt_moe_export() -> None:
    # ModelOpt's to_quantized_weight views a stack's weight_scale_2 [E] as [E, 1, 1].
    x = torch.stack([_weight((6, 48), torch.bfloat16, p, seed=i) for i, p in enumerate(PATTERNS)])
    global_scale = torch.stack([NVFP4QTensor.get_weights_scaling_factor_2(expert) for expert in x])
    block_scale, _ = NVFP4QTensor.get_weights_scaling_factor(x, 16, global_scale.view(-1, 1, 1))
    packed = quant_utils.to_quantized_weight(x, block_scale, quant_utils.QUANTIZATION_NVFP4, global_scale, 16)
    ours = quantize_nvfp4_stacked(x)
    _assert_same_nvfp4(ours, NVFP4Tensor(packed, block_scale, global_scale))


def test_nvfp4_all_zero_tensor_is_modelopt_with_its_zero_amax_substitute() -> None:
    zeros = torch.zeros(4, 32, dtype=torch.bfloat16)
    # ModelOpt divides 0 by 0 here: NaN block scales, codes 7 (6.0), NaN on dequantize ...
    theirs = _modelopt_nvfp4(zeros)
    assert torch.isnan(theirs.block_scale.float()).all()
    # ... so we quantize as ModelOpt does with the amax its export substitutes for zero: 6.
    ours = quantize_nvfp4(zeros)
    _assert_same_nvfp4(ours, _modelopt_nvfp4(zeros, torch.tensor(6.0) / (6.0 * 448.0)))
    assert torch.equal(dequantize_nvfp4(ours), torch.zeros(4, 32))


# --------------------------------------------------------------------------- NVFP4 four over six


def _fp4_round_magnitude(a: torch.Tensor) -> torch.Tensor:
    """modelopt/torch/kernels/quantization/common/nvfp4_quant.py: fp4_round_magnitude."""
    return torch.where(
        a <= 0.25,
        0.0,
        torch.where(
            a < 0.75,
            0.5,
            torch.where(
                a <= 1.25,
                1.0,
                torch.where(
                    a < 1.75,
                    1.5,
                    torch.where(a <= 2.5, 2.0, torch.where(a < 3.5, 3.0, torch.where(a <= 5.0, 4.0, 6.0))),
                ),
            ),
        ),
    )


def _static_blockwise_fp4_fake_quant(
    x: torch.Tensor,
    amax: torch.Tensor,
    global_amax: torch.Tensor | None = None,
    quantize_block_scales: bool = True,
    fp8_max_for_normalization: float = 448.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """CPU twin of modelopt/torch/kernels/quantization/gemm/fp4_kernel.py's function of this name:
    compute_fp4_scales (with ModelOpt's own scaled_e4m3_impl), then nvfp4_scalar_quant per block."""
    scale = amax.float() / 6.0
    if quantize_block_scales:
        global_amax = amax.float().amax() if global_amax is None else global_amax.float()
        scale = tensor_quant.scaled_e4m3_impl(scale, global_amax * (448.0 / fp8_max_for_normalization) / 6.0)
    blocks = x.contiguous().view(amax.numel(), -1).float()
    scale = scale.contiguous().view(-1, 1)
    zero = scale == 0
    safe = torch.where(zero | torch.isnan(scale) | torch.isinf(scale), 1.0, scale)
    rescaled = _fp4_round_magnitude(blocks.abs() / safe) * safe
    quantized = torch.where(zero, 0.0, torch.where(blocks >= 0, rescaled, -rescaled))
    return quantized.to(out_dtype or x.dtype).view(x.shape)


@pytest.fixture
def modelopt_fp4_kernel_on_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    kernels = tensor_quant.triton_kernel
    monkeypatch.setattr(kernels, "IS_AVAILABLE", True)
    monkeypatch.setattr(
        kernels, "static_blockwise_fp4_fake_quant", _static_blockwise_fp4_fake_quant, raising=False
    )
    yield


def _modelopt_export(weight: torch.Tensor, config: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """Quantize a Linear holding weight with a ModelOpt config: its export (weight, weight_scale, weight_scale_2)."""
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    inputs = torch.randn(3, weight.shape[1]).to(weight.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the zero-amax substitution, which the tests check
        mtq.quantize(linear, config, lambda model: model(inputs))
        fmt = quant_utils.get_quantization_format(linear)
        scale = quant_utils.get_weight_scaling_factor(linear)
        scale_2 = quant_utils.get_weight_scaling_factor_2(linear)
    packed = quant_utils.to_quantized_weight(linear.weight.data, scale, fmt, scale_2, 16)
    return packed, scale, scale_2


FOUR_OVER_SIX_CASES = [((7, 64), "mixed"), ((33, 128), "outliers"), ((16, 256), "gaussian")]


@pytest.mark.usefixtures("modelopt_fp4_kernel_on_cpu")
@pytest.mark.parametrize(("shape", "pattern"), FOUR_OVER_SIX_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_four_over_six_matches_modelopt_calibrate_and_export(
    shape: tuple[int, int], pattern: str, dtype: torch.dtype
) -> None:
    weight = _weight(shape, dtype, pattern, seed=shape[0])
    packed, block_scale, global_scale = _modelopt_export(weight, mtq.NVFP4_FOUR_OVER_SIX_CFG)
    ours = quantize_nvfp4(weight, four_over_six=True)
    _assert_same_nvfp4(ours, NVFP4Tensor(packed, block_scale, global_scale))
    # Both choices really occur, or this would test only one of them. Against the plain recipe's
    # block scales a block scaled to 6 has about 256/448 = 0.57 of the scale, one scaled to 4 0.86.
    ratio = ours.block_scale.float() / quantize_nvfp4(weight).block_scale.float()
    assert (ratio > 0.7).any() and (ratio < 0.7).any()


# -------------------------------------------------------------------------------------------- FP8


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_per_tensor_matches_modelopt_export(dtype: torch.dtype, pattern: str) -> None:
    weight = _weight((33, 64), dtype, pattern, seed=5)
    data, scale, _ = _modelopt_export(weight, mtq.FP8_DEFAULT_CFG)
    ours = quantize_fp8(weight)
    assert torch.equal(ours.scale, scale.view(()))
    assert torch.equal(ours.data.view(torch.uint8), data.view(torch.uint8))
    qtensor, _ = FP8QTensor.quantize(weight, scale)  # the exporter's scale, shape [1]
    assert torch.equal(ours.data.view(torch.uint8), qtensor._quantized_data.view(torch.uint8))
    theirs = qtensor.dequantize(dtype=torch.float32, scale=scale)
    _assert_bitwise_equal(dequantize_fp8(ours), theirs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_per_channel_matches_modelopt_export(dtype: torch.dtype) -> None:
    weight = _weight((33, 64), dtype, "mixed", seed=6)
    weight[4] = 0
    data, scale, _ = _modelopt_export(weight, mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG)
    ours = quantize_fp8(weight, per_channel=True)
    assert torch.equal(ours.scale, scale) and ours.scale[4].item() == 1.0
    assert torch.equal(ours.data.view(torch.uint8), data.view(torch.uint8))


def test_fp8_all_zero_weight_matches_modelopt_export() -> None:
    data, scale, _ = _modelopt_export(torch.zeros(4, 32, dtype=torch.bfloat16), mtq.FP8_DEFAULT_CFG)
    ours = quantize_fp8(torch.zeros(4, 32, dtype=torch.bfloat16))
    assert torch.equal(ours.scale, scale.view(())) and ours.scale.item() == 1.0
    assert torch.equal(ours.data.view(torch.uint8), data.view(torch.uint8))
