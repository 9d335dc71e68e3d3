"""The Nemotron-H model configuration, read from a Hugging Face config.json as released
(`layers_block_type` or `hybrid_override_pattern`, legacy `mamba_*` field names).
Every key is classified in one table (CONFIG_FIELDS): implemented, without effect at inference,
or changing the numerics in a way nemocompile does not implement (refused unless at its no-op
value). An unknown key close to a known one is refused as a misspelling; other unknown keys are
kept and listed in the engine's report."""

from __future__ import annotations

import builtins
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemocompile.base.errors import ConfigError
from nemocompile.base.inputs import MIB, read_regular_text

PATTERN_LETTERS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
LAYER_TYPE_NAMES = {"linear_attention": "mamba", "mamba": "mamba", "full_attention": "attention",
                    "attention": "attention", "moe": "moe", "mlp": "mlp"}
# Older releases spelled some fields differently (transformers' NemotronHConfig accepts these
# spellings, and its `attribute_map` aliases).
LEGACY_NAMES = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_expand": "expand",
                 "mamba_dt_min": "time_step_min", "mamba_dt_max": "time_step_max",
                 "mamba_dt_limit": "time_step_limit", "mamba_dt_init_floor": "time_step_floor",
                 "mamba_conv_bias": "use_conv_bias", "mamba_chunk_size": "chunk_size",
                 "layer_types": "layers_block_type", "num_local_experts": "n_routed_experts"}

IMPLEMENTED = "implemented"
NO_EFFECT = "no effect at inference"
REFUSED = "changes the numerics, not implemented"


@dataclass(frozen=True)
class FieldRule:
    """How nemocompile treats one config.json key. A REFUSED field is accepted only at one of its
    `no_op` values (lists compare as tuples); any other value is refused, giving `why`."""

    status: str
    why: str = ""
    no_op: tuple[Any, ...] = ()


_STANDARD = FieldRule(NO_EFFECT, "a generic transformers config key (bookkeeping, training or generation defaults)")
# Generic PretrainedConfig keys, as transformers 4.x and 5.x write them into config.json.
_STANDARD_KEYS = (
    "_name_or_path", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset", "architectures",
    "auto_map", "transformers_version", "model_type", "return_dict", "output_hidden_states", "output_attentions",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder",
    "finetuning_task", "id2label", "label2id", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "problem_type", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
)

