"""The Nemotron-H model as weights and block ops: which tensors a checkpoint must hold (names,
shapes, categories) and the block-level graph that uses them. Used by the checkpoint importer
and by plan mode (config.json alone, no weight bytes)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import overload

from nemocompile.base.formats import FLOAT_FORMATS

from .builder import GraphBuilder
from .config import ModelConfig
from .ir import DimBound, Graph, TensorSource, Weight
from .types import DTYPES, F32, I64, DType, TensorType

# The float formats a checkpoint's unquantized weights may hold (safetensors strings), and
# config.json's torch_dtype -> IR dtype; both from the format registry.
FLOAT_DTYPES = frozenset(DTYPES[name].format.safetensors or "" for name in FLOAT_FORMATS)
TORCH_DTYPE_TO_IR = {DTYPES[name].format.torch_name or "": DTYPES[name] for name in FLOAT_FORMATS}
# The one statement of the router rule: its logits decide which experts run, so router weights
# stay fp32 whatever the precision (transformers keeps them fp32 too). The precision policy and
# set_precision derive from it.
FP32_CATEGORIES = frozenset({"router"})

# Static activation scales of quantized GEMMs (W4A4, W8A8): stored bytes, not model parameters.
INPUT_SCALE_CATEGORY = "activation_scales"
CATEGORIES = ("embeddings", "lm_head", "attention", "mamba_in_proj", "mamba_out_proj", "conv1d", "mamba_ssm",
              "mlp", "shared_experts", "routed_experts", "router", "latent_projections", "norms", "mtp",
              INPUT_SCALE_CATEGORY)


# The per-tensor scales of an FP8 KV cache (passes/assign_kv_cache.py): `{scope}.k_scale`, `{scope}.v_scale`.
KV_SCALES = ("k_scale", "v_scale")


def kv_scale_name(scope: str, which: str) -> str:
    """The scale of attention block `scope`'s key (`which` = "k") or value ("v") cache."""
    return f"{scope}.{which}_scale"


# Graph input: tokens each sequence already holds in its caches (attention writes at that position).
CACHE_LENS = "cache_lens"  # graph input: tokens each sequence holds before this call
SEQ_LENS = "seq_lens"  # graph input: real (not padding) new tokens of each sequence in this call
# (largest batch, longest context in tokens): the default run-time bounds of a built graph.
DEFAULT_BOUNDS = (256, 131072)


@dataclass(frozen=True)
class ExpertTensorNames(Sequence[str]):
    """The checkpoint names `{prefix}.{i}.{suffix}` of `experts` experts, made on demand: a config
    may declare up to a million experts, and plan mode never needs their names."""

    prefix: str
    suffix: str
    experts: int

    def __len__(self) -> int:
        return self.experts

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.experts))]
        if not -self.experts <= index < self.experts:
            raise IndexError(f"expert {index} of {self.experts}")
        return f"{self.prefix}.{index % self.experts}.{self.suffix}"

    def __iter__(self) -> Iterator[str]:
        return (f"{self.prefix}.{i}.{self.suffix}" for i in range(self.experts))


@dataclass(frozen=True)
class WeightSpec:
    """One graph weight and the checkpoint tensor(s) it comes from (several = stacked experts)."""

    name: str
    shape: tuple[int, ...]
    category: str
    tensors: Sequence[str]  # a tuple, or ExpertTensorNames for stacked experts
    bias: bool = False  # a projection's bias: stays in the float base, never quantized

    @property
    def keep_fp32(self) -> bool:
        return self.category in FP32_CATEGORIES

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


def _bias(spec: WeightSpec) -> WeightSpec:
    """The bias of projection `spec` ([out]), counted in the same category."""
    (tensor,) = spec.tensors
    return WeightSpec(f"{spec.name}_bias", spec.shape[:1], spec.category,
                      (tensor.removesuffix(".weight") + ".bias",), bias=True)


def _projections(specs: list[WeightSpec], with_bias: bool) -> list[WeightSpec]:
    """Each projection, followed by its bias when the config asks for biases."""
    return [s for spec in specs for s in ([spec, _bias(spec)] if with_bias else [spec])]


