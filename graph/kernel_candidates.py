"""The compiled kernel candidates of the catalog (graph/kernels.py), as data: which op each
implements, the operand formats and archs it takes, and the options an autotuner may try
(issue 14's tuner measures them; select_kernels takes the highest priority otherwise).

Codegen specialises each chosen one (codegen/triton/plan.py) and the runtime launches it
(runtime/kernels/triton_backend.py)."""

from __future__ import annotations

from . import ops  # noqa: F401  the ops are declared before their candidates name them
from .kernels import KernelSpec, kernel, register
from .opdef import REGISTRY

HOPPER_AND_BLACKWELL = ("sm_90", "sm_100")
# Tile options of the grouped NVFP4 GEMM (SWAP_AB computes W x^T so a small BLOCK_M stays on wgmma).
MOE_TILES = {"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (64, 128), "BLOCK_K": (32, 64, 128),
             "SWAP_AB": (True, False), "num_warps": (4, 8), "num_stages": (2, 3, 4)}
W4A4_TILES = {"BLOCK_M": (128,), "BLOCK_N": (128, 256), "BLOCK_K": (128, 256), "num_warps": (4, 8),
              "num_stages": (2, 3)}
FP8_TILES = {"BLOCK_M": (16, 64, 128), "BLOCK_N": (64, 128), "BLOCK_K": (64, 128), "SWAP_AB": (True, False),
             "num_warps": (4, 8), "num_stages": (2, 3, 4)}

CANDIDATES: tuple[KernelSpec, ...] = (
    kernel("triton_nvfp4_grouped_w4a16", "grouped_gemm", "triton", formats={"weight": ["nvfp4"], "x": ["bf16"]},
           archs=HOPPER_AND_BLACKWELL, config_space=MOE_TILES, priority=1,
           doc="NVFP4 weights dequantized in registers (E2M1 codes x E4M3 block scales, exact in bf16), bf16 "
               "tensor-core dot, ragged expert segments scheduled on the device"),
)



def register_candidates() -> None:
    for spec in CANDIDATES:
        assert spec.op in REGISTRY
        register(spec)
