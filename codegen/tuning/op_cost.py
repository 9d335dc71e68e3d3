"""The roofline of the non-GEMM templates: per template, the work of one call on `tokens` tokens
(programs in the grid, FLOPs as computed, padding included, HBM bytes moved, dependent loop steps
per program, cross-warp reductions), and one formula that turns work into seconds on a target.

Assumptions, so the ranking can be judged:
- Compute runs at the target's fp32 (CUDA-core) peak, or at the tensor-core peak of the format a
  tl.dot multiplies (attention: bf16); the "ieee" fp32 dots of the SSD scan and the router are
  CUDA-core work. Padded tiles compute their masked lanes too (tile waste).
- Only the SMs that hold a program work, and an SM is full only with FULL_WARPS resident warps:
  fewer programs than SMs, or too few warps per SM, leave the peak unused. Programs per SM are
  bounded by threads (2048), registers (the tile's live values over the threads, plus
  BASE_REGISTERS) and shared memory; a partial last wave costs a whole one.
- Bytes are the useful ones (masked lanes load nothing): inputs read once from HBM, a re-read by
  another program missing the L2 L2_MISS of the time, outputs written once. The bandwidth follows
  Little's law: the bytes the resident programs have in flight (one step's loads, times the stages)
  over the memory latency, up to the HBM bandwidth.
- Compute and memory overlap by OVERLAP: the shorter of the two still costs a tenth of itself, so
  padded lanes cost something even under a memory bound (ties go to the tile with less waste).
- A program's loop steps wait on their loads: STEP_SECONDS each, divided by the stages that
  pipeline them; a cross-warp reduction costs SYNC_SECONDS per halving of the warps.
Like the GEMM model, it ranks the configs of one problem; its absolute times are lower bounds."""

from __future__ import annotations

import math
from dataclasses import dataclass

from nemocompile.codegen.triton.spec import KernelInstance
from nemocompile.targets import Target

from .op_tiles import Config, element_bytes, tile, values
from .workload import DECODE_CONTEXT, Workload

LAUNCH_SECONDS = 3e-6
MEMORY_LATENCY_SECONDS = 1e-6
STEP_SECONDS = 0.5e-6  # one loop step's loads (L2 hits mostly) before its arithmetic can start
SYNC_SECONDS = 50e-9  # one level of a cross-warp tree reduction through shared memory
L2_MISS = 0.1
OVERLAP = 0.9  # the share of the shorter of compute and memory hidden under the longer
FULL_WARPS = 16  # resident warps that keep an SM's four schedulers busy
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
REGISTERS_PER_SM = 64 * 1024
SHARED_BYTES_PER_SM = 228 * 1024
BASE_REGISTERS = 32  # addresses, indices and masks per thread besides the tile


