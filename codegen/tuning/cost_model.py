"""A tile-aware roofline: the time a GEMM config needs on a target, from the target's numbers
(targets/: SM count, HBM bandwidth, peak rates) and the config's tiles. Nothing is measured.

Assumptions, so the ranking can be judged:
- Work is padded to whole tiles: an expert's rows to BLOCK_M, N to BLOCK_N. Padded FLOPs run at
  the peak of the GEMM's input format (W4A16 at bf16: the weight is dequantized in registers).
- The programs run in waves over the SMs; blocks per SM are bounded by shared memory, registers
  and 32 blocks. A last partial wave costs a whole one (wave quantization).
- Memory: the weights of the experts the tokens hit are read once, the activations once per
  N tile (the first read from HBM, a tenth of the repeats missing the L2), the output written once.
  The bandwidth reached follows Little's law: the bytes the resident programs have in flight
  (num_stages tiles of weights and of the rows that exist, padding loads nothing) over
  MEMORY_LATENCY_SECONDS, up to the HBM bandwidth, and up to SM_LOAD_BYTES_PER_S per SM that holds
  a program (an SM's path from the L2 moves about 64 bytes per clock: a few SMs cannot draw the
  whole HBM bandwidth, which is what split-K fixes in decode).
- Each program walks K / BLOCK_K steps of fixed latency (fewer, deeper steps are cheaper) and
  every launch costs LAUNCH_SECONDS.
- Split-K (SPLIT_K > 1): SPLIT_K times the programs, each walking one slice of the K steps (more
  programs to fill the SMs and more bytes in flight, fewer serial steps each); the GEMM writes fp32
  partial tiles (rows x N x 4 bytes x SPLIT_K) instead of its output, and a second launch reads
  them back, at HBM bandwidth bounded by its own bytes in flight, and writes the output. The
  workspace may stay in the L2; it is counted at HBM rates, against split-K.
The model ranks configs of one problem; its absolute times are lower bounds, not predictions.
The other templates (norms, conv, SSD, attention, router, the expert combine) have their own
work terms under the same kind of roofline: op_cost."""

from __future__ import annotations

import math
from dataclasses import dataclass

from nemocompile.codegen.triton.spec import KernelInstance
from nemocompile.targets import Target

from . import op_cost
from .op_spaces import OP_SPACES
from .space import LIMITS, Config, accumulator_registers, shared_bytes
from .workload import GEMM, Workload

MODEL_VERSION = "roofline-tiles-3"  # recorded with every modelled entry
LAUNCH_SECONDS = 3e-6
K_STEP_SECONDS = 40e-9
MEMORY_LATENCY_SECONDS = 1e-6  # HBM round trip under load, order of magnitude
L2_MISS = 0.1
MAX_BLOCKS_PER_SM = 32
SM_LOAD_BYTES_PER_S = 110e9  # 64 B per clock at ~1.75 GHz, order of magnitude
WORKSPACE_BYTES = 4  # a split-K partial sum: fp32


@dataclass(frozen=True)
class Problem:
    """One call of a GEMM kernel: rows of activations (tokens x top_k for the expert GEMMs)."""

    rows: int
    n: int
    k: int
    experts: int
    top_k: int
    weight_bits: float  # stored bits per weight element, scales included
    act_bytes: float  # bytes per activation element as the kernel reads it
    out_bytes: float
    compute: str  # the peak it runs at: bf16, fp8, fp4


def gemm_problem(instance: KernelInstance, tokens: int) -> Problem:
    """The problem of a GEMM instance (moe_nvfp4_gemm, moe_fp8_gemm, fp8_linear) called on `tokens` tokens."""
    values = dict(instance.constexprs)
    pointers = dict(instance.pointer_types)
    out_bytes = 4.0 if pointers.get("out_ptr") == "fp32" else 2.0
    if instance.template.entry == "moe_nvfp4_gemm":  # grouped, or DENSE (one weight: NUM_EXPERTS 1, TOP_K 1)
        top_k = int(values["TOP_K"])
        w4a4 = values.get("ACT_FORMAT") == "nvfp4"
        # fp32 activations: 4 bytes each, and W4A16 keeps an exact fp32 dot (no tensor cores)
        fp32_x = pointers.get("x_ptr") == "fp32"
        compute = "fp4" if w4a4 else "fp32" if fp32_x else "bf16"
        return Problem(tokens * top_k, int(values["N"]), int(values["K"]), int(values["NUM_EXPERTS"]), top_k,
                       4 + 8 / 16, 4.0 if fp32_x else 2.0, out_bytes, compute)
    quant = bool(values.get("QUANT_ACT"))
    if instance.template.entry == "moe_fp8_gemm":  # E4M3 weights (the per-expert scales are negligible)
        top_k = int(values["TOP_K"])
        return Problem(tokens * top_k, int(values["N"]), int(values["K"]), int(values["NUM_EXPERTS"]), top_k, 8.0,
                       2.0, out_bytes, "fp8" if quant else "bf16")
    return Problem(tokens, int(values["N"]), int(values["K"]), 1, 1, 8.0, 2.0, out_bytes, "fp8" if quant else "bf16")


