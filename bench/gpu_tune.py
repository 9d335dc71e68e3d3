"""Tune the fused MoE expert GEMMs on a lent GPU, within 10 minutes, and print tuned against
default times (H100/H200: NVFP4 W4A16; B200: W4A4).

For Nano's expert shapes (up: hidden -> expert intermediate with the gather and ReLU²; down:
back to hidden with the routing-weight epilogue) and each batch size of 1..256 tokens:
1. the template's config space, pruned by the target's limits, ordered by the cost model; the
   best --top of them are compiled ahead of time in parallel (the shared compile cache) and timed
   with CUDA events (median of 25 after 5 warm-up launches, L2 flushed before each), the default
   config and the model's best split-K config (with its reduce kernel) always among them; a config
   that fails to compile or run scores infinitely slow;
2. the fastest config must reproduce the default config's output on the same inputs (the default
   is checked against the reference composition by bench/gpu_check.py), else it is rejected;
3. the winners go to a tuning database (--db), as `nemocompile tune` writes them.

    python bench/gpu_tune.py [--model /work/shared/models/nano.json] [--batch-sizes 1,2,4,...,256]
                             [--budget 540] [--top 24] [--db gpu-tuning.sqlite]

Nothing here asserts a speed. Without a GPU it says so and exits with status 2."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nemocompile.base.settings import settings
from nemocompile.codegen.triton import templates_catalog as catalog
from nemocompile.codegen.triton.spec import KernelInstance
from nemocompile.codegen.tuning import cost_model, space
from nemocompile.codegen.tuning.db import TUNED, Entry, Trial, TuningDB, bucket_of
from nemocompile.kernel_configs import environment, kernel_key
from nemocompile.numerics_gate import tolerance_for
from nemocompile.targets import Target, load_target
from nemocompile.tune_measure import compile_all

TARGETS = {90: "h100", 100: "b200"}
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# (instance, config, tokens) -> (seconds, output); raises when the config cannot run
Runner = Callable[[KernelInstance, space.Config, int], tuple[float, torch.Tensor]]


def expert_gemms(config: dict[str, int], act_format: str) -> list[KernelInstance]:
    """The up and down expert GEMMs of a model config, with their builders' default configs."""
    d, i = config["hidden_size"], config["moe_intermediate_size"]
    experts, top_k = config["n_routed_experts"], config["num_experts_per_tok"]
    block_m, block_n = (16, 64) if act_format == "bf16" else (128, 128)
    up = catalog.moe_gemm("moe_up", "moe_expert_up", n=i, k=d, experts=experts, top_k=top_k, act_format=act_format,
                          activation="relu2", gather=True, block_m=block_m, block_n=block_n,
                          block_k=128 if d % 128 == 0 else 64)
    down = catalog.moe_gemm("moe_down", "moe_expert_down", n=d, k=i, experts=experts, top_k=top_k,
                            act_format=act_format, combine=True, block_m=block_m, block_n=block_n,
                            block_k=128 if i % 128 == 0 else 64)
    return [up, down]


def candidates(instance: KernelInstance, tokens: int, target: Target, top: int) -> list[space.Config]:
    """`top` configs: the default, the cost model's best split-K config (the model seldom ranks
    split-K high for these shapes; the measurement tells whether it is right), and the model's best
    of the rest of the pruned space."""
    kept = space.prune(instance, space.configs(instance), target.arch).kept
    ranked = sorted(kept, key=lambda c: cost_model.seconds(instance, c, tokens, target))
    default = space.config_of(instance)
    split = next((c for c in ranked if dict(c).get(space.SPLIT_K, 1) != 1), None)
    must = [default, *([split] if split is not None and split not in ranked[:top] else [])]
    return [*must, *(c for c in ranked if c not in must)][:top]


@dataclass
class Row:
    kernel: str
    tokens: int
    default: float
    tuned: float
    config: space.Config
    tried: int
    failed: int
    check: str


def tune_one(instance: KernelInstance, tokens: int, configs: Sequence[space.Config], run: Runner,
             deadline: float) -> Row:
    """Time `configs` (the default first) until the deadline; the fastest that reproduces the
    default config's output wins."""
    default = space.config_of(instance)
    times: dict[space.Config, float] = {}
    outputs: dict[space.Config, torch.Tensor] = {}
    for config in sorted(configs, key=lambda c: c != default):
        if time.monotonic() > deadline and times:
            break
        try:
            times[config], outputs[config] = run(instance, config, tokens)
        except Exception:  # a config that fails to compile or run scores infinitely slow
            times[config] = math.inf
    reference = outputs.get(default)
    check = "default failed to run"
    for config in sorted(times, key=lambda c: times[c]):
        if math.isinf(times[config]) or reference is None:
            continue
        error = float((outputs[config].float() - reference.float()).abs().max())
        tolerance = tolerance_for(reference)
        if error <= tolerance:
            check = f"matches the default within {tolerance:.3g}"
            return Row(instance.op, tokens, times.get(default, math.inf), times[config], config, len(times),
                       sum(math.isinf(t) for t in times.values()), check)
        check = f"config {space.short(config)} rejected: differs from the default by {error:.3g}"
    return Row(instance.op, tokens, times.get(default, math.inf), math.inf, default, len(times),
               sum(math.isinf(t) for t in times.values()), check)


