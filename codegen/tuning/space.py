"""Config spaces of the kernel templates, and their pruning by a target's limits before anything
is compiled.

A config is the part of a kernel instance a tuner may change without changing what it computes:
tile sizes, the MoE block size (BLOCK_M of the grouped GEMM: the rows of one expert per tile),
the operand swap, warps, stages and split-K. Everything else of the instance (shapes, formats,
epilogue) is its problem. `configs` lists a template's space for one problem; `prune` drops the
configs a target cannot run well or at all, each with its reason."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from itertools import product

from nemocompile.codegen.triton.spec import Constexpr, KernelInstance

from . import op_spaces
from .workload import Workload

Config = tuple[tuple[str, Constexpr], ...]  # sorted (option, value) pairs
LAUNCH_OPTIONS = ("num_warps", "num_stages")
# Split-K: the GEMM templates sum K in SPLIT_K slices (a third grid axis) into an fp32 workspace,
# and a second kernel adds the slices and runs the epilogue (codegen/triton/templates_catalog:
# split_k_reduce). A slice is at least MIN_SLICE_STEPS whole BLOCK_K steps.
SPLIT_K = "SPLIT_K"
MIN_SLICE_STEPS = 2


@dataclass(frozen=True)
class TemplateSpace:
    """The options of one template entry: option -> candidate values."""

    entry: str
    options: tuple[tuple[str, tuple[Constexpr, ...]], ...]

    def option_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.options)


def _space(entry: str, options: Mapping[str, tuple[Constexpr, ...]]) -> TemplateSpace:
    return TemplateSpace(entry, tuple(options.items()))


# The grouped NVFP4 GEMM: BLOCK_M is the MoE block size; SWAP_AB computes W x^T so a small BLOCK_M
# stays on the tensor cores (the weight becomes the 64-row operand).
MOE_SPACE = _space("moe_nvfp4_gemm", {
    "BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (64, 128, 256), "BLOCK_K": (16, 32, 64, 128, 256),
    "SWAP_AB": (True, False), SPLIT_K: (1, 2, 4, 8), "num_warps": (4, 8), "num_stages": (2, 3, 4)})
FP8_SPACE = _space("fp8_linear", {
    "BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (64, 128, 256), "BLOCK_K": (32, 64, 128, 256),
    "SWAP_AB": (True, False), SPLIT_K: (1, 2, 4, 8), "num_warps": (4, 8), "num_stages": (2, 3, 4)})
# The grouped FP8 GEMM (moe_fp8_gemm): the FP8 tiles and MoE block sizes, no split-K (it has none).
MOE_FP8_SPACE = _space("moe_fp8_gemm", {
    "BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (64, 128, 256), "BLOCK_K": (32, 64, 128, 256),
    "SWAP_AB": (True, False), "num_warps": (4, 8), "num_stages": (2, 3, 4)})
GEMM_SPACES = (MOE_SPACE, FP8_SPACE, MOE_FP8_SPACE)
FP8_ENTRIES = frozenset({"fp8_linear", "moe_fp8_gemm"})  # the GEMMs whose operands are staged as bytes
# every template of codegen/triton/templates_catalog.py: the GEMMs' here, the others' in op_spaces
SPACES: dict[str, TemplateSpace] = {
    **{space.entry: space for space in GEMM_SPACES},
    **{entry: _space(entry, options) for entry, options in op_spaces.OP_SPACES.items()}}


def space_of(instance: KernelInstance) -> TemplateSpace | None:
    """The template's space, or None for a template with nothing to tune (its builder's config is
    the default and only one)."""
    return SPACES.get(instance.template.entry)


def config_of(instance: KernelInstance) -> Config:
    """The instance's current config (its builder's default when it comes from plan.py)."""
    space = space_of(instance)
    values = dict(instance.constexprs)
    launch: dict[str, Constexpr] = {"num_warps": instance.num_warps, "num_stages": instance.num_stages}
    names = space.option_names() if space else LAUNCH_OPTIONS
    return tuple(sorted((name, launch[name] if name in launch else values.get(name, 1)) for name in names))


def apply(instance: KernelInstance, config: Config) -> KernelInstance:
    """The instance with `config` filled in (split-K only where the template takes it; its reduce
    kernel is added by templates_catalog.with_split_k_reduces)."""
    chosen = dict(config)
    if chosen.get(SPLIT_K, 1) != 1 and SPLIT_K not in instance.template.constexprs:
        raise ValueError(f"kernel {instance.name}: template {instance.template.entry} has no split-K")
    constexprs = tuple((name, chosen.get(name, value)) for name, value in instance.constexprs)
    return replace(instance, constexprs=constexprs,
                   num_warps=int(chosen.get("num_warps", instance.num_warps)),
                   num_stages=int(chosen.get("num_stages", instance.num_stages)))


def configs(instance: KernelInstance) -> list[Config]:
    """Every config of the instance's template space (its default first), or only the default."""
    space = space_of(instance)
    default = config_of(instance)
    if space is None:
        return [default]
    names = space.option_names()
    found = [tuple(sorted(zip(names, values, strict=True))) for values in product(*(v for _, v in space.options))]
    return [default, *(c for c in found if c != default)]


