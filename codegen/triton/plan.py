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

from nemocompile.graph.ir import Graph, Op
from nemocompile.graph.kernels import find, kernel_of
from nemocompile.graph.types import FP8_E4M3, NVFP4_CODES, TensorType

from . import plan_ops
from . import templates_catalog as catalog
from .plan_ops import NoKernel, triton_dtype
from .spec import KernelInstance

# The triton kernels of graph/kernels.py that this codegen specialises (catalog name -> builder): a
# builder takes the op, the graph's value types, the arch and whether the graph is the decode one.
Builder = Callable[[Op, Mapping[str, TensorType], str, bool], tuple[KernelInstance, ...]]
# Chooses the configs of one op's instances (graph name, op, the builder's instances): the build's
# tuning stage (nemocompile/kernel_configs.py); without one the builders' defaults stand.
Configure = Callable[[str, Op, tuple[KernelInstance, ...]], tuple[KernelInstance, ...]]


@dataclass(frozen=True)
class Fallback:
    """An op whose chosen Triton kernel has no specialisation for it: it runs its reference
    implementation, for `reason` (listed in kernels.json and report.md)."""

    graph: str
    value: str
    op: str
    kernel: str
    reason: str

    def describe(self) -> dict[str, str]:
        return {"graph": self.graph, "value": self.value, "op": self.op, "kernel": self.kernel, "reason": self.reason}


@dataclass(frozen=True)
class KernelPlan:
    instances: tuple[KernelInstance, ...]
    bindings: dict[str, dict[str, list[str]]]  # graph name -> op result name -> instance names, in launch order
    fallbacks: tuple[Fallback, ...] = ()


_dims = plan_ops.dims


BLOCK_K_CHOICES = (128, 64, 32, 16)


FP8_MIN_BLOCK_K = 32  # an FP8 tl.dot needs K >= 32 per tile
W4A4_MIN_BLOCK_K = 64  # tl.dot_scaled (W4A4) refuses smaller K steps on sm_100a (Triton 3.9)
NVFP4_BLOCK = catalog.NVFP4_BLOCK


def block_k_for(k: int, minimum: int = BLOCK_K_CHOICES[-1]) -> int:
    """The largest K tile (at least `minimum`) that divides K, else the smallest one: the GEMM
    templates mask the elements of the last K step beyond K (they load as zeros and add nothing),
    so a K of 32 runs a 64-wide W4A4 step, half of it padding."""
    tiles = [b for b in BLOCK_K_CHOICES if b >= minimum]
    return next((b for b in tiles if k % b == 0), tiles[-1])


def _operand_type(op: Op, types: Mapping[str, TensorType], index: int) -> TensorType:
    value = op.operands[index]
    assert value is not None
    return types[value]


def _nvfp4_k(k: int) -> None:
    if k % NVFP4_BLOCK:
        raise NoKernel(f"K = {k} is not a multiple of {NVFP4_BLOCK}, the NVFP4 block")


def _grouped_w4a16(op: Op, types: Mapping[str, TensorType], arch: str, decode: bool) -> tuple[KernelInstance, ...]:
    """grouped_gemm(x_sorted bf16, offsets, nvfp4 weight [E, N, K]) -> out."""
    experts, n, k = _dims(_operand_type(op, types, 2), f"{op.opname} weight")
    _nvfp4_k(k)
    x_dtype = triton_dtype(_operand_type(op, types, 0), f"{op.opname} input")
    out_dtype = triton_dtype(op.results[0].type, f"{op.opname} result")
    return (catalog.moe_gemm("triton_nvfp4_grouped_w4a16", op.opname, n=n, k=k, experts=experts, top_k=1,
                             act_format="bf16", x_dtype=x_dtype, out_dtype=out_dtype, block_m=16, block_n=64,
                             block_k=block_k_for(k)),)