def gpu_runner(arch: str) -> Runner:  # pragma: no cover - needs a GPU
    from nemocompile.runtime.kernels.triton_loader import TritonKernels
    from nemocompile.tune_measure import MeasuredTimer, kernel_files, synthetic_call

    timer = MeasuredTimer(arch, Path(settings().kernel_cache_dir).expanduser(), torch.device("cuda"))

    def run(instance: KernelInstance, config: space.Config, tokens: int) -> tuple[float, torch.Tensor]:
        seconds = timer(instance, config, tokens)
        configured = catalog.with_split_k_reduces([space.apply(instance, config)])  # a split GEMM and its reduce
        kernels = TritonKernels.from_files(kernel_files(configured, arch, timer.cache_dir, timer.device), timer.device)
        call, out = synthetic_call(kernels, configured[0], tokens, timer.device,
                                   configured[1].name if len(configured) > 1 else None)
        call()
        torch.cuda.synchronize()
        return seconds, out.clone()

    return run


def precompile(instances: Sequence[KernelInstance], configs: Sequence[space.Config], arch: str) -> int:
    """Compile every (instance, config) into the shared cache in parallel; the failures' count."""
    cache = Path(settings().kernel_cache_dir).expanduser()
    return sum(len(compile_all(instance, configs, arch, cache)) for instance in instances)


def record(db: TuningDB, target: Target, instance: KernelInstance, row: Row) -> None:
    if math.isfinite(row.tuned):
        db.record_entry(Entry(kernel_key(instance), bucket_of(row.tokens), environment(target, measured=True), TUNED,
                              row.config, row.tuned, row.default if math.isfinite(row.default) else None, row.check))
        db.record_trial(kernel_key(instance), bucket_of(row.tokens), environment(target, measured=True), "measured",
                        Trial(row.config, row.tuned, ""))


def print_rows(rows: Sequence[Row]) -> None:
    print(f"{'kernel':16s} {'tokens':>6s} {'default us':>11s} {'tuned us':>9s} {'speedup':>8s} {'tried':>5s} "
          f"{'failed':>6s}  config / check")
    for r in rows:
        speedup = f"{r.default / r.tuned:.2f}x" if math.isfinite(r.default) and math.isfinite(r.tuned) else "-"
        print(f"{r.kernel:16s} {r.tokens:6d} {r.default * 1e6:11.2f} {r.tuned * 1e6:9.2f} {speedup:>8s} {r.tried:5d} "
              f"{r.failed:6d}  {space.short(r.config)} / {r.check}")


def main() -> int:  # pragma: no cover - needs a GPU
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/work/shared/models/nano.json")
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole sweep")
    parser.add_argument("--top", type=int, default=24, help="configs per kernel and batch size, by the cost model")
    parser.add_argument("--db", default="gpu-tuning.sqlite")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_tune.py needs a CUDA GPU (sm_90 or sm_100); none is visible", file=sys.stderr)
        return 2
    major, _ = torch.cuda.get_device_capability()
    if major * 10 not in TARGETS:
        print(f"gpu_tune.py tunes sm_90 and sm_100 GPUs; this one is sm_{major}x", file=sys.stderr)
        return 2
    start = time.monotonic()
    target = load_target(TARGETS[major * 10])
    act_format = "bf16" if target.arch == "sm_90" else "nvfp4"
    instances = expert_gemms(json.loads(Path(args.model).read_text()), act_format)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    plans = {(i.op, t): candidates(i, t, target, args.top) for i in instances for t in sizes}
    every = sorted({c for configs in plans.values() for c in configs})
    failed = precompile(instances, every, target.arch)
    print(f"{torch.cuda.get_device_name()}: {len(every)} configs x {len(instances)} kernels compiled in "
          f"{time.monotonic() - start:.0f} s ({failed} failed)")
    run = gpu_runner(target.arch)
    db = TuningDB(Path(args.db), create=True)
    rows = []
    slices = len(instances) * len(sizes)
    for position, (instance, tokens) in enumerate((i, t) for i in instances for t in sizes):
        remaining = args.budget - (time.monotonic() - start)
        deadline = time.monotonic() + remaining / (slices - position)
        row = tune_one(instance, tokens, plans[(instance.op, tokens)], run, deadline)
        record(db, target, instance, row)
        rows.append(row)
    db.close()
    print_rows(rows)
    print(f"total {time.monotonic() - start:.0f} s; database {args.db}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
