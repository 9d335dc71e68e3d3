"""The path an engine takes for the norm, Mamba, attention and router ops, without a model: an op as
the passes write it, specialised by codegen/triton/plan.py (its builder, prefill or decode variant),
emitted, resolved by the runtime's Triton backend and run in the interpreter, against the op's own
reference implementation (runtime/reference_dispatch.py) on the same operands. This checks the
launchers' adaptation (operand order, attributes, seq_lens, the runtime's form of quantized outputs,
result shapes and dtypes); tests/test_triton_ops.py checks the kernels themselves at more shapes.

Tolerances: bf16 results within one bf16 ulp of the largest magnitude, fp32 ones 4e-5 of it (the
SSD scan's chunked sums), quantized activations, states, ids, offsets and orders exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("triton", reason="the Triton kernels need the triton package (the [triton] extra)")

import torch

from nemocompile.codegen.triton.emit import emit
from nemocompile.codegen.triton.plan import BUILDERS, _named
from nemocompile.graph.ir import Attrs, Op, Value
from nemocompile.graph.types import TensorType, dtype_named
from nemocompile.runtime.formats import NVFP4Tensor
from nemocompile.runtime.kernels.triton_backend import TritonBackend
from nemocompile.runtime.kernels.triton_loader import TritonKernels
from nemocompile.runtime.reference_dispatch import reference_impl

B, T, D = 3, 19, 64  # 19 tokens: one 16-token block and a remainder
HEADS, HEAD_DIM, GROUPS, STATE = 4, 16, 2, 16
INNER = HEADS * HEAD_DIM


def _t(dtype: str, *shape: int) -> TensorType:
    return TensorType(dtype_named(dtype), shape)


def _run(tmp_path: Path, kernel: str, opname: str, operands: list[tuple[TensorType, Any] | None],
         results: list[TensorType], attrs: dict[str, Any], decode: bool = False) -> tuple[tuple[torch.Tensor, ...],
                                                                                    tuple[torch.Tensor, ...]]:
    """(the Triton backend's results, the reference implementation's) for one op."""
    names = tuple(None if o is None else f"v{i}" for i, o in enumerate(operands))
    types = {f"v{i}": o[0] for i, o in enumerate(operands) if o is not None}
    op = Op(opname, names, tuple(Value(f"r{i}", t) for i, t in enumerate(results)),
            Attrs.of({**attrs, "kernel": kernel}))
    instances = [_named(i) for i in BUILDERS[kernel](op, types, "sm_90", decode)]
    graph = "decode" if decode else "prefill"
    bindings = {graph: {"r0": [i.name for i in instances]}}
    emit(instances, tmp_path, "sm_90", tmp_path / "cache", compile_binaries=False, bindings=bindings)
    resolution = TritonBackend(TritonKernels.from_directory(tmp_path, "cpu"), bindings).resolver(graph)(op, "cpu")
    assert resolution.kernel == kernel and resolution.fallback is None

    def args() -> list[Any]:  # fresh copies: attention writes its caches in place
        return [None if o is None else (o[1].clone() if isinstance(o[1], torch.Tensor) else o[1]) for o in operands]

    return resolution(op, args()), reference_impl(opname)(op, args())


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, actual.shape,
                                                                               expected.dtype, expected.shape)
    if not expected.dtype.is_floating_point:
        assert torch.equal(actual, expected)
        return
    assert not actual.isnan().any()
    scale = max(float(expected.abs().max()), 1.0)
    rtol = 2.0**-8 if expected.dtype == torch.bfloat16 else 4e-5
    assert float((actual.float() - expected.float()).abs().max()) <= rtol * scale


def _randn(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("act_format", [None, "fp8", "nvfp4"])
def test_add_rms_norm(tmp_path: Path, act_format: str | None) -> None:
    torch.manual_seed(1)
    x, residual, weight = _randn(B, T, D), _randn(B, T, D), _randn(D) * 0.1 + 1
    scale = torch.tensor(3.0 / (448 if act_format == "fp8" else 6 * 448))
    out_type = _t({None: "bf16", "fp8": "fp8e4m3", "nvfp4": "nvfp4codes"}[act_format], B, T, D)
    got, want = _run(tmp_path, "triton_add_rms_norm", "add_rms_norm",
                     [(_t("bf16", B, T, D), x), (_t("bf16", B, T, D), residual), (_t("bf16", D), weight),
                      (_t("f32"), scale) if act_format else None],
                     [out_type, _t("bf16", B, T, D)], {"eps": 1e-5, **({"act_format": act_format} if act_format else {})})
    assert torch.equal(got[1], want[1])
    if act_format == "nvfp4":  # the packed E2M1 codes and E4M3 block scales as the kernel wrote them, bit for bit
        codes, expected = got[0], want[0]
        assert isinstance(codes, NVFP4Tensor) and isinstance(expected, NVFP4Tensor)
        assert codes.packed.shape == (B, T, D // 2) and codes.block_scale.shape == (B, T, D // 16)
        assert torch.equal(codes.packed, expected.packed)
        assert torch.equal(codes.block_scale.view(torch.uint8), expected.block_scale.view(torch.uint8))
        assert torch.equal(codes.global_scale, scale)
        assert int(codes.packed.count_nonzero()) > codes.packed.numel() // 2  # real codes, not zeros
    elif act_format == "fp8":  # the E4M3 codes themselves, bit for bit
        assert got[0].dtype == torch.float8_e4m3fn and torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    else:
        assert got[0].dtype == want[0].dtype and torch.equal(got[0], want[0])


def test_rms_norm_and_gated_rms_norm(tmp_path: Path) -> None:
    torch.manual_seed(2)
    x, weight = _randn(B, T, D, dtype=torch.float32), _randn(D) * 0.1 + 1
    got, want = _run(tmp_path / "plain", "triton_rms_norm", "rms_norm", [(_t("f32", B, T, D), x), (_t("bf16", D), weight)],
                     [_t("f32", B, T, D)], {"eps": 1e-5})
    _close(got[0], want[0])
    y, gate, norm_w = _randn(B, T, INNER, dtype=torch.float32), _randn(B, T, INNER), _randn(INNER) * 0.1 + 1
    got, want = _run(tmp_path / "gated", "triton_gated_rms_norm", "gated_rms_norm",  # the prefill's fp32 scan output
                     [(_t("f32", B, T, INNER), y), (_t("bf16", B, T, INNER), gate), (_t("bf16", INNER), norm_w)],
                     [_t("f32", B, T, INNER)], {"group_size": INNER // GROUPS, "eps": 1e-5})
    _close(got[0], want[0])


@pytest.mark.parametrize("decode", [False, True])
def test_causal_conv1d_with_seq_lens(tmp_path: Path, decode: bool) -> None:
    torch.manual_seed(3)
    length, channels = (1 if decode else T), INNER + 2 * GROUPS * STATE
    seq_lens = torch.tensor([length, 0, max(1, length - 4)])
    got, want = _run(tmp_path, "triton_causal_conv1d", "causal_conv1d",
                     [(_t("bf16", B, length, channels), _randn(B, length, channels)),
                      (_t("bf16", channels, 1, 4), _randn(channels, 1, 4)), (_t("bf16", channels), _randn(channels)),
                      (_t("bf16", B, channels, 3), _randn(B, channels, 3)), (_t("i64", B), seq_lens)],
                     [_t("bf16", B, length, channels), _t("bf16", B, channels, 3)], {"activation": "silu"}, decode)
    _close(got[0], want[0])
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("decode", [False, True])
def test_ssd_with_seq_lens(tmp_path: Path, decode: bool) -> None:
    torch.manual_seed(4)
    length = 1 if decode else T
    seq_lens = torch.tensor([length, 0, max(1, length - 4)])
    operands = [(_t("bf16", B, length, INNER), _randn(B, length, INNER)),
                (_t("bf16", B, length, HEADS), _randn(B, length, HEADS) * 0.5 - 1),
                (_t("bf16", HEADS), _randn(HEADS) * 0.5),
                (_t("bf16", B, length, GROUPS * STATE), _randn(B, length, GROUPS * STATE)),
                (_t("bf16", B, length, GROUPS * STATE), _randn(B, length, GROUPS * STATE)),
                (_t("bf16", HEADS), _randn(HEADS)), (_t("bf16", HEADS), _randn(HEADS) * 0.5),
                (_t("f32", B, HEADS, HEAD_DIM, STATE), _randn(B, HEADS, HEAD_DIM, STATE, dtype=torch.float32)),
                (_t("i64", B), seq_lens)]
    attrs: dict[str, Any] = {"num_heads": HEADS, "head_dim": HEAD_DIM, "n_groups": GROUPS, "state_size": STATE,
                             "dt_min": 0.001, "dt_max": float("inf")}
    if decode:
        got, want = _run(tmp_path, "triton_ssd_state_update", "ssd_state_update", operands,
                         [_t("bf16", B, 1, INNER), _t("f32", B, HEADS, HEAD_DIM, STATE)], attrs, decode)
    else:
        got, want = _run(tmp_path, "triton_ssd_chunk_scan", "ssd_chunk_scan", operands,
                         [_t("f32", B, T, INNER), _t("f32", B, HEADS, HEAD_DIM, STATE)], {**attrs, "chunk_size": 16})
    for a, b in zip(got, want, strict=True):
        _close(a, b)
    assert torch.equal(got[1][1], operands[7][1][1]), "the idle sequence keeps its state"  # type: ignore[index]


@pytest.mark.parametrize("decode", [False, True])
def test_attention_gqa(tmp_path: Path, decode: bool) -> None:
    torch.manual_seed(5)
    length, kv_heads, capacity = (1 if decode else T), 2, 48
    lens = torch.tensor([5, 0, 20]) if decode else torch.tensor([0, 3, 0])
    k_cache, v_cache = _randn(B, kv_heads, capacity, HEAD_DIM), _randn(B, kv_heads, capacity, HEAD_DIM)
    got, want = _run(tmp_path, "triton_attention_gqa", "attention_gqa",
                     [(_t("bf16", B, length, HEADS * HEAD_DIM), _randn(B, length, HEADS * HEAD_DIM)),
                      (_t("bf16", B, length, kv_heads * HEAD_DIM), _randn(B, length, kv_heads * HEAD_DIM)),
                      (_t("bf16", B, length, kv_heads * HEAD_DIM), _randn(B, length, kv_heads * HEAD_DIM)),
                      (_t("bf16", B, kv_heads, capacity, HEAD_DIM), k_cache),
                      (_t("bf16", B, kv_heads, capacity, HEAD_DIM), v_cache), (_t("i64", B), lens)],
                     [_t("bf16", B, length, HEADS * HEAD_DIM), _t("bf16", B, kv_heads, capacity, HEAD_DIM),
                      _t("bf16", B, kv_heads, capacity, HEAD_DIM)],
                     {"num_heads": HEADS, "num_kv_heads": kv_heads, "head_dim": HEAD_DIM, "scale": HEAD_DIM**-0.5},
                     decode)
    _close(got[0], want[0])
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_moe_route(tmp_path: Path) -> None:
    torch.manual_seed(6)
    experts, top_k = 8, 2  # batch 1 x 1 token: six experts get none
    x, weight, bias = _randn(1, 1, D), torch.randn(experts, D), torch.rand(experts) * 0.1
    got, want = _run(tmp_path, "triton_moe_route", "moe_route",
                     [(_t("bf16", 1, 1, D), x), (_t("f32", experts, D), weight), (_t("f32", experts), bias)],
                     [_t("f32", 1, 1, top_k), _t("i64", 1, 1, top_k), _t("i64", experts + 1), _t("i64", top_k)],
                     {"top_k": top_k, "n_group": 2, "topk_group": 1, "norm_topk_prob": True,
                      "routed_scaling_factor": 2.5, "num_experts": experts})
    # the slot order within a token is unspecified: compare by expert
    ids, slots = got[1].sort(-1)
    want_ids, want_slots = want[1].sort(-1)
    assert torch.equal(ids, want_ids) and torch.equal(got[2], want[2])
    _close(got[0].gather(-1, slots), want[0].gather(-1, want_slots))
    assert torch.equal(got[1].flatten()[got[3]], want[1].flatten()[want[3]])
