"""The kernel templates this codegen knows, as data (see spec.KernelTemplate), and helpers that
specialise them for one op's shapes and formats."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from nemocompile.base.errors import IRError
from nemocompile.base.formats import FORMATS

from .spec import Constexpr, KernelInstance, KernelTemplate, instance

MOE_NVFP4_GEMM = KernelTemplate(
    module="moe_gemm", entry="moe_nvfp4_gemm", imports=("numerics", "quant_math"),
    params=(("x_ptr", "*dtype"), ("order_ptr", "*i64"), ("tile_starts_ptr", "*i32"), ("offsets_ptr", "*i64"),
            ("weight_ptr", "*u8"), ("block_scale_ptr", "*fp8e4nv"), ("global_scale_ptr", "*fp32"),
            ("input_scale_ptr", "*fp32"), ("routing_ptr", "*fp32"), ("out_ptr", "*dtype"), ("workspace_ptr", "*fp32"),
            ("bias_ptr", "*dtype"), ("x_scale_ptr", "*fp8e4nv"), ("rows", "i32")),
    constexprs=("N", "K", "NUM_EXPERTS", "TOP_K", "GATHER", "ACTIVATION", "COMBINE", "ACT_FORMAT",
                "BLOCK_M", "BLOCK_N", "BLOCK_K", "SWAP_AB", "SPLIT_K", "DENSE", "HAS_BIAS", "INTERPRET"),
    aligned=("x_ptr", "weight_ptr", "block_scale_ptr", "out_ptr"),
)
# The second launch of a split-K moe_nvfp4_gemm: sums the K slices' partials, applies the epilogue.
MOE_NVFP4_GEMM_REDUCE = KernelTemplate(
    module="moe_gemm", entry="moe_nvfp4_gemm_reduce", imports=("numerics", "quant_math"),
    params=(("workspace_ptr", "*fp32"), ("x_ptr", "*dtype"), ("order_ptr", "*i64"), ("tile_starts_ptr", "*i32"),
            ("offsets_ptr", "*i64"), ("global_scale_ptr", "*fp32"), ("input_scale_ptr", "*fp32"),
            ("routing_ptr", "*fp32"), ("out_ptr", "*dtype"), ("bias_ptr", "*dtype"), ("rows", "i32")),
    constexprs=("N", "NUM_EXPERTS", "ACTIVATION", "COMBINE", "ACT_FORMAT", "BLOCK_M", "BLOCK_N", "SPLIT_K",
                "DENSE", "HAS_BIAS", "INTERPRET"),
    aligned=("workspace_ptr", "out_ptr"),
)
# tl.dot_scaled with E4M3 block-16 scales: tcgen05 kind::mxf4nvf4 exists on sm_100a only
MOE_NVFP4_W4A4_ARCHS = ("sm_100",)

MOE_COMBINE_ROWS = KernelTemplate(
    module="moe_gemm", entry="moe_combine_rows", imports=("numerics", "quant_math"),
    params=(("pairs_ptr", "*fp32"), ("out_ptr", "*dtype")),
    constexprs=("N", "TOP_K", "BLOCK_N", "INTERPRET"),
    aligned=("pairs_ptr", "out_ptr"),
)

FP8_LINEAR = KernelTemplate(
    module="fp8_gemm", entry="fp8_linear", imports=("numerics", "quant_math"),
    params=(("x_ptr", "*dtype"), ("input_scale_ptr", "*fp32"), ("weight_ptr", "*fp8e4nv"),
            ("weight_scale_ptr", "*fp32"), ("bias_ptr", "*dtype"), ("out_ptr", "*dtype"), ("workspace_ptr", "*fp32"),
            ("rows", "i32")),
    constexprs=("N", "K", "QUANT_ACT", "PER_CHANNEL", "HAS_BIAS", "BLOCK_M", "BLOCK_N", "BLOCK_K", "SWAP_AB",
                "SPLIT_K", "INTERPRET"),
    aligned=("x_ptr", "weight_ptr", "out_ptr"),
)
FP8_LINEAR_REDUCE = KernelTemplate(
    module="fp8_gemm", entry="fp8_linear_reduce", imports=("numerics", "quant_math"),
    params=(("workspace_ptr", "*fp32"), ("input_scale_ptr", "*fp32"), ("weight_scale_ptr", "*fp32"),
            ("bias_ptr", "*dtype"), ("out_ptr", "*dtype"), ("rows", "i32")),
    constexprs=("N", "QUANT_ACT", "PER_CHANNEL", "HAS_BIAS", "BLOCK_M", "BLOCK_N", "SPLIT_K", "INTERPRET"),
    aligned=("workspace_ptr", "out_ptr"),
)

# The grouped GEMM of FP8 E4M3 experts (W8A8, or W8A16): moe_gemm's schedule and epilogue around
# fp8_gemm's K loop; no split-K (templates/moe_fp8_gemm.py says why).
MOE_FP8_GEMM = KernelTemplate(
    module="moe_fp8_gemm", entry="moe_fp8_gemm", imports=("numerics", "quant_math", "fp8_gemm", "moe_gemm"),
    params=(("x_ptr", "*dtype"), ("order_ptr", "*i64"), ("tile_starts_ptr", "*i32"), ("offsets_ptr", "*i64"),
            ("weight_ptr", "*fp8e4nv"), ("weight_scale_ptr", "*fp32"), ("input_scale_ptr", "*fp32"),
            ("routing_ptr", "*fp32"), ("out_ptr", "*dtype"), ("scale_expert_stride", "i32"),
            ("scale_column_stride", "i32")),
    constexprs=("N", "K", "NUM_EXPERTS", "TOP_K", "GATHER", "ACTIVATION", "COMBINE", "QUANT_ACT", "BLOCK_M",
                "BLOCK_N", "BLOCK_K", "SWAP_AB", "INTERPRET"),
    aligned=("x_ptr", "weight_ptr", "out_ptr"),
)

# The norm, Mamba, attention and router templates (docs/triton-codegen.md).
NVFP4_BLOCK = FORMATS["nvfp4"].block
ADD_RMS_NORM = KernelTemplate(
    module="norms", entry="add_rms_norm", imports=("numerics", "quant_math"),
    params=(("x_ptr", "*dtype"), ("residual_ptr", "*dtype"), ("weight_ptr", "*dtype"), ("out_ptr", "*dtype"),
            ("residual_out_ptr", "*dtype"), ("input_scale_ptr", "*fp32"), ("block_scale_ptr", "*fp8e4nv"),
            ("eps", "fp32")),
    constexprs=("WIDTH", "HAS_RESIDUAL", "ACT_FORMAT", "BLOCK_D", "INTERPRET"),
)
GATED_RMS_NORM = KernelTemplate(
    module="norms", entry="gated_rms_norm", imports=("numerics", "quant_math"),
    params=(("x_ptr", "*dtype"), ("gate_ptr", "*dtype"), ("weight_ptr", "*dtype"), ("out_ptr", "*dtype"),
            ("eps", "fp32")),
    constexprs=("WIDTH", "GROUP_SIZE", "HAS_GATE", "BLOCK_G", "INTERPRET"),
)
CAUSAL_CONV1D = KernelTemplate(
    module="conv1d", entry="causal_conv1d", imports=("numerics",),
    params=(("x_ptr", "*dtype"), ("weight_ptr", "*dtype"), ("bias_ptr", "*dtype"), ("state_ptr", "*dtype"),
            ("out_ptr", "*dtype"), ("new_state_ptr", "*dtype"), ("seq_lens_ptr", "*i64"), ("length", "i32"),
            ("channels", "i32")),
    constexprs=("KERNEL", "HAS_BIAS", "HAS_STATE", "SILU", "HAS_SEQ_LENS", "BLOCK_T", "BLOCK_C", "INTERPRET"),
)
_SSD_PARAMS = (("x_ptr", "*dtype"), ("dt_ptr", "*dtype"), ("a_log_ptr", "*dtype"), ("b_ptr", "*dtype"),
               ("c_ptr", "*dtype"), ("d_ptr", "*dtype"), ("dt_bias_ptr", "*dtype"))
_SSD_SIZES = (("num_heads", "i32"), ("head_dim", "i32"), ("n_groups", "i32"), ("state_size", "i32"),
              ("dt_min", "fp32"), ("dt_max", "fp32"))
SSD_CHUNK_SCAN = KernelTemplate(
    module="ssd", entry="ssd_chunk_scan", imports=("numerics",),
    params=(*_SSD_PARAMS, ("init_ptr", "*dtype"), ("y_ptr", "*fp32"), ("final_ptr", "*fp32"),
            ("seq_lens_ptr", "*i64"), ("length", "i32"), *_SSD_SIZES),
    constexprs=("HAS_INIT", "HAS_SEQ_LENS", "CHUNK", "BLOCK_P", "BLOCK_N", "INTERPRET"),
)
SSD_STATE_UPDATE = KernelTemplate(
    module="ssd", entry="ssd_state_update", imports=("numerics",),
    params=(*_SSD_PARAMS, ("state_ptr", "*dtype"), ("y_ptr", "*dtype"), ("new_state_ptr", "*fp32"),
            ("seq_lens_ptr", "*i64"), *_SSD_SIZES),
    constexprs=("HAS_SEQ_LENS", "BLOCK_P", "BLOCK_N", "INTERPRET"),
)
KV_CACHE_WRITE = KernelTemplate(
    module="attention", entry="kv_cache_write", imports=("numerics", "quant_math"),
    params=(("k_ptr", "*dtype"), ("v_ptr", "*dtype"), ("k_cache_ptr", "*dtype"), ("v_cache_ptr", "*dtype"),
            ("lens_ptr", "*i64"), ("k_scale_ptr", "*fp32"), ("v_scale_ptr", "*fp32"), ("length", "i32"), ("num_kv_heads", "i32"), ("head_dim", "i32"),
            ("capacity", "i32")),
    constexprs=("BLOCK_D", "INTERPRET"),
)
ATTENTION_GQA = KernelTemplate(
    module="attention", entry="attention_gqa", imports=("numerics", "quant_math"),
    params=(("q_ptr", "*dtype"), ("k_cache_ptr", "*dtype"), ("v_cache_ptr", "*dtype"), ("lens_ptr", "*i64"),
            ("out_ptr", "*dtype"), ("k_scale_ptr", "*fp32"), ("v_scale_ptr", "*fp32"), ("length", "i32"), ("num_heads", "i32"), ("num_kv_heads", "i32"),
            ("head_dim", "i32"), ("capacity", "i32"), ("scale", "fp32")),
    constexprs=("BLOCK_M", "BLOCK_N", "BLOCK_D", "EXACT", "INTERPRET"),
)
MOE_ROUTER = KernelTemplate(
    module="moe_route", entry="moe_router",
    params=(("x_ptr", "*dtype"), ("weight_ptr", "*dtype"), ("bias_ptr", "*dtype"), ("weights_out_ptr", "*fp32"),
            ("ids_out_ptr", "*i64"), ("num_tokens", "i32"), ("hidden", "i32"), ("num_experts", "i32"),
            ("scaling", "fp32")),
    constexprs=("HAS_BIAS", "TOP_K", "N_GROUP", "TOPK_GROUP", "NORM_TOPK", "BLOCK_T", "BLOCK_E", "BLOCK_K",
                "BLOCK_SLOTS", "BLOCK_G"),
)
MOE_PERMUTATION = KernelTemplate(
    module="moe_route", entry="moe_permutation",
    params=(("ids_ptr", "*i64"), ("offsets_ptr", "*i64"), ("order_ptr", "*i64"), ("num_pairs", "i32"),
            ("num_experts", "i32")),
    constexprs=("BLOCK_PAIRS", "BLOCK_E"),
)

TEMPLATES = {t.entry: t for t in (MOE_NVFP4_GEMM, MOE_NVFP4_GEMM_REDUCE, MOE_COMBINE_ROWS, FP8_LINEAR,
                                  FP8_LINEAR_REDUCE, MOE_FP8_GEMM, ADD_RMS_NORM, GATED_RMS_NORM,
                                  CAUSAL_CONV1D, SSD_CHUNK_SCAN, SSD_STATE_UPDATE, KV_CACHE_WRITE, ATTENTION_GQA,
                                  MOE_ROUTER, MOE_PERMUTATION)}
__all__ = ["TEMPLATES", "KernelInstance", "add_rms_norm", "attention_gqa", "causal_conv1d", "fp8_linear",
           "gated_rms_norm", "moe_combine", "moe_fp8_gemm", "moe_gemm", "moe_route", "nvfp4_linear", "ssd_chunk_scan",
           "ssd_state_update"]

# Tile configurations an autotuner may try (graph/kernels.py carries the same spaces for the tuner).
MOE_CONFIG_SPACE: dict[str, tuple[Constexpr, ...]] = {
    "BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (64, 128), "BLOCK_K": (64, 128), "SWAP_AB": (True, False),
    "num_warps": (4, 8), "num_stages": (2, 3, 4)}
FP8_CONFIG_SPACE: dict[str, tuple[Constexpr, ...]] = {
    "BLOCK_M": (16, 64, 128), "BLOCK_N": (64, 128), "BLOCK_K": (64, 128), "SWAP_AB": (True, False),
    "num_warps": (4, 8), "num_stages": (2, 3, 4)}


MMA_K = 16  # the K step of a 16-bit tensor-core instruction: BLOCK_K must be a multiple of it
W4A4_BLOCK_K = 64  # tl.dot_scaled steps K by 64 at least (Triton 3.9, sm_100a)


def _check_tiles(name: str, k: int, block_k: int, act_format: str = "") -> None:
    """BLOCK_K must be a multiple of 16 (of 64 for W4A4); it need not divide K (the templates mask
    the last K step). An NVFP4 weight's K is a multiple of its 16-element block."""
    if block_k % MMA_K or block_k <= 0:
        raise IRError(f"kernel {name}: BLOCK_K {block_k} must be a positive multiple of {MMA_K}")
    if act_format == "nvfp4" and block_k % W4A4_BLOCK_K:
        raise IRError(f"kernel {name}: BLOCK_K {block_k} must be a multiple of {W4A4_BLOCK_K} for tl.dot_scaled (W4A4)")
    if act_format and k % NVFP4_BLOCK:
        raise IRError(f"kernel {name}: K = {k} is not a multiple of the NVFP4 block ({NVFP4_BLOCK})")