def problem_of(instance: KernelInstance) -> dict[str, Constexpr]:
    """What the instance computes, without its config: its constexprs less the tunable ones."""
    space = space_of(instance)
    tunable = set(space.option_names()) if space else set()
    return {name: value for name, value in instance.constexprs if name not in tunable and name != "INTERPRET"}


def formats_of(instance: KernelInstance) -> str:
    """The element types the instance fills in, e.g. out_ptr=bf16,x_ptr=bf16."""
    return ",".join(f"{name}={kind}" for name, kind in instance.pointer_types)


def template_hash(instance: KernelInstance) -> str:
    """sha256 of the template's source files and entry: a changed template never takes old entries."""
    return hashlib.sha256(instance.template.source() + instance.template.entry.encode()).hexdigest()[:16]


def config_text(config: Config) -> str:
    return json.dumps(dict(config), sort_keys=True)


def parse_config(text: str) -> Config:
    return tuple(sorted(json.loads(text).items()))


def short(config: Config) -> str:
    """A compact label: M16 N64 K64 swap w4 s3 (other tiles by name: BLOCK_T 16 -> T16, CHUNK 64 -> chunk64)."""
    values = dict(config)
    parts = [f"{name.removeprefix('BLOCK_')}{value}" for name, value in values.items() if name.startswith("BLOCK_")]
    if "CHUNK" in values:
        parts.append(f"chunk{values['CHUNK']}")
    if values.get("SWAP_AB"):
        parts.append("swap")
    if values.get(SPLIT_K, 1) != 1:
        parts.append(f"splitk{values[SPLIT_K]}")
    parts += [f"{letter}{values[name]}" for letter, name in (("w", "num_warps"), ("s", "num_stages")) if name in values]
    return " ".join(parts) or "default"


# ---- target limits -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchLimits:
    """What one SM offers a kernel (CUDA C++ Programming Guide, table of technical specifications
    per compute capability: 9.0 and 10.0 alike)."""

    shared_bytes_per_block: int = 227 * 1024  # "maximum amount of shared memory per thread block: 227 KB"
    shared_bytes_per_sm: int = 228 * 1024
    registers_per_sm: int = 64 * 1024  # 32-bit registers
    registers_per_thread: int = 255
    mma_m: int = 64  # wgmma (sm_90) and tcgen05 (sm_100) take at least 64 rows on the M side
    mma_k: int = 16  # the K step of a 16-bit MMA
    mma_n_max: int = 256


LIMITS = {"sm_90": ArchLimits(), "sm_100": ArchLimits()}
# The fp32 accumulator may take at most this share of a thread's registers (operand fragments,
# addresses and the dequantization need the rest).
ACCUMULATOR_REGISTER_SHARE = 0.5
FP8_MIN_BLOCK_K = 32  # an FP8 tl.dot needs K >= 32 per tile
W4A4_MIN_BLOCK_K = 64  # tl.dot_scaled refuses smaller K steps on sm_100a (Triton 3.9)


def shared_bytes(instance: KernelInstance, config: Config) -> int:
    """Shared memory a GEMM config needs at most: num_stages buffers of an activation tile and a
    weight tile, both staged as 16-bit values (FP8 as bytes) before the MMA."""
    values = dict(config)
    element = 1 if instance.template.entry in FP8_ENTRIES else 2
    tile = (int(values["BLOCK_M"]) + int(values["BLOCK_N"])) * int(values["BLOCK_K"]) * element
    return tile * int(values["num_stages"])


def accumulator_registers(config: Config) -> float:
    values = dict(config)
    return int(values["BLOCK_M"]) * int(values["BLOCK_N"]) / (32 * int(values["num_warps"]))