def experts_hit(experts: int, top_k: int, tokens: int) -> float:
    return experts * (1 - (1 - top_k / experts) ** tokens) if experts > 1 else 1.0


def blocks_per_sm(instance: KernelInstance, config: Config, arch: str) -> int:
    limits = LIMITS[arch]
    values = dict(config)
    threads = 32 * int(values["num_warps"])
    # registers: the accumulator plus a fixed 64 for operands and addresses, per thread
    registers = min(limits.registers_per_thread, accumulator_registers(config) + 64) * threads
    by_registers = limits.registers_per_sm // max(int(registers), 1)
    by_shared = limits.shared_bytes_per_sm // max(shared_bytes(instance, config), 1)
    return max(1, min(MAX_BLOCKS_PER_SM, by_registers, by_shared))


def seconds(instance: KernelInstance, config: Config, tokens: int, target: Target,
            workload: Workload = GEMM) -> float:
    """The modelled time of one call of `instance` with `config` on `tokens` tokens (`workload`: the
    op's runtime sizes and phase, which the non-GEMM templates need: op_cost)."""
    if instance.template.entry in OP_SPACES:
        return op_cost.seconds(instance, config, tokens, target, workload)
    p = gemm_problem(instance, tokens)
    values = dict(config)
    block_m, block_n, block_k = (int(values[f"BLOCK_{x}"]) for x in "MNK")
    stages = int(values["num_stages"])
    split = int(values.get("SPLIT_K", 1))
    hit = experts_hit(p.experts, p.top_k, tokens)
    rows_per_expert = p.rows / hit
    tiles_m = hit * math.ceil(rows_per_expert / block_m)
    tiles_n = math.ceil(p.n / block_n)
    programs = tiles_m * tiles_n * split
    slots = target.sm_count * blocks_per_sm(instance, config, target.arch)
    waves = math.ceil(programs / slots)
    peak = (target.peak_tflops.get(p.compute) or target.peak_tflops["bf16"]) * 1e12
    k_tiles = math.ceil(p.k / block_k)  # the last step is masked past K, its padding still computed
    slice_tiles = math.ceil(k_tiles / split)  # steps per program (the last slice may have fewer)
    padded_flops = 2.0 * tiles_m * block_m * tiles_n * block_n * k_tiles * block_k
    # a wave's programs share the machine; a partial wave runs at the speed of a whole one
    compute = padded_flops / peak * (waves * slots / max(programs, 1))
    weight_bytes = hit * p.n * p.k * p.weight_bits / 8
    act_bytes = p.rows * p.k * p.act_bytes * (1 + L2_MISS * (tiles_n - 1))
    written = p.rows * p.n * (p.out_bytes if split == 1 else WORKSPACE_BYTES * split)
    moved = weight_bytes + act_bytes + written
    rows_in_tile = min(block_m, math.ceil(rows_per_expert))
    tile_bytes = block_n * block_k * p.weight_bits / 8 + rows_in_tile * block_k * p.act_bytes
    in_flight = min(programs, slots) * stages * tile_bytes
    bandwidth = min(target.hbm_bandwidth_bytes_per_s, in_flight / MEMORY_LATENCY_SECONDS,
                    min(programs, target.sm_count) * SM_LOAD_BYTES_PER_S)
    memory = moved / bandwidth
    k_steps = waves * slice_tiles * K_STEP_SECONDS
    gemm = LAUNCH_SECONDS + max(compute, memory) + k_steps
    if split == 1:
        return gemm
    # the reduce: one program per output tile, its SPLIT_K partial loads in flight together
    reduce_programs = tiles_m * tiles_n
    reduce_in_flight = min(reduce_programs, target.sm_count * MAX_BLOCKS_PER_SM) * rows_in_tile * block_n \
        * WORKSPACE_BYTES * split
    reduce_bandwidth = min(target.hbm_bandwidth_bytes_per_s, reduce_in_flight / MEMORY_LATENCY_SECONDS,
                           min(reduce_programs, target.sm_count) * SM_LOAD_BYTES_PER_S)
    reduce_bytes = p.rows * p.n * (WORKSPACE_BYTES * split + p.out_bytes)
    return gemm + LAUNCH_SECONDS + reduce_bytes / reduce_bandwidth