def moe_gemm(name: str, op: str, *, n: int, k: int, experts: int, top_k: int, act_format: str,
             activation: str = "none", gather: bool = False, combine: bool = False, x_dtype: str = "bf16",
             out_dtype: str = "bf16", block_m: int = 16, block_n: int = 64, block_k: int = 128,
             swap_ab: bool | None = None, num_warps: int = 4, num_stages: int = 3,
             split_k: int = 1, dense: bool = False, has_bias: bool = False) -> KernelInstance:
    """One grouped NVFP4 GEMM: act_format "bf16" (W4A16) or "nvfp4" (W4A4). split_k > 1 needs its
    reduce kernel after it (split_k_reduce). dense: the DENSE mode (nvfp4_linear)."""
    _check_tiles(name, k, block_k, act_format)
    if dense and (experts != 1 or gather or combine or activation != "none"):
        raise IRError(f"kernel {name}: a dense NVFP4 GEMM has one weight and no gather, combine or activation")
    if has_bias and not dense:
        raise IRError(f"kernel {name}: only the dense NVFP4 GEMM adds a bias")
    swap = (act_format == "bf16" and block_m < 64) if swap_ab is None else swap_ab
    template = MOE_NVFP4_GEMM if act_format == "bf16" else replace(MOE_NVFP4_GEMM, archs=MOE_NVFP4_W4A4_ARCHS)
    out = "fp32" if combine else out_dtype
    return instance(name, op, template, {
        "N": n, "K": k, "NUM_EXPERTS": experts, "TOP_K": top_k, "GATHER": gather, "ACTIVATION": activation,
        "COMBINE": combine, "ACT_FORMAT": act_format, "BLOCK_M": block_m, "BLOCK_N": block_n,
        "BLOCK_K": block_k, "SWAP_AB": swap, "SPLIT_K": split_k, "DENSE": dense, "HAS_BIAS": has_bias,
        "INTERPRET": False},
        {"x_ptr": x_dtype, "out_ptr": out, "bias_ptr": out}, num_warps, num_stages)


