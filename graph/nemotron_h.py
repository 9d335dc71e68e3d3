"""The Nemotron-H model as weights and block ops: which tensors a checkpoint must hold (names,
shapes, categories) and the block-level graph that uses them. Used by the checkpoint importer
and by plan mode (config.json alone, no weight bytes)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from nemocompile.base.formats import FLOAT_FORMATS

from .builder import GraphBuilder
from .config import ModelConfig
from .ir import Graph, TensorSource, Weight
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


@dataclass(frozen=True)
class WeightSpec:
    """One graph weight and the checkpoint tensor(s) it comes from (several = stacked experts)."""

    name: str
    shape: tuple[int, ...]
    category: str
    tensors: tuple[str, ...]

    @property
    def keep_fp32(self) -> bool:
        return self.category in FP32_CATEGORIES

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


def _mamba(c: ModelConfig, p: str, t: str) -> list[WeightSpec]:
    specs = [
        WeightSpec(f"{p}.in_proj", (c.in_proj_size, c.hidden_size), "mamba_in_proj", (f"{t}.in_proj.weight",)),
        WeightSpec(f"{p}.conv1d", (c.conv_dim, 1, c.conv_kernel), "conv1d", (f"{t}.conv1d.weight",)),
    ]
    if c.use_conv_bias:
        specs.append(WeightSpec(f"{p}.conv1d_bias", (c.conv_dim,), "conv1d", (f"{t}.conv1d.bias",)))
    specs += [
        WeightSpec(f"{p}.dt_bias", (c.mamba_num_heads,), "mamba_ssm", (f"{t}.dt_bias",)),
        WeightSpec(f"{p}.A_log", (c.mamba_num_heads,), "mamba_ssm", (f"{t}.A_log",)),
        WeightSpec(f"{p}.D", (c.mamba_num_heads,), "mamba_ssm", (f"{t}.D",)),
        WeightSpec(f"{p}.norm", (c.mamba_intermediate,), "norms", (f"{t}.norm.weight",)),
        WeightSpec(f"{p}.out_proj", (c.hidden_size, c.mamba_intermediate), "mamba_out_proj",
                   (f"{t}.out_proj.weight",)),
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
    return [
        WeightSpec(f"{p}.up_proj", (c.intermediate_size, c.hidden_size), "mlp", (f"{t}.up_proj.weight",)),
        WeightSpec(f"{p}.down_proj", (c.hidden_size, c.intermediate_size), "mlp", (f"{t}.down_proj.weight",)),
    ]


def _moe(c: ModelConfig, p: str, t: str) -> list[WeightSpec]:
    e, inter, width = c.n_routed_experts, c.moe_intermediate_size, c.expert_input_size
    shared = c.moe_shared_expert_intermediate_size
    specs = [
        WeightSpec(f"{p}.router", (e, c.hidden_size), "router", (f"{t}.gate.weight",)),
        WeightSpec(f"{p}.router_bias", (e,), "router", (f"{t}.gate.e_score_correction_bias",)),
        WeightSpec(f"{p}.experts_up", (e, inter, width), "routed_experts",
                   tuple(f"{t}.experts.{i}.up_proj.weight" for i in range(e))),
        WeightSpec(f"{p}.experts_down", (e, width, inter), "routed_experts",
                   tuple(f"{t}.experts.{i}.down_proj.weight" for i in range(e))),
        WeightSpec(f"{p}.shared_up", (shared, c.hidden_size), "shared_experts",
                   (f"{t}.shared_experts.up_proj.weight",)),
        WeightSpec(f"{p}.shared_down", (c.hidden_size, shared), "shared_experts",
                   (f"{t}.shared_experts.down_proj.weight",)),
    ]
    if c.moe_latent_size is not None:
        specs += [
            WeightSpec(f"{p}.fc1_latent", (c.moe_latent_size, c.hidden_size), "latent_projections",
                       (f"{t}.fc1_latent_proj.weight",)),
            WeightSpec(f"{p}.fc2_latent", (c.hidden_size, c.moe_latent_size), "latent_projections",
                       (f"{t}.fc2_latent_proj.weight",)),
        ]
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
    total = 0
    for _ in range(c.num_nextn_predict_layers):
        total += 3 * c.hidden_size + 2 * c.hidden_size * c.hidden_size
        for kind in c.mtp_layer_kinds:
            total += c.hidden_size + sum(s.numel for s in BLOCK_WEIGHTS[kind](c, "mtp", "mtp"))
    return total


def _block_op(b: GraphBuilder, c: ModelConfig, kind: str, index: int, x: str, dtype: DType) -> str:
    p, scope = f"layers.{index}.mixer", f"layers.{index}.mixer"
    if kind == "mamba":
        conv_state = b.state(f"layers.{index}.conv", "conv",
                             TensorType(dtype, ("batch", c.conv_dim, c.conv_kernel - 1)))
        ssm_state = b.state(f"layers.{index}.ssm", "ssm",
                            TensorType(F32, ("batch", c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size)))
        return b.op1("mamba2_mixer",
                     [x, f"{p}.in_proj", f"{p}.conv1d", f"{p}.conv1d_bias" if c.use_conv_bias else None,
                      f"{p}.dt_bias", f"{p}.A_log", f"{p}.D", f"{p}.norm", f"{p}.out_proj"],
                     {"num_heads": c.mamba_num_heads, "head_dim": c.mamba_head_dim, "n_groups": c.n_groups,
                      "state_size": c.ssm_state_size, "conv_kernel": c.conv_kernel, "chunk_size": c.chunk_size,
                      "eps": c.layer_norm_epsilon, "dt_min": c.time_step_min, "dt_max": float("inf"),
                      "activation": c.mamba_hidden_act, "conv_state": conv_state, "ssm_state": ssm_state},
                     scope)
    if kind == "attention":
        kv_state = b.state(f"layers.{index}.kv", "kv",
                           TensorType(dtype, ("batch", c.num_key_value_heads, "ctx", c.head_dim)))
        return b.op1("attention", [x, f"{p}.q_proj", f"{p}.k_proj", f"{p}.v_proj", f"{p}.o_proj"],
                     {"num_heads": c.num_attention_heads, "num_kv_heads": c.num_key_value_heads,
                      "head_dim": c.head_dim, "scale": c.head_dim ** -0.5, "kv_state": kv_state}, scope)
    if kind == "mlp":
        return b.op1("mlp", [x, f"{p}.up_proj", f"{p}.down_proj"], {"activation": c.mlp_hidden_act}, scope)
    latent = c.moe_latent_size is not None
    return b.op1("moe",
                 [x, f"{p}.router", f"{p}.router_bias", f"{p}.experts_up", f"{p}.experts_down",
                  f"{p}.shared_up", f"{p}.shared_down", f"{p}.fc1_latent" if latent else None,
                  f"{p}.fc2_latent" if latent else None],
                 {"top_k": c.num_experts_per_tok, "n_group": c.n_group, "topk_group": c.topk_group,
                  "norm_topk_prob": c.norm_topk_prob, "routed_scaling_factor": c.routed_scaling_factor,
                  "activation": c.mlp_hidden_act}, scope)


@dataclass(frozen=True)
class WeightSource:
    """A weight's checkpoint tensors (several: stacked experts) and the format they hold."""

    tensors: tuple[TensorSource, ...]
    dtype: DType


def build_block_graph(c: ModelConfig, dtype: DType, sources: Mapping[str, WeightSource] | None = None,
                      extra_weights: list[Weight] | None = None,
                      metadata: dict[str, str] | None = None, prefix: str = "backbone.",
                      lm_head: bool | None = None) -> Graph:
    """The block-level graph. Float weights get `dtype` (routers stay fp32), already-quantized
    ones keep their format; `sources` maps each weight name to its checkpoint tensors (omitted
    in plan mode); `extra_weights` are carried, unused weights (MTP)."""
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
