"""The norm, Mamba, attention and router kernels in Triton's interpreter, against their reference ops.

Each kernel instance is emitted and loaded as an engine's kernels/ (tests/triton_kernels.py), then
run by its launch wrapper (runtime/kernels/triton_ops.py). Every case draws fresh random inputs from
its own seed, and every output buffer is NaN-poisoned first (`poison`), so an element the kernel
fails to write fails the comparison. Shapes cover batch-1 decode, prompts that are not a multiple
of the chunk, several head, group and expert counts, per-sequence cache lengths and experts with
no token.

Tolerances per output dtype (``assert_close``), relative to the expected tensor's largest magnitude
(at least 1):
- float32: 2e-6; the SSD scan 4e-5 (its chunked sums associate differently from the reference's);
- bfloat16: one bfloat16 ulp (2**-8), attention's two-pass (EXACT) form included; its one-pass flash
  form 2e-2: the reference rounds the normalised probabilities to bf16, the flash form rounds
  unnormalised ones;
- quantized outputs (FP8, NVFP4 codes and block scales), expert ids, offsets and orders: exact.

The interpreter's known faults (/work/shared/notes/triton-3.9-facts.md) and how the kernels meet
them, under their INTERPRET constexpr; `test_rounding_helpers_match_torch` checks the workarounds on
the values that expose the faults:
- bf16 ``tl.dot`` multiplies raw bits (Triton issue 11584): numerics.dot_f32 upcasts to fp32
  (attention with bf16 inputs, the SSD scan's C B^T);
- fp32 -> bf16 truncates: numerics.cast_rne rounds on the bits first (every bf16 output);
- fp32 -> fp8e4nv is wrong near powers of two, on overflow and for subnormals: the values are
  rounded onto the E4M3 grid in fp32 first (quant_math, the FP8 and NVFP4 outputs of add_rms_norm).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("triton", reason="the Triton kernels need the triton package (the [triton] extra)")

import torch

from nemocompile.codegen.triton import templates_catalog as catalog
from nemocompile.codegen.triton.spec import TEMPLATE_DIR
from nemocompile.runtime.formats import NVFP4Tensor, dequantize_nvfp4
from nemocompile.runtime.kernels import triton_ops
from nemocompile.runtime.kernels.triton_loader import TritonKernels
from nemocompile.runtime.quantized_ops import quantize
from nemocompile.runtime.reference.attention import attention_gqa_cached
from nemocompile.runtime.reference.conv import causal_conv1d
from nemocompile.runtime.reference.moe import moe_dispatch, moe_router
from nemocompile.runtime.reference.norms import gated_rms_norm, rms_norm
from nemocompile.runtime.reference.ssd import ssd_chunk_scan, ssd_state_update
from tests.triton_kernels import interpreted

RTOL = {torch.float32: 2e-6, torch.bfloat16: 2.0**-8}
RTOL_SSD_SCAN = 4e-5
RTOL_ATTENTION_BF16 = 2e-2
DTYPES = [torch.float32, torch.bfloat16]


def poison(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer full of NaN (uint8: 0xFF; other integers: -7, never a valid id or index)."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device).to(dtype)
    return torch.full(shape, 0xFF if dtype == torch.uint8 else -7, dtype=dtype, device=device)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not actual.isnan().any(), "the kernel left elements unwritten (NaN poison) or produced NaN"
    if not expected.numel():
        return
    scale = max(float(expected.float().abs().max()), 1.0)
    error = float((actual.float() - expected.float()).abs().max())
    assert error <= rtol * scale, f"max error {error:.3g} exceeds {rtol:.3g} x {scale:.3g}"


TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16"}


# ------------------------------------------------------------------------ the interpreter's faults

PROBE = '''
import triton
import triton.language as tl

from .numerics import cast_rne
from .quant_math import round_to_e4m3_signed


@triton.jit
def rounding_probe(x_ptr, bf16_ptr, fp8_ptr, n, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n)
    tl.store(bf16_ptr + offsets, cast_rne(x, tl.bfloat16, INTERPRET), mask=offsets < n)
    tl.store(fp8_ptr + offsets, round_to_e4m3_signed(x).to(tl.float8e4nv), mask=offsets < n)
'''


def test_rounding_helpers_match_torch() -> None:
    """cast_rne to bf16 and the E4M3 rounding before the cast, run as an engine runs them in the
    interpreter, against torch's conversions: random values, the halfway points between neighbouring
    E4M3 values, E4M3 subnormals, overflow past 448 and tiny negatives (-0.0)."""
    index = {"version": 1, "triton": "3.9.0", "arch": "sm_90", "kernels": [{
        "name": "probe", "op": "test", "module": "probe", "entry": "rounding_probe",
        "signature": ["x_ptr", "bf16_ptr", "fp8_ptr", "n", "BLOCK", "INTERPRET"],
        "constexprs": {"BLOCK": 8192, "INTERPRET": False}, "aligned": []}]}
    files = {"kernels/kernels.json": json.dumps(index).encode(), "kernels/src/probe.py": PROBE.encode()}
    for helper in ("numerics.py", "quant_math.py"):
        files[f"kernels/src/{helper}"] = (TEMPLATE_DIR / helper).read_bytes()
    probe = TritonKernels.from_files(files, "cpu")
    torch.manual_seed(1)
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    e4m3 = e4m3[e4m3.isfinite()].unique()
    halfway = (e4m3[:-1] + e4m3[1:]) / 2
    x = torch.cat([torch.randn(3000) * 10.0 ** torch.randint(-4, 3, (3000,)).float(), halfway, e4m3,
                   torch.tensor([460.0, 464.0, 470.0, 1e4, -1e4, 2.0**-10, 2.0**-11, 3 * 2.0**-11, 1 + 2.0**-8,
                                 -1e-5])])
    bf16 = poison(tuple(x.shape), torch.bfloat16, x.device)
    fp8 = poison(tuple(x.shape), torch.float8_e4m3fn, x.device)
    probe.launch("probe", (1,), x_ptr=x, bf16_ptr=bf16, fp8_ptr=fp8, n=x.numel())
    expected_bf16 = x.to(torch.bfloat16)
    truncated = (x.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    assert (truncated != expected_bf16).sum() > 100, "the probe values must tell rounding from truncation"
    assert torch.equal(bf16.view(torch.int16), expected_bf16.view(torch.int16))
    expected_fp8 = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    # Bit for bit, except that -0.0 itself quantizes to +0 (equal values; tiny negatives keep the sign).
    assert torch.equal(fp8.float(), expected_fp8.float())
    nonzero_input = x != 0
    assert torch.equal(fp8.view(torch.uint8)[nonzero_input], expected_fp8.view(torch.uint8)[nonzero_input])


# ------------------------------------------------------------------------------------------- norms

ROWS = [(1, 1, 64), (3, 5, 48), (2, 7, 160)]  # (batch, tokens, width): decode, odd widths


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROWS)
def test_add_rms_norm(dtype: torch.dtype, shape: tuple[int, int, int], tmp_path: Path) -> None:
    torch.manual_seed(hash((str(dtype), shape)) % 1000)
    x, residual = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    weight = (torch.rand(shape[-1]) + 0.5).to(dtype)
    fused = catalog.add_rms_norm("norm", "add_rms_norm", width=shape[-1], dtype=TRITON_TYPE[dtype])
    plain_norm = catalog.add_rms_norm("plain", "rms_norm", width=shape[-1], residual=False, dtype=TRITON_TYPE[dtype])
    ks = interpreted([fused, plain_norm], tmp_path)
    (out,), residual_out = triton_ops.add_rms_norm(ks, "norm", x, residual, weight, 1e-5, alloc=poison)
    expected_residual = x + residual
    assert torch.equal(residual_out, expected_residual)
    assert_close(out, rms_norm(expected_residual, weight, 1e-5), RTOL[dtype])
    (plain,), same = triton_ops.add_rms_norm(ks, "plain", x, None, weight, 1e-5, alloc=poison)
    assert same is x
    assert_close(plain, rms_norm(x, weight, 1e-5), RTOL[dtype])


@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 5, 96), (3, 3, 32)])
def test_add_rms_norm_fp8_output(shape: tuple[int, int, int], tmp_path: Path) -> None:
    """W8A8: the norm's bf16 output quantized with the static input_scale, as the `quantize` op does."""
    torch.manual_seed(sum(shape))
    x, residual = torch.randn(shape).bfloat16(), torch.randn(shape).bfloat16()
    weight = (torch.rand(shape[-1]) + 0.5).bfloat16()
    input_scale = torch.tensor(2.5 / 448)  # some values saturate at 448
    ks = interpreted([catalog.add_rms_norm("norm", "add_rms_norm", width=shape[-1], act_format="fp8")], tmp_path)
    (data,), residual_out = triton_ops.add_rms_norm(ks, "norm", x, residual, weight, 1e-5, input_scale, alloc=poison)
    expected = quantize(rms_norm(x + residual, weight, 1e-5), "fp8", input_scale)
    assert data.dtype == torch.float8_e4m3fn
    assert torch.equal(data.float() * input_scale, expected)
    assert (data.float().abs() == 448).any(), "the scale was chosen so that some values saturate"
    assert torch.equal(residual_out, x + residual)