def nvfp4_linear(name: str, op: str, *, n: int, k: int, act_format: str, has_bias: bool = False,
                 x_dtype: str = "bf16", out_dtype: str = "bf16", block_m: int | None = None,
                 block_n: int | None = None, block_k: int = 128, swap_ab: bool | None = None,
                 num_warps: int | None = None, num_stages: int = 3, split_k: int = 1) -> KernelInstance:
    """A dense GEMM with an NVFP4 weight [N, K]: moe_nvfp4_gemm's DENSE mode (one weight, rows from
    the program id, optional bias). act_format "bf16": W4A16 (x bf16 or fp32), default tiles
    BLOCK_M 16 with SWAP_AB (decode: the weight tile is the 64-row MMA operand); "nvfp4": W4A4 on
    sm_100 (x quantized on load under the static input_scale, tl.dot_scaled), 128x128 tiles; x_dtype
    "u8": x is NVFP4 codes a fused norm wrote (packed, with block scales), read as they are."""
    w4a4 = act_format == "nvfp4"
    # W4A4 takes 8 warps by default: its 128x128 tile quantized on load spilled with 4 (sm_100a: 255
    # registers and 120 bytes of stack at N = K = 4096; 178 registers and none with 8)
    return moe_gemm(name, op, n=n, k=k, experts=1, top_k=1, act_format=act_format, x_dtype=x_dtype,
                    out_dtype=out_dtype, block_m=block_m or (128 if w4a4 else 16),
                    block_n=block_n or (128 if w4a4 else 64),
                    block_k=block_k,
                    swap_ab=swap_ab, num_warps=num_warps or (8 if w4a4 else 4), num_stages=num_stages,
                    split_k=split_k, dense=True,
                    has_bias=has_bias)