def _expert_tiles(act_format: str, k: int) -> tuple[int, int, int]:
    """Decode-friendly tiles: W4A16 BLOCK_M 16 with the weight as the 64-row MMA operand; W4A4
    128x128 tiles, the shape tcgen05's native NVFP4 MMA takes, BLOCK_K 128 where it divides K, else
    64 (the last step padded where 64 does not divide K either)."""
    if act_format == "bf16":
        return 16, 64, block_k_for(k)
    return 128, 128, block_k_for(k, W4A4_MIN_BLOCK_K)


def _expert_up(op: Op, types: Mapping[str, TensorType], arch: str, decode: bool) -> tuple[KernelInstance, ...]:
    """moe_expert_up(x, order, offsets, nvfp4 weight [E, I, D], input_scale?) -> hidden [N*k, I]."""
    experts, n, k = _dims(_operand_type(op, types, 3), f"{op.opname} weight")
    act_format = "nvfp4" if op.attrs.get("act_format") == "nvfp4" else "bf16"
    _nvfp4_k(k)
    block_m, block_n, block_k = _expert_tiles(act_format, k)
    return (catalog.moe_gemm(kernel_of(op), op.opname, n=n, k=k, experts=experts, top_k=op.attrs.int("top_k"),
                             act_format=act_format, activation=op.attrs.str("activation"), gather=True,
                             x_dtype=triton_dtype(_operand_type(op, types, 0), f"{op.opname} input"),
                             out_dtype=triton_dtype(op.results[0].type, f"{op.opname} result"),
                             block_m=block_m, block_n=block_n, block_k=block_k),)


def _expert_down(op: Op, types: Mapping[str, TensorType], arch: str, decode: bool) -> tuple[KernelInstance, ...]:
    """moe_expert_down(hidden, order, offsets, nvfp4 weight [E, D, I], weights, input_scale?) -> out:
    the GEMM writing weighted pair rows, then the per-token sum."""
    experts, n, k = _dims(_operand_type(op, types, 3), f"{op.opname} weight")
    act_format = "nvfp4" if op.attrs.get("act_format") == "nvfp4" else "bf16"
    _nvfp4_k(k)
    top_k = op.attrs.int("top_k")
    x_dtype = triton_dtype(_operand_type(op, types, 0), f"{op.opname} input")
    if x_dtype != triton_dtype(op.results[0].type, f"{op.opname} result"):
        raise NoKernel("the kernel rounds each expert row to the input's dtype, which differs from the result's")
    block_m, block_n, block_k = _expert_tiles(act_format, k)
    gemm = catalog.moe_gemm(kernel_of(op), op.opname, n=n, k=k, experts=experts, top_k=top_k,
                            act_format=act_format, combine=True, x_dtype=x_dtype,
                            block_m=block_m, block_n=block_n, block_k=block_k)
    combine = catalog.moe_combine(f"{kernel_of(op)}_combine", op.opname, n=n, top_k=top_k,
                                  out_dtype=triton_dtype(op.results[0].type, f"{op.opname} result"))
    return gemm, combine


def _fp8_quant_linear(op: Op, types: Mapping[str, TensorType], arch: str, decode: bool) -> tuple[KernelInstance, ...]:
    """quant_linear(x, fp8 weight [N, K], input_scale, bias?) with act_format fp8 (W8A8): x bf16 (rounded
    to E4M3 on load) or the E4M3 codes a fused norm wrote (loaded as they are)."""
    n, k = _dims(_operand_type(op, types, 1), f"{op.opname} weight")
    has_bias = len(op.operands) > 3 and op.operands[3] is not None
    out_dtype = triton_dtype(op.results[0].type, f"{op.opname} result")
    x_type = _operand_type(op, types, 0)
    x_dtype = "fp8e4nv" if x_type.dtype == FP8_E4M3 else triton_dtype(x_type, f"{op.opname} input")
    block_k = block_k_for(k, FP8_MIN_BLOCK_K)
    return (catalog.fp8_linear(kernel_of(op), op.opname, n=n, k=k, quant_act=True, per_channel=True,
                               has_bias=has_bias, x_dtype=x_dtype, out_dtype=out_dtype, block_m=16, block_n=64,
                               block_k=block_k),)


