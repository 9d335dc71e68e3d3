"""Per-program resources of the non-GEMM templates under one config: the fp32 values a program
keeps live (registers), the shared memory its tl.dot operands are staged in, the elements of its
tile (what its threads share) and the tile sides a tl.dot takes. Pruning (op_spaces) and the cost
model (op_cost) read the same numbers.

The counts follow each template's source (codegen/triton/templates/): the arrays a program holds at
its widest point, in fp32 words (an int64 takes two)."""

from __future__ import annotations

from dataclasses import dataclass

from nemocompile.codegen.triton.spec import Constexpr, KernelInstance

Config = tuple[tuple[str, Constexpr], ...]  # as space.Config (sorted option, value pairs)


@dataclass(frozen=True)
class Tile:
    live: float  # fp32 words a program holds at once
    shared: float  # bytes of shared memory (tl.dot operands, times the pipeline's stages)
    elements: int  # elements of the tile the program's threads share out
    dot_sides: tuple[tuple[str, int], ...] = ()  # the tl.dot operand sides (each must be >= 16)


def element_bytes(instance: KernelInstance, pointer: str, default: float = 2.0) -> float:
    kind = dict(instance.pointer_types).get(pointer)
    return {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8e4nv": 1.0, "u8": 1.0}.get(kind or "", default)


def values(instance: KernelInstance, config: Config) -> dict[str, int]:
    """The instance's integer constexprs with the config's options over them."""
    found = {name: int(value) for name, value in instance.constexprs
             if isinstance(value, int | bool) and not isinstance(value, str)}
    found.update({name: int(value) for name, value in config if not isinstance(value, str)})
    found.setdefault("num_stages", instance.num_stages)
    found.setdefault("num_warps", instance.num_warps)
    return found


def tile(instance: KernelInstance, config: Config) -> Tile:
    v = values(instance, config)
    entry = instance.template.entry
    stages = max(1, v["num_stages"])
    if entry == "add_rms_norm":
        width = v["BLOCK_D"]
        return Tile(width * (3 if v["HAS_RESIDUAL"] else 2), 0, width)
    if entry == "gated_rms_norm":
        return Tile(v["BLOCK_G"] * 3, 0, v["BLOCK_G"])
    if entry == "moe_combine_rows":
        return Tile(v["BLOCK_N"] * 2, 0, v["BLOCK_N"])
    if entry == "causal_conv1d":
        block = v["BLOCK_T"] * v["BLOCK_C"]
        return Tile(block * 3 + v["BLOCK_C"], 0, block)  # acc, u, y and the tap row
    if entry == "ssd_state_update":
        block = v["BLOCK_P"] * v["BLOCK_N"]
        return Tile(block * 3 + v["BLOCK_N"] * 2, 0, block)  # state, update, the rounded state; B, C
    if entry == "kv_cache_write":
        return Tile(v["BLOCK_D"] * 2, 0, v["BLOCK_D"])
    if entry == "ssd_chunk_scan":
        chunk, p, n = v["CHUNK"], v["BLOCK_P"], v["BLOCK_N"]
        live = p * n + 3 * chunk * chunk + 3 * chunk * p + 2 * chunk * n  # state; scores, decay, product; x, x dt, y; B, C
        shared = (2 * chunk * n * 2 + chunk * chunk * 4 + chunk * p * 4 + p * n * 4) * stages
        return Tile(live, shared, chunk * p, (("CHUNK", chunk), ("BLOCK_P", p), ("BLOCK_N", n)))
    if entry == "attention_gqa":
        m, n, d = v["BLOCK_M"], v["BLOCK_N"], v["BLOCK_D"]
        live = 2 * m * d + 2 * m * n + 2 * n * d  # q, acc; scores, probabilities; k, v
        shared = (m * d + 2 * n * d) * 2 * stages
        return Tile(live, shared, m * n, (("BLOCK_M", m), ("BLOCK_N", n), ("BLOCK_D", d)))
    if entry == "moe_router":
        t, e, k = v["BLOCK_T"], v["BLOCK_E"], v["BLOCK_K"]
        live = 3 * t * e + t * k + e * k + 4 * t * v["BLOCK_SLOTS"]  # logits, scores, choice; x, w tiles; picks
        shared = (t * k + e * k) * 4 * stages
        return Tile(live, shared, t * e, (("BLOCK_T", t), ("BLOCK_E", e), ("BLOCK_K", k)))
    if entry == "moe_permutation":
        block = v["BLOCK_PAIRS"] * v["BLOCK_E"]
        return Tile(block * 2 * 3, 0, block)  # one-hot, its cumulative sum and the product, int64
    raise KeyError(entry)