@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 5, 96), (3, 2, 48)])
def test_add_rms_norm_nvfp4_output(shape: tuple[int, int, int], tmp_path: Path) -> None:
    """W4A4: E2M1 codes and dynamic E4M3 block scales under the static global input_scale."""
    torch.manual_seed(sum(shape) + 1)
    x, residual = torch.randn(shape).bfloat16(), torch.randn(shape).bfloat16()
    x[..., :16] = 0.0  # an all-zero block: scale 1, codes 0
    residual[..., :16] = 0.0
    weight = (torch.rand(shape[-1]) + 0.5).bfloat16()
    global_scale = torch.tensor(3.0 / (6 * 448))
    ks = interpreted([catalog.add_rms_norm("norm", "add_rms_norm", width=shape[-1], act_format="nvfp4")], tmp_path)
    (packed, block_scale), _ = triton_ops.add_rms_norm(ks, "norm", x, residual, weight, 1e-5, global_scale,
                                                       alloc=poison)
    assert packed.shape == (*shape[:-1], shape[-1] // 2) and block_scale.shape == (*shape[:-1], shape[-1] // 16)
    assert not block_scale.float().isnan().any()
    expected = quantize(rms_norm(x + residual, weight, 1e-5), "nvfp4", global_scale)
    assert torch.equal(dequantize_nvfp4(NVFP4Tensor(packed, block_scale, global_scale)), expected)
    assert (block_scale[..., 0].float() == 1.0).all()


def test_norm_kernels_refuse_what_they_cannot_mean(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="divisible by 16"):
        catalog.add_rms_norm("norm", "add_rms_norm", width=40, act_format="nvfp4")
    with pytest.raises(Exception, match="act_format"):
        catalog.add_rms_norm("norm", "add_rms_norm", width=32, act_format="int4")
    ks = interpreted([catalog.add_rms_norm("norm", "add_rms_norm", width=32, act_format="fp8")], tmp_path)
    x = torch.randn(2, 32).bfloat16()
    with pytest.raises(ValueError, match="input_scale"):
        triton_ops.add_rms_norm(ks, "norm", x, x, torch.ones(32).bfloat16(), 1e-5)
    with pytest.raises(ValueError, match="rows of 32"):
        triton_ops.add_rms_norm(ks, "norm", torch.randn(2, 48), None, torch.ones(48), 1e-5)


@pytest.mark.parametrize(("dtype", "weight_dtype"), [(torch.float32, torch.float32),
                                                     (torch.bfloat16, torch.bfloat16),
                                                     (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize(("shape", "group_size", "gated"), [((1, 1, 64), 16, True), ((2, 5, 96), 32, True),
                                                           ((3, 4, 48), 48, False)])
def test_gated_rms_norm(dtype: torch.dtype, weight_dtype: torch.dtype, shape: tuple[int, int, int],
                        group_size: int, gated: bool, tmp_path: Path) -> None:
    torch.manual_seed(group_size)
    x = torch.randn(shape).to(dtype)
    gate = torch.randn(shape).to(dtype) if gated else None
    weight = (torch.rand(shape[-1]) + 0.5).to(weight_dtype)
    out_dtype = torch.promote_types(weight_dtype, dtype)
    ks = interpreted([catalog.gated_rms_norm("gated", "gated_rms_norm", width=shape[-1], group_size=group_size,
                                             gated=gated, dtype=TRITON_TYPE[dtype],
                                             weight_dtype=TRITON_TYPE[weight_dtype],
                                             out_dtype=TRITON_TYPE[out_dtype])], tmp_path)
    out = triton_ops.gated_rms_norm(ks, "gated", x, gate, weight, 1e-5, alloc=poison)
    expected = gated_rms_norm(x, gate, weight, group_size, 1e-5)
    assert_close(out, expected, RTOL[expected.dtype])


# ------------------------------------------------------------------------------------------ conv1d

CONV_CASES = [  # (batch, tokens, channels, taps, with state): decode is one token from the state
    (1, 1, 24, 4, True), (2, 7, 40, 4, False), (2, 19, 136, 4, True), (3, 1, 8, 2, True), (1, 3, 8, 4, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("activation", ["silu", None])
def test_causal_conv1d(dtype: torch.dtype, case: tuple[int, int, int, int, bool], activation: str | None,
                       tmp_path: Path) -> None:
    batch, length, channels, taps, with_state = case
    torch.manual_seed(length * channels + taps)
    x = torch.randn(batch, length, channels).to(dtype)
    weight = torch.randn(channels, 1, taps).to(dtype)
    bias = torch.randn(channels).to(dtype) if length != 3 else None
    state = torch.randn(batch, channels, taps - 1).to(dtype) if with_state else None
    ks = interpreted([catalog.causal_conv1d("conv", "causal_conv1d", kernel_size=taps, bias=bias is not None,
                                            state=with_state, silu=activation == "silu", decode=length == 1,
                                            dtype=TRITON_TYPE[dtype])], tmp_path)
    y, new_state = triton_ops.causal_conv1d(ks, "conv", x, weight, bias, state, alloc=poison)
    expected_y, expected_state = causal_conv1d(x, weight, bias, activation, state)
    assert_close(y, expected_y, RTOL[dtype])
    assert torch.equal(new_state, expected_state)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("length", "lens"), [(19, [19, 4, 0]), (1, [1, 0, 1]), (6, [2, 6, 1])])
def test_causal_conv1d_takes_seq_lens(dtype: torch.dtype, length: int, lens: list[int], tmp_path: Path) -> None:
    """Right-padded rows (a mixed-length batch): each new state ends at its sequence's last real token,
    an idle sequence (0 tokens) keeps its state."""
    torch.manual_seed(length + sum(lens))
    batch, channels, taps = len(lens), 40, 4
    x = torch.randn(batch, length, channels).to(dtype)
    weight, bias = torch.randn(channels, 1, taps).to(dtype), torch.randn(channels).to(dtype)
    state = torch.randn(batch, channels, taps - 1).to(dtype)
    seq_lens = torch.tensor(lens)
    ks = interpreted([catalog.causal_conv1d("conv", "causal_conv1d", kernel_size=taps, state=True,
                                            decode=length == 1, dtype=TRITON_TYPE[dtype], seq_lens=True)], tmp_path)
    y, new_state = triton_ops.causal_conv1d(ks, "conv", x, weight, bias, state, alloc=poison, seq_lens=seq_lens)
    expected_y, expected_state = causal_conv1d(x, weight, bias, "silu", state, seq_lens)
    assert_close(y, expected_y, RTOL[dtype])
    assert torch.equal(new_state, expected_state)
    with pytest.raises(ValueError, match="seq_lens"):
        triton_ops.causal_conv1d(ks, "conv", x, weight, bias, state)


# --------------------------------------------------------------------------------------------- SSD

SSD_CASES = [  # (batch, tokens, heads, head_dim, groups, state, chunk, initial state)
    (1, 20, 4, 16, 2, 16, 16, True),   # 20 = one chunk and a 4-token remainder
    (2, 37, 2, 8, 1, 32, 16, False),
    (1, 5, 3, 16, 3, 16, 32, True),    # shorter than one chunk
    (2, 33, 4, 24, 4, 16, 16, True),   # head_dim not a power of two
]


def _ssd_inputs(dtype: torch.dtype, batch: int, length: int, heads: int, head_dim: int, groups: int,
                state: int) -> tuple[torch.Tensor, ...]:
    x = torch.randn(batch, length, heads * head_dim).to(dtype)
    dt = (torch.randn(batch, length, heads) * 0.7 - 1.0).to(dtype)
    b = torch.randn(batch, length, groups * state).to(dtype)
    c = torch.randn(batch, length, groups * state).to(dtype)
    return x, dt, torch.randn(heads) * 0.5, b, c, torch.randn(heads), torch.randn(heads) * 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SSD_CASES)
def test_ssd_chunk_scan(dtype: torch.dtype, case: tuple[int, ...], tmp_path: Path) -> None:
    batch, length, heads, head_dim, groups, state, chunk, with_init = case
    torch.manual_seed(length + heads)
    x, dt, a_log, b, c, d, dt_bias = _ssd_inputs(dtype, batch, length, heads, head_dim, groups, state)
    init = torch.randn(batch, heads, head_dim, state) if with_init else None
    sizes: dict[str, Any] = dict(num_heads=heads, head_dim=head_dim, n_groups=groups, state_size=state,
                                 dt_min=0.01, dt_max=float("inf"), initial_state=init)
    ks = interpreted([catalog.ssd_chunk_scan("scan", "ssd_chunk_scan", head_dim=head_dim, state_size=state,
                                             chunk_size=chunk, initial_state=with_init, dtype=TRITON_TYPE[dtype])],
                     tmp_path)
    y, final = triton_ops.ssd_chunk_scan(ks, "scan", x, dt, a_log, b, c, d, dt_bias, alloc=poison, **sizes)
    expected_y, expected_final = ssd_chunk_scan(x, dt, a_log, b, c, d, dt_bias, chunk_size=chunk, **sizes)
    assert_close(y, expected_y, RTOL_SSD_SCAN)
    assert_close(final, expected_final, RTOL_SSD_SCAN)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ssd_chunk_scan_takes_seq_lens(dtype: torch.dtype, tmp_path: Path) -> None:
    """A right-padded batch: 37 tokens for one sequence (two chunks and a remainder), 5 and 0 (idle)
    for the others; the final states are those after each sequence's real tokens."""
    batch, length, heads, head_dim, groups, state = 3, 37, 4, 16, 2, 16
    torch.manual_seed(37)
    x, dt, a_log, b, c, d, dt_bias = _ssd_inputs(dtype, batch, length, heads, head_dim, groups, state)
    init = torch.randn(batch, heads, head_dim, state)
    seq_lens = torch.tensor([37, 5, 0])
    sizes: dict[str, Any] = dict(num_heads=heads, head_dim=head_dim, n_groups=groups, state_size=state,
                                 dt_min=0.01, dt_max=float("inf"), initial_state=init)
    ks = interpreted([catalog.ssd_chunk_scan("scan", "ssd_chunk_scan", head_dim=head_dim, state_size=state,
                                             chunk_size=16, initial_state=True, dtype=TRITON_TYPE[dtype],
                                             seq_lens=True)], tmp_path)
    y, final = triton_ops.ssd_chunk_scan(ks, "scan", x, dt, a_log, b, c, d, dt_bias, alloc=poison,
                                         seq_lens=seq_lens, **sizes)
    expected_y, expected_final = ssd_chunk_scan(x, dt, a_log, b, c, d, dt_bias, chunk_size=16, seq_lens=seq_lens,
                                                **sizes)
    assert_close(y, expected_y, RTOL_SSD_SCAN)
    assert_close(final, expected_final, RTOL_SSD_SCAN)
    assert torch.equal(final[2], init[2]), "an idle sequence keeps its state"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [(1, 4, 16, 2, 16), (3, 2, 8, 1, 32), (2, 6, 24, 3, 16)])
def test_ssd_state_update(dtype: torch.dtype, case: tuple[int, ...], tmp_path: Path) -> None:
    batch, heads, head_dim, groups, state = case
    torch.manual_seed(batch * heads)
    x, dt, a_log, b, c, d, dt_bias = _ssd_inputs(dtype, batch, 1, heads, head_dim, groups, state)
    previous = torch.randn(batch, heads, head_dim, state)
    sizes: dict[str, Any] = dict(num_heads=heads, head_dim=head_dim, n_groups=groups, state_size=state,
                                 dt_min=0.0, dt_max=float("inf"), state=previous)
    ks = interpreted([catalog.ssd_state_update("update", "ssd_state_update", head_dim=head_dim, state_size=state,
                                               dtype=TRITON_TYPE[dtype])], tmp_path)
    y, new_state = triton_ops.ssd_state_update(ks, "update", x, dt, a_log, b, c, d, dt_bias, alloc=poison, **sizes)
    expected_y, expected_state = ssd_state_update(x, dt, a_log, b, c, d, dt_bias, **sizes)
    assert_close(y, expected_y, RTOL[dtype])
    assert_close(new_state, expected_state, RTOL[torch.float32])
    if batch > 1:  # a batch where one sequence is idle this step (seq_lens 0) keeps that one's state
        seq_lens = torch.tensor([1] * (batch - 1) + [0])
        ks = interpreted([catalog.ssd_state_update("idle", "ssd_state_update", head_dim=head_dim, state_size=state,
                                                   dtype=TRITON_TYPE[dtype], seq_lens=True)], tmp_path / "idle")
        y, new_state = triton_ops.ssd_state_update(ks, "idle", x, dt, a_log, b, c, d, dt_bias, alloc=poison,
                                                   seq_lens=seq_lens, **sizes)
        expected_y, expected_state = ssd_state_update(x, dt, a_log, b, c, d, dt_bias, seq_lens=seq_lens, **sizes)
        assert_close(y, expected_y, RTOL[dtype])
        assert_close(new_state, expected_state, RTOL[torch.float32])
        assert torch.equal(new_state[-1], previous[-1])


# --------------------------------------------------------------------------------------- attention

ATTENTION_CASES = [  # (batch, new tokens, query heads, kv heads, head_dim, cached lengths)
    (1, 1, 4, 2, 16, [5]),          # batch-1 decode
    (3, 1, 8, 2, 16, [0, 17, 40]),  # decode, a different length per sequence
    (2, 1, 64, 2, 16, [3, 30]),     # decode, Ultra's group of 32 query heads: one 32-row block per KV head
    (2, 7, 4, 1, 32, [0, 3]),       # prefill, one kv head for four query heads
    (1, 20, 2, 2, 24, [0]),         # a fresh prompt; head_dim not a power of two
    (2, 70, 4, 2, 16, [0, 100]),    # prefill past one 64-row block and one 64-key block
]


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_gqa_cached(dtype: torch.dtype, case: tuple[Any, ...], exact: bool, tmp_path: Path) -> None:
    _check_attention(case, dtype, exact, False, tmp_path)


FP8_ATTENTION_CASES = [ATTENTION_CASES[0], ATTENTION_CASES[1], ATTENTION_CASES[4], ATTENTION_CASES[5]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FP8_ATTENTION_CASES)
def test_attention_gqa_fp8_cache(dtype: torch.dtype, case: tuple[Any, ...], tmp_path: Path) -> None:
    """An FP8 (E4M3) KV cache: the new keys/values written as the reference's codes bit for bit (some
    beyond 448 * scale, which saturate; some under E4M3's smallest normal), every cached entry read as
    code * scale; entries past each sequence's length are NaN codes the kernel must not read."""
    _check_attention(case, dtype, True, True, tmp_path)


def _check_attention(case: tuple[Any, ...], dtype: torch.dtype, exact: bool, fp8: bool, tmp_path: Path) -> None:
    """The cache write and attention kernels against attention_gqa_cached on one case, with a float
    cache of `dtype` or an FP8 one (E4M3 codes under fp32 k/v scales)."""
    batch, length, heads, kv_heads, head_dim, lens = case
    torch.manual_seed(length * 100 + sum(lens) + 7 * fp8)
    capacity = max(lens) + length + 3
    q = torch.randn(batch, length, heads * head_dim).to(dtype)
    k = torch.randn(batch, length, kv_heads * head_dim)
    if fp8:  # magnitudes over five decades: some keys saturate at 448 * k_scale, some are subnormal codes
        k = k * torch.logspace(-4, 1, kv_heads * head_dim)
    k = k.to(dtype)
    v = torch.randn(batch, length, kv_heads * head_dim).to(dtype)
    cache_dtype = torch.float8_e4m3fn if fp8 else dtype
    k_cache = (torch.randn(batch, kv_heads, capacity, head_dim) * (100 if fp8 else 1)).to(cache_dtype)
    v_cache = (torch.randn(batch, kv_heads, capacity, head_dim) * (100 if fp8 else 1)).to(cache_dtype)
    for seq, cached in enumerate(lens):  # the runtime's cache holds zeros past each length ...
        k_cache[seq, :, cached:] = 0.0
        v_cache[seq, :, cached:] = 0.0
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for seq, cached in enumerate(lens):  # ... the kernel must not read them: poison its copy there
        k_cache[seq, :, cached:] = float("nan")
        v_cache[seq, :, cached:] = float("nan")
    cache_lens = torch.tensor(lens)
    sizes: dict[str, Any] = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, scale=head_dim**-0.5)
    if fp8:
        sizes.update(k_scale=torch.tensor(float(k.float().abs().max()) / 600), v_scale=torch.tensor(0.01))
    write, attend = catalog.attention_gqa("attn", "attention_gqa", head_dim=head_dim, decode=length == 1,
                                          dtype=TRITON_TYPE[dtype], exact=exact, group=heads // kv_heads,
                                          cache_dtype="fp8e4nv" if fp8 else None)
    ks = interpreted([write, attend], tmp_path)
    out, k_out, v_out = triton_ops.attention_gqa_cached(ks, write.name, attend.name, q, k, v, k_cache, v_cache,
                                                        cache_lens, alloc=poison, **sizes)
    expected, _, _ = attention_gqa_cached(q, k, v, expected_k, expected_v, cache_lens, **sizes)
    assert k_out is k_cache and v_out is v_cache
    assert_close(out, expected, RTOL_ATTENTION_BF16 if dtype == torch.bfloat16 and not exact else RTOL[dtype])
    if fp8:
        new_codes = k_out.view(torch.uint8)[0, :, lens[0]:lens[0] + length]
        assert (new_codes & 0x7F == 0x7E).any(), "some new keys saturate at 448"
    bits = torch.uint8 if fp8 else dtype  # codes compared bit for bit
    for seq, cached in enumerate(lens):
        written = slice(0, cached + length)
        assert torch.equal(k_out[seq, :, written].view(bits), expected_k[seq, :, written].view(bits))
        assert torch.equal(v_out[seq, :, written].view(bits), expected_v[seq, :, written].view(bits))
        assert k_out[seq, :, cached + length:].float().isnan().all(), "nothing past the new tokens is written"


def test_attention_gqa_fp8_cache_needs_its_scales(tmp_path: Path) -> None:
    write, attend = catalog.attention_gqa("attn", "attention_gqa", head_dim=16, decode=True, cache_dtype="fp8e4nv",
                                          group=2)
    ks = interpreted([write, attend], tmp_path)
    q, k = torch.randn(1, 1, 64).bfloat16(), torch.randn(1, 1, 32).bfloat16()
    cache = torch.zeros(1, 2, 4, 16).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="take k_scale and v_scale"):
        triton_ops.attention_gqa_cached(ks, write.name, attend.name, q, k, k, cache, cache.clone(), torch.tensor([0]),
                                        num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25)


# ----------------------------------------------------------------------------------------- router

ROUTER_CASES = [  # (tokens, hidden, experts, top_k, n_group, topk_group, bias)
    (1, 48, 16, 2, 1, 1, True),     # batch-1 decode: 14 experts get no token
    (9, 40, 32, 4, 4, 2, True),     # group-limited
    (33, 64, 24, 3, 1, 1, False),   # expert count and top_k not powers of two
    (5, 32, 64, 6, 8, 3, True),
    (70, 32, 16, 2, 2, 1, True),    # more pairs than one block of the permutation kernel
]


@pytest.mark.parametrize("case", ROUTER_CASES)
def test_moe_route(case: tuple[Any, ...], tmp_path: Path) -> None:
    tokens, hidden, experts, top_k, n_group, topk_group, with_bias = case
    torch.manual_seed(tokens * experts)
    x = torch.randn(tokens, hidden).bfloat16()
    weight = torch.randn(experts, hidden)
    bias = torch.rand(experts) * 0.2 if with_bias else None
    attrs: dict[str, Any] = dict(top_k=top_k, n_group=n_group, topk_group=topk_group, norm_topk_prob=True,
                                 routed_scaling_factor=2.5)
    router, permutation = catalog.moe_route("route", "moe_route", experts=experts, top_k=top_k, n_group=n_group,
                                            topk_group=topk_group, bias=with_bias)
    ks = interpreted([router, permutation], tmp_path)
    weights, ids, offsets, order = triton_ops.moe_route(ks, router.name, permutation.name, x, weight, bias,
                                                        routed_scaling_factor=2.5, alloc=poison)
    expected_weights, expected_ids = moe_router(x, weight, bias, **attrs)
    _, expected_offsets, expected_order = moe_dispatch(x, expected_ids, experts)
    # The slot order within a token is unspecified (torch.topk(sorted=False)): compare by expert.
    sorted_ids, slots = ids.sort(dim=1)
    expected_sorted_ids, expected_slots = expected_ids.sort(dim=1)
    assert torch.equal(sorted_ids, expected_sorted_ids)
    assert_close(weights.gather(1, slots), expected_weights.gather(1, expected_slots), RTOL[torch.float32])
    assert torch.equal(offsets, expected_offsets)
    assert torch.equal(order, torch.argsort(ids.flatten(), stable=True))
    # The same (token, expert) pairs in the same rows as the reference's permutation.
    assert torch.equal(order // top_k, expected_order // top_k)
    assert torch.equal(ids.flatten()[order], expected_ids.flatten()[expected_order])
    if tokens == 1:
        assert int((offsets[1:] == offsets[:-1]).sum()) == experts - top_k  # experts with no token


def test_moe_route_refuses_bad_groups() -> None:
    with pytest.raises(Exception, match="n_group"):
        catalog.moe_route("route", "moe_route", experts=6, top_k=2, n_group=4)
    with pytest.raises(Exception, match="top_k"):
        catalog.moe_route("route", "moe_route", experts=6, top_k=7)
