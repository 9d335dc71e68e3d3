"""NVFP4 and FP8 against their exact math: codes, ties, saturation, scales, edge cases, error sizes.

Runs without ModelOpt; tests/test_formats_modelopt.py compares the same functions bit for bit
with ModelOpt when it is installed.
"""

from __future__ import annotations

import math

import pytest
import torch

from nemocompile.runtime.formats import (
    E2M1_VALUES,
    FP8Tensor,
    NVFP4Tensor,
    dequantize_fp8,
    dequantize_nvfp4,
    fake_quantize_fp8,
    fake_quantize_nvfp4,
    fp8_scale,
    nvfp4_global_scale,
    quantize_fp8,
    quantize_fp8_stacked,
    quantize_nvfp4,
    quantize_nvfp4_stacked,
)

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _codes(t: NVFP4Tensor) -> torch.Tensor:
    """The 4-bit codes of t, unpacked by hand: low nibble is the even element."""
    return torch.stack((t.packed & 0xF, t.packed >> 4), dim=-1).flatten(-2)


def _one_block(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A [1, 16] weight: values, padded with a 6.0 that pins the block amax at 6."""
    padded = [*values, *([6.0] * (16 - len(values)))]
    return torch.tensor([padded], dtype=dtype)


def _same_nvfp4(a: NVFP4Tensor, b: NVFP4Tensor) -> bool:
    return (
        torch.equal(a.packed, b.packed)
        and torch.equal(a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8))
        and torch.equal(a.global_scale, b.global_scale)
    )


# ------------------------------------------------------------------------------- E2M1 codes


def test_e2m1_values_are_the_eight_magnitudes() -> None:
    assert E2M1_VALUES.tolist() == GRID
    assert E2M1_VALUES.dtype == torch.float32


def test_every_byte_unpacks_low_nibble_first_to_the_signed_grid() -> None:
    packed = torch.arange(256, dtype=torch.uint8).view(32, 8)
    t = NVFP4Tensor(packed, torch.ones(32, 1).to(torch.float8_e4m3fn), torch.tensor(1.0))
    values = dequantize_nvfp4(t).view(256, 2)
    signed = [*GRID, *(-v for v in GRID)]
    byte = torch.arange(256)
    assert values[:, 0].tolist() == [signed[int(b) & 0xF] for b in byte]
    assert values[:, 1].tolist() == [signed[int(b) >> 4] for b in byte]
    assert not torch.signbit(values[values == 0]).any()  # code 8 (sign, magnitude 0) reads back +0.0


@pytest.mark.parametrize("exponent", [-6, -1, 0, 3, 5])
def test_grid_values_times_a_power_of_two_round_trip_exactly(exponent: int) -> None:
    # With global scale 2**-3 the block scale is 2**(exponent + 3): every step is exact.
    row = [*GRID, *(-v for v in GRID[1:]), 6.0]
    weight = torch.tensor([row, row[::-1]]) * 2.0**exponent
    t = quantize_nvfp4(weight, torch.tensor(2.0**-3))
    assert t.block_scale.float().tolist() == [[2.0 ** (exponent + 3)]] * 2
    assert torch.equal(dequantize_nvfp4(t), weight)
    expected_codes = [*range(8), *range(9, 16), 7]
    assert _codes(t)[0].tolist() == expected_codes
    assert _codes(t)[1].tolist() == expected_codes[::-1]


def test_even_element_goes_to_the_low_nibble() -> None:
    t = quantize_nvfp4(_one_block([6.0, -0.5, 1.0, -6.0]), torch.tensor(1.0))
    # codes 7 (6.0), 9 (-0.5), 2 (1.0), 15 (-6.0)
    assert t.packed[0, :2].tolist() == [0x97, 0xF2]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_midpoints_round_half_to_even(sign: float) -> None:
    midpoints = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    t = quantize_nvfp4(_one_block([sign * m for m in midpoints]), torch.tensor(1.0))
    assert t.block_scale.float().item() == 1.0
    got = dequantize_nvfp4(t)[0, : len(midpoints)].tolist()
    assert got == [sign * e + 0.0 for e in expected]


def test_one_ulp_off_a_midpoint_rounds_to_the_nearer_value() -> None:
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    below = torch.nextafter(midpoints, torch.zeros(7))
    above = torch.nextafter(midpoints, torch.full((7,), 8.0))
    low = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    high = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    for values, expected in ((below, low), (above, high)):
        t = quantize_nvfp4(_one_block(values.tolist()), torch.tensor(1.0))
        assert dequantize_nvfp4(t)[0, :7].tolist() == expected


def test_values_beyond_the_range_saturate_at_six() -> None:
    # Block amax 1000 with global scale 2**-8 wants block scale 42667: it clamps at 448, so the
    # values divide by 448 * 2**-8 = 1.75 and everything past 6 * 1.75 = 10.5 saturates.
    weight = torch.tensor([[1000.0, -1000.0, 11.0, -10.0, 10.6, 7.0, 0.0, 1.0] * 2])
    t = quantize_nvfp4(weight, torch.tensor(2.0**-8))
    assert t.block_scale.float().item() == 448.0
    assert dequantize_nvfp4(t)[0, :8].tolist() == [10.5, -10.5, 10.5, -10.5, 10.5, 7.0, 0.0, 0.875]


def test_negative_values_that_round_to_zero_keep_the_sign_bit_but_minus_zero_does_not() -> None:
    t = quantize_nvfp4(_one_block([-0.1, 0.1, -0.0, 0.0]), torch.tensor(1.0))
    assert _codes(t)[0, :4].tolist() == [8, 0, 0, 0]
    out = dequantize_nvfp4(t)[0, :4]
    assert out.tolist() == [0.0] * 4 and not torch.signbit(out).any()


# ------------------------------------------------------------------------------ block scales


def test_block_scales_round_to_nearest_even_e4m3_and_clamp() -> None:
    # global scale 2**-4: a block with amax 0.375 * v wants block scale exactly v.
    wanted = [1.0625, 1.1875, 3.0, 500.0, 1e-4, 1.5 * 2.0**-9, 0.0, 448.0]
    expected = [1.0, 1.25, 3.0, 448.0, 2.0**-9, 2.0**-8, 1.0, 448.0]
    weight = torch.zeros(len(wanted), 16)
    weight[:, 5] = torch.tensor(wanted) * 0.375
    t = quantize_nvfp4(weight, torch.tensor(2.0**-4))
    assert t.block_scale.float().flatten().tolist() == expected


def test_global_scale_is_amax_over_2688_and_zero_amax_becomes_six() -> None:
    amax = torch.tensor([3.5, 0.0, 1e-30])
    assert torch.equal(nvfp4_global_scale(amax), torch.tensor([3.5, 6.0, 1e-30]) / 2688.0)
    assert torch.equal(nvfp4_global_scale(amax, four_over_six=True), torch.tensor([3.5, 6.0, 1e-30]) / 1536.0)
    weight = torch.randn(8, 32)
    assert torch.equal(quantize_nvfp4(weight).global_scale, weight.abs().max() / 2688.0)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="amax"):
            nvfp4_global_scale(torch.tensor(bad))


def test_tiny_blocks_get_the_smallest_e4m3_scale_not_zero() -> None:
    weight = torch.randn(4, 32)
    weight[1, 16:] *= 1e-6
    t = quantize_nvfp4(weight)
    assert t.block_scale[1, 1].float().item() == 2.0**-9
    assert torch.isfinite(dequantize_nvfp4(t)).all()


# ------------------------------------------------------------------------------- zero, NaN, shapes


def test_an_all_zero_tensor_comes_back_as_exact_zeros_with_finite_scales() -> None:
    for t in (
        quantize_nvfp4(torch.zeros(3, 32, dtype=torch.bfloat16)),
        quantize_nvfp4(torch.zeros(3, 32), four_over_six=True),
        quantize_nvfp4_stacked(torch.zeros(2, 3, 32)),
    ):
        assert torch.isfinite(t.global_scale).all() and (t.global_scale > 0).all()
        assert torch.isfinite(t.block_scale.float()).all()
        assert not t.packed.any()
        out = dequantize_nvfp4(t)
        assert torch.equal(out, torch.zeros(t.shape)) and not torch.signbit(out).any()
    assert torch.equal(quantize_nvfp4(torch.zeros(2, 16)).block_scale.float(), torch.ones(2, 1))
    assert torch.equal(fake_quantize_nvfp4(torch.zeros(2, 16), torch.tensor(0.01)), torch.zeros(2, 16))


def test_an_all_zero_block_gets_scale_one_and_zero_codes() -> None:
    weight = torch.randn(2, 48)
    weight[0, 16:32] = 0
    t = quantize_nvfp4(weight)
    assert t.block_scale[0, 1].float().item() == 1.0
    assert not t.packed[0, 8:16].any()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_refused(bad: float) -> None:
    weight = torch.randn(2, 4, 32)
    weight[1, 2, 3] = bad
    for quantize in (quantize_nvfp4, quantize_nvfp4_stacked, quantize_fp8_stacked, quantize_fp8):
        with pytest.raises(ValueError, match="NaN or Inf"):
            quantize(weight)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_fp8(weight, per_channel=True)


def test_an_input_dim_not_divisible_by_16_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"\[4, 40\] has 40 elements"):
        quantize_nvfp4(torch.randn(4, 40))
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_nvfp4_stacked(torch.randn(2, 4, 8))


def test_other_dtypes_shapes_and_scales_are_refused() -> None:
    with pytest.raises(ValueError, match=r"torch\.int32"):
        quantize_nvfp4(torch.ones(2, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="must have shape"):
        quantize_nvfp4(torch.randn(2, 16), torch.ones(2))
    with pytest.raises(ValueError, match="positive"):
        quantize_nvfp4(torch.randn(2, 16), torch.tensor(0.0))
    with pytest.raises(ValueError, match="four_over_six"):
        quantize_nvfp4(torch.randn(2, 16), torch.tensor(0.1), four_over_six=True)
    with pytest.raises(ValueError, match=r"\[E, out, in\]"):
        quantize_nvfp4_stacked(torch.randn(2, 16))
    packed = torch.zeros(2, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="block_scale"):
        NVFP4Tensor(packed, torch.ones(2, 2).to(torch.float8_e4m3fn), torch.tensor(1.0))
    with pytest.raises(ValueError, match="global_scale"):
        NVFP4Tensor(packed, torch.ones(2, 1).to(torch.float8_e4m3fn), torch.ones(2))
    with pytest.raises(ValueError, match="uint8"):
        NVFP4Tensor(packed.float(), torch.ones(2, 1).to(torch.float8_e4m3fn), torch.tensor(1.0))
    with pytest.raises(ValueError, match="must have shape"):
        quantize_fp8(torch.randn(4, 8), per_channel=True, scale=torch.ones(8))
    with pytest.raises(ValueError, match="positive"):
        quantize_fp8(torch.randn(4, 8), scale=torch.tensor(-1.0))
    with pytest.raises(ValueError, match="scale"):
        FP8Tensor(torch.zeros(4, 8).to(torch.float8_e4m3fn), torch.ones(8))


def test_leading_dims_share_one_global_scale_and_keep_their_shape() -> None:
    weight = torch.randn(2, 3, 5, 32)
    t = quantize_nvfp4(weight)
    assert t.shape == (2, 3, 5, 32) and t.global_scale.shape == ()
    assert t.packed.shape == (2, 3, 5, 16) and t.block_scale.shape == (2, 3, 5, 2)
    flat = quantize_nvfp4(weight.reshape(30, 32))
    assert torch.equal(t.packed.reshape(30, 16), flat.packed)
    given = quantize_nvfp4(weight, torch.full((2, 3), 0.01))
    assert given.global_scale.shape == (2, 3)
    assert torch.equal(
        dequantize_nvfp4(given)[1, 2], dequantize_nvfp4(quantize_nvfp4(weight[1, 2], torch.tensor(0.01)))
    )


def test_quantizers_leave_their_input_untouched() -> None:
    weight = torch.randn(2, 8, 64)
    original = weight.clone()
    quantize_nvfp4(weight)
    quantize_nvfp4(weight, four_over_six=True)
    quantize_nvfp4_stacked(weight)
    fake_quantize_nvfp4(weight, torch.tensor(0.01))
    quantize_fp8(weight)
    quantize_fp8(weight, per_channel=True)
    quantize_fp8_stacked(weight)
    fake_quantize_fp8(weight, torch.tensor(0.01))
    assert torch.equal(weight, original)


# --------------------------------------------------------------------------- stacked, fake quant


@pytest.mark.parametrize("four_over_six", [False, True])
def test_stacked_equals_each_slice_on_its_own(four_over_six: bool) -> None:
    magnitudes = torch.tensor([1e-3, 1.0, 30.0, 0.0]).view(4, 1, 1)
    weight = (torch.randn(4, 6, 64) * magnitudes).to(torch.bfloat16)
    stacked = quantize_nvfp4_stacked(weight, four_over_six=four_over_six)
    assert stacked.global_scale.shape == (4,)
    for e in range(4):
        alone = quantize_nvfp4(weight[e], four_over_six=four_over_six)
        piece = NVFP4Tensor(stacked.packed[e], stacked.block_scale[e], stacked.global_scale[e])
        assert _same_nvfp4(piece, alone), e
        assert torch.equal(dequantize_nvfp4(stacked)[e], dequantize_nvfp4(alone))


def test_fp8_stacked_equals_each_slice_on_its_own() -> None:
    weight = (torch.randn(3, 5, 32) * torch.tensor([1e-2, 1.0, 0.0]).view(3, 1, 1)).to(torch.bfloat16)
    stacked = quantize_fp8_stacked(weight)
    assert stacked.scale.shape == (3,)
    for e in range(3):
        alone = quantize_fp8(weight[e])
        assert torch.equal(stacked.data[e].view(torch.uint8), alone.data.view(torch.uint8))
        assert torch.equal(stacked.scale[e], alone.scale)
    assert torch.equal(dequantize_fp8(stacked)[1], dequantize_fp8(quantize_fp8(weight[1])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_nvfp4_equals_dequantize_of_quantize_row_by_row(dtype: torch.dtype) -> None:
    x = (torch.randn(6, 64) * torch.logspace(-2, 2, 6).view(6, 1)).to(dtype)
    static = torch.tensor(0.004)
    out = fake_quantize_nvfp4(x, static)
    assert out.dtype == dtype
    assert torch.equal(out, dequantize_nvfp4(quantize_nvfp4(x, static), dtype))
    # One static scale per row, as when per-expert input scales are gathered per token.
    per_row = torch.logspace(-4, -1, 6).view(6, 1)
    out = fake_quantize_nvfp4(x, per_row)
    for row in range(6):
        expected = dequantize_nvfp4(quantize_nvfp4(x[row : row + 1], per_row[row, 0]), dtype)
        assert torch.equal(out[row : row + 1], expected), row
        assert torch.equal(torch.signbit(out[row : row + 1]), torch.signbit(expected))


def test_fake_quantize_nvfp4_keeps_nan_and_saturates_outliers() -> None:
    x = torch.randn(2, 32)
    x[0, 0] = math.nan
    x[1, 5] = 1e6
    out = fake_quantize_nvfp4(x, torch.tensor(1e-3))
    assert math.isnan(out[0, 0].item())
    # amax 1e6 wants a block scale far beyond 448: it clamps, and 1e6 saturates to 6 * 448 * 1e-3.
    assert out[1, 5].item() == pytest.approx(6 * 448 * 1e-3, rel=1e-6)


# ----------------------------------------------------------------------------------- four over six


def _squared_error(weight: torch.Tensor, t: NVFP4Tensor) -> float:
    return float((dequantize_nvfp4(t) - weight).square().sum())


def test_four_over_six_scales_to_four_where_that_is_exact() -> None:
    # Global amax 6, so global scale 6 / 1536 = 2**-8 and block scale = chosen amax / 6 * 256.
    # Row 0 sits on the grid scaled to 6 (amax 6 -> scale 256). Row 1 sits on the grid scaled
    # to 4 (amax 4 * 1.5 -> 256; scaled to 6 it would be e4m3(170.7) = 176 and 3 not exact).
    # Row 2 is exact both ways (6 -> 6 or 6 -> 4): the tie goes to 6 (256, not 384).
    weight = torch.tensor(
        [
            [6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.0] * 2,
            [4.0, 3.0, 2.0, 1.0, -3.0, -1.5, 0.5, 0.0] * 2,
            [6.0, -6.0, 0.0, 0.0] * 4,
        ]
    )
    t = quantize_nvfp4(weight, four_over_six=True)
    assert t.global_scale.item() == 2.0**-8
    assert t.block_scale.float().flatten().tolist() == [256.0, 256.0, 256.0]
    assert torch.equal(dequantize_nvfp4(t), weight)
    plain = quantize_nvfp4(weight)
    assert not torch.equal(dequantize_nvfp4(plain)[1], weight[1])


def test_four_over_six_zero_blocks_get_scale_448_and_zero_codes() -> None:
    weight = torch.randn(2, 32)
    weight[1, :16] = 0
    t = quantize_nvfp4(weight, four_over_six=True)
    assert t.block_scale[1, 0].float().item() == 448.0
    assert not t.packed[1, :8].any()


def test_four_over_six_beats_the_plain_recipe_on_gaussian_weights() -> None:
    torch.manual_seed(3)
    weight = torch.randn(128, 512)
    four_six = _squared_error(weight, quantize_nvfp4(weight, four_over_six=True))
    plain = _squared_error(weight, quantize_nvfp4(weight))
    assert four_six < 0.9 * plain  # about 0.83 measured


# ------------------------------------------------------------------------------------ error sizes


def test_nvfp4_relative_rms_error_on_gaussian_weights() -> None:
    torch.manual_seed(0)
    weight = torch.randn(256, 1024)
    error = dequantize_nvfp4(quantize_nvfp4(weight)) - weight
    relative_rms = (error.pow(2).mean() / weight.pow(2).mean()).sqrt().item()
    assert 0.08 < relative_rms < 0.12, relative_rms


def test_fp8_per_tensor_round_trip_is_within_half_an_e4m3_ulp() -> None:
    torch.manual_seed(1)
    weight = torch.randn(64, 256) * 0.02
    t = quantize_fp8(weight)
    assert t.scale.shape == () and torch.equal(t.scale, weight.abs().max() / 448.0)
    error = (dequantize_fp8(t) - weight).abs()
    # 3 mantissa bits: half an ulp is 2**-4 relative for normals, 2**-10 * scale below 2**-6 * scale.
    bound = torch.maximum(weight.abs() * 2.0**-4, torch.full_like(weight, 2.0**-10) * t.scale) * (1 + 1e-6)
    assert (error <= bound).all()
    relative_rms = (error.pow(2).mean() / weight.pow(2).mean()).sqrt().item()
    assert 0.01 < relative_rms < 0.04, relative_rms


def test_fp8_per_channel_scales_each_row_and_beats_per_tensor_on_uneven_rows() -> None:
    torch.manual_seed(2)
    weight = torch.randn(8, 128) * torch.logspace(-6, 0, 8).view(8, 1)
    weight[3] = 0
    t = quantize_fp8(weight, per_channel=True)
    amax = weight.abs().amax(dim=1)
    assert torch.equal(t.scale, torch.where(amax == 0, 1.0, amax / 448.0))
    assert torch.equal(t.data.float().abs().amax(dim=1), torch.tensor([448.0] * 3 + [0.0] + [448.0] * 4))
    row_amax = amax.clamp_min(1e-30)
    per_channel_error = (dequantize_fp8(t) - weight).abs().amax(dim=1) / row_amax
    per_tensor_error = (dequantize_fp8(quantize_fp8(weight)) - weight).abs().amax(dim=1) / row_amax
    assert (per_channel_error <= 2.0**-4).all()
    assert per_tensor_error[0] > 0.5  # the smallest row is mostly flushed to zero per-tensor


def test_fp8_zero_tensor_and_given_scale() -> None:
    t = quantize_fp8(torch.zeros(4, 8, dtype=torch.bfloat16))
    assert t.scale.item() == 1.0 and torch.equal(dequantize_fp8(t), torch.zeros(4, 8))
    assert torch.equal(fp8_scale(torch.tensor([0.0, 448.0, 1.0])), torch.tensor([1.0, 1.0, 1.0 / 448.0]))
    # A given scale too small for the data saturates at ±448 instead of overflowing.
    t = quantize_fp8(torch.tensor([[1.0, -1.0, 0.001]]), scale=torch.tensor(1e-3))
    assert t.data.float().tolist() == [[448.0, -448.0, 1.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_fp8_equals_dequantize_of_quantize(dtype: torch.dtype) -> None:
    x = (torch.randn(5, 64) * 3).to(dtype)
    scale = torch.tensor(0.01)
    out = fake_quantize_fp8(x, scale)
    assert out.dtype == dtype
    assert torch.equal(out, dequantize_fp8(quantize_fp8(x, scale=scale), dtype))