def moe_combine(name: str, op: str, *, n: int, top_k: int, out_dtype: str = "bf16",
                block_n: int = 256) -> KernelInstance:
    return instance(name, op, MOE_COMBINE_ROWS, {"N": n, "TOP_K": top_k, "BLOCK_N": block_n, "INTERPRET": False},
                    {"out_ptr": out_dtype}, num_warps=4, num_stages=1)


def fp8_linear(name: str, op: str, *, n: int, k: int, quant_act: bool, per_channel: bool = False,
               has_bias: bool = False, x_dtype: str = "bf16", out_dtype: str = "bf16", block_m: int = 16,
               block_n: int = 64, block_k: int = 128, swap_ab: bool | None = None, num_warps: int = 4,
               num_stages: int = 3, split_k: int = 1) -> KernelInstance:
    _check_tiles(name, k, block_k)
    swap = block_m < 64 if swap_ab is None else swap_ab
    return instance(name, op, FP8_LINEAR, {
        "N": n, "K": k, "QUANT_ACT": quant_act, "PER_CHANNEL": per_channel, "HAS_BIAS": has_bias,
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SWAP_AB": swap, "SPLIT_K": split_k,
        "INTERPRET": False},
        {"x_ptr": x_dtype, "bias_ptr": out_dtype, "out_ptr": out_dtype}, num_warps, num_stages)


