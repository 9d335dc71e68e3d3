"""A roofline cost model of the IR's ops: the bytes each op moves to and from GPU memory and the
FLOPs it computes, for concrete sizes (batch, tokens in the call, tokens already cached), and the
time a GPU with a given memory bandwidth and peak rate needs at least (`max(bytes / bandwidth,
flops / peak)`). Nothing is measured; bench/bench_roofline.py prints these numbers per kernel.

Assumptions, so the numbers can be judged:
- Every operand is read from memory once and every result written once; a view (`split`) moves
  nothing. A value's bytes are its element count times its format's bits (NVFP4 activations:
  4 bits plus one E4M3 scale per 16; stored weights: their stored tensors, scales included).
- Routed experts: with N tokens routed to top_k of E experts uniformly at random, the expected
  number of experts hit is E * (1 - (1 - top_k / E) ** N); only their weights are read. The
  expert GEMMs read each token's row once (repeated reads of a gathered row hit the L2 cache).
- Attention reads the KV cache of the tokens cached before the call and writes the new ones; the
  new tokens' keys and values stay on chip (flash attention). Causal FLOPs: 4 * heads * head_dim
  per (query, key) pair, over cached + (seq + 1) / 2 keys on average.
- The Mamba2 SSD scan (chunk Q, state N, head dim P, H heads, G groups) costs per sequence
  2*S*Q*N*G (C B^T in each chunk) + 2*S*Q*P*H (scores times x) + 4*S*N*P*H (the state in and
  out); one decode step 6*H*P*N. Element-wise ops count a few FLOPs per element (their math
  runs on CUDA cores, so their time is their bytes).
- A GEMM runs at the peak of its input format: W4A4 at fp4, W8A8 at fp8, BF16 and weight-only
  (W4A16, W8A16: dequantized in registers) at bf16, fp32 at fp32; every other op at fp32."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .ir import Graph, Op
from .opdef import opdef, operand
from .storage import stored_nbytes
from .types import DTYPES, DType, TensorType


@dataclass(frozen=True)
class Sizes:
    """One call: `batch` sequences of `seq` new tokens each, `cached` tokens already in the caches."""

    batch: int
    seq: int
    cached: int = 0

    def dims(self, top_k: int = 1) -> dict[str, int]:
        tokens = self.batch * self.seq
        return {"batch": self.batch, "seq": self.seq, "ctx": self.cached + self.seq, "routed": tokens * top_k}


@dataclass(frozen=True)
class OpCost:
    bytes: float
    flops: float
    compute: str  # the peak rate it runs at: fp4, fp8, bf16 or fp32

    def seconds(self, bandwidth: float, peaks: Mapping[str, float]) -> float:
        """The roofline time: bandwidth in bytes/s, peaks in TFLOP/s by format (a format the GPU
        lacks runs at bf16)."""
        peak = peaks.get(self.compute) or peaks["bf16"]
        return max(self.bytes / bandwidth, self.flops / (peak * 1e12))

    def memory_bound(self, bandwidth: float, peaks: Mapping[str, float]) -> bool:
        peak = peaks.get(self.compute) or peaks["bf16"]
        return self.bytes / bandwidth >= self.flops / (peak * 1e12)


GEMMS = ("linear", "quant_linear", "grouped_gemm", "quant_grouped_gemm", "moe_expert_up", "moe_expert_down")
ROUTED = ("grouped_gemm", "quant_grouped_gemm", "moe_expert_up", "moe_expert_down")
ELEMENTWISE_FLOPS = {"rms_norm": 4, "add_rms_norm": 5, "gated_rms_norm": 8, "add": 1, "activation": 4,
                     "quantize": 4, "cast": 1}


def numel(type_: TensorType, dims: Mapping[str, int]) -> int:
    return math.prod(d if isinstance(d, int) else dims[d] for d in type_.shape)


def element_bytes(dtype: DType) -> float:
    """Bytes per element of an activation of `dtype`: NVFP4 codes (`nvfp4`, `nvfp4codes`) with their
    E4M3 block scales, 0.5 + 1/16; FP8 one (its one scale per tensor is nothing); a float's."""
    scale = dtype.scale_dtype
    block_scale = DTYPES[scale].bits / 8 / dtype.block_size if dtype.block_size and scale else 0.0
    return dtype.bits / 8 + block_scale


def activation_bytes(type_: TensorType, dims: Mapping[str, int]) -> float:
    """Bytes of an activation (element_bytes each)."""
    return numel(type_, dims) * element_bytes(type_.dtype)