def _mamba(c: ModelConfig, p: str, t: str) -> list[WeightSpec]:
    # transformers' NemotronH: use_bias adds biases to in_proj and out_proj
    in_proj = WeightSpec(f"{p}.in_proj", (c.in_proj_size, c.hidden_size), "mamba_in_proj", (f"{t}.in_proj.weight",))
    out_proj = WeightSpec(f"{p}.out_proj", (c.hidden_size, c.mamba_intermediate), "mamba_out_proj",
                          (f"{t}.out_proj.weight",))
    specs = [
        *_projections([in_proj], c.use_bias),
        WeightSpec(f"{p}.conv1d", (c.conv_dim, 1, c.conv_kernel), "conv1d", (f"{t}.conv1d.weight",)),
    ]
    if c.use_conv_bias:
        specs.append(WeightSpec(f"{p}.conv1d_bias", (c.conv_dim,), "conv1d", (f"{t}.conv1d.bias",)))
    specs += [
        WeightSpec(f"{p}.dt_bias", (c.mamba_num_heads,), "mamba_ssm", (f"{t}.dt_bias",)),
        WeightSpec(f"{p}.A_log", (c.mamba_num_heads,), "mamba_ssm", (f"{t}.A_log",)),
        WeightSpec(f"{p}.D", (c.mamba_num_heads,), "mamba_ssm", (f"{t}.D",)),
        WeightSpec(f"{p}.norm", (c.mamba_intermediate,), "norms", (f"{t}.norm.weight",)),
        *_projections([out_proj], c.use_bias),
    ]
    return specs


def _attention(c: ModelConfig, p: str, t: str) -> list[WeightSpec]:
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return [
        WeightSpec(f"{p}.q_proj", (q, c.hidden_size), "attention", (f"{t}.q_proj.weight",)),
        WeightSpec(f"{p}.k_proj", (kv, c.hidden_size), "attention", (f"{t}.k_proj.weight",)),
        WeightSpec(f"{p}.v_proj", (kv, c.hidden_size), "attention", (f"{t}.v_proj.weight",)),
        WeightSpec(f"{p}.o_proj", (c.hidden_size, q), "attention", (f"{t}.o_proj.weight",)),
    ]


def _mlp(c: ModelConfig, p: str, t: str) -> list[WeightSpec]:
    # transformers' NemotronH: mlp_bias adds biases to the dense MLP, the shared expert and the
    # latent projections; the routed experts never have one
    return _projections([
        WeightSpec(f"{p}.up_proj", (c.intermediate_size, c.hidden_size), "mlp", (f"{t}.up_proj.weight",)),
        WeightSpec(f"{p}.down_proj", (c.hidden_size, c.intermediate_size), "mlp", (f"{t}.down_proj.weight",)),
    ], c.mlp_bias)


def _moe(c: ModelConfig, p: str, t: str) -> list[WeightSpec]:
    e, inter, width = c.n_routed_experts, c.moe_intermediate_size, c.expert_input_size
    shared = c.moe_shared_expert_intermediate_size
    specs = [
        WeightSpec(f"{p}.router", (e, c.hidden_size), "router", (f"{t}.gate.weight",)),
        WeightSpec(f"{p}.router_bias", (e,), "router", (f"{t}.gate.e_score_correction_bias",)),
        WeightSpec(f"{p}.experts_up", (e, inter, width), "routed_experts",
                   ExpertTensorNames(f"{t}.experts", "up_proj.weight", e)),
        WeightSpec(f"{p}.experts_down", (e, width, inter), "routed_experts",
                   ExpertTensorNames(f"{t}.experts", "down_proj.weight", e)),
        *_projections([
            WeightSpec(f"{p}.shared_up", (shared, c.hidden_size), "shared_experts",
                       (f"{t}.shared_experts.up_proj.weight",)),
            WeightSpec(f"{p}.shared_down", (c.hidden_size, shared), "shared_experts",
                       (f"{t}.shared_experts.down_proj.weight",)),
        ], c.mlp_bias),
    ]
    if c.moe_latent_size is not None:
        specs += _projections([
            WeightSpec(f"{p}.fc1_latent", (c.moe_latent_size, c.hidden_size), "latent_projections",
                       (f"{t}.fc1_latent_proj.weight",)),
            WeightSpec(f"{p}.fc2_latent", (c.hidden_size, c.moe_latent_size), "latent_projections",
                       (f"{t}.fc2_latent_proj.weight",)),
        ], c.mlp_bias)
    return specs


BLOCK_WEIGHTS: dict[str, Callable[[ModelConfig, str, str], list[WeightSpec]]] = {
    "mamba": _mamba, "attention": _attention, "mlp": _mlp, "moe": _moe,
}


def layer_weights(c: ModelConfig, index: int, prefix: str) -> list[WeightSpec]:
    p, t = f"layers.{index}", f"{prefix}layers.{index}"
    specs = [WeightSpec(f"{p}.norm", (c.hidden_size,), "norms", (f"{t}.norm.weight",))]
    return specs + BLOCK_WEIGHTS[c.layer_kinds[index]](c, f"{p}.mixer", f"{t}.mixer")