def _fp8_linear(op: Op, types: Mapping[str, TensorType], arch: str, decode: bool) -> tuple[KernelInstance, ...]:
    """linear(x, fp8 weight [N, K], bias?) with bf16 x (W8A16)."""
    n, k = _dims(_operand_type(op, types, 1), f"{op.opname} weight")
    x_dtype = triton_dtype(_operand_type(op, types, 0), f"{op.opname} input")
    bias = op.operands[2] if len(op.operands) > 2 else None
    out_dtype = triton_dtype(op.results[0].type, f"{op.opname} result")
    if bias is not None and triton_dtype(types[bias], f"{op.opname} bias") != out_dtype:
        raise NoKernel("the bias dtype differs from the result's; the kernel reads it as the result's")
    return (catalog.fp8_linear(kernel_of(op), op.opname, n=n, k=k, quant_act=False, per_channel=True,
                               has_bias=bias is not None, x_dtype=x_dtype, out_dtype=out_dtype, block_m=16,
                               block_n=64, block_k=block_k_for(k, FP8_MIN_BLOCK_K)),)


def _fp8_experts(op: Op, types: Mapping[str, TensorType], arch: str, decode: bool) -> tuple[KernelInstance, ...]:
    """moe_expert_up / moe_expert_down with an FP8 weight [E, N, K]: W8A8 (act_format fp8, the rows
    rounded to E4M3 on load with input_scale[expert]) or W8A16 (no act_format). Up: gather, GEMM,
    activation; down: the GEMM writing weighted pair rows, then the per-token sum (moe_combine_rows).
    Decode tiles of 16 rows (the weight is the MMA's 64-row side), prefill tiles of 64."""
    experts, n, k = _dims(_operand_type(op, types, 3), f"{op.opname} weight")
    up = op.opname == "moe_expert_up"
    x_dtype = triton_dtype(_operand_type(op, types, 0), f"{op.opname} input")
    out_dtype = triton_dtype(op.results[0].type, f"{op.opname} result")
    if not up and x_dtype != out_dtype:
        raise NoKernel("the kernel rounds each expert row to the input's dtype, which differs from the result's")
    top_k = op.attrs.int("top_k")
    gemm = catalog.moe_fp8_gemm(kernel_of(op), op.opname, n=n, k=k, experts=experts, top_k=top_k,
                                quant_act=op.attrs.get("act_format") == "fp8",
                                activation=op.attrs.str("activation") if up else "none", gather=up, combine=not up,
                                x_dtype=x_dtype, out_dtype=out_dtype, block_m=16 if decode else 64,
                                block_k=block_k_for(k, FP8_MIN_BLOCK_K))
    if up:
        return (gemm,)
    return gemm, catalog.moe_combine(f"{kernel_of(op)}_combine", op.opname, n=n, top_k=top_k, out_dtype=out_dtype)


