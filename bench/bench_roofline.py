"""Numbers without a GPU: per kernel and per target, the bytes moved, the FLOPs and the roofline
time of Nemotron 3 Nano, Super and Ultra at decode (batch 1, 8, 64) and prefill (4k tokens).

The graphs are what `nemocompile plan` builds from each published config.json (no weights): the
target's pipeline, fusions included; the decode graph is the one specialize_decode forks. Costs
come from graph/cost.py (its docstring states the assumptions), bandwidth and peak rates from the
targets' data files (targets/data/*.json). One GPU holds the whole model here (no sharding): the
numbers are per forward call of one rank holding everything, a lower bound on its time.

    python bench/bench_roofline.py                       # summary + per-kernel tables, all of them
    python bench/bench_roofline.py --model nano --target b200 --regime decode-1
    python bench/bench_roofline.py --summary-only
    --models-dir DIR   folder with nano.json, super.json, ultra.json (default ../shared/models beside
                       the repo, else /work/shared/models)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nemocompile.graph.cost import CostModel, OpCost, Sizes, kernel_label
from nemocompile.graph.ir import Graph
from nemocompile.options import BuildOptions
from nemocompile.passes.manager import PassManager
from nemocompile.passes.specialize_decode import SpecializeDecode
from nemocompile.pipeline import FUSION_PASSES
from nemocompile.planner import plan_model
from nemocompile.targets import Target, load_target

MODELS = ("nano", "super", "ultra")
TARGETS = ("h100", "b200")
PROMPT = 4096  # prefill length, and the tokens cached before each decode step
REGIMES: dict[str, Sizes] = {
    "decode-1": Sizes(1, 1, PROMPT),
    "decode-8": Sizes(8, 1, PROMPT),
    "decode-64": Sizes(64, 1, PROMPT),
    "prefill-4k": Sizes(1, PROMPT, 0),
}


@dataclass
class Row:
    kernel: str
    count: int = 0
    bytes: float = 0.0
    flops: float = 0.0
    seconds: float = 0.0
    memory_bound: int = 0  # ops of this kernel that are memory-bound


def models_dir(given: Path | None) -> Path:
    if given is not None:
        return given
    beside = Path(__file__).resolve().parents[1].parent / "shared" / "models"
    return beside if beside.is_dir() else Path("/work/shared/models")


def graphs(config: Path, target: str) -> dict[tuple[str, bool], Graph]:
    """(phase, fused) -> graph for one model on one target: prefill and decode, with the fusions and
    without them (for comparison)."""
    plan = plan_model(config, BuildOptions(target=target))
    unfused = _unfused(config, target)
    return {("prefill", True): plan.graph, ("decode", True): SpecializeDecode().apply(plan.graph).graph,
            ("prefill", False): unfused, ("decode", False): SpecializeDecode().apply(unfused).graph}


def _unfused(config: Path, target: str) -> Graph:
    """The prefill graph the same pipeline makes without its fusion passes."""
    from nemocompile.graph.config import load_config
    from nemocompile.graph.nemotron_h import TORCH_DTYPE_TO_IR, build_block_graph
    from nemocompile.passes.precision_policy import resolve_policy
    from nemocompile.pipeline import build_steps, graph_passes

    chosen = load_target(target)
    model, _ = load_config(config)
    passes = [p for p in graph_passes(build_steps(chosen, resolve_policy(chosen))) if p.name not in FUSION_PASSES]
    graph, _ = PassManager(passes, verify_each=False).run(
        build_block_graph(model, TORCH_DTYPE_TO_IR[model.torch_dtype]))
    return graph


def table(graph: Graph, sizes: Sizes, target: Target) -> tuple[list[Row], OpCost, float]:
    """Per-kernel rows (by time, largest first), the total cost and the total roofline seconds."""
    model = CostModel(graph)
    types = graph.value_types()
    weight_types = {name: w.type for name, w in graph.weight_map().items()}
    bandwidth, peaks = float(target.hbm_bandwidth_bytes_per_s), dict(target.peak_tflops)
    rows: dict[str, Row] = {}
    total_bytes = total_flops = total_seconds = 0.0
    for op in graph.ops:
        cost = model.cost(op, sizes)
        label = kernel_label(op, types, weight_types)
        row = rows.setdefault(label, Row(label))
        seconds = cost.seconds(bandwidth, peaks)
        row.count += 1
        row.bytes += cost.bytes
        row.flops += cost.flops
        row.seconds += seconds
        row.memory_bound += cost.memory_bound(bandwidth, peaks)
        total_bytes += cost.bytes
        total_flops += cost.flops
        total_seconds += seconds
    ordered = sorted(rows.values(), key=lambda r: -r.seconds)
    return ordered, OpCost(total_bytes, total_flops, "-"), total_seconds


def print_kernels(name: str, target: Target, regime: str, rows: list[Row], total: float) -> None:
    print(f"\n### {name} on {target.name} ({target.hbm_bandwidth_bytes_per_s / 1e12:.2f} TB/s), {regime}")
    print(f"{'kernel':58} {'ops':>4} {'MB moved':>11} {'GFLOP':>11} {'roofline us':>12} {'share':>6} bound")
    for row in rows:
        bound = "memory" if row.memory_bound == row.count else "compute" if row.memory_bound == 0 else "mixed"
        print(f"{row.kernel:58} {row.count:4d} {row.bytes / 1e6:11.2f} {row.flops / 1e9:11.2f} "
              f"{row.seconds * 1e6:12.2f} {row.seconds / total:6.1%} {bound}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--model", choices=MODELS, action="append")
    parser.add_argument("--target", choices=TARGETS, action="append")
    parser.add_argument("--regime", choices=sorted(REGIMES), action="append")
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args(argv)
    folder = models_dir(args.models_dir)
    start = time.perf_counter()
    summary: list[str] = []
    for model in args.model or MODELS:
        config = folder / f"{model}.json"
        if not config.is_file():
            print(f"error: {config} not found (pass --models-dir)", file=sys.stderr)
            return 1
        for target_name in args.target or TARGETS:
            target = load_target(target_name)
            built = graphs(config, target_name)
            for regime in args.regime or REGIMES:
                sizes = REGIMES[regime]
                phase = regime.split("-")[0]
                rows, total, seconds = table(built[phase, True], sizes, target)
                _, unfused_total, unfused_seconds = table(built[phase, False], sizes, target)
                tokens = sizes.batch * sizes.seq
                summary.append(f"{model:6} {target_name:5} {regime:11} {total.bytes / 1e9:10.3f} "
                               f"{total.flops / 1e12:10.3f} {seconds * 1e3:10.3f} {tokens / seconds:12,.0f} "
                               f"{unfused_total.bytes / 1e9:13.3f} {unfused_seconds * 1e3:13.3f}")
                if not args.summary_only:
                    print_kernels(model, target, regime, rows, seconds)
    print("\n## Summary: one forward call, whole model on one GPU (roofline lower bound)")
    print(f"{'model':6} {'gpu':5} {'regime':11} {'GB moved':>10} {'TFLOP':>10} {'ms':>10} {'tokens/s':>12} "
          f"{'unfused GB':>13} {'unfused ms':>13}")
    print("\n".join(summary))
    print(f"\n(decode: {PROMPT} tokens cached; prefill: one sequence of {PROMPT} tokens; "
          f"{time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