FP8_DOT_MIN_K = 32  # an fp8 x fp8 tl.dot takes K >= 32 per step


def moe_fp8_gemm(name: str, op: str, *, n: int, k: int, experts: int, top_k: int, quant_act: bool = True,
                 activation: str = "none", gather: bool = False, combine: bool = False, x_dtype: str = "bf16",
                 out_dtype: str = "bf16", block_m: int = 16, block_n: int = 64, block_k: int = 128,
                 swap_ab: bool | None = None, num_warps: int = 4, num_stages: int = 3) -> KernelInstance:
    """One grouped FP8 GEMM: quant_act (W8A8: activations rounded to E4M3 on load with the expert's
    input_scale) or not (W8A16). A BLOCK_M under 64 swaps the operands (the weight tile is the MMA's
    64-row side) unless swap_ab says otherwise."""
    _check_tiles(name, k, block_k)
    if block_k < FP8_DOT_MIN_K:
        raise IRError(f"kernel {name}: BLOCK_K {block_k} is under the {FP8_DOT_MIN_K} an FP8 dot steps K by")
    swap = block_m < 64 if swap_ab is None else swap_ab
    return instance(name, op, MOE_FP8_GEMM, {
        "N": n, "K": k, "NUM_EXPERTS": experts, "TOP_K": top_k, "GATHER": gather, "ACTIVATION": activation,
        "COMBINE": combine, "QUANT_ACT": quant_act, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
        "SWAP_AB": swap, "INTERPRET": False},
        {"x_ptr": x_dtype, "out_ptr": "fp32" if combine else out_dtype}, num_warps, num_stages)