# Every key nemocompile knows: each field of transformers' NemotronHConfig, the generic keys, and
# keys that released Nemotron-H configs carry beside them. The one table to extend.
CONFIG_FIELDS: dict[str, FieldRule] = {
    **{key: _STANDARD for key in _STANDARD_KEYS},
    # transformers' NemotronHConfig
    "vocab_size": FieldRule(IMPLEMENTED),
    "hidden_size": FieldRule(IMPLEMENTED),
    "layers_block_type": FieldRule(IMPLEMENTED),
    "tie_word_embeddings": FieldRule(IMPLEMENTED),
    "use_cache": FieldRule(NO_EFFECT, "the runtime always keeps its caches"),
    "num_logits_to_keep": FieldRule(NO_EFFECT, "which logits generation computes, not their values"),
    "pad_token_id": FieldRule(NO_EFFECT, "a token id for batching, not part of the graph"),
    "bos_token_id": FieldRule(NO_EFFECT, "a token id for the tokenizer, not part of the graph"),
    "eos_token_id": FieldRule(NO_EFFECT, "where generation stops, not part of the graph"),
    "num_attention_heads": FieldRule(IMPLEMENTED),
    "num_key_value_heads": FieldRule(IMPLEMENTED),
    "head_dim": FieldRule(IMPLEMENTED),
    "max_position_embeddings": FieldRule(NO_EFFECT, "attention has no positional encoding; not a numerics limit"),
    "attention_bias": FieldRule(NO_EFFECT, "transformers' NemotronH builds q/k/v/o without bias whatever it says "
                                           "(a checkpoint with attention biases is refused by its tensors)"),
    "attention_dropout": FieldRule(NO_EFFECT, "training only"),
    "sliding_window": FieldRule(REFUSED, "would limit attention to a window; nemocompile (like transformers' "
                                         "NemotronH) attends to the whole context", (None,)),
    "intermediate_size": FieldRule(IMPLEMENTED),
    "mlp_hidden_act": FieldRule(IMPLEMENTED),
    "mlp_bias": FieldRule(IMPLEMENTED),
    "use_mamba_kernels": FieldRule(NO_EFFECT, "a kernel choice in transformers"),
    "ssm_state_size": FieldRule(IMPLEMENTED),
    "mamba_num_heads": FieldRule(IMPLEMENTED),
    "mamba_head_dim": FieldRule(IMPLEMENTED),
    "mamba_hidden_act": FieldRule(IMPLEMENTED),
    "n_groups": FieldRule(IMPLEMENTED),
    "conv_kernel": FieldRule(IMPLEMENTED),
    "expand": FieldRule(NO_EFFECT, "the Mamba width is mamba_num_heads x mamba_head_dim, as in transformers"),
    "time_step_min": FieldRule(IMPLEMENTED),
    "time_step_max": FieldRule(NO_EFFECT, "initialization only"),
    "time_step_limit": FieldRule(REFUSED, "would clamp the Mamba step size; nemocompile (like transformers' "
                                          "NemotronH) clamps only below, at time_step_min",
                                 ((0.0, math.inf),)),
    "time_step_floor": FieldRule(NO_EFFECT, "initialization only"),
    "use_conv_bias": FieldRule(IMPLEMENTED),
    "chunk_size": FieldRule(IMPLEMENTED),
    "mamba_proj_bias": FieldRule(NO_EFFECT, "unused by transformers; use_bias sets the Mamba projection biases"),
    "mamba_ssm_cache_dtype": FieldRule(NO_EFFECT, "the SSM state format is the precision policy's ssm_state "
                                                  "(fp32 by default)"),
    "n_routed_experts": FieldRule(IMPLEMENTED),
    "output_router_logits": FieldRule(NO_EFFECT, "training only (auxiliary loss)"),
    "n_shared_experts": FieldRule(REFUSED, "asks for several shared experts; nemocompile (like transformers' "
                                           "NemotronH) builds exactly one", (1,)),
    "moe_intermediate_size": FieldRule(IMPLEMENTED),
    "moe_shared_expert_intermediate_size": FieldRule(IMPLEMENTED),
    "moe_latent_size": FieldRule(IMPLEMENTED),
    "moe_shared_expert_overlap": FieldRule(NO_EFFECT, "a scheduling choice (overlapping shared and routed work)"),
    "num_experts_per_tok": FieldRule(IMPLEMENTED),
    "routed_scaling_factor": FieldRule(IMPLEMENTED),
    "n_group": FieldRule(IMPLEMENTED),
    "topk_group": FieldRule(IMPLEMENTED),
    "norm_topk_prob": FieldRule(IMPLEMENTED),
    "num_nextn_predict_layers": FieldRule(IMPLEMENTED, "MTP blocks are carried and counted, not executed"),
    "mtp_layers_block_type": FieldRule(IMPLEMENTED),
    "use_bias": FieldRule(IMPLEMENTED),
    "initializer_range": FieldRule(NO_EFFECT, "initialization only"),
    "layer_norm_epsilon": FieldRule(IMPLEMENTED),
    "residual_in_fp32": FieldRule(REFUSED, "would keep the residual stream in fp32 (NVIDIA's reference code; "
                                           "transformers ignores it)", (False,)),
    "hidden_dropout": FieldRule(NO_EFFECT, "training only"),
    "rescale_prenorm_residual": FieldRule(NO_EFFECT, "initialization only"),
    # spellings transformers also accepts, and keys released configs carry
    "hybrid_override_pattern": FieldRule(IMPLEMENTED),
    "mtp_hybrid_override_pattern": FieldRule(IMPLEMENTED),
    "num_hidden_layers": FieldRule(NO_EFFECT, "the layer count comes from the block pattern, as in transformers"),
    "torch_dtype": FieldRule(IMPLEMENTED),
    "dtype": FieldRule(IMPLEMENTED),
    "quantization_config": FieldRule(IMPLEMENTED, "a ModelOpt checkpoint's quantization (graph/modelopt.py)"),
    "rms_norm_eps": FieldRule(NO_EFFECT, "unused by transformers' NemotronH, which reads layer_norm_epsilon"),
    "norm_eps": FieldRule(NO_EFFECT, "unused by transformers' NemotronH, which reads layer_norm_epsilon"),
    "rope_theta": FieldRule(NO_EFFECT, "Nemotron-H attention has no rotary embedding"),
    "partial_rotary_factor": FieldRule(NO_EFFECT, "Nemotron-H attention has no rotary embedding"),
    "attention_head_dim": FieldRule(NO_EFFECT, "unused by transformers' NemotronH, which reads head_dim"),
}  # an older spelling (LEGACY_NAMES) follows the rule of the field it names
SUGGESTION_CUTOFF = 0.85  # difflib ratio above which an unknown key is taken for a misspelling