def _nvfp4_linear(op: Op, types: Mapping[str, TensorType], arch: str, decode: bool) -> tuple[KernelInstance, ...]:
    """linear(x, nvfp4 weight [N, K], bias?) (W4A16), or quant_linear(x, nvfp4 weight, input_scale,
    bias?) {act_format nvfp4} (W4A4): the dense mode of the NVFP4 GEMM template."""
    n, k = _dims(_operand_type(op, types, 1), f"{op.opname} weight")
    _nvfp4_k(k)
    w4a4 = op.opname == "quant_linear"
    bias_index = 3 if w4a4 else 2
    bias = op.operands[bias_index] if len(op.operands) > bias_index else None
    out_dtype = triton_dtype(op.results[0].type, f"{op.opname} result")
    if bias is not None and triton_dtype(types[bias], f"{op.opname} bias") != out_dtype:
        raise NoKernel("the bias dtype differs from the result's; the kernel reads it as the result's")
    x_type = _operand_type(op, types, 0)
    # NVFP4 codes a fused norm wrote (nvfp4codes) are read by W4A4 as they are: packed codes (x pointer
    # u8, the kernel's codes mode) and their block scales
    if x_type.dtype == NVFP4_CODES and not w4a4:
        raise NoKernel("NVFP4 codes are read by the W4A4 quant_linear")
    x_dtype = "u8" if x_type.dtype == NVFP4_CODES else triton_dtype(x_type, f"{op.opname} input")
    return (catalog.nvfp4_linear(kernel_of(op), op.opname, n=n, k=k, act_format="nvfp4" if w4a4 else "bf16",
                                 has_bias=bias is not None, x_dtype=x_dtype,
                                 out_dtype=out_dtype,
                                 block_k=block_k_for(k, W4A4_MIN_BLOCK_K if w4a4 else BLOCK_K_CHOICES[-1])),)


BUILDERS: dict[str, Builder] = {
    "triton_nvfp4_grouped_w4a16": _grouped_w4a16,
    "triton_moe_up_w4a16": _expert_up,
    "triton_moe_up_w4a4": _expert_up,
    "triton_moe_down_w4a16": _expert_down,
    "triton_moe_down_w4a4": _expert_down,
    "triton_fp8_quant_linear": _fp8_quant_linear,
    "triton_fp8_linear": _fp8_linear,
    "triton_moe_up_fp8": _fp8_experts,
    "triton_moe_down_fp8": _fp8_experts,
    "triton_nvfp4_linear_w4a16": _nvfp4_linear,
    "triton_nvfp4_quant_linear_w4a4": _nvfp4_linear,
    "triton_rms_norm": plan_ops.rms_norm,
    "triton_add_rms_norm": plan_ops.add_rms_norm,
    "triton_gated_rms_norm": plan_ops.gated_rms_norm,
    "triton_causal_conv1d": plan_ops.causal_conv1d,
    "triton_ssd_chunk_scan": plan_ops.ssd_chunk_scan,
    "triton_ssd_state_update": plan_ops.ssd_state_update,
    "triton_attention_gqa": plan_ops.attention_gqa,
    "triton_moe_route": plan_ops.moe_route,
}
DECODE_GRAPH = "decode"  # the graph whose ops see one new token per sequence


def _named(instance: KernelInstance) -> KernelInstance:
    text = json.dumps({k: v for k, v in instance.describe().items() if k != "name"}, sort_keys=True)
    return replace(instance, name=f"{instance.name}_{hashlib.sha256(text.encode()).hexdigest()[:10]}")


def plan_kernels(graphs: Mapping[str, Graph], arch: str, configure: Configure | None = None) -> KernelPlan:
    """The instances and bindings of every op of `graphs` whose kernel is a Triton one (their
    configs as `configure` chooses them), and the ops whose Triton kernel has no specialisation for
    them (their reason)."""
    instances: dict[str, KernelInstance] = {}
    bindings: dict[str, dict[str, list[str]]] = {}
    fallbacks: list[Fallback] = []
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
            try:
                built = builder(op, types, arch, graph_name == DECODE_GRAPH)
            except NoKernel as why:
                fallbacks.append(Fallback(graph_name, op.results[0].name, op.opname, name, str(why)))
                continue
            configured = configure(graph_name, op, built) if configure else built
            named = [_named(i) for i in catalog.with_split_k_reduces(configured)]
            for instance in named:
                instances.setdefault(instance.name, instance)
            bindings.setdefault(graph_name, {})[op.results[0].name] = [i.name for i in named]
    return KernelPlan(tuple(instances[n] for n in sorted(instances)), bindings, tuple(fallbacks))