# GEMM template entry -> the template of its split-K reduce (the second launch)
SPLIT_K_REDUCES = {MOE_NVFP4_GEMM.entry: MOE_NVFP4_GEMM_REDUCE, FP8_LINEAR.entry: FP8_LINEAR_REDUCE}
REDUCE_SUFFIX = "_splitk_reduce"


def split_k_reduce(gemm: KernelInstance) -> KernelInstance | None:
    """The reduce kernel a GEMM instance with SPLIT_K > 1 launches after itself (its tiles, epilogue
    options and output dtypes), or None for SPLIT_K 1 and for other templates."""
    reduce = SPLIT_K_REDUCES.get(gemm.template.entry)
    values = dict(gemm.constexprs)
    if reduce is None or int(values.get("SPLIT_K", 1)) == 1:
        return None
    if int(values["SPLIT_K"]) < 1:
        raise IRError(f"kernel {gemm.name}: SPLIT_K {values['SPLIT_K']} must be at least 1")
    pointers = dict(gemm.pointer_types)
    return instance(gemm.name + REDUCE_SUFFIX, gemm.op, reduce, {name: values[name] for name in reduce.constexprs},
                    {name: pointers[name] for name in ("x_ptr", "bias_ptr", "out_ptr")
                     if name in pointers and (name, "*dtype") in reduce.params},
                    num_warps=8 if int(values["BLOCK_M"]) * int(values["BLOCK_N"]) > 4096 else 4, num_stages=1)


def with_split_k_reduces(instances: Sequence[KernelInstance]) -> tuple[KernelInstance, ...]:
    """An op's kernels in launch order with each split-K GEMM followed by its reduce kernel (reduce
    kernels already in the list are replaced: the GEMM's config decides them)."""
    reduces = {t.entry for t in SPLIT_K_REDUCES.values()}
    result: list[KernelInstance] = []
    for kernel in instances:
        if kernel.template.entry in reduces:
            continue
        result.append(kernel)
        reduce = split_k_reduce(kernel)
        if reduce is not None:
            result.append(reduce)
    return tuple(result)


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def add_rms_norm(name: str, op: str, *, width: int, residual: bool = True, act_format: str = "none",
                 dtype: str = "bf16", weight_dtype: str | None = None) -> KernelInstance:
    """Residual add + RMSNorm over rows of `width`; act_format "none", "fp8" or "nvfp4" (width % 16 == 0)."""
    if act_format not in ("none", "fp8", "nvfp4"):
        raise IRError(f"kernel {name}: act_format must be none, fp8 or nvfp4, not {act_format!r}")
    if act_format == "nvfp4" and width % NVFP4_BLOCK:
        raise IRError(f"kernel {name}: NVFP4 output needs a width divisible by {NVFP4_BLOCK}, not {width}")
    block = max(_pow2(width), NVFP4_BLOCK)
    out = {"none": dtype, "fp8": "fp8e4nv", "nvfp4": "u8"}[act_format]
    return instance(name, op, ADD_RMS_NORM, {
        "WIDTH": width, "HAS_RESIDUAL": residual, "ACT_FORMAT": act_format, "BLOCK_D": block, "INTERPRET": False},
        {"x_ptr": dtype, "residual_ptr": dtype, "weight_ptr": weight_dtype or dtype, "out_ptr": out,
         "residual_out_ptr": dtype}, num_warps=4 if block <= 1024 else 8, num_stages=1)