def model_weights(c: ModelConfig, prefix: str = "backbone.", lm_head: bool | None = None) -> list[WeightSpec]:
    """Every weight the forward pass uses, in execution order (MTP excluded). `lm_head` says
    whether a separate lm_head tensor exists; by default it does unless embeddings are tied."""
    specs = [WeightSpec("embeddings", (c.vocab_size, c.hidden_size), "embeddings", (f"{prefix}embeddings.weight",))]
    for index in range(c.num_layers):
        specs += layer_weights(c, index, prefix)
    specs.append(WeightSpec("norm_f", (c.hidden_size,), "norms", (f"{prefix}norm_f.weight",)))
    if (not c.tie_word_embeddings) if lm_head is None else lm_head:
        specs.append(WeightSpec("lm_head", (c.vocab_size, c.hidden_size), "lm_head", ("lm_head.weight",)))
    return specs


def mtp_weight_estimate(c: ModelConfig) -> int:
    """Parameters of the multi-token-prediction blocks from config alone: per predict layer, the
    enorm/hnorm/final norms and eh_proj [H, 2H], then its blocks (embeddings and lm_head shared)."""
    per_layer = 3 * c.hidden_size + 2 * c.hidden_size * c.hidden_size
    per_kind = {kind: c.hidden_size + sum(s.numel for s in BLOCK_WEIGHTS[kind](c, "mtp", "mtp"))
                for kind in set(c.mtp_layer_kinds)}  # each kind once: the count may be large
    per_layer += sum(per_kind[kind] for kind in c.mtp_layer_kinds)
    return c.num_nextn_predict_layers * per_layer


def _block_op(b: GraphBuilder, c: ModelConfig, kind: str, index: int, x: str, dtype: DType) -> str:
    """Emit layer `index`'s block; a stateful block reads its state slots and binds their updates."""
    p, scope = f"layers.{index}.mixer", f"layers.{index}.mixer"
    if kind == "mamba":
        conv_state = b.state(f"layers.{index}.conv", "conv",
                             TensorType(dtype, ("batch", c.conv_dim, c.conv_kernel - 1)))
        ssm_state = b.state(f"layers.{index}.ssm", "ssm",
                            TensorType(F32, ("batch", c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size)))
        out, conv_next, ssm_next = b.op_named(
            "mamba2_mixer",
            {"x": x, "in_proj": f"{p}.in_proj", "conv_weight": f"{p}.conv1d",
             "conv_bias": f"{p}.conv1d_bias" if c.use_conv_bias else None, "dt_bias": f"{p}.dt_bias",
             "A_log": f"{p}.A_log", "D": f"{p}.D", "norm_weight": f"{p}.norm", "out_proj": f"{p}.out_proj",
             "in_proj_bias": f"{p}.in_proj_bias" if c.use_bias else None,
             "out_proj_bias": f"{p}.out_proj_bias" if c.use_bias else None,
             "conv_state": conv_state, "ssm_state": ssm_state, "seq_lens": SEQ_LENS},
            {"num_heads": c.mamba_num_heads, "head_dim": c.mamba_head_dim, "n_groups": c.n_groups,
             "state_size": c.ssm_state_size, "conv_kernel": c.conv_kernel, "chunk_size": c.chunk_size,
             "eps": c.layer_norm_epsilon, "dt_min": c.time_step_min, "dt_max": float("inf"),
             "activation": c.mamba_hidden_act},
            scope, [b.fresh(), f"{conv_state}.next", f"{ssm_state}.next"])
        b.update_state(conv_state, conv_next)
        b.update_state(ssm_state, ssm_next)
        return out
    if kind == "attention":
        cache_type = TensorType(dtype, ("batch", c.num_key_value_heads, "ctx", c.head_dim))
        k_cache = b.state(f"layers.{index}.k", "kv", cache_type)
        v_cache = b.state(f"layers.{index}.v", "kv", cache_type)
        out, k_next, v_next = b.op_named(
            "attention",
            {"x": x, "q_proj": f"{p}.q_proj", "k_proj": f"{p}.k_proj", "v_proj": f"{p}.v_proj",
             "o_proj": f"{p}.o_proj", "k_cache": k_cache, "v_cache": v_cache, "cache_lens": CACHE_LENS},
            {"num_heads": c.num_attention_heads, "num_kv_heads": c.num_key_value_heads,
             "head_dim": c.head_dim, "scale": c.head_dim ** -0.5},
            scope, [b.fresh(), f"{k_cache}.next", f"{v_cache}.next"])
        b.update_state(k_cache, k_next)
        b.update_state(v_cache, v_next)
        return out
    bias = c.mlp_bias
    if kind == "mlp":
        (out,) = b.op_named("mlp", {"x": x, "up_proj": f"{p}.up_proj", "down_proj": f"{p}.down_proj",
                                    "up_bias": f"{p}.up_proj_bias" if bias else None,
                                    "down_bias": f"{p}.down_proj_bias" if bias else None},
                            {"activation": c.mlp_hidden_act}, scope)
        return out
    latent = c.moe_latent_size is not None
    (out,) = b.op_named(
        "moe",
        {"x": x, "router_weight": f"{p}.router", "router_bias": f"{p}.router_bias",
         "experts_up": f"{p}.experts_up", "experts_down": f"{p}.experts_down",
         "shared_up": f"{p}.shared_up", "shared_down": f"{p}.shared_down",
         "fc1_latent": f"{p}.fc1_latent" if latent else None, "fc2_latent": f"{p}.fc2_latent" if latent else None,
         "shared_up_bias": f"{p}.shared_up_bias" if bias else None,
         "shared_down_bias": f"{p}.shared_down_bias" if bias else None,
         "fc1_latent_bias": f"{p}.fc1_latent_bias" if bias and latent else None,
         "fc2_latent_bias": f"{p}.fc2_latent_bias" if bias and latent else None},
        {"top_k": c.num_experts_per_tok, "n_group": c.n_group, "topk_group": c.topk_group,
         "norm_topk_prob": c.norm_topk_prob, "routed_scaling_factor": c.routed_scaling_factor,
         "activation": c.mlp_hidden_act}, scope)
    return out


