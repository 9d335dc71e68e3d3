"""Config spaces of the norm, convolution, SSD, attention and router templates, and the rules that
prune them by a target's limits before anything is compiled (the GEMM spaces are in space.py).

Each space lists the constexprs its template declares as tile sizes and that the launcher reads
back for its grid (runtime/kernels/triton_ops.py), plus warps and, where a loop streams loads
through a tl.dot, pipeline stages. A size that must cover a whole row (a norm's BLOCK_D, the
attention's BLOCK_D, the router's BLOCK_E) is the problem's, not the config's. None of these
templates reduces over a split dimension, so none has split-K."""

from __future__ import annotations

from nemocompile.codegen.triton.spec import Constexpr, KernelInstance

from .op_tiles import Config, tile, values
from .workload import Workload

Options = dict[str, tuple[Constexpr, ...]]
OP_SPACES: dict[str, Options] = {
    # one program per row (per group of a row): only how many threads share it
    "add_rms_norm": {"num_warps": (1, 2, 4, 8, 16)},
    "gated_rms_norm": {"num_warps": (1, 2, 4, 8, 16)},
    "kv_cache_write": {"num_warps": (1, 2, 4)},
    "moe_combine_rows": {"BLOCK_N": (64, 128, 256, 512, 1024), "num_warps": (1, 2, 4, 8)},
    "causal_conv1d": {"BLOCK_T": (1, 4, 8, 16, 32, 64), "BLOCK_C": (32, 64, 128, 256, 512), "num_warps": (1, 2, 4, 8)},
    # CHUNK at most 64: 128 took 256 KiB of shared memory and minutes of ptxas (templates_catalog)
    "ssd_chunk_scan": {"CHUNK": (16, 32, 64), "BLOCK_P": (16, 32, 64), "num_warps": (2, 4, 8)},
    "ssd_state_update": {"BLOCK_P": (4, 8, 16, 32, 64), "num_warps": (1, 2, 4, 8)},
    "attention_gqa": {"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (16, 32, 64, 128), "num_warps": (2, 4, 8),
                      "num_stages": (1, 2, 3)},
    "moe_router": {"BLOCK_T": (16, 32, 64), "BLOCK_K": (16, 32, 64, 128), "num_warps": (2, 4, 8),
                   "num_stages": (1, 2, 3)},
    "moe_permutation": {"BLOCK_PAIRS": (16, 32, 64, 128, 256), "num_warps": (1, 2, 4, 8)},
}

DOT_MIN_SIDE = 16  # tl.dot takes operand sides of at least 16
# Registers: a thread may keep this share of its 255 in live tile values (addresses, masks and
# temporaries need the rest); more spills to local memory.
LIVE_REGISTER_SHARE = 0.5
REGISTERS_PER_THREAD = 255
THREADS_PER_WARP = 32


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _extent(instance: KernelInstance, workload: Workload | None) -> dict[str, int]:
    """option -> the size it tiles, where a tile wider than that size (rounded up to a power of
    two) would only add masked lanes."""
    v = values(instance, ())
    entry = instance.template.entry
    found: dict[str, int] = {}
    if entry == "moe_combine_rows":
        found["BLOCK_N"] = v["N"]
    if workload is None:
        return found
    dims = dict(workload.dims)
    if entry == "causal_conv1d" and "channels" in dims:
        found["BLOCK_C"] = dims["channels"]
    if entry in ("ssd_chunk_scan", "ssd_state_update") and "head_dim" in dims:
        found["BLOCK_P"] = dims["head_dim"]
    if entry == "moe_router" and "hidden" in dims:
        found["BLOCK_K"] = dims["hidden"]
    return found


def why_pruned(instance: KernelInstance, config: Config, shared_limit: int,
               workload: Workload | None = None) -> str | None:
    """Why a target with `shared_limit` bytes of shared memory per block cannot run `config` of a
    non-GEMM `instance` well or at all, or None."""
    v = values(instance, config)
    warps = v["num_warps"]
    threads = THREADS_PER_WARP * warps
    t = tile(instance, config)
    for side, size in t.dot_sides:
        if size < DOT_MIN_SIDE:
            return f"{side} {size} is under the {DOT_MIN_SIDE} a tl.dot operand side needs"
    if t.elements < threads and warps > 1:
        return f"a tile of {t.elements} elements leaves threads of {warps} warps ({threads} threads) idle"
    per_thread = t.live / threads
    if per_thread > REGISTERS_PER_THREAD * LIVE_REGISTER_SHARE:
        return (f"{per_thread:.0f} live fp32 values per thread exceed {LIVE_REGISTER_SHARE:.0%} of "
                f"{REGISTERS_PER_THREAD} registers (they would spill)")
    if t.shared > shared_limit:
        return f"needs {t.shared:.0f} bytes of shared memory, over the {shared_limit} of a block"
    for option, size in _extent(instance, workload).items():
        block = v.get(option)
        choices = sorted(int(c) for c in OP_SPACES[instance.template.entry].get(option, ()))
        covering = [c for c in choices if c >= _pow2(size)]
        if block is not None and covering and block > covering[0]:
            return (f"{option} {block} is wider than the {size} it tiles: {option} {covering[0]} covers it, "
                    f"the rest are masked lanes")
    return None