def gated_rms_norm(name: str, op: str, *, width: int, group_size: int, gated: bool = True, dtype: str = "bf16",
                   weight_dtype: str | None = None, out_dtype: str | None = None,
                   gate_dtype: str | None = None) -> KernelInstance:
    """gate_dtype: the gate's, when it differs from x's (the Mamba prefill gates an fp32 scan output
    with a bf16 projection)."""
    if width % group_size:
        raise IRError(f"kernel {name}: width {width} is not a multiple of group_size {group_size}")
    block = _pow2(group_size)
    return instance(name, op, GATED_RMS_NORM, {
        "WIDTH": width, "GROUP_SIZE": group_size, "HAS_GATE": gated, "BLOCK_G": block, "INTERPRET": False},
        {"x_ptr": dtype, "gate_ptr": gate_dtype or dtype, "weight_ptr": weight_dtype or dtype,
         "out_ptr": out_dtype or dtype},
        num_warps=4 if block <= 1024 else 8, num_stages=1)


def causal_conv1d(name: str, op: str, *, kernel_size: int, bias: bool = True, state: bool = False,
                  silu: bool = True, decode: bool = False, dtype: str = "bf16", weight_dtype: str | None = None,
                  state_dtype: str | None = None, seq_lens: bool = False) -> KernelInstance:
    """decode: one token per launch (BLOCK_T = 1); prefill: 16-step time blocks. seq_lens: the new
    state is taken after each sequence's real tokens (right padding)."""
    return instance(name, op, CAUSAL_CONV1D, {
        "KERNEL": kernel_size, "HAS_BIAS": bias, "HAS_STATE": state, "SILU": silu, "HAS_SEQ_LENS": seq_lens,
        "BLOCK_T": 1 if decode else 16,
        "BLOCK_C": 128, "INTERPRET": False},
        {"x_ptr": dtype, "weight_ptr": weight_dtype or dtype, "bias_ptr": weight_dtype or dtype,
         "state_ptr": state_dtype or dtype, "out_ptr": dtype, "new_state_ptr": state_dtype or dtype},
        num_warps=4, num_stages=1)


def _ssd_pointers(dtype: str, param_dtype: str) -> dict[str, str]:
    return {"x_ptr": dtype, "dt_ptr": dtype, "b_ptr": dtype, "c_ptr": dtype, "a_log_ptr": param_dtype,
            "d_ptr": param_dtype, "dt_bias_ptr": param_dtype}


SSD_CHUNK_MAX = 64  # the scan's own chunk: 128 took 256 KiB of shared memory (over an SM's) and minutes of ptxas


def ssd_chunk_scan(name: str, op: str, *, head_dim: int, state_size: int, chunk_size: int, initial_state: bool,
                   dtype: str = "bf16", param_dtype: str = "fp32", state_dtype: str = "fp32",
                   seq_lens: bool = False) -> KernelInstance:
    """The chunked scan; the kernel's chunk is chunk_size clamped to [16, 64] (the recurrence does not
    depend on it), its head_dim block at most 64."""
    chunk = min(max(16, _pow2(chunk_size)), SSD_CHUNK_MAX)
    block_p = max(16, min(_pow2(head_dim), 64))
    return instance(name, op, SSD_CHUNK_SCAN, {
        "HAS_INIT": initial_state, "HAS_SEQ_LENS": seq_lens, "CHUNK": chunk, "BLOCK_P": block_p, "BLOCK_N": max(16, _pow2(state_size)),
        "INTERPRET": False},
        {**_ssd_pointers(dtype, param_dtype), "init_ptr": state_dtype}, num_warps=8 if block_p * chunk > 1024 else 4,
        num_stages=1)


