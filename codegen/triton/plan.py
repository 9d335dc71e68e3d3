"""Which kernel instances an engine needs: every op whose `kernel` attribute (set by
select_kernels) names a Triton kernel gets a specialisation for its shapes and formats, and a
binding from the op (by graph and result value name) to the instances that run it.

A Triton-backend kernel this codegen has no builder for is left to the runtime's kernel registry
(which runs its registered implementation, or the reference one). Identical specialisations are shared by every op that needs them; an instance's name is its
catalog kernel name plus a short hash of its specialisation, so it is stable across builds."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from nemocompile.base.errors import IRError
from nemocompile.graph.ir import Graph, Op
from nemocompile.graph.kernels import find, kernel_of
from nemocompile.graph.types import TensorType

from . import templates_catalog as catalog
from .spec import KernelInstance

# The triton kernels of graph/kernels.py that this codegen specialises (catalog name -> builder).
Builder = Callable[[Op, Mapping[str, TensorType], str], tuple[KernelInstance, ...]]
# Chooses the configs of one op's instances (graph name, op, the builder's instances): the build's
# tuning stage (nemocompile/kernel_configs.py); without one the builders' defaults stand.
Configure = Callable[[str, Op, tuple[KernelInstance, ...]], tuple[KernelInstance, ...]]


@dataclass(frozen=True)
class KernelPlan:
    instances: tuple[KernelInstance, ...]
    bindings: dict[str, dict[str, list[str]]]  # graph name -> op result name -> instance names, in launch order


def _dims(t: TensorType, what: str) -> tuple[int, ...]:
    if not all(isinstance(d, int) for d in t.shape):
        raise IRError(f"{what} has a symbolic dim in {t}; Triton kernels are specialised to the weight shapes")
    return tuple(int(d) for d in t.shape)  # type: ignore[arg-type]


TRITON_DTYPES = {"bf16": "bf16", "f16": "fp16", "f32": "fp32"}


def triton_dtype(t: TensorType, what: str) -> str:
    if t.dtype.name not in TRITON_DTYPES:
        raise IRError(f"{what} is {t.dtype.name}; the Triton kernels take {', '.join(TRITON_DTYPES)}")
    return TRITON_DTYPES[t.dtype.name]


BLOCK_K_CHOICES = (128, 64, 32, 16)


FP8_MIN_BLOCK_K = 32  # an FP8 tl.dot needs K >= 32 per tile


def block_k_for(k: int, minimum: int = BLOCK_K_CHOICES[-1]) -> int | None:
    """The largest K tile (at least `minimum`) that divides K, or None: a K with no such divisor
    (40, say) gets no Triton kernel and runs as the runtime's registry says (its reference
    implementation)."""
    return next((b for b in BLOCK_K_CHOICES if b >= minimum and k % b == 0), None)


def _operand_type(op: Op, types: Mapping[str, TensorType], index: int) -> TensorType:
    value = op.operands[index]
    assert value is not None
    return types[value]


def _grouped_w4a16(op: Op, types: Mapping[str, TensorType], arch: str) -> tuple[KernelInstance, ...]:
    """grouped_gemm(x_sorted bf16, offsets, nvfp4 weight [E, N, K]) -> out."""
    experts, n, k = _dims(_operand_type(op, types, 2), f"{op.opname} weight")
    x_dtype = triton_dtype(_operand_type(op, types, 0), f"{op.opname} input")
    out_dtype = triton_dtype(op.results[0].type, f"{op.opname} result")
    block_k = block_k_for(k)
    if block_k is None:
        return ()
    return (catalog.moe_gemm("triton_nvfp4_grouped_w4a16", op.opname, n=n, k=k, experts=experts, top_k=1,
                             act_format="bf16", x_dtype=x_dtype, out_dtype=out_dtype, block_m=16, block_n=64,
                             block_k=block_k),)


def _expert_tiles(act_format: str, k: int) -> tuple[int, int, int | None]:
    """Decode-friendly tiles: W4A16 BLOCK_M 16 with the weight as the 64-row MMA operand; W4A4
    128x128 tiles, the shape tcgen05's native NVFP4 MMA takes (BLOCK_K 64 only where 128 does not
    divide K)."""
    if act_format == "bf16":
        return 16, 64, block_k_for(k)
    return 128, 128, 128 if k % 128 == 0 else block_k_for(k)


def _fits(act_format: str, k: int) -> bool:
    """tl.dot_scaled (W4A4) needs K steps of at least 64 (Triton 3.9 refuses smaller ones for sm_100a);
    an op whose K is not a multiple of 64 gets no W4A4 kernel and runs as the runtime's registry says
    (its reference implementation)."""
    return (act_format == "bf16" and block_k_for(k) is not None) or k % 64 == 0


def _expert_up(op: Op, types: Mapping[str, TensorType], arch: str) -> tuple[KernelInstance, ...]:
    """moe_expert_up(x, order, offsets, nvfp4 weight [E, I, D], input_scale?) -> hidden [N*k, I]."""
    experts, n, k = _dims(_operand_type(op, types, 3), f"{op.opname} weight")
    act_format = "nvfp4" if op.attrs.get("act_format") == "nvfp4" else "bf16"
    if not _fits(act_format, k):
        return ()
    block_m, block_n, block_k = _expert_tiles(act_format, k)
    assert block_k is not None  # _fits
    return (catalog.moe_gemm(kernel_of(op), op.opname, n=n, k=k, experts=experts, top_k=op.attrs.int("top_k"),
                             act_format=act_format, activation=op.attrs.str("activation"), gather=True,
                             x_dtype=triton_dtype(_operand_type(op, types, 0), f"{op.opname} input"),
                             out_dtype=triton_dtype(op.results[0].type, f"{op.opname} result"),
                             block_m=block_m, block_n=block_n, block_k=block_k),)


def _expert_down(op: Op, types: Mapping[str, TensorType], arch: str) -> tuple[KernelInstance, ...]:
    """moe_expert_down(hidden, order, offsets, nvfp4 weight [E, D, I], weights, input_scale?) -> out:
    the GEMM writing weighted pair rows, then the per-token sum."""
    experts, n, k = _dims(_operand_type(op, types, 3), f"{op.opname} weight")
    act_format = "nvfp4" if op.attrs.get("act_format") == "nvfp4" else "bf16"
    if not _fits(act_format, k):
        return ()
    top_k = op.attrs.int("top_k")
    block_m, block_n, block_k = _expert_tiles(act_format, k)
    assert block_k is not None  # _fits
    gemm = catalog.moe_gemm(kernel_of(op), op.opname, n=n, k=k, experts=experts, top_k=top_k,
                            act_format=act_format, combine=True,
                            x_dtype=triton_dtype(_operand_type(op, types, 0), f"{op.opname} input"),
                            block_m=block_m, block_n=block_n, block_k=block_k)
    combine = catalog.moe_combine(f"{kernel_of(op)}_combine", op.opname, n=n, top_k=top_k,
                                  out_dtype=triton_dtype(op.results[0].type, f"{op.opname} result"))
    return gemm, combine


def _fp8_quant_linear(op: Op, types: Mapping[str, TensorType], arch: str) -> tuple[KernelInstance, ...]:
    """quant_linear(x, fp8 weight [N, K], input_scale, bias?) with act_format fp8 (W8A8)."""
    n, k = _dims(_operand_type(op, types, 1), f"{op.opname} weight")
    has_bias = len(op.operands) > 3 and op.operands[3] is not None
    out_dtype = triton_dtype(op.results[0].type, f"{op.opname} result")
    block_k = block_k_for(k, FP8_MIN_BLOCK_K)
    if block_k is None:
        return ()
    return (catalog.fp8_linear(kernel_of(op), op.opname, n=n, k=k, quant_act=True, per_channel=True,
                               has_bias=has_bias, x_dtype=triton_dtype(_operand_type(op, types, 0), "x"),
                               out_dtype=out_dtype, block_m=16, block_n=64, block_k=block_k),)


BUILDERS: dict[str, Builder] = {
    "triton_nvfp4_grouped_w4a16": _grouped_w4a16,
    "triton_moe_up_w4a16": _expert_up,
    "triton_moe_up_w4a4": _expert_up,
    "triton_moe_down_w4a16": _expert_down,
    "triton_moe_down_w4a4": _expert_down,
    "triton_fp8_quant_linear": _fp8_quant_linear,
}


def _named(instance: KernelInstance) -> KernelInstance:
    text = json.dumps({k: v for k, v in instance.describe().items() if k != "name"}, sort_keys=True)
    return replace(instance, name=f"{instance.name}_{hashlib.sha256(text.encode()).hexdigest()[:10]}")


def plan_kernels(graphs: Mapping[str, Graph], arch: str, configure: Configure | None = None) -> KernelPlan:
    """The instances and bindings of every op of `graphs` whose kernel is a Triton one (their
    configs as `configure` chooses them)."""
    instances: dict[str, KernelInstance] = {}
    bindings: dict[str, dict[str, list[str]]] = {}
    for graph_name, graph in graphs.items():
        types = graph.value_types()
        for op in graph.ops:
            name = kernel_of(op)
            spec = find(op.opname, name)
            if spec is None or spec.backend != "triton":
                continue
            builder = BUILDERS.get(name)
            if builder is None:  # a kernel the runtime registry provides (or falls back from): nothing to emit
                continue
            built = builder(op, types, arch)
            named = [_named(i) for i in (configure(graph_name, op, built) if configure and built else built)]
            if not named:  # no specialisation fits this op's shapes
                continue
            for instance in named:
                instances.setdefault(instance.name, instance)
            bindings.setdefault(graph_name, {})[op.results[0].name] = [i.name for i in named]
    return KernelPlan(tuple(instances[n] for n in sorted(instances)), bindings)
