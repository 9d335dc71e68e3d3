"""Specialisations of the norm, Mamba, attention and router kernels for one op of an engine's graph
(the GEMM ones are in plan.py, which collects every builder in BUILDERS).

A builder reads the op's operand types and attributes and returns the kernel instances that run it,
in launch order, or raises NoKernel with the reason no specialisation fits (the op then runs its
reference implementation, and the build lists it with that reason)."""

from __future__ import annotations

from collections.abc import Mapping

from nemocompile.base.errors import IRError
from nemocompile.graph.ir import Op
from nemocompile.graph.kernels import kernel_of
from nemocompile.graph.types import FP8_E4M3, TensorType

from . import templates_catalog as catalog
from .spec import KernelInstance


class NoKernel(Exception):
    """No specialisation of the chosen kernel fits this op; the message says why."""


TRITON_DTYPES = {"bf16": "bf16", "f16": "fp16", "f32": "fp32"}


def dims(t: TensorType, what: str) -> tuple[int, ...]:
    if not all(isinstance(d, int) for d in t.shape):
        raise IRError(f"{what} has a symbolic dim in {t}; Triton kernels are specialised to the weight shapes")
    return tuple(int(d) for d in t.shape)  # type: ignore[arg-type]


def triton_dtype(t: TensorType, what: str) -> str:
    if t.dtype.name not in TRITON_DTYPES:
        raise NoKernel(f"{what} is {t.dtype.name}; the Triton kernels take {', '.join(TRITON_DTYPES)}")
    return TRITON_DTYPES[t.dtype.name]


def operand(op: Op, types: Mapping[str, TensorType], index: int) -> TensorType | None:
    value = op.operands[index] if index < len(op.operands) else None
    return None if value is None else types[value]


def required(op: Op, types: Mapping[str, TensorType], index: int) -> TensorType:
    found = operand(op, types, index)
    if found is None:
        raise IRError(f"{op.opname} at {op.scope} lacks operand {index}")
    return found


def _same_dtype(op: Op, types: Mapping[str, TensorType], indices: tuple[int, ...], what: str) -> str:
    names = {required(op, types, i).dtype.name for i in indices}
    if len(names) != 1:
        raise NoKernel(f"{what} differ in dtype ({', '.join(sorted(names))}); the kernel reads them as one")
    return triton_dtype(required(op, types, indices[0]), what)


def rms_norm(op: Op, types: Mapping[str, TensorType], arch: str, decode: bool) -> tuple[KernelInstance, ...]:
    """rms_norm(x, weight): the add_rms_norm template without a residual."""
    (width,) = dims(required(op, types, 1), "rms_norm weight")
    return (catalog.add_rms_norm(kernel_of(op), op.opname, width=width, residual=False,
                                 dtype=triton_dtype(required(op, types, 0), "rms_norm input"),
                                 weight_dtype=triton_dtype(required(op, types, 1), "rms_norm weight")),)


def add_rms_norm(op: Op, types: Mapping[str, TensorType], arch: str, decode: bool) -> tuple[KernelInstance, ...]:
    """add_rms_norm(x, residual, weight, input_scale?): residual add, norm, quantize-on-output."""
    (width,) = dims(required(op, types, 2), "add_rms_norm weight")
    act_format = op.attrs.get("act_format")
    fmt = "none" if act_format is None else str(act_format)
    if fmt == "nvfp4" and width % catalog.NVFP4_BLOCK:
        raise NoKernel(f"NVFP4 output needs a width divisible by {catalog.NVFP4_BLOCK}, not {width}")
    if fmt not in ("none", "fp8", "nvfp4"):
        raise NoKernel(f"the kernel quantizes to fp8 or nvfp4, not {fmt}")
    return (catalog.add_rms_norm(kernel_of(op), op.opname, width=width, act_format=fmt,
                                 dtype=_same_dtype(op, types, (0, 1), "add_rms_norm x and residual"),
                                 weight_dtype=triton_dtype(required(op, types, 2), "add_rms_norm weight")),)


def gated_rms_norm(op: Op, types: Mapping[str, TensorType], arch: str, decode: bool) -> tuple[KernelInstance, ...]:
    """gated_rms_norm(x, gate, weight) per group of group_size channels."""
    (width,) = dims(required(op, types, 2), "gated_rms_norm weight")
    group = op.attrs.int("group_size")
    if width % group:
        raise NoKernel(f"width {width} is not a multiple of group_size {group}")
    return (catalog.gated_rms_norm(kernel_of(op), op.opname, width=width, group_size=group,
                                   dtype=triton_dtype(required(op, types, 0), "gated_rms_norm input"),
                                   gate_dtype=triton_dtype(required(op, types, 1), "gated_rms_norm gate"),
                                   weight_dtype=triton_dtype(required(op, types, 2), "gated_rms_norm weight"),
                                   out_dtype=triton_dtype(op.results[0].type, "gated_rms_norm result")),)