@dataclass(frozen=True)
class WeightSource:
    """A weight's checkpoint tensors (several: stacked experts) and the format they hold."""

    tensors: tuple[TensorSource, ...]
    dtype: DType


def dim_bounds(c: ModelConfig, bounds: tuple[int, int]) -> tuple[DimBound, ...]:
    """The symbolic dims' ranges at `bounds` = (largest batch, longest context)."""
    max_batch, max_context = bounds
    return (DimBound("batch", 1, max_batch), DimBound("seq", 1, max_context), DimBound("ctx", 0, max_context),
            DimBound("routed", 0, max_batch * max_context * c.num_experts_per_tok))


def rebound(graph: Graph, c: ModelConfig, bounds: tuple[int, int]) -> Graph:
    """`graph` with its symbolic dims bounded at `bounds` instead (the build's chosen run-time bounds)."""
    new = {dim.name: dim for dim in dim_bounds(c, bounds)}
    return dataclasses.replace(graph, dims=tuple(new.get(dim.name, dim) for dim in graph.dims))


def build_block_graph(c: ModelConfig, dtype: DType, sources: Mapping[str, WeightSource] | None = None,
                      extra_weights: list[Weight] | None = None,
                      metadata: dict[str, str] | None = None, prefix: str = "backbone.",
                      lm_head: bool | None = None, bounds: tuple[int, int] = DEFAULT_BOUNDS) -> Graph:
    """The block-level graph. Float weights get `dtype` (routers stay fp32), already-quantized
    ones keep their format; `sources` maps each weight name to its checkpoint tensors (omitted
    in plan mode); `extra_weights` are carried, unused weights (MTP); `bounds` = (largest batch,
    longest context in tokens) the engine accepts."""
    b = GraphBuilder("nemotron_h", {"model_type": "nemotron_h", "pattern": c.pattern, **(metadata or {})})
    specs = model_weights(c, prefix, lm_head)
    for spec in specs:
        origin = sources.get(spec.name) if sources else None
        weight_dtype = F32 if spec.keep_fp32 else dtype
        if origin is not None and origin.dtype.quantized:
            weight_dtype = origin.dtype
        b.weight(spec.name, TensorType(weight_dtype, spec.shape), spec.category,
                 origin.tensors if origin else (), origin.dtype if origin else None)
    for weight in extra_weights or []:
        b.add_weight(weight)
    ids = b.input("input_ids", TensorType(I64, ("batch", "seq")))
    b.input(CACHE_LENS, TensorType(I64, ("batch",)))
    b.input(SEQ_LENS, TensorType(I64, ("batch",)))
    for dim in dim_bounds(c, bounds):
        b.bound(dim.name, dim.low, dim.high)
    hidden = b.op1("embedding", [ids, "embeddings"], scope="embeddings")
    for index, kind in enumerate(c.layer_kinds):
        normed = b.op1("rms_norm", [hidden, f"layers.{index}.norm"], {"eps": c.layer_norm_epsilon},
                       f"layers.{index}.norm")
        mixed = _block_op(b, c, kind, index, normed, dtype)
        hidden = b.op1("add", [hidden, mixed], scope=f"layers.{index}")
    final = b.op1("rms_norm", [hidden, "norm_f"], {"eps": c.layer_norm_epsilon}, "norm_f")
    head = "lm_head" if specs[-1].name == "lm_head" else "embeddings"
    logits = b.op1("linear", [final, head], scope="lm_head")
    b.op("cast", [logits], {"dtype": "f32"}, "lm_head", result_names=["logits"])
    b.output("logits")
    return b.build()