def why_pruned(instance: KernelInstance, config: Config, arch: str, workload: Workload | None = None) -> str | None:
    """The reason `arch` cannot run `config` of `instance` well or at all, or None when it can
    (`workload`: the op's runtime sizes, where a rule needs them)."""
    if space_of(instance) is None:
        return None
    limits = LIMITS[arch]
    if instance.template.entry in op_spaces.OP_SPACES:
        return op_spaces.why_pruned(instance, config, limits.shared_bytes_per_block, workload)
    values = dict(config)
    problem = dict(instance.constexprs)
    k = int(problem["K"])
    block_m, block_n, block_k = (int(values[f"BLOCK_{x}"]) for x in "MNK")
    swap = bool(values["SWAP_AB"])
    w4a4 = problem.get("ACT_FORMAT") == "nvfp4"
    if block_k % limits.mma_k:
        return f"BLOCK_K {block_k} must be a multiple of {limits.mma_k}"
    fp8 = instance.template.entry in FP8_ENTRIES
    if fp8 and block_k < FP8_MIN_BLOCK_K:
        return f"an FP8 dot needs BLOCK_K >= {FP8_MIN_BLOCK_K}"
    if w4a4 and block_k < W4A4_MIN_BLOCK_K:
        return f"tl.dot_scaled needs BLOCK_K >= {W4A4_MIN_BLOCK_K}"
    # The last K step masks its loads past K, so BLOCK_K need not divide K; but a BLOCK_K that
    # takes as many steps over K as half of it only loads more padding.
    smallest = W4A4_MIN_BLOCK_K if w4a4 else FP8_MIN_BLOCK_K if fp8 else limits.mma_k
    half = block_k // 2
    if half >= smallest and half % limits.mma_k == 0 and -(-k // half) == -(-k // block_k):
        return (f"BLOCK_K {block_k} takes as many steps over K = {k} as {half} (the last step is masked "
                f"past K), loading more padding")
    split = int(values.get(SPLIT_K, 1))
    if split > 1:
        k_steps = -(-k // block_k)
        slice_steps = -(-k_steps // split)
        if slice_steps < MIN_SLICE_STEPS:
            return (f"SPLIT_K {split} leaves slices of {slice_steps} BLOCK_K step(s) of the {k_steps} over K = {k} "
                    f"(at least {MIN_SLICE_STEPS}: a shorter slice costs a workspace round trip for too little work)")
        if (split - 1) * slice_steps >= k_steps:
            return f"SPLIT_K {split} over {k_steps} BLOCK_K steps of {slice_steps} leaves the last slice empty"
    if w4a4:
        if block_m != 128 or swap:
            return "the native NVFP4 MMA (tcgen05 mxf4nvf4) takes 128-row activation tiles, unswapped"
        if arch != "sm_100":
            return "W4A4 runs on sm_100 only"
    mma_rows = block_n if swap else block_m
    mma_cols = block_m if swap else block_n
    if mma_rows < limits.mma_m:
        return (f"the MMA's M side ({'BLOCK_N' if swap else 'BLOCK_M'} {mma_rows}) is under the "
                f"{limits.mma_m} rows a warpgroup MMA takes (it would fall back to mma.sync)")
    if mma_cols > limits.mma_n_max:
        return f"the MMA's N side {mma_cols} exceeds {limits.mma_n_max}"
    if mma_rows < limits.mma_m * int(values["num_warps"]) // 4:
        return f"{values['num_warps']} warps need {limits.mma_m * int(values['num_warps']) // 4} MMA rows"
    smem = shared_bytes(instance, config)
    if smem > limits.shared_bytes_per_block:
        return f"needs {smem} bytes of shared memory, over the {limits.shared_bytes_per_block} of a block"
    registers = accumulator_registers(config)
    if registers > limits.registers_per_thread * ACCUMULATOR_REGISTER_SHARE:
        return (f"the fp32 accumulator takes {registers:.0f} registers per thread, over "
                f"{ACCUMULATOR_REGISTER_SHARE:.0%} of {limits.registers_per_thread}")
    return None


@dataclass(frozen=True)
class Pruned:
    kept: tuple[Config, ...]
    dropped: tuple[tuple[Config, str], ...]


def prune(instance: KernelInstance, candidates: Iterable[Config], arch: str,
          workload: Workload | None = None) -> Pruned:
    kept: list[Config] = []
    dropped: list[tuple[Config, str]] = []
    for config in candidates:
        reason = why_pruned(instance, config, arch, workload)
        if reason is None:
            kept.append(config)
        else:
            dropped.append((config, reason))
    return Pruned(tuple(kept), tuple(dropped))
