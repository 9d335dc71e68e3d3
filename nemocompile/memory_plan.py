"""The memory plan per GPU: what the largest rank holds while it serves `max_batch` sequences of
`max_context` tokens. Weights at their engine formats, split as the shard pass splits them
(memory_plan_split.py); the KV cache of the attention layers and the conv + SSM state of the Mamba
layers at the engine's state dtypes; the activation workspace of one forward step; communication
buffers; and a fixed reserve for the CUDA context and library workspaces. Pure arithmetic on the
graph's types and config.json: no weight is read (docs/memory-plan.md gives every formula).

A forward step processes at most `step_tokens` tokens (prefill longer prompts in chunks of that
many, as vLLM's and TensorRT-LLM's schedulers do; a decode step takes one token per sequence) and
attention is fused (no score matrix is held), so the workspace does not grow with the context."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nemocompile.base.errors import TargetError
from nemocompile.base.formats import BASE_PRECISIONS, PRECISIONS
from nemocompile.base.settings import settings
from nemocompile.graph.config import ModelConfig
from nemocompile.graph.cost import element_bytes
from nemocompile.graph.ir import Graph
from nemocompile.graph.types import DTYPES, DType
from nemocompile.targets import Target

from .memory_plan_split import (
    Parallelism,
    local_kv_heads,
    mamba_channels,
    per_sequence_bytes,
    rank_weight_bytes_by_category,
    share,
)

FP32_BYTES = 4
INDEX_BYTES = 8  # a routed token's expert id (int32) and weight (fp32)
QUANTIZED_INPUT_BYTES = 1  # an FP8 (or narrower NVFP4) copy of a GEMM's input, per element


def _quantized_input(c: ModelConfig, tokens: int, codes: float | None) -> int:
    """The block input's quantized copy: the codes its norm hands the GEMM (`codes` bytes per element:
    1 for FP8, 0.5 + 1/16 for NVFP4 with its block scales), else an FP8-sized bound."""
    return math.ceil(tokens * c.hidden_size * (QUANTIZED_INPUT_BYTES if codes is None else codes))


def _mamba_workspace(c: ModelConfig, p: Parallelism, tokens: int, batch: int, act: int,
                     codes: float | None) -> dict[str, int]:
    heads = share(c.mamba_num_heads, p.tp)
    width = heads * c.mamba_head_dim
    chunks = -(-tokens // c.chunk_size) + batch  # whole chunks, plus one partial chunk per sequence
    in_rows = width + mamba_channels(c, p.tp) + heads
    return {
        "quantized input": _quantized_input(c, tokens, codes),
        "in_proj output (z, x, B, C, dt)": tokens * in_rows * act,
        "conv output": tokens * mamba_channels(c, p.tp) * act,
        "SSD chunk states (fp32)": chunks * heads * c.mamba_head_dim * c.ssm_state_size * FP32_BYTES,
        "SSD output and gated norm": 2 * tokens * width * act,
    }


def _attention_workspace(c: ModelConfig, p: Parallelism, tokens: int, batch: int, act: int,
                         codes: float | None) -> dict[str, int]:
    heads = share(c.num_attention_heads, p.tp)
    return {
        "q, k, v": tokens * (heads + 2 * local_kv_heads(c, p.tp)) * c.head_dim * act,
        "attention output": tokens * heads * c.head_dim * act,
        "softmax statistics (fp32)": tokens * heads * FP32_BYTES,
    }


def _moe_workspace(c: ModelConfig, p: Parallelism, tokens: int, batch: int, act: int,
                   codes: float | None) -> dict[str, int]:
    width = c.expert_input_size
    local_experts = share(c.n_routed_experts, p.ep)
    # a token picks distinct experts: at most min(top_k, local experts) of its rows land on one rank
    rows = tokens * min(c.num_experts_per_tok, local_experts)
    parts = {
        "quantized input": _quantized_input(c, tokens, codes),
        "router logits (fp32)": tokens * c.n_routed_experts * FP32_BYTES,
        "top-k ids and weights": tokens * c.num_experts_per_tok * INDEX_BYTES,
        "expert inputs": rows * width * act,
        "expert up output": rows * c.moe_intermediate_size * act,
        "expert down output": rows * width * act,
        "expert combine (fp32)": tokens * width * FP32_BYTES,
        "shared expert hidden": tokens * share(c.moe_shared_expert_intermediate_size, p.tp) * act,
    }
    if c.moe_latent_size is not None:
        parts["latent input"] = tokens * c.moe_latent_size * act
    return parts


def _mlp_workspace(c: ModelConfig, p: Parallelism, tokens: int, batch: int, act: int,
                   codes: float | None) -> dict[str, int]:
    hidden = {"mlp hidden": tokens * share(c.intermediate_size, p.tp) * act}
    return hidden if codes is None else {"quantized input": _quantized_input(c, tokens, codes), **hidden}


# (config, parallelism, step tokens, batch, float bytes, bytes per element of the codes the block's
# norm hands its first GEMM, None where it hands none) -> the block's buffers
BLOCK_WORKSPACE: Mapping[str, Callable[[ModelConfig, Parallelism, int, int, int, float | None], dict[str, int]]] = {
    "mamba": _mamba_workspace, "attention": _attention_workspace, "moe": _moe_workspace, "mlp": _mlp_workspace,
}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes on the largest rank. `weights` by category; the state per token or per sequence; the
    workspace, communication and totals as functions of (batch, context)."""

    model: str
    config: ModelConfig = field(repr=False)
    target: Target = field(repr=False)
    parallelism: Parallelism
    activation_dtype: DType
    weights: Mapping[str, int]
    kv_bytes_per_token: int  # one sequence, every attention layer's keys and values
    conv_state_bytes_per_sequence: int  # every Mamba layer's conv window
    ssm_bytes_per_sequence: int  # every Mamba layer's SSM state
    max_batch: int
    max_context: int
    step_tokens_bound: int  # tokens one forward step processes at most (settings.plan_step_tokens)
    reserve_bytes: int  # CUDA context, cuBLAS workspaces, allocator rounding
    nccl_bytes_per_communicator: int
    # block kind -> bytes per element of the codes its norm hands its first GEMM (add_rms_norm with an
    # act_format: FP8 E4M3 codes, or NVFP4 codes with block scales), for the kinds that have one
    norm_codes_bytes: Mapping[str, float] = field(default_factory=dict)

    @property
    def weights_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def ssm_state_bytes_per_sequence(self) -> int:
        """The Mamba state of one sequence: the SSM state and the conv window."""
        return self.conv_state_bytes_per_sequence + self.ssm_bytes_per_sequence

    def step_tokens(self, batch: int, context: int) -> int:
        """Tokens of the largest forward step: a prefill chunk, or one decode token per sequence."""
        return min(max(self.step_tokens_bound, batch), batch * context)

    def workspace(self, batch: int, context: int) -> dict[str, int]:
        """The largest block's transient buffers plus the residual stream, or the logits if larger."""
        c, p, act = self.config, self.parallelism, self.activation_dtype.bits // 8
        tokens = self.step_tokens(batch, context)
        blocks = {kind: BLOCK_WORKSPACE[kind](c, p, tokens, batch, act, self.norm_codes_bytes.get(kind))
                  for kind in set(c.layer_kinds)}
        kind, parts = max(blocks.items(), key=lambda item: (sum(item[1].values()), item[0]))
        logits = batch * share(c.vocab_size, p.tp) * FP32_BYTES
        out = {"residual stream, block input and output": 3 * tokens * c.hidden_size * act}
        if logits > sum(parts.values()):
            out["logits of the rank's vocabulary (fp32)"] = logits
        else:
            out.update({f"{kind}: {name}": size for name, size in parts.items()})
        return out

    def communication(self, batch: int, context: int) -> dict[str, int]:
        c, p, act = self.config, self.parallelism, self.activation_dtype.bits // 8
        if p.world_size == 1:
            return {}
        tokens = self.step_tokens(batch, context)
        out = {"NCCL channel buffers": p.communicators * self.nccl_bytes_per_communicator}
        if p.tp > 1:
            out["tensor-parallel all-reduce of a block output"] = tokens * c.hidden_size * act
            out["logits all-gather (fp32)"] = batch * c.vocab_size * FP32_BYTES
        if p.ep > 1 and "moe" in c.layer_kinds:
            out["expert-parallel combine"] = tokens * c.expert_input_size * act
        return out

    def kv_cache_bytes(self, batch: int, context: int) -> int:
        return batch * context * self.kv_bytes_per_token

    def mamba_state_bytes(self, batch: int) -> int:
        return batch * self.ssm_state_bytes_per_sequence

    def parts(self, batch: int, context: int) -> dict[str, int]:
        return {
            "weights": self.weights_bytes,
            "KV cache": self.kv_cache_bytes(batch, context),
            "Mamba conv + SSM state": self.mamba_state_bytes(batch),
            "activation workspace": sum(self.workspace(batch, context).values()),
            "communication buffers": sum(self.communication(batch, context).values()),
            "runtime reserve": self.reserve_bytes,
        }

    def bytes_at(self, batch: int, context: int) -> int:
        return sum(self.parts(batch, context).values())

    def fits_at(self, batch: int, context: int) -> bool:
        return self.bytes_at(batch, context) <= self.target.memory_bytes

    @property
    def bytes_per_gpu(self) -> int:
        return self.bytes_at(self.max_batch, self.max_context)

    @property
    def fits(self) -> bool:
        return self.fits_at(self.max_batch, self.max_context)

    def largest_context(self, batch: int) -> int | None:
        """The longest context `batch` sequences fit with: 0 if none does, None if unbounded (no
        attention layer holds a KV cache)."""
        if not self.fits_at(batch, 1):
            return 0
        if self.kv_bytes_per_token == 0:
            return None
        return largest_true(lambda context: self.fits_at(batch, context),
                        self.target.memory_bytes // self.kv_bytes_per_token + 1)

    def largest_batch(self, context: int) -> int:
        """The most sequences of `context` tokens that fit (0 if not one)."""
        per_sequence = context * self.kv_bytes_per_token + self.ssm_state_bytes_per_sequence
        return largest_true(lambda batch: self.fits_at(batch, context), self.target.memory_bytes // max(per_sequence, 1) + 1)

    def summary(self) -> str:
        """Why a plan does not fit, in one sentence (the build's refusal)."""
        batch, context = self.max_batch, self.max_context
        parts = self.parts(batch, context)
        detail = ", ".join(f"{name} {_gb(size)}" for name, size in parts.items())
        text = (f"{self.model} does not fit {self.target.name} at world size {self.parallelism.world_size}: the memory "
                f"plan at --max-batch-size {batch} and --max-context {context} needs {_gb(self.bytes_per_gpu)} per GPU "
                f"of {_gb(self.target.memory_bytes)} ({detail})")
        longest, most = self.largest_context(batch), self.largest_batch(context)
        if not self.fits_at(1, 1):
            return text + "; not even one sequence of one token fits: use a larger --world-size or smaller formats"
        choices = []
        if longest:
            choices.append(f"--max-context {longest} at this batch")
        if most:
            choices.append(f"--max-batch-size {most} at this context")
        choices.append(f"--max-context {self.largest_context(1)} at batch 1" if self.largest_context(1) else "")
        return text + "; what fits: " + ", or ".join(choice for choice in choices if choice)

    def as_json(self) -> dict[str, Any]:
        batch, context = self.max_batch, self.max_context
        p = self.parallelism
        return {
            "tp": p.tp, "ep": p.ep, "max_batch_size": batch, "max_context": context,
            "step_tokens": self.step_tokens(batch, context),
            "weights_bytes": self.weights_bytes, "weights_by_category": dict(self.weights),
            "kv_cache_bytes": self.kv_cache_bytes(batch, context),
            "mamba_state_bytes": self.mamba_state_bytes(batch),
            "conv_state_bytes_per_sequence": self.conv_state_bytes_per_sequence,
            "ssm_bytes_per_sequence": self.ssm_bytes_per_sequence,
            "workspace_bytes": sum(self.workspace(batch, context).values()),
            "workspace": self.workspace(batch, context),
            "communication_bytes": sum(self.communication(batch, context).values()),
            "communication": self.communication(batch, context),
            "reserve_bytes": self.reserve_bytes,
            "max_context_at_max_batch": self.largest_context(batch),
            "max_batch_at_max_context": self.largest_batch(context),
        }


def largest_true(fits: Callable[[int], bool], above: int) -> int:
    """The largest n >= 0 with fits(n), for a `fits` true at 0 (or not at all) and false at `above`."""
    low, high = 0, above
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def _gb(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale / 10:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def plan_memory(model: str, graph: Graph, config: ModelConfig, target: Target, parallelism: Parallelism,
                bounds: tuple[int, int], extra_mtp_bytes: int = 0) -> MemoryPlan:
    """The plan of `graph` (precision assigned; its weight and state types are the engine's) on
    `target` at `bounds` = (--max-batch-size, --max-context)."""
    kv = conv = ssm = 0
    for slot in graph.states:
        size = per_sequence_bytes(slot, config, parallelism)
        if slot.kind == "kv":
            kv += size
        elif slot.kind == "conv":
            conv += size
        else:
            ssm += size
    # activations are in the engine's float base (set_precision records it)
    activation = DTYPES[PRECISIONS[graph.meta("precision") or BASE_PRECISIONS[0]].weight_dtype]
    current = settings()
    return MemoryPlan(model, config, target, parallelism, activation,
                      rank_weight_bytes_by_category(graph.weights, config, parallelism, extra_mtp_bytes),
                      kv, conv, ssm, bounds[0], bounds[1], current.plan_step_tokens,
                      current.plan_runtime_reserve_bytes, current.plan_nccl_bytes, norm_codes_bytes(graph, config))


def norm_codes_bytes(graph: Graph, config: ModelConfig) -> dict[str, float]:
    """Block kind -> bytes per element of the codes a layer's norm of that kind hands its GEMM (the
    largest where layers differ), from the graph's `add_rms_norm` ops with an act_format: the norm
    of layer N (scope `layers.N.norm`) feeds layer N's mixer."""
    found: dict[str, float] = {}
    for op in graph.ops:
        if op.opname != "add_rms_norm" or op.attrs.get("act_format") is None:
            continue
        layer = _NORM_SCOPE.fullmatch(op.scope)
        if layer is None or int(layer.group(1)) >= len(config.layer_kinds):
            continue
        kind = config.layer_kinds[int(layer.group(1))]
        found[kind] = max(found.get(kind, 0.0), element_bytes(op.results[0].type.dtype))
    return found


_NORM_SCOPE = re.compile(r"layers\.(\d+)\.norm")


def check_fits(plan: MemoryPlan) -> None:
    """Refuse a build whose plan does not fit the target, naming what does."""
    if not plan.fits:
        raise TargetError(plan.summary())