def ssd_state_update(name: str, op: str, *, head_dim: int, state_size: int, dtype: str = "bf16",
                     param_dtype: str = "fp32", state_dtype: str = "fp32", seq_lens: bool = False) -> KernelInstance:
    return instance(name, op, SSD_STATE_UPDATE, {
        "HAS_SEQ_LENS": seq_lens, "BLOCK_P": min(_pow2(head_dim), 64), "BLOCK_N": _pow2(state_size), "INTERPRET": False},
        {**_ssd_pointers(dtype, param_dtype), "state_ptr": state_dtype, "y_ptr": dtype}, num_warps=8, num_stages=1)


def attention_gqa(name: str, op: str, *, head_dim: int, decode: bool, dtype: str = "bf16",
                  cache_dtype: str | None = None, exact: bool = True,
                  group: int = 16) -> tuple[KernelInstance, KernelInstance]:
    """(the KV-cache write, the attention): prefill blocks 64 (token, head) rows; decode one token's
    query heads of a KV head (`group` of them: 16 to 64 rows), so each program reads its KV head's
    cache once. cache_dtype "fp8e4nv": an FP8 cache of E4M3 codes under fp32 k/v scales. exact: the two-pass softmax that rounds as the reference does
    (templates/attention.py), else flash.

    Decode tiles under 64 rows compile to mma.sync, not wgmma (which takes 64-row tiles): a decode
    step is bound by the KV-cache read (each K/V element meets `group` query rows, about `group`
    FLOP per byte, far below the tensor cores' ridge), so padding a 16-row group to 64 would buy no
    time, while splitting a group over several programs would read the cache once per program."""
    block_d = max(16, _pow2(head_dim))
    cache = cache_dtype or dtype
    write = instance(f"{name}_kv_write", op, KV_CACHE_WRITE, {"BLOCK_D": block_d, "INTERPRET": False},
                     {"k_ptr": dtype, "v_ptr": dtype, "k_cache_ptr": cache, "v_cache_ptr": cache}, num_warps=1,
                     num_stages=1)
    attend = instance(name, op, ATTENTION_GQA, {
        "BLOCK_M": min(64, max(16, _pow2(group))) if decode else 64, "BLOCK_N": 64, "BLOCK_D": block_d, "EXACT": exact, "INTERPRET": False},
        {"q_ptr": dtype, "k_cache_ptr": cache, "v_cache_ptr": cache, "out_ptr": dtype}, num_warps=4, num_stages=2)
    return write, attend


def moe_route(name: str, op: str, *, experts: int, top_k: int, n_group: int = 1, topk_group: int = 1,
              bias: bool = True, norm_topk_prob: bool = True, dtype: str = "bf16",
              weight_dtype: str = "fp32") -> tuple[KernelInstance, KernelInstance]:
    """(the router: fp32 GEMM, sigmoid, bias, group-limited top-k, normalisation, scaling; the
    permutation: expert offsets and the stable order of the pairs)."""
    if n_group < 1 or experts % n_group or (n_group > 1 and (experts // n_group < 2 or not 1 <= topk_group <= n_group)):
        raise IRError(f"kernel {name}: {experts} experts, n_group {n_group} and topk_group {topk_group} do not "
                      f"make a group-limited routing (groups of at least 2 experts, 1 <= topk_group <= n_group)")
    if not 1 <= top_k <= experts:
        raise IRError(f"kernel {name}: top_k must be between 1 and {experts}, not {top_k}")
    block_e = max(16, _pow2(experts))
    router = instance(name, op, MOE_ROUTER, {
        "HAS_BIAS": bias, "TOP_K": top_k, "N_GROUP": n_group, "TOPK_GROUP": topk_group, "NORM_TOPK": norm_topk_prob,
        "BLOCK_T": 16, "BLOCK_E": block_e, "BLOCK_K": 32, "BLOCK_SLOTS": _pow2(top_k), "BLOCK_G": _pow2(n_group)},
        {"x_ptr": dtype, "weight_ptr": weight_dtype, "bias_ptr": weight_dtype},
        num_warps=4 if block_e <= 128 else 8, num_stages=1)
    permutation = instance(f"{name}_permutation", op, MOE_PERMUTATION, {"BLOCK_PAIRS": 64, "BLOCK_E": block_e},
                           num_warps=4, num_stages=1)
    return router, permutation
