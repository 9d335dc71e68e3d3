"""The compiled kernel candidates of the catalog (graph/kernels.py), as data: which op each
implements, the operand formats and archs it takes, and the options an autotuner may try
(issue 14's tuner measures them; select_kernels takes the highest priority otherwise).

Codegen specialises each chosen one (codegen/triton/plan.py) and the runtime launches it
(runtime/kernels/triton_backend.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from . import ops  # noqa: F401  the ops are declared before their candidates name them
from .ir import AttrValue
from .kernels import KernelSpec, kernel, register
from .opdef import REGISTRY

HOPPER_AND_BLACKWELL = ("sm_90", "sm_100")
# Tile options of the grouped NVFP4 GEMM (SWAP_AB computes W x^T so a small BLOCK_M stays on wgmma).
MOE_TILES: dict[str, tuple[AttrValue, ...]] = {"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (64, 128), "BLOCK_K": (32, 64, 128),
             "SWAP_AB": (True, False), "num_warps": (4, 8), "num_stages": (2, 3, 4)}
W4A4_TILES: dict[str, tuple[AttrValue, ...]] = {"BLOCK_M": (128,), "BLOCK_N": (128, 256), "BLOCK_K": (128, 256), "num_warps": (4, 8),
              "num_stages": (2, 3)}
# The dense NVFP4 GEMMs (the grouped template's DENSE mode) also split K: at decode, N / BLOCK_N
# programs alone may leave SMs idle.
DENSE_NVFP4_TILES: dict[str, tuple[AttrValue, ...]] = {**MOE_TILES, "SPLIT_K": (1, 2, 4, 8)}
DENSE_W4A4_TILES: dict[str, tuple[AttrValue, ...]] = {**W4A4_TILES, "SPLIT_K": (1, 2, 4, 8)}
FP8_TILES: dict[str, tuple[AttrValue, ...]] = {"BLOCK_M": (16, 64, 128), "BLOCK_N": (64, 128), "BLOCK_K": (64, 128), "SWAP_AB": (True, False),
             "num_warps": (4, 8), "num_stages": (2, 3, 4)}
# The grouped FP8 GEMM (templates/moe_fp8_gemm.py): FP8_TILES without split-K, which it does not take.
MOE_FP8_TILES: dict[str, tuple[AttrValue, ...]] = {"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (64, 128),
                                                   "BLOCK_K": (32, 64, 128), "SWAP_AB": (True, False),
                                                   "num_warps": (4, 8), "num_stages": (2, 3, 4)}

# The float element types the norm, Mamba and attention kernels read and write (f16 and quantized inputs
# run their reference implementations; attention also takes an FP8 KV cache).
FLOATS = ("bf16", "f32")  # the dtypes the kernels are tested in (tests/test_triton_ops.py)
WARPS: dict[str, tuple[AttrValue, ...]] = {"num_warps": (1, 2, 4, 8)}

CANDIDATES: tuple[KernelSpec, ...] = (
    kernel("triton_nvfp4_grouped_w4a16", "grouped_gemm", "triton", formats={"weight": ["nvfp4"], "x": ["bf16"]},
           archs=HOPPER_AND_BLACKWELL, config_space=MOE_TILES, priority=1,
           doc="NVFP4 weights dequantized in registers (E2M1 codes x E4M3 block scales, exact in bf16), bf16 "
               "tensor-core dot, ragged expert segments scheduled on the device"),
    kernel("triton_nvfp4_linear_w4a16", "linear", "triton", formats={"weight": ["nvfp4"], "x": FLOATS},
           archs=HOPPER_AND_BLACKWELL, config_space=DENSE_NVFP4_TILES, priority=1,
           doc="NVFP4 weight, bf16 activations (W4A16): E2M1 codes and E4M3 block scales dequantized in "
               "registers, bf16 tensor-core dot (wgmma on sm_90a), global scale on the accumulator, optional "
               "bias (the grouped NVFP4 GEMM's DENSE mode); fp32 activations take an exact fp32 dot (no "
               "tensor cores)"),
    kernel("triton_fp8_linear", "linear", "triton", formats={"weight": ["fp8"], "x": ["bf16"]},
           archs=HOPPER_AND_BLACKWELL, config_space=FP8_TILES, priority=1,
           doc="FP8 weight, bf16 activations (W8A16): the weight upcast in registers, bf16 tensor-core dot"),
    kernel("triton_rms_norm", "rms_norm", "triton", formats={"x": FLOATS, "weight": FLOATS},
           archs=HOPPER_AND_BLACKWELL, config_space=WARPS, priority=1,
           doc="one row per program, fp32 statistics, the add_rms_norm template without a residual"),
    kernel("triton_gated_rms_norm", "gated_rms_norm", "triton", formats={"x": FLOATS, "gate": FLOATS, "weight": FLOATS},
           archs=HOPPER_AND_BLACKWELL, config_space=WARPS, priority=1,
           doc="x * silu(gate), RMS-normalised per group; one (row, group) per program"),
    kernel("triton_causal_conv1d", "causal_conv1d", "triton",
           formats={"x": FLOATS, "weight": FLOATS, "bias": FLOATS, "conv_state": FLOATS},
           archs=HOPPER_AND_BLACKWELL, config_space={"BLOCK_C": (64, 128, 256), **WARPS}, priority=1,
           attrs={"activation": (None, "silu")},
           doc="depthwise causal conv with SiLU fused, prefill time blocks or the decode step; state after "
               "each sequence's real tokens (seq_lens)"),
    kernel("triton_ssd_chunk_scan", "ssd_chunk_scan", "triton",
           formats={"x": FLOATS, "dt": FLOATS, "B": FLOATS, "C": FLOATS, "ssm_state": ("f32",)},
           archs=HOPPER_AND_BLACKWELL, config_space={"CHUNK": (16, 32, 64), **WARPS}, priority=1,
           doc="Mamba2 SSD prefill: one program per (sequence, head, head_dim block) walks the chunks, state in "
               "registers; padding (seq_lens) gets step size 0"),
    kernel("triton_ssd_state_update", "ssd_state_update", "triton",
           formats={"x": FLOATS, "dt": FLOATS, "B": FLOATS, "C": FLOATS, "ssm_state": ("f32",)},
           archs=HOPPER_AND_BLACKWELL, config_space=WARPS, priority=1,
           doc="Mamba2 decode step; an idle sequence (seq_lens 0) keeps its state"),
    kernel("triton_attention_gqa", "attention_gqa", "triton",
           formats={"q": FLOATS, "k": FLOATS, "v": FLOATS, "k_cache": (*FLOATS, "fp8e4m3"),
                    "v_cache": (*FLOATS, "fp8e4m3")},
           archs=HOPPER_AND_BLACKWELL, config_space={"BLOCK_M": (16, 64, 128), "BLOCK_N": (32, 64, 128), **WARPS},
           priority=1,
           doc="KV-cache write at each sequence's length, then causal flash attention (online softmax, fp32 "
               "statistics); a program serves one KV head, so a group's query heads share K/V loads; an FP8 "
               "cache is written as E4M3 codes and read as code * scale, 1 byte per element"),
)



# The fused expert GEMMs and the quantize-on-load linear (graph/fused_ops.py, created by the fusion
# passes): W4A16 on Hopper and Blackwell, W4A4 (activations quantized to NVFP4 on load,
# tl.dot_scaled) on Blackwell only, FP8 W8A8 on both.
_NVFP4 = {"weight": ("nvfp4",), "x": ("bf16",)}
_NVFP4_DOWN = {"weight": ("nvfp4",), "hidden": ("bf16",)}
_FP8 = {"weight": ("fp8",), "x": ("bf16",)}
_FP8_DOWN = {"weight": ("fp8",), "hidden": ("bf16",)}


@dataclass(frozen=True)
class FusedCandidate:
    """A candidate of a fused op, made into a KernelSpec once that op is declared."""

    name: str
    op: str
    formats: Mapping[str, tuple[str, ...]]
    attrs: Mapping[str, tuple[AttrValue, ...]]
    archs: tuple[str, ...]
    config_space: Mapping[str, tuple[AttrValue, ...]]
    doc: str

    def spec(self) -> KernelSpec:
        return kernel(self.name, self.op, "triton", formats=self.formats, archs=self.archs,
                      config_space=self.config_space, priority=1, doc=self.doc, attrs=self.attrs)


FUSED_CANDIDATES = (
    FusedCandidate("triton_moe_up_w4a16", "moe_expert_up", _NVFP4, {"act_format": (None,), "activation": ("relu2",)},
                   HOPPER_AND_BLACKWELL, MOE_TILES, "gather x[order // k], NVFP4 W4A16 grouped GEMM, ReLU² epilogue"),
    FusedCandidate("triton_moe_up_w4a4", "moe_expert_up", _NVFP4, {"act_format": ("nvfp4",), "activation": ("relu2",)},
                   ("sm_100",), W4A4_TILES, "gather, NVFP4 quantize-on-load, tl.dot_scaled (tcgen05 mxf4nvf4), ReLU²"),
    FusedCandidate("triton_moe_down_w4a16", "moe_expert_down", _NVFP4_DOWN, {"act_format": (None,)},
                   HOPPER_AND_BLACKWELL, MOE_TILES,
                   "NVFP4 W4A16 grouped GEMM, routing weight times each pair's row, per-token sum"),
    FusedCandidate("triton_moe_down_w4a4", "moe_expert_down", _NVFP4_DOWN, {"act_format": ("nvfp4",)}, ("sm_100",),
                   W4A4_TILES, "NVFP4 quantize-on-load, tl.dot_scaled, routing weight times each pair's row, per-token sum"),
    FusedCandidate("triton_moe_up_fp8", "moe_expert_up", _FP8, {"act_format": ("fp8", None), "activation": ("relu2",)},
                   HOPPER_AND_BLACKWELL, MOE_FP8_TILES,
                   "gather x[order // k], FP8 grouped GEMM: W8A8 (rows rounded to E4M3 on load with the expert's "
                   "input_scale, fp8 tensor-core dot) or W8A16; ReLU² epilogue"),
    FusedCandidate("triton_moe_down_fp8", "moe_expert_down", _FP8_DOWN, {"act_format": ("fp8", None)},
                   HOPPER_AND_BLACKWELL, MOE_FP8_TILES,
                   "FP8 grouped GEMM (W8A8 or W8A16), routing weight times each pair's row, per-token sum"),
    FusedCandidate("triton_nvfp4_quant_linear_w4a4", "quant_linear", {"weight": ("nvfp4",), "x": (*FLOATS, "nvfp4codes")},
                   {"act_format": ("nvfp4",)}, ("sm_100",), DENSE_W4A4_TILES,
                   "NVFP4 W4A4: activations quantized to NVFP4 on load (dynamic E4M3 block-16 scales under the "
                   "static input_scale), or the NVFP4 codes and block scales a fused norm wrote read as they are; "
                   "tl.dot_scaled (tcgen05 mxf4nvf4 block16), optional bias"),
    FusedCandidate("triton_fp8_quant_linear", "quant_linear", {"weight": ("fp8",), "x": ("bf16", "fp8e4m3")},
                   {"act_format": ("fp8",)}, HOPPER_AND_BLACKWELL, FP8_TILES,
                   "FP8 W8A8: bf16 activations rounded to E4M3 on load, or the E4M3 codes a fused norm wrote "
                   "read as they are; fp8 tensor-core dot"),
    FusedCandidate("triton_add_rms_norm", "add_rms_norm", {"x": FLOATS, "residual": FLOATS, "weight": FLOATS},
                   {"act_format": (None, "fp8", "nvfp4")}, HOPPER_AND_BLACKWELL, WARPS,
                   "residual add + RMSNorm, output in the stream dtype or quantized on output (FP8, NVFP4)"),
    FusedCandidate("triton_moe_route", "moe_route", {"x": FLOATS, "weight": ("f32",), "bias": ("f32",)}, {},
                   HOPPER_AND_BLACKWELL, {"BLOCK_T": (8, 16, 32), **WARPS},
                   "fp32 router GEMM, sigmoid, bias, group-limited top-k, normalisation and scaling; then the "
                   "expert offsets and the pair order sorted stably by expert (no atomics)"),
)


def fused_candidates() -> tuple[KernelSpec, ...]:
    """The fused-op candidates whose op is declared in this build of the IR."""
    return tuple(candidate.spec() for candidate in FUSED_CANDIDATES if candidate.op in REGISTRY)


def register_candidates() -> None:
    for spec in (*CANDIDATES, *fused_candidates()):
        assert spec.op in REGISTRY
        register(spec)