def causal_conv1d(op: Op, types: Mapping[str, TensorType], arch: str, decode: bool) -> tuple[KernelInstance, ...]:
    """causal_conv1d(x, weight, bias?, conv_state, seq_lens?): BLOCK_T 1 in the decode graph."""
    weight = required(op, types, 1)
    bias = operand(op, types, 2)
    activation = op.attrs.get("activation")
    if activation not in (None, "silu"):
        raise NoKernel(f"the kernel fuses SiLU or nothing, not {activation}")
    weight_dtype = triton_dtype(weight, "causal_conv1d weight")
    if bias is not None and triton_dtype(bias, "causal_conv1d bias") != weight_dtype:
        raise NoKernel("the conv bias and weight differ in dtype; the kernel reads them as one")
    return (catalog.causal_conv1d(kernel_of(op), op.opname, kernel_size=dims(weight, "causal_conv1d weight")[-1],
                                  bias=bias is not None, state=True, silu=activation == "silu", decode=decode,
                                  dtype=triton_dtype(required(op, types, 0), "causal_conv1d input"),
                                  weight_dtype=weight_dtype,
                                  state_dtype=triton_dtype(required(op, types, 3), "causal_conv1d state"),
                                  seq_lens=operand(op, types, 4) is not None),)


def _ssd_dtypes(op: Op, types: Mapping[str, TensorType]) -> dict[str, str]:
    state = required(op, types, 7)
    if state.dtype.name != "f32":
        raise NoKernel(f"the SSD kernels keep the state in f32, not {state.dtype.name}")
    return {"dtype": _same_dtype(op, types, (0, 1, 3, 4), f"{op.opname} x, dt, B and C"),
            "param_dtype": _same_dtype(op, types, (2, 5, 6), f"{op.opname} A_log, D and dt_bias"),
            "state_dtype": "fp32"}


def ssd_chunk_scan(op: Op, types: Mapping[str, TensorType], arch: str, decode: bool) -> tuple[KernelInstance, ...]:
    """ssd_chunk_scan(x, dt, A_log, B, C, D, dt_bias, ssm_state, seq_lens?)."""
    return (catalog.ssd_chunk_scan(kernel_of(op), op.opname, head_dim=op.attrs.int("head_dim"),
                                   state_size=op.attrs.int("state_size"), chunk_size=op.attrs.int("chunk_size"),
                                   initial_state=True, seq_lens=operand(op, types, 8) is not None,
                                   **_ssd_dtypes(op, types)),)


def ssd_state_update(op: Op, types: Mapping[str, TensorType], arch: str, decode: bool) -> tuple[KernelInstance, ...]:
    """ssd_state_update(x, dt, A_log, B, C, D, dt_bias, ssm_state, seq_lens?), one token."""
    return (catalog.ssd_state_update(kernel_of(op), op.opname, head_dim=op.attrs.int("head_dim"),
                                     state_size=op.attrs.int("state_size"),
                                     seq_lens=operand(op, types, 8) is not None, **_ssd_dtypes(op, types)),)


def attention_gqa(op: Op, types: Mapping[str, TensorType], arch: str, decode: bool) -> tuple[KernelInstance, ...]:
    """attention_gqa(q, k, v, k_cache, v_cache, cache_lens): the cache write, then the attention
    (in the decode graph one block per KV head's query group, 16 to 64 rows; 64 rows in prefill)."""
    group = max(1, op.attrs.int("num_heads") // op.attrs.int("num_kv_heads"))
    write, attend = catalog.attention_gqa(kernel_of(op), op.opname, head_dim=op.attrs.int("head_dim"), decode=decode,
                                          group=group,
                                          dtype=_same_dtype(op, types, (0, 1, 2), "attention q, k and v"),
                                          cache_dtype=_cache_dtype(op, types))
    return write, attend


def _cache_dtype(op: Op, types: Mapping[str, TensorType]) -> str:
    """The KV caches' element type: a float one, or E4M3 codes (an FP8 cache, with its two scales)."""
    if {required(op, types, i).dtype for i in (3, 4)} != {FP8_E4M3}:
        return _same_dtype(op, types, (3, 4), "attention k and v caches")
    if operand(op, types, 6) is None or operand(op, types, 7) is None:
        raise NoKernel("an FP8 KV cache needs its k_scale and v_scale")
    return "fp8e4nv"


def moe_route(op: Op, types: Mapping[str, TensorType], arch: str, decode: bool) -> tuple[KernelInstance, ...]:
    """moe_route(x, weight, bias?): the router, then the permutation sorted by expert."""
    weight = required(op, types, 1)
    bias = operand(op, types, 2)
    weight_dtype = triton_dtype(weight, "router weight")
    if bias is not None and triton_dtype(bias, "router bias") != weight_dtype:
        raise NoKernel("the router bias and weight differ in dtype; the kernel reads them as one")
    at = op.attrs
    try:
        router, permutation = catalog.moe_route(
            kernel_of(op), op.opname, experts=dims(weight, "router weight")[0], top_k=at.int("top_k"),
            n_group=at.int("n_group"), topk_group=at.int("topk_group"), bias=bias is not None,
            norm_topk_prob=at.bool("norm_topk_prob"), dtype=triton_dtype(required(op, types, 0), "router input"),
            weight_dtype=weight_dtype)
    except IRError as error:
        raise NoKernel(str(error)) from error
    return router, permutation
