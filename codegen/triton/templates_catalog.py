"""The kernel templates this codegen knows, as data (see spec.KernelTemplate), and helpers that
specialise them for one op's shapes and formats."""

from __future__ import annotations

from dataclasses import replace

from nemocompile.base.errors import IRError

from .spec import Constexpr, KernelInstance, KernelTemplate, instance

MOE_NVFP4_GEMM = KernelTemplate(
    module="moe_gemm", entry="moe_nvfp4_gemm", imports=("quant_math",),
    params=(("x_ptr", "*dtype"), ("order_ptr", "*i64"), ("tile_starts_ptr", "*i32"), ("offsets_ptr", "*i64"),
            ("weight_ptr", "*u8"), ("block_scale_ptr", "*fp8e4nv"), ("global_scale_ptr", "*fp32"),
            ("input_scale_ptr", "*fp32"), ("routing_ptr", "*fp32"), ("out_ptr", "*dtype"), ("rows", "i32")),
    constexprs=("N", "K", "NUM_EXPERTS", "TOP_K", "GATHER", "ACTIVATION", "COMBINE", "ACT_FORMAT",
                "BLOCK_M", "BLOCK_N", "BLOCK_K", "SWAP_AB", "INTERPRET"),
    aligned=("x_ptr", "weight_ptr", "block_scale_ptr", "out_ptr"),
)
# tl.dot_scaled with E4M3 block-16 scales: tcgen05 kind::mxf4nvf4 exists on sm_100a only
MOE_NVFP4_W4A4_ARCHS = ("sm_100",)

MOE_COMBINE_ROWS = KernelTemplate(
    module="moe_gemm", entry="moe_combine_rows", imports=("quant_math",),
    params=(("pairs_ptr", "*fp32"), ("out_ptr", "*dtype")),
    constexprs=("N", "TOP_K", "BLOCK_N"),
    aligned=("pairs_ptr", "out_ptr"),
)

FP8_LINEAR = KernelTemplate(
    module="fp8_gemm", entry="fp8_linear", imports=("quant_math",),
    params=(("x_ptr", "*dtype"), ("input_scale_ptr", "*fp32"), ("weight_ptr", "*fp8e4nv"),
            ("weight_scale_ptr", "*fp32"), ("bias_ptr", "*dtype"), ("out_ptr", "*dtype"), ("rows", "i32")),
    constexprs=("N", "K", "QUANT_ACT", "PER_CHANNEL", "HAS_BIAS", "BLOCK_M", "BLOCK_N", "BLOCK_K", "SWAP_AB",
                "INTERPRET"),
    aligned=("x_ptr", "weight_ptr", "out_ptr"),
)

TEMPLATES = {t.entry: t for t in (MOE_NVFP4_GEMM, MOE_COMBINE_ROWS, FP8_LINEAR)}
__all__ = ["TEMPLATES", "KernelInstance", "fp8_linear", "moe_combine", "moe_gemm"]

# Tile configurations an autotuner may try (graph/kernels.py carries the same spaces for the tuner).
MOE_CONFIG_SPACE: dict[str, tuple[Constexpr, ...]] = {
    "BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (64, 128), "BLOCK_K": (64, 128), "SWAP_AB": (True, False),
    "num_warps": (4, 8), "num_stages": (2, 3, 4)}
FP8_CONFIG_SPACE: dict[str, tuple[Constexpr, ...]] = {
    "BLOCK_M": (16, 64, 128), "BLOCK_N": (64, 128), "BLOCK_K": (64, 128), "SWAP_AB": (True, False),
    "num_warps": (4, 8), "num_stages": (2, 3, 4)}


def _check_tiles(name: str, k: int, block_k: int) -> None:
    """The GEMM templates step over K without a mask: BLOCK_K must divide K (and 16 must divide BLOCK_K)."""
    if k % block_k or block_k % 16:
        raise IRError(f"kernel {name}: BLOCK_K {block_k} must be a multiple of 16 dividing K = {k}")


def moe_gemm(name: str, op: str, *, n: int, k: int, experts: int, top_k: int, act_format: str,
             activation: str = "none", gather: bool = False, combine: bool = False, x_dtype: str = "bf16",
             out_dtype: str = "bf16", block_m: int = 16, block_n: int = 64, block_k: int = 128,
             swap_ab: bool | None = None, num_warps: int = 4, num_stages: int = 3) -> KernelInstance:
    """One grouped NVFP4 GEMM: act_format "bf16" (W4A16) or "nvfp4" (W4A4)."""
    _check_tiles(name, k, block_k)
    swap = (act_format == "bf16" and block_m < 64) if swap_ab is None else swap_ab
    template = MOE_NVFP4_GEMM if act_format == "bf16" else replace(MOE_NVFP4_GEMM, archs=MOE_NVFP4_W4A4_ARCHS)
    return instance(name, op, template, {
        "N": n, "K": k, "NUM_EXPERTS": experts, "TOP_K": top_k, "GATHER": gather, "ACTIVATION": activation,
        "COMBINE": combine, "ACT_FORMAT": act_format, "BLOCK_M": block_m, "BLOCK_N": block_n,
        "BLOCK_K": block_k, "SWAP_AB": swap, "INTERPRET": False},
        {"x_ptr": x_dtype, "out_ptr": "fp32" if combine else out_dtype}, num_warps, num_stages)


def moe_combine(name: str, op: str, *, n: int, top_k: int, out_dtype: str = "bf16",
                block_n: int = 256) -> KernelInstance:
    return instance(name, op, MOE_COMBINE_ROWS, {"N": n, "TOP_K": top_k, "BLOCK_N": block_n},
                    {"out_ptr": out_dtype}, num_warps=4, num_stages=1)


def fp8_linear(name: str, op: str, *, n: int, k: int, quant_act: bool, per_channel: bool = False,
               has_bias: bool = False, x_dtype: str = "bf16", out_dtype: str = "bf16", block_m: int = 16,
               block_n: int = 64, block_k: int = 128, swap_ab: bool | None = None, num_warps: int = 4,
               num_stages: int = 3) -> KernelInstance:
    _check_tiles(name, k, block_k)
    swap = block_m < 64 if swap_ab is None else swap_ab
    return instance(name, op, FP8_LINEAR, {
        "N": n, "K": k, "QUANT_ACT": quant_act, "PER_CHANNEL": per_channel, "HAS_BIAS": has_bias,
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SWAP_AB": swap, "INTERPRET": False},
        {"x_ptr": x_dtype, "bias_ptr": out_dtype, "out_ptr": out_dtype}, num_warps, num_stages)