# Size limits, far above any released Nemotron-H (Ultra: 88 layers, 512 experts), so that a
# config cannot make plan or build run out of memory or time before a weight is read.
MAX_LAYERS = 10_000  # decoder layers (the block pattern's length), and MTP blocks per predict layer
MAX_MTP_LAYERS = 1_000  # num_nextn_predict_layers
MAX_EXPERTS = 1_000_000  # n_routed_experts
MAX_DIM = 2**31 - 1  # any other size (widths, heads, vocabulary): kernels index tensors with int32
# Nonsense numerics are refused rather than built into an engine that produces NaN.
POSITIVE = "positive"
NON_NEGATIVE = "non-negative"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    layer_kinds: tuple[str, ...]  # "mamba" | "attention" | "moe" | "mlp"
    mtp_layer_kinds: tuple[str, ...]
    num_nextn_predict_layers: int
    tie_word_embeddings: bool
    layer_norm_epsilon: float
    # attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    attention_bias: bool
    # dense MLP
    intermediate_size: int
    mlp_hidden_act: str
    mlp_bias: bool
    # Mamba2
    mamba_num_heads: int
    mamba_head_dim: int
    n_groups: int
    ssm_state_size: int
    conv_kernel: int
    chunk_size: int
    use_conv_bias: bool
    use_bias: bool
    mamba_hidden_act: str
    time_step_min: float
    # MoE
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    moe_shared_expert_intermediate_size: int
    moe_latent_size: int | None
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    torch_dtype: str
    # keys nemocompile does not know and that resemble no known key: kept, listed in report.md
    unknown_keys: tuple[str, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.layer_kinds)

    @property
    def mamba_intermediate(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.mamba_intermediate + 2 * self.n_groups * self.ssm_state_size

    @property
    def in_proj_size(self) -> int:
        return self.mamba_intermediate + self.conv_dim + self.mamba_num_heads

    @property
    def expert_input_size(self) -> int:
        return self.moe_latent_size if self.moe_latent_size is not None else self.hidden_size

    @property
    def pattern(self) -> str:
        letters = {kind: letter for letter, kind in PATTERN_LETTERS.items()}
        return "".join(letters[k] for k in self.layer_kinds)


def _kinds_from_pattern(pattern: Any, field: str, source: str) -> tuple[str, ...]:
    if not isinstance(pattern, str):
        raise ConfigError(f"{source}: '{field}' must be a string of block letters M, E, * and -")
    for index, letter in enumerate(pattern):
        if letter not in PATTERN_LETTERS:
            raise ConfigError(f"{source}: unknown block letter '{letter}' at position {index} of '{field}'; "
                              f"known letters are M (Mamba2), E (MoE), * (attention), - (MLP)")
    return tuple(PATTERN_LETTERS[c] for c in pattern)


def _kinds_from_list(kinds: Any, field: str, source: str) -> tuple[str, ...]:
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
        raise ConfigError(f"{source}: '{field}' must be a list of block type names")
    for kind in kinds:
        if kind not in LAYER_TYPE_NAMES:
            raise ConfigError(f"{source}: unknown block type '{kind}' in '{field}'; known types are "
                              f"{', '.join(sorted(LAYER_TYPE_NAMES))}")
    return tuple(LAYER_TYPE_NAMES[k] for k in kinds)


class _Fields:
    """Typed reads from the raw JSON with the defaults transformers uses."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw = dict(raw)
        for legacy, name in LEGACY_NAMES.items():
            if legacy not in self.raw:
                continue
            if name in self.raw and self.raw[name] != self.raw[legacy]:
                raise ConfigError(f"{source}: '{legacy}' ({self.raw[legacy]!r}) and '{name}' ({self.raw[name]!r}) "
                                  f"are two spellings of one field with different values")
            self.raw[name] = self.raw[legacy]
        self.source = source

    def int(self, name: builtins.str, default: builtins.int | None = None, minimum: builtins.int = 1,
            maximum: builtins.int = MAX_DIM) -> builtins.int:
        value = self.raw.get(name, default)
        if value is None:
            raise ConfigError(f"{self.source}: required field '{name}' is missing")
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise ConfigError(f"{self.source}: '{name}' must be an integer from {minimum} to {maximum:,} "
                              f"(nemocompile's limit), got {_short(value)}")
        return value

    def optional_int(self, name: builtins.str) -> builtins.int | None:
        return None if self.raw.get(name) is None else self.int(name)

    def float(self, name: builtins.str, default: builtins.float, sign: builtins.str = "",
              below: builtins.float = math.inf) -> builtins.float:
        """A finite number; `sign` POSITIVE or NON_NEGATIVE bounds it below, `below` above."""
        value = self.raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{self.source}: '{name}' must be a finite number, got {_short(value)}")
        low_ok = value > 0 if sign == POSITIVE else value >= 0 if sign == NON_NEGATIVE else True
        if not low_ok or value >= below:
            bound = f" below {below:g}" if below != math.inf else ""
            raise ConfigError(f"{self.source}: '{name}' must be a {sign or 'finite'} number{bound}, got {value!r}")
        return float(value)

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        value = self.raw.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.source}: '{name}' must be true or false, got {value!r}")
        return value

    def str(self, name: builtins.str, default: str, allowed: tuple[str, ...] | None = None) -> str:
        value = self.raw.get(name, default)
        if not isinstance(value, str) or (allowed and value not in allowed):
            expected = f"one of {', '.join(allowed)}" if allowed else "a string"
            raise ConfigError(f"{self.source}: '{name}' must be {expected}, got {value!r}")
        return value


def _short(value: Any) -> str:
    """repr of a config value, cut short: a hostile config may hold a huge one."""
    text = repr(value) if not isinstance(value, builtins.int) or abs(value) < 10**30 else "a huge integer"
    return text if len(text) <= 60 else text[:57] + "..."


def _check_length(value: Any, field: str, source: str, limit: int = MAX_LAYERS) -> None:
    """Refuse a layer list or pattern longer than `limit` before looking at its items."""
    if isinstance(value, str | list) and len(value) > limit:
        raise ConfigError(f"{source}: '{field}' has {len(value):,} layers; nemocompile's limit is {limit:,}")


def _no_op_form(value: Any) -> Any:
    """Lists as tuples, and the non-finite floats transformers 5 writes as {"__float__": "Infinity"}."""
    if isinstance(value, list):
        return tuple(_no_op_form(v) for v in value)
    if isinstance(value, dict) and set(value) == {"__float__"} and isinstance(value["__float__"], str):
        try:
            return float(value["__float__"])
        except ValueError:
            return value
    return value


def check_keys(raw: dict[str, Any], source: str) -> tuple[str, ...]:
    """Refuse a misspelled key (one close to a known key) and a field that changes the numerics
    in a way nemocompile does not implement; return the other unknown keys, sorted."""
    unknown = []
    known = [*CONFIG_FIELDS, *LEGACY_NAMES]
    for key in sorted(raw):
        rule = CONFIG_FIELDS.get(LEGACY_NAMES.get(key, key))
        if rule is None:
            close = difflib.get_close_matches(key, known, n=1, cutoff=SUGGESTION_CUTOFF)
            if close:
                raise ConfigError(f"{source}: unknown key '{key}'; did you mean '{close[0]}'?")
            unknown.append(key)
        elif rule.status == REFUSED and _no_op_form(raw[key]) not in rule.no_op:
            accepted = " or ".join(json.dumps(v) for v in rule.no_op)
            raise ConfigError(f"{source}: '{key}' is {json.dumps(raw[key])}, which {rule.why}; nemocompile does not "
                              f"implement that (accepted: {accepted})")
    return tuple(unknown)


def config_from_dict(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type != "nemotron_h":
        raise ConfigError(f"{source}: model_type is {model_type!r}, but nemocompile compiles only 'nemotron_h'")
    unknown_keys = check_keys(raw, source)
    f = _Fields(raw, source)
    raw = f.raw  # with older spellings under their current names
    for field in ("layers_block_type", "hybrid_override_pattern", "mtp_layers_block_type",
                  "mtp_hybrid_override_pattern"):
        _check_length(raw.get(field), field, source)
    if raw.get("layers_block_type") is not None:
        kinds = _kinds_from_list(raw["layers_block_type"], "layers_block_type", source)
    elif raw.get("hybrid_override_pattern") is not None:
        kinds = _kinds_from_pattern(raw["hybrid_override_pattern"], "hybrid_override_pattern", source)
    else:
        raise ConfigError(f"{source}: neither 'layers_block_type' nor 'hybrid_override_pattern' is given")
    if not kinds:
        raise ConfigError(f"{source}: the model has no layers")
    mtp_layers = f.int("num_nextn_predict_layers", 0, minimum=0, maximum=MAX_MTP_LAYERS)
    if raw.get("mtp_layers_block_type") is not None:
        mtp_kinds = _kinds_from_list(raw["mtp_layers_block_type"], "mtp_layers_block_type", source)
    else:
        mtp_kinds = _kinds_from_pattern(raw.get("mtp_hybrid_override_pattern", "*E"),
                                        "mtp_hybrid_override_pattern", source)
    hidden = f.int("hidden_size")
    heads = f.int("num_attention_heads", 32)
    # transformers' defaults; a null num_key_value_heads means one per query head, as there
    kv_heads = heads if "num_key_value_heads" in raw and raw["num_key_value_heads"] is None else None
    config = ModelConfig(
        vocab_size=f.int("vocab_size"),
        hidden_size=hidden,
        layer_kinds=kinds,
        mtp_layer_kinds=mtp_kinds if mtp_layers else (),
        num_nextn_predict_layers=mtp_layers,
        tie_word_embeddings=f.bool("tie_word_embeddings", False),
        layer_norm_epsilon=f.float("layer_norm_epsilon", 1e-5, POSITIVE, below=1.0),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or f.int("num_key_value_heads", 8),
        head_dim=f.int("head_dim", 128),
        attention_bias=f.bool("attention_bias", False),
        intermediate_size=f.int("intermediate_size", 21504),
        mlp_hidden_act=f.str("mlp_hidden_act", "relu2", ("relu2", "silu")),
        mlp_bias=f.bool("mlp_bias", False),
        mamba_num_heads=f.int("mamba_num_heads", 128),
        mamba_head_dim=f.int("mamba_head_dim", 64),
        n_groups=f.int("n_groups", 8),
        ssm_state_size=f.int("ssm_state_size", 128),
        conv_kernel=f.int("conv_kernel", 4),
        chunk_size=f.int("chunk_size", 128),
        use_conv_bias=f.bool("use_conv_bias", True),
        use_bias=f.bool("use_bias", False),
        mamba_hidden_act=f.str("mamba_hidden_act", "silu", ("silu",)),
        time_step_min=f.float("time_step_min", 0.001, NON_NEGATIVE),
        n_routed_experts=f.int("n_routed_experts", 8, maximum=MAX_EXPERTS),
        num_experts_per_tok=f.int("num_experts_per_tok", 2),
        moe_intermediate_size=f.int("moe_intermediate_size", 7688),
        moe_shared_expert_intermediate_size=f.int("moe_shared_expert_intermediate_size", 7688),
        moe_latent_size=f.optional_int("moe_latent_size"),
        n_group=f.int("n_group", 1),
        topk_group=f.int("topk_group", 1),
        norm_topk_prob=f.bool("norm_topk_prob", True),
        routed_scaling_factor=f.float("routed_scaling_factor", 1.0, POSITIVE),
        torch_dtype=f.str("torch_dtype", str(raw.get("dtype", "bfloat16")), ("bfloat16", "float16", "float32")),
        unknown_keys=unknown_keys,
    )
    _check_consistent(config, source)
    return config


def _check_consistent(c: ModelConfig, source: str) -> None:
    problems = []
    if c.num_attention_heads % c.num_key_value_heads:
        problems.append(f"num_attention_heads {c.num_attention_heads} is not a multiple of "
                        f"num_key_value_heads {c.num_key_value_heads}")
    if c.mamba_num_heads % c.n_groups:
        problems.append(f"mamba_num_heads {c.mamba_num_heads} is not a multiple of n_groups {c.n_groups}")
    if c.n_routed_experts % c.n_group:
        problems.append(f"n_routed_experts {c.n_routed_experts} is not a multiple of n_group {c.n_group}")
    if c.topk_group > c.n_group:
        problems.append(f"topk_group {c.topk_group} exceeds n_group {c.n_group}")
    if c.num_experts_per_tok > c.n_routed_experts:
        problems.append(f"num_experts_per_tok {c.num_experts_per_tok} exceeds n_routed_experts")
    if "moe" in c.layer_kinds and c.n_routed_experts // c.n_group < 2:
        problems.append("each expert group needs at least 2 experts (group scores sum the top 2)")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


# A released config.json is a few kilobytes; past this it is not a config (or /dev/zero).
CONFIG_MAX_BYTES = 16 * MIB


def load_config(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Read config.json from a file or a checkpoint directory; returns the typed config and the raw JSON."""
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.exists():
        raise ConfigError(f"{config_path} does not exist; a Nemotron-H checkpoint directory needs config.json")
    try:
        raw = json.loads(read_regular_text(config_path, "config", ConfigError, CONFIG_MAX_BYTES))
    except (ValueError, UnicodeDecodeError, ConfigError) as error:  # JSONDecodeError, and integers past Python's digit limit
        if config_path.suffix != ".json" and config_path.is_file():  # e.g. model.safetensors: say what to pass
            raise ConfigError(f"{config_path} is not a config.json; pass a checkpoint directory or its "
                              f"config.json") from None
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{config_path} is not valid JSON ({str(error)[:200]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path} must hold a JSON object")
    return config_from_dict(raw, str(config_path)), raw
