"""Op declarations: the model blocks as imported, and the core ops they decompose into.
Shapes use symbolic dims: `batch`, `seq` (tokens in this call), `ctx` (cached tokens),
`routed` (token-expert pairs after MoE dispatch)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from nemocompile.base.errors import IRError

from .ir import Attrs
from .opdef import define, dims_agree, require
from .types import F32, I64, Dim, TensorType, dtype_named

Types = Sequence[TensorType | None]


def _same_as_first(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    return (require(types, 0),)


def _last_dim(t: TensorType, what: str, expected: int | str) -> None:
    if not dims_agree(t.shape[-1], expected):
        raise IRError(f"{what} has last dim {t.shape[-1]}, expected {expected}")


def _with_last(t: TensorType, dim: int | str) -> TensorType:
    return t.with_(shape=(*t.shape[:-1], dim))


# ---------------------------------------------------------------- core ops used at every level


def _infer_embedding(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    ids, table = require(types, 0), require(types, 1)
    if ids.dtype.is_float:
        raise IRError(f"embedding ids must be integers, got {ids.dtype}")
    if table.rank != 2:
        raise IRError(f"embedding table must be [vocab, hidden], got {table}")
    return (TensorType(table.dtype, (*ids.shape, table.shape[1])),)


define("embedding", "core", ["ids:index", "table:weight"], ["out"], infer=_infer_embedding,
       doc="out[b, s] = table[ids[b, s]]")


def _infer_rms_norm(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    x, weight = require(types, 0), require(types, 1)
    _last_dim(x, "rms_norm input", weight.shape[0])
    return (x,)


define("rms_norm", "core", ["x", "weight:weight"], ["out"], [("eps", "float")], infer=_infer_rms_norm,
       doc="x / rms(x) * weight over the last dim, computed in fp32, result in x's dtype")


def _matmul_result(x: TensorType, weight: TensorType, attrs: Attrs, what: str) -> TensorType:
    """The GEMM's result type before its last dim is set: x's dtype, or `out_dtype` when x is an
    activation that a `quantize` op quantized (its format then is the weight's)."""
    out_dtype = attrs.get("out_dtype")
    if x.dtype.name == "fp8e4m3":
        raise IRError(f"{what} input is E4M3 codes {x}, which carry no scale; a quant_linear with their "
                      "input_scale reads them")
    if x.dtype.name == "nvfp4codes":
        raise IRError(f"{what} input is NVFP4 codes {x} (E2M1 codes and E4M3 block scales), which carry no global "
                      "scale; a quant_linear with act_format nvfp4 and their input_scale reads them")
    if x.dtype.quantized:
        if x.dtype != weight.dtype:
            raise IRError(f"{what} input is quantized to {x.dtype} but its weight is {weight.dtype}")
        if not isinstance(out_dtype, str):
            raise IRError(f"{what} of a quantized input needs out_dtype, the float dtype of its result")
        result = dtype_named(out_dtype)
        if not result.is_float or result.quantized:
            raise IRError(f"{what} out_dtype must be a float dtype, got {out_dtype}")
        return x.with_(dtype=result)
    if out_dtype is not None:
        raise IRError(f"{what} takes out_dtype only for a quantized input; its input is {x.dtype}")
    if not weight.dtype.quantized and x.dtype != weight.dtype:
        raise IRError(f"{what} input is {x.dtype} but its weight is {weight.dtype}")
    return x


def _infer_linear(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    x, weight = require(types, 0), require(types, 1)
    if weight.rank != 2:
        raise IRError(f"linear weight must be 2-D, got {weight}")
    result = _matmul_result(x, weight, attrs, "linear")
    _last_dim(x, "linear input", weight.shape[1])
    bias = types[2]
    if bias is not None and not dims_agree(bias.shape[0], weight.shape[0]):
        raise IRError(f"linear bias {bias} does not match weight {weight}")
    return (_with_last(result, weight.shape[0]),)


define("linear", "core", ["x", "weight:weight", "bias?:bias"], ["out"], [("out_dtype", "dtype?")],
       infer=_infer_linear,
       doc="x @ weight^T + bias; weight [out, in]. A quantized weight is dequantized and multiplied in fp32; "
           "an input quantized by `quantize` (same format as the weight) gives a result in out_dtype")

QUANTIZE_FORMATS = ("nvfp4", "fp8")


def _infer_quantize(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    x, scale, offsets = require(types, 0), require(types, 1), types[2]
    fmt = attrs.str("format")
    if fmt not in QUANTIZE_FORMATS:
        raise IRError(f"quantize format {fmt!r} is not one of {', '.join(QUANTIZE_FORMATS)}")
    if not x.dtype.is_float or x.dtype.quantized:
        raise IRError(f"quantize input must be a float activation, got {x}")
    if scale.dtype != F32 or scale.rank != (0 if offsets is None else 1):
        raise IRError(f"quantize input_scale must be an f32 {'scalar' if offsets is None else '[experts] vector'}, "
                      f"got {scale}")
    block = dtype_named(fmt).block_size
    if block and isinstance(x.shape[-1], int) and x.shape[-1] % block:
        raise IRError(f"quantize to {fmt} needs a last dim divisible by {block}, got {x}")
    return (x.with_(dtype=dtype_named(fmt)),)


define("quantize", "core", ["x", "input_scale:scale", "offsets?:index"], ["out"], [("format", "str")],
       infer=_infer_quantize,
       doc="x quantized to format with the static scale input_scale (NVFP4: dynamic E4M3 scale per block of 16, "
           "global scale input_scale; FP8: per-tensor scale). With offsets (rows grouped by expert, as "
           "moe_dispatch sorts them), rows of expert e use input_scale[e]")


def _infer_quantize_dynamic(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    x = require(types, 0)
    fmt = attrs.str("format")
    if fmt not in QUANTIZE_FORMATS:
        raise IRError(f"quantize_dynamic format {fmt!r} is not one of {', '.join(QUANTIZE_FORMATS)}")
    if not x.dtype.is_float or x.dtype.quantized:
        raise IRError(f"quantize_dynamic input must be a float activation, got {x}")
    block = dtype_named(fmt).block_size
    if block and isinstance(x.shape[-1], int) and x.shape[-1] % block:
        raise IRError(f"quantize_dynamic to {fmt} needs a last dim divisible by {block}, got {x}")
    return (x.with_(dtype=dtype_named(fmt)),)


define("quantize_dynamic", "core", ["x", "offsets?:index"], ["out"], [("format", "str")],
       infer=_infer_quantize_dynamic,
       doc="x quantized to format with scales computed from x itself on every call, no calibration: FP8 one "
           "scale per token (row amax / 448), NVFP4 one global scale per tensor (amax / (6 * 448)) and the "
           "dynamic E4M3 scale per block of 16. With offsets (rows grouped by expert), each expert's rows "
           "are one tensor. An all-zero row (FP8) or tensor (NVFP4) takes the format's element maximum as amax")


def _infer_add(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    a, b = require(types, 0), require(types, 1)
    if a.rank != b.rank or not all(dims_agree(x, y) for x, y in zip(a.shape, b.shape, strict=True)):
        raise IRError(f"add of mismatched shapes {a} and {b}")
    return (a,)


define("add", "core", ["a", "b"], ["out"], infer=_infer_add, doc="a + b, result in a's dtype")


def _infer_cast(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    return (require(types, 0).with_(dtype=dtype_named(attrs.str("dtype"))),)


define("cast", "core", ["x"], ["out"], [("dtype", "dtype")], infer=_infer_cast,
       doc="x converted to dtype (round to nearest even)")

ACTIVATIONS = ("relu2", "silu")


def _verify_activation(types: Types, attrs: Attrs) -> str | None:
    kind = attrs.str("kind")
    return None if kind in ACTIVATIONS else f"activation kind {kind!r} is not one of {ACTIVATIONS}"


define("activation", "core", ["x"], ["out"], [("kind", "str")], infer=_same_as_first,
       verify=_verify_activation, doc="relu2: relu(x)^2; silu: x * sigmoid(x)")


def _infer_split(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    x = require(types, 0)
    sizes = attrs.ints("sizes")
    if isinstance(x.shape[-1], int) and sum(sizes) != x.shape[-1]:
        raise IRError(f"split sizes {list(sizes)} do not sum to the last dim of {x}")
    return tuple(_with_last(x, size) for size in sizes)


define("split", "core", ["x"], ["*"], [("sizes", "ints")], infer=_infer_split,
       doc="split the last dim into pieces of the given sizes")

# ---------------------------------------------------------------- Mamba2 core ops


def _infer_gated_rms_norm(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    x, gate, weight = require(types, 0), require(types, 1), require(types, 2)
    _last_dim(gate, "gated_rms_norm gate", x.shape[-1])
    _last_dim(x, "gated_rms_norm input", weight.shape[0])
    return (x,)


define("gated_rms_norm", "core", ["x", "gate", "weight:weight"], ["out"], [("group_size", "int"), ("eps", "float")],
       infer=_infer_gated_rms_norm, doc="rms-normalise x * silu(gate) per group, times weight")


def _infer_conv(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    x, weight, state = require(types, 0), require(types, 1), require(types, 3)
    _last_dim(x, "causal_conv1d input", weight.shape[0])
    if state.rank != 3 or not dims_agree(state.shape[1], weight.shape[0]) or \
            not dims_agree(state.shape[2], weight.shape[-1] - 1 if isinstance(weight.shape[-1], int) else "k"):
        raise IRError(f"causal_conv1d state {state} must be [batch, channels, kernel - 1] for weight {weight}")
    return (x, state)


def _verify_seq_lens(types: Types, index: int) -> str | None:
    """The optional `seq_lens` operand: how many of the seq new tokens of each sequence are real (the
    rest is right padding, which must leave the state as it was)."""
    lens = types[index] if index < len(types) else None
    if lens is not None and (lens.dtype.is_float or lens.rank != 1):
        return f"seq_lens {lens} must be integer [batch]"
    return None


def _verify_conv(types: Types, attrs: Attrs) -> str | None:
    return _verify_seq_lens(types, 4)


define("causal_conv1d", "core", ["x", "weight:weight", "bias?:bias", "conv_state:state", "seq_lens?:index"],
       ["out", "conv_state_out"], [("activation", "str?")], infer=_infer_conv,
       verify=_verify_conv,
       doc="depthwise causal conv over seq, channels last; continues from the conv window and returns the new "
           "one, taken after the first seq_lens[b] tokens of sequence b when seq_lens is given")

_SSD_OPERANDS = ["x", "dt", "A_log:weight", "B", "C", "D:weight", "dt_bias:bias", "ssm_state:state",
                 "seq_lens?:index"]
_SSD_ATTRS = [("num_heads", "int"), ("head_dim", "int"), ("n_groups", "int"), ("state_size", "int"),
              ("dt_min", "float"), ("dt_max", "float")]


def _verify_ssd(types: Types, attrs: Attrs) -> str | None:
    x, dt, b = require(types, 0), require(types, 1), require(types, 3)
    heads, head_dim = attrs.int("num_heads"), attrs.int("head_dim")
    groups, state = attrs.int("n_groups"), attrs.int("state_size")
    if not dims_agree(x.shape[-1], heads * head_dim):
        return f"x has {x.shape[-1]} channels, expected num_heads * head_dim = {heads * head_dim}"
    if not dims_agree(dt.shape[-1], heads):
        return f"dt has {dt.shape[-1]} channels, expected num_heads = {heads}"
    if not dims_agree(b.shape[-1], groups * state):
        return f"B has {b.shape[-1]} channels, expected n_groups * state_size = {groups * state}"
    if heads % groups:
        return f"num_heads {heads} is not a multiple of n_groups {groups}"
    state_type = require(types, 7)
    expected: tuple[Dim, ...] = ("batch", heads, head_dim, state)
    if state_type.rank != 4 or not all(dims_agree(a, e) for a, e in zip(state_type.shape, expected, strict=True)):
        return f"ssm_state {state_type} must be [batch, {heads}, {head_dim}, {state}]"
    return _verify_seq_lens(types, 8)


def _infer_ssd_chunk(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    # The chunked scan accumulates in fp32 and returns fp32 (as transformers' torch path does).
    return (require(types, 0).with_(dtype=F32), require(types, 7))


def _infer_ssd_step(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    return (require(types, 0), require(types, 7))


define("ssd_chunk_scan", "core", _SSD_OPERANDS, ["y", "ssm_state_out"], [*_SSD_ATTRS, ("chunk_size", "int")],
       infer=_infer_ssd_chunk, verify=_verify_ssd,
       doc="Mamba2 SSD over a whole sequence in chunks; continues from the SSM state and returns the new one; "
           "tokens of sequence b from seq_lens[b] on (right padding) leave the state unchanged")
define("ssd_state_update", "core", _SSD_OPERANDS, ["y", "ssm_state_out"], _SSD_ATTRS, infer=_infer_ssd_step,
       verify=_verify_ssd,
       doc="one Mamba2 recurrence step (seq == 1): state = exp(dt*A) state + dt B x; y = C state + D x; a "
           "sequence with seq_lens[b] = 0 keeps its state")

# ---------------------------------------------------------------- attention


# The element dtype of an FP8 KV cache: the raw E4M3 code (its scale is an operand).
FP8_CACHE_DTYPE = "fp8e4m3"


def _verify_gqa(types: Types, attrs: Attrs) -> str | None:
    q, k = require(types, 0), require(types, 1)
    k_cache, lens = require(types, 3), require(types, 5)
    if k_cache.rank != 4 or not dims_agree(k_cache.shape[1], attrs.int("num_kv_heads")) or \
            not dims_agree(k_cache.shape[3], attrs.int("head_dim")):
        return f"k_cache {k_cache} must be [batch, num_kv_heads, ctx, head_dim]"
    if require(types, 4) != k_cache:
        return f"v_cache {require(types, 4)} differs from k_cache {k_cache}"
    if lens.dtype.is_float or lens.rank != 1:
        return f"cache_lens {lens} must be integer [batch]"
    scales = [types[index] if index < len(types) else None for index in (6, 7)]
    coded = k_cache.dtype.name == FP8_CACHE_DTYPE
    if coded and any(s is None or s.dtype != F32 or s.rank != 0 for s in scales):
        return f"an FP8 cache {k_cache} needs fp32 scalar k_scale and v_scale"
    if not coded and any(s is not None for s in scales):
        return f"k_scale and v_scale belong to an FP8 cache, not {k_cache}"
    heads, kv_heads, head_dim = attrs.int("num_heads"), attrs.int("num_kv_heads"), attrs.int("head_dim")
    if heads % kv_heads:
        return f"num_heads {heads} is not a multiple of num_kv_heads {kv_heads}"
    if not dims_agree(q.shape[-1], heads * head_dim):
        return f"q has {q.shape[-1]} channels, expected {heads * head_dim}"
    if not dims_agree(k.shape[-1], kv_heads * head_dim):
        return f"k has {k.shape[-1]} channels, expected {kv_heads * head_dim}"
    return None


def _infer_gqa(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    return (require(types, 0), require(types, 3), require(types, 4))


define("attention_gqa", "core", ["q", "k", "v", "k_cache:state", "v_cache:state", "cache_lens:index",
                                 "k_scale?:scale", "v_scale?:scale"],
       ["out", "k_cache_out", "v_cache_out"],
       [("num_heads", "int"), ("num_kv_heads", "int"), ("head_dim", "int"), ("scale", "float")],
       infer=_infer_gqa, verify=_verify_gqa,
       doc="causal grouped-query attention: sequence b writes its keys/values at positions cache_lens[b].. of "
           "the preallocated caches and attends to positions 0..cache_lens[b]+t; an FP8 (E4M3) cache takes fp32 "
           "scales k_scale, v_scale: a key is stored as E4M3(clamp(k / k_scale, +-448)) and read as code * k_scale")

# ---------------------------------------------------------------- mixture of experts


def _infer_router(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    x, weight = require(types, 0), require(types, 1)
    _last_dim(x, "moe_router input", weight.shape[1])
    shape = (*x.shape[:-1], attrs.int("top_k"))
    return (TensorType(F32, shape), TensorType(I64, shape))


def _verify_router(types: Types, attrs: Attrs) -> str | None:
    weight = require(types, 1)
    experts, groups = weight.shape[0], attrs.int("n_group")
    if isinstance(experts, int) and experts % groups:
        return f"{experts} experts do not split into n_group = {groups} groups"
    if attrs.int("topk_group") > groups:
        return f"topk_group {attrs.int('topk_group')} exceeds n_group {groups}"
    if isinstance(experts, int) and attrs.int("top_k") > experts:
        return f"top_k {attrs.int('top_k')} exceeds the {experts} experts"
    return None


define("moe_router", "core", ["x", "weight:weight", "bias:bias"], ["weights", "ids"],
       [("top_k", "int"), ("n_group", "int"), ("topk_group", "int"), ("norm_topk_prob", "bool"),
        ("routed_scaling_factor", "float")],
       infer=_infer_router, verify=_verify_router,
       doc="sigmoid scores; group-limited top-k on score + bias; weights normalised and scaled (fp32)")


def _infer_dispatch(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    x = require(types, 0)
    experts = attrs.int("num_experts")
    return (TensorType(x.dtype, ("routed", x.shape[-1])), TensorType(I64, (experts + 1,)),
            TensorType(I64, ("routed",)))


define("moe_dispatch", "core", ["x", "ids:index"], ["x_sorted", "offsets", "order"], [("num_experts", "int")],
       infer=_infer_dispatch, doc="token copies sorted by expert; expert e owns rows offsets[e]:offsets[e+1]")


def _infer_grouped_gemm(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    x, weight = require(types, 0), require(types, 2)
    if weight.rank != 3:
        raise IRError(f"grouped_gemm weight must be [experts, out, in], got {weight}")
    result = _matmul_result(x, weight, attrs, "grouped_gemm")
    _last_dim(x, "grouped_gemm input", weight.shape[2])
    return (_with_last(result, weight.shape[1]),)


define("grouped_gemm", "core", ["x", "offsets:index", "weight:weight"], ["out"], [("out_dtype", "dtype?")],
       infer=_infer_grouped_gemm,
       doc="rows of expert e times weight[e]^T; quantized weights and inputs as for linear")


def _infer_combine(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    y, weights = require(types, 0), require(types, 2)
    return (TensorType(y.dtype, (*weights.shape[:-1], y.shape[-1])),)


define("moe_combine", "core", ["y", "order:index", "weights"], ["out"], infer=_infer_combine,
       doc="out[token] = sum over its k experts of weight * expert output (fp32 accumulation)")

# ---------------------------------------------------------------- blocks, as imported


def _infer_block(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    x = require(types, 0)
    return (x,)


def _block_with_state(*state_indices: int) -> Callable[[Types, Attrs], tuple[TensorType, ...]]:
    """A block returns its output and the new content of each state it reads."""
    def infer(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
        return (require(types, 0), *(require(types, i) for i in state_indices))
    return infer


define("mamba2_mixer", "block",
       ["x", "in_proj:weight", "conv_weight:weight", "conv_bias?:bias", "dt_bias:bias", "A_log:weight", "D:weight",
        "norm_weight:weight", "out_proj:weight", "in_proj_bias?:bias", "out_proj_bias?:bias",
        "conv_state:state", "ssm_state:state", "seq_lens?:index"],
       ["out", "conv_state_out", "ssm_state_out"],
       [("num_heads", "int"), ("head_dim", "int"), ("n_groups", "int"), ("state_size", "int"),
        ("conv_kernel", "int"), ("chunk_size", "int"), ("eps", "float"), ("dt_min", "float"),
        ("dt_max", "float"), ("activation", "str")],
       infer=_block_with_state(11, 12),
       doc="Mamba2 mixer: in_proj -> conv1d -> SSD -> gated RMS norm -> out_proj")
define("attention", "block",
       ["x", "q_proj:weight", "k_proj:weight", "v_proj:weight", "o_proj:weight", "k_cache:state", "v_cache:state",
        "cache_lens:index"],
       ["out", "k_cache_out", "v_cache_out"],
       [("num_heads", "int"), ("num_kv_heads", "int"), ("head_dim", "int"), ("scale", "float")],
       infer=_block_with_state(5, 6), doc="GQA self-attention without positional encoding")
define("mlp", "block", ["x", "up_proj:weight", "down_proj:weight", "up_bias?:bias", "down_bias?:bias"], ["out"], [("activation", "str")],
       infer=_infer_block, doc="down(act(up(x)))")
define("moe", "block",
       ["x", "router_weight:weight", "router_bias:bias", "experts_up:weight", "experts_down:weight",
        "shared_up:weight", "shared_down:weight", "fc1_latent?:weight", "fc2_latent?:weight",
        "shared_up_bias?:bias", "shared_down_bias?:bias", "fc1_latent_bias?:bias", "fc2_latent_bias?:bias"],
       ["out"],
       [("top_k", "int"), ("n_group", "int"), ("topk_group", "int"), ("norm_topk_prob", "bool"),
        ("routed_scaling_factor", "float"), ("activation", "str")],
       infer=_infer_block,
       doc="routed experts (optionally in a latent space) plus a shared expert")

# The fused ops the fusion passes create are declared in their own file; importing it here
# registers them with the rest (everything that looks ops up imports this module).
from . import comm_ops as _comm_ops  # noqa: E402, F401
from . import fused_ops as _fused_ops  # noqa: E402, F401
