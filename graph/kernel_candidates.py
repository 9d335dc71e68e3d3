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
FP8_TILES: dict[str, tuple[AttrValue, ...]] = {"BLOCK_M": (16, 64, 128), "BLOCK_N": (64, 128), "BLOCK_K": (64, 128), "SWAP_AB": (True, False),
             "num_warps": (4, 8), "num_stages": (2, 3, 4)}

CANDIDATES: tuple[KernelSpec, ...] = (
    kernel("triton_nvfp4_grouped_w4a16", "grouped_gemm", "triton", formats={"weight": ["nvfp4"], "x": ["bf16"]},
           archs=HOPPER_AND_BLACKWELL, config_space=MOE_TILES, priority=1,
           doc="NVFP4 weights dequantized in registers (E2M1 codes x E4M3 block scales, exact in bf16), bf16 "
               "tensor-core dot, ragged expert segments scheduled on the device"),
)



# The fused expert GEMMs and the quantize-on-load linear (graph/fused_ops.py, created by the fusion
# passes): W4A16 on Hopper and Blackwell, W4A4 (activations quantized to NVFP4 on load,
# tl.dot_scaled) on Blackwell only, FP8 W8A8 on both.
_NVFP4 = {"weight": ("nvfp4",), "x": ("bf16",)}
_NVFP4_DOWN = {"weight": ("nvfp4",), "hidden": ("bf16",)}


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
    FusedCandidate("triton_fp8_quant_linear", "quant_linear", {"weight": ("fp8",), "x": ("bf16",)},
                   {"act_format": ("fp8",)}, HOPPER_AND_BLACKWELL, FP8_TILES,
                   "FP8 W8A8: activations rounded to E4M3 on load, fp8 tensor-core dot"),
)


def fused_candidates() -> tuple[KernelSpec, ...]:
    """The fused-op candidates whose op is declared in this build of the IR."""
    return tuple(candidate.spec() for candidate in FUSED_CANDIDATES if candidate.op in REGISTRY)


def register_candidates() -> None:
    for spec in (*CANDIDATES, *fused_candidates()):
        assert spec.op in REGISTRY
        register(spec)