def experts_hit(experts: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts that `tokens` tokens routed to top_k of `experts` hit."""
    return experts * (1 - (1 - top_k / experts) ** tokens)


def _gemm_format(op: Op, types: Mapping[str, TensorType], weight: TensorType) -> str:
    act = op.attrs.get("act_format")
    x = types[op.operands[0] or ""].dtype.name
    if act == "nvfp4" or x == "nvfp4":
        return "fp4"
    if act == "fp8" or x == "fp8":
        return "fp8"
    return "fp32" if x == "f32" and weight.dtype.name == "f32" else "bf16"


class CostModel:
    """The cost of each op of one graph (weights resolved once)."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.types = graph.value_types()
        self.weights = graph.weight_map()
        self.top_k = {op.scope: op.attrs.int("top_k") for op in graph.ops if op.opname in ("moe_router", "moe_route")}

    def _weight_bytes(self, name: str) -> float:
        return float(stored_nbytes(self.weights[name].type))

    def _operand_bytes(self, op: Op, dims: Mapping[str, int], skip: tuple[str, ...] = ()) -> float:
        definition = opdef(op.opname)
        total = 0.0
        seen: set[str] = set()
        for spec, name in zip(definition.operands, op.operands, strict=False):
            if name is None or name in seen or spec.name in skip:
                continue
            seen.add(name)
            total += self._weight_bytes(name) if name in self.weights else activation_bytes(self.types[name], dims)
        return total

    def _result_bytes(self, op: Op, dims: Mapping[str, int]) -> float:
        return sum(activation_bytes(r.type, dims) for r in op.results)

    def cost(self, op: Op, sizes: Sizes) -> OpCost:
        top_k = self.top_k.get(op.scope, 1)
        dims = sizes.dims(top_k)
        tokens = sizes.batch * sizes.seq
        name = op.opname
        if name == "split":
            return OpCost(0.0, 0.0, "fp32")
        if name in GEMMS:
            return self._gemm(op, dims, tokens, top_k)
        if name in ("moe_route", "moe_router"):
            weight = self.weights[operand(op, "weight") or ""].type
            experts, hidden = (int(d) for d in weight.shape)
            return OpCost(self._operand_bytes(op, dims) + self._result_bytes(op, dims),
                          2.0 * tokens * hidden * experts, "fp32")
        if name == "attention_gqa":
            return self._attention(op, dims, sizes)
        if name in ("ssd_chunk_scan", "ssd_state_update"):
            return self._ssd(op, dims, sizes)
        if name == "embedding":  # only the rows the ids pick are read
            out = activation_bytes(op.results[0].type, dims)
            return OpCost(2 * out + self._operand_bytes(op, dims, skip=("table",)), 0.0, "fp32")
        moved = self._operand_bytes(op, dims) + self._result_bytes(op, dims)
        elements = numel(op.results[0].type, dims)
        if name == "causal_conv1d":
            kernel = self.types[operand(op, "weight") or ""].shape[-1]
            return OpCost(moved, 2.0 * int(kernel) * elements, "fp32")
        return OpCost(moved, float(ELEMENTWISE_FLOPS.get(name, 1) * elements), "fp32")

    def _gemm(self, op: Op, dims: Mapping[str, int], tokens: int, top_k: int) -> OpCost:
        weight_name = operand(op, "weight") or ""
        weight = self.weights[weight_name].type
        k_in, n_out = int(weight.shape[-1]), int(weight.shape[-2])
        weight_bytes = self._weight_bytes(weight_name)
        if op.opname in ROUTED:
            experts = int(weight.shape[0])
            weight_bytes *= experts_hit(experts, top_k, tokens) / experts
            rows = tokens * top_k
        else:
            x = self.types[op.operands[0] or ""]
            rows = numel(x, dims) // k_in
        moved = weight_bytes + self._operand_bytes(op, dims, skip=("weight",)) + self._result_bytes(op, dims)
        return OpCost(moved, 2.0 * rows * k_in * n_out, _gemm_format(op, self.types, weight))

    def _attention(self, op: Op, dims: Mapping[str, int], sizes: Sizes) -> OpCost:
        cache = self.types[operand(op, "k_cache") or ""]
        kv_heads, head_dim = int(cache.shape[1]), int(cache.shape[3])
        element = cache.dtype.bits / 8
        cache_read = 2 * sizes.batch * kv_heads * sizes.cached * head_dim * element
        cache_write = 2 * sizes.batch * kv_heads * sizes.seq * head_dim * element
        q, k, v = (self.types[name or ""] for name in op.operands[:3])
        moved = sum(activation_bytes(t, dims) for t in (q, k, v)) + activation_bytes(op.results[0].type, dims)
        heads = op.attrs.int("num_heads")
        keys = sizes.cached + (sizes.seq + 1) / 2
        flops = 4.0 * sizes.batch * heads * sizes.seq * keys * head_dim
        return OpCost(moved + cache_read + cache_write, flops, "bf16")

    def _ssd(self, op: Op, dims: Mapping[str, int], sizes: Sizes) -> OpCost:
        at = op.attrs
        heads, head_dim, groups, state = (at.int(k) for k in ("num_heads", "head_dim", "n_groups", "state_size"))
        moved = self._operand_bytes(op, dims) + self._result_bytes(op, dims)
        if op.opname == "ssd_state_update":
            return OpCost(moved, 6.0 * sizes.batch * heads * head_dim * state, "fp32")
        chunk = at.int("chunk_size")
        per_sequence = (2 * sizes.seq * chunk * state * groups + 2 * sizes.seq * chunk * head_dim * heads
                        + 4 * sizes.seq * state * head_dim * heads)
        return OpCost(moved, float(sizes.batch * per_sequence), "bf16")


def kernel_label(op: Op, graph_types: Mapping[str, TensorType], weights: Mapping[str, TensorType]) -> str:
    """What a kernel is specialised on: the op, its weight format (w), its input's format (x) and
    the format it quantizes activations to (act: a GEMM's input on load, a norm's output)."""
    names = opdef(op.opname).operand_names
    weight = operand(op, "weight") if "weight" in names else operand(op, "table") if "table" in names else None
    x = op.operands[0]
    parts = []
    if weight is not None and weight in weights:
        parts.append(f"w={weights[weight].dtype.name}")
    if x is not None and x in graph_types:
        parts.append(f"x={graph_types[x].dtype.name}")
    act = op.attrs.get("act_format")
    if isinstance(act, str):
        parts.append(f"act={act}")
    return f"{op.opname}({', '.join(parts)})"