@dataclass(frozen=True)
class Work:
    programs: int
    flops: float
    peak: str  # the target's peak_tflops key the flops run at
    bytes: float
    steps: float  # dependent loop steps per program
    step_bytes: float  # bytes one program loads per step
    reductions: int = 0  # cross-warp reductions per step


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def work(instance: KernelInstance, config: Config, tokens: int, workload: Workload) -> Work:
    """The work of one call of a non-GEMM `instance` with `config` on `tokens` tokens."""
    v = values(instance, config)
    entry = instance.template.entry
    x = element_bytes(instance, "x_ptr")
    if entry == "add_rms_norm":
        block, width = v["BLOCK_D"], v["WIDTH"]
        out = {"none": x, "fp8": 1.0, "nvfp4": 0.5 + 1 / 16}[str(dict(instance.constexprs)["ACT_FORMAT"])]
        streams = x * (3 if v["HAS_RESIDUAL"] else 1) + out  # x (residual in and out), the output
        return Work(tokens, tokens * block * 10.0, "fp32", tokens * width * streams + width * x, 1,
                    block * x * (2 if v["HAS_RESIDUAL"] else 1), 1)
    if entry == "gated_rms_norm":
        width, group, block = v["WIDTH"], v["GROUP_SIZE"], v["BLOCK_G"]
        programs = tokens * (width // group)
        moved = tokens * width * (x + element_bytes(instance, "gate_ptr") + element_bytes(instance, "out_ptr"))
        return Work(programs, programs * block * 14.0, "fp32", moved + width * 2, 1, block * 2 * x, 1)
    if entry == "moe_combine_rows":
        n, top_k, block = v["N"], v["TOP_K"], v["BLOCK_N"]
        programs = tokens * _cdiv(n, block)
        moved = tokens * top_k * n * 4 + tokens * n * element_bytes(instance, "out_ptr")
        return Work(programs, programs * block * top_k * 1.0, "fp32", moved, top_k, min(block, n) * 4)
    if entry == "causal_conv1d":
        batch, length = workload.sequences(tokens)
        channels, taps = workload.get("channels"), v["KERNEL"]
        bt, bc = v["BLOCK_T"], v["BLOCK_C"]
        programs = batch * _cdiv(channels, bc) * _cdiv(length, bt)
        moved = batch * length * channels * 2 * x + batch * channels * (taps - 1) * 2 * x + channels * (taps + 1) * x
        # every time block reads the taps - 1 inputs before it again (from the L2 mostly)
        moved += batch * _cdiv(length, bt) * (taps - 1) * channels * x * L2_MISS
        # the taps are unrolled: their loads overlap, one step; the first time block also writes the state
        useful = (min(bt, length) + taps - 1) * min(bc, channels) * x  # masked lanes load nothing
        return Work(programs, programs * bt * bc * (taps * 6.0 + 12), "fp32", moved, 1, useful)
    if entry == "ssd_state_update":
        batch = tokens
        heads, head_dim, state = workload.get("num_heads"), workload.get("head_dim"), workload.get("state_size")
        bp, bn = v["BLOCK_P"], v["BLOCK_N"]
        programs = batch * heads * _cdiv(head_dim, bp)
        moved = batch * heads * head_dim * state * 4 * 2 + batch * heads * head_dim * 2 * x
        moved += batch * workload.get("n_groups") * state * 2 * x * (1 + L2_MISS * (programs / max(batch, 1) - 1))
        return Work(programs, programs * bp * bn * 12.0, "fp32", moved, 1, min(bp, head_dim) * min(bn, state) * 4, 1)
    if entry == "kv_cache_write":
        batch, length = workload.sequences(tokens)
        kv_heads, head_dim = workload.get("num_kv_heads"), workload.get("head_dim")
        programs = batch * length * kv_heads
        return Work(programs, programs * v["BLOCK_D"] * 4.0, "fp32", programs * head_dim * 2 * (x + 2), 1,
                    v["BLOCK_D"] * 2 * x)
    if entry == "ssd_chunk_scan":
        return _ssd_chunk_scan(v, tokens, workload, x)
    if entry == "attention_gqa":
        return _attention(v, tokens, workload, x)
    if entry == "moe_router":
        return _router(instance, v, tokens, workload, x)
    if entry == "moe_permutation":
        pairs = tokens * workload.get("top_k")
        block, experts = v["BLOCK_PAIRS"], v["BLOCK_E"]
        steps = 2 * max(1, _cdiv(pairs, block))
        return Work(1, steps * block * experts * 8.0, "fp32", pairs * 8 * 3 + experts * 8 * 2, steps, block * 8, 2)
    raise KeyError(entry)


def _ssd_chunk_scan(v: dict[str, int], tokens: int, workload: Workload, x: float) -> Work:
    batch, length = 1, tokens
    heads, head_dim, groups = workload.get("num_heads"), workload.get("head_dim"), workload.get("n_groups")
    state = workload.get("state_size")
    chunk, bp, bn = v["CHUNK"], v["BLOCK_P"], v["BLOCK_N"]
    blocks_p = _cdiv(head_dim, bp)
    programs = batch * heads * blocks_p
    steps = max(1, _cdiv(length, chunk))
    # per chunk: C B^T, (scores*decay) (x dt), C S^T, the state update, and the decay matrix
    per_step = 2.0 * chunk * chunk * bn + 2.0 * chunk * chunk * bp + 4.0 * chunk * bn * bp + 12.0 * chunk * chunk
    readers = heads // max(groups, 1) * blocks_p  # programs reading one group's B and C
    moved = batch * length * heads * head_dim * (x + 4)  # x in, y (fp32) out
    moved += batch * length * heads * x * blocks_p  # dt, read by every P block
    moved += batch * length * groups * state * 2 * x * (1 + L2_MISS * (readers - 1))
    moved += batch * heads * head_dim * state * 4 * 2  # the initial and the final state
    step_bytes = chunk * (bp * x + 2 * bn * x + x)
    return Work(programs, programs * steps * per_step, "fp32", moved, steps, step_bytes, 2)


def _attention(v: dict[str, int], tokens: int, workload: Workload, x: float) -> Work:
    batch, length = workload.sequences(tokens)
    heads, kv_heads, head_dim = workload.get("num_heads"), workload.get("num_kv_heads"), workload.get("head_dim")
    group = heads // kv_heads
    bm, bn, bd = v["BLOCK_M"], v["BLOCK_N"], v["BLOCK_D"]
    passes = 2 if v["EXACT"] else 1
    row_blocks = _cdiv(length * group, bm)
    past = DECODE_CONTEXT - 1 if workload.decode else 0
    # the keys each row block walks: up to the last token of its rows (causal)
    keys = [past + min((i + 1) * bm - 1, length * group - 1) // group + 1 for i in range(row_blocks)]
    key_steps = [_cdiv(k, bn) for k in keys]
    programs = batch * kv_heads * row_blocks
    flops = batch * kv_heads * sum(s * bn for s in key_steps) * bm * bd * 2.0 * (passes + 1)
    context = past + length
    kv_once = batch * kv_heads * context * head_dim * x
    moved = kv_once * (2 + L2_MISS * ((passes + 1) * row_blocks - 2))  # K read `passes` times, V once
    moved += batch * length * heads * head_dim * x * 2  # q in, out
    return Work(programs, flops, "bf16", moved, passes * max(key_steps), bn * bd * x * 2, 2 * passes)


def _router(instance: KernelInstance, v: dict[str, int], tokens: int, workload: Workload, x: float) -> Work:
    experts, hidden = workload.get("experts"), workload.get("hidden")
    bt, be, bk = v["BLOCK_T"], v["BLOCK_E"], v["BLOCK_K"]
    programs = _cdiv(tokens, bt)
    steps = _cdiv(hidden, bk)
    weight = element_bytes(instance, "weight_ptr", 4.0)
    flops = programs * (bt * be * steps * bk * 2.0 + bt * be * (v["TOP_K"] + 2 * v["N_GROUP"] + 4) * 3.0)
    moved = tokens * hidden * x + experts * hidden * weight * (1 + L2_MISS * (programs - 1)) + tokens * v["TOP_K"] * 12
    return Work(programs, flops, "fp32", moved, steps, bt * bk * x + be * bk * weight)


def blocks_per_sm(instance: KernelInstance, config: Config) -> int:
    v = values(instance, config)
    threads = 32 * v["num_warps"]
    t = tile(instance, config)
    registers = min(255.0, BASE_REGISTERS + t.live / threads) * threads
    by_shared = int(SHARED_BYTES_PER_SM // t.shared) if t.shared else MAX_BLOCKS_PER_SM
    return max(1, min(MAX_BLOCKS_PER_SM, MAX_THREADS_PER_SM // threads, int(REGISTERS_PER_SM // registers), by_shared))


def seconds(instance: KernelInstance, config: Config, tokens: int, target: Target, workload: Workload) -> float:
    """The modelled time of one call of a non-GEMM `instance` with `config` on `tokens` tokens."""
    w = work(instance, config, tokens, workload)
    v = values(instance, config)
    warps, stages = v["num_warps"], max(1, v["num_stages"])
    programs = max(1, w.programs)
    per_sm = blocks_per_sm(instance, config)
    slots = target.sm_count * per_sm
    waves = math.ceil(programs / slots)
    active = min(target.sm_count, programs)
    resident = min(per_sm, math.ceil(programs / active))
    fill = min(1.0, resident * warps / FULL_WARPS)
    wave_use = programs / (waves * slots) if waves > 1 else 1.0
    peak = (target.peak_tflops.get(w.peak) or target.peak_tflops["fp32"]) * 1e12
    compute = w.flops / (peak * active / target.sm_count * fill * wave_use)
    in_flight = min(programs, slots) * w.step_bytes * stages
    memory = w.bytes / min(target.hbm_bandwidth_bytes_per_s, in_flight / MEMORY_LATENCY_SECONDS)
    step = STEP_SECONDS / stages + w.reductions * math.log2(warps) * SYNC_SECONDS
    overlapped = max(compute, memory) + (1 - OVERLAP) * min(compute, memory)
    return LAUNCH_SECONDS + overlapped + waves * w.steps * step
