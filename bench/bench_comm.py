"""Communication per decode step of the published Nemotron 3 configs split over 8 ranks, computed
from the IR: the build's graph (plan mode, no weights) through the `shard` pass, whose
communication ops (all_reduce, all_gather, ...) are counted with their tensors' sizes at one new
token per sequence.

For each model and batch size it prints the collectives per step, the payload (the bytes of the
tensors the collectives complete) and what each rank sends over NVLink with ring algorithms
(all-reduce: 2(n-1)/n of the payload; all-gather: (n-1)/n of the gathered tensor), and that
traffic's time at the target's NVLink bandwidth (half the datasheet's bidirectional figure).
At decode the collectives are small, so each one's fixed latency (a few microseconds in NCCL on
NVLink), times their count, weighs more than their bytes: the count is printed for that reason.

    python bench/bench_comm.py [--models-dir ../shared/models] [--world-size 8]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from bench_plan import find_models_dir
from report_tables import print_table

from nemocompile.graph.ir import Graph
from nemocompile.graph.types import TensorType
from nemocompile.options import BuildOptions
from nemocompile.passes.shard import Shard
from nemocompile.planner import plan_model
from nemocompile.targets import load_target

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
BATCHES = (1, 8, 64)


def _bytes(kind: TensorType, batch: int) -> int:
    count = 1
    for dim in kind.shape:
        count *= batch if dim == "batch" else 1 if dim == "seq" else int(dim)
    return count * kind.dtype.bits // 8


def sharded_graph(config: Path, target: str, world_size: int) -> Graph:
    options = BuildOptions(target=target, world_size=world_size)
    plan = plan_model(config, options)
    return Shard(world_size, options.tensor_parallel, options.expert_parallel).apply(plan.graph).graph


def step_traffic(graph: Graph, batch: int, world_size: int) -> tuple[Counter[str], int, int]:
    """(collectives by kind, payload bytes, bytes each rank sends with ring algorithms) of one decode
    step of `batch` sequences."""
    counts: Counter[str] = Counter()
    payload = sent = 0
    for op in graph.ops:
        if op.opname not in COLLECTIVES:
            continue
        counts[op.opname] += 1
        size = _bytes(op.results[0].type, batch)
        payload += size
        share = (world_size - 1) / world_size
        sent += round(size * (2 * share if op.opname == "all_reduce" else share))
    return counts, payload, sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--world-size", type=int, default=8)
    args = parser.parse_args()
    models = find_models_dir(args.models_dir)
    rows = []
    for name in ("nano", "super", "ultra"):
        for target_name in ("h100", "b200"):
            target = load_target(target_name)
            link = target.nvlink_bandwidth_bytes_per_s / 2  # one direction
            graph = sharded_graph(models / f"{name}.json", target_name, args.world_size)
            for batch in BATCHES:
                counts, payload, sent = step_traffic(graph, batch, args.world_size)
                rows.append([name, target_name, str(batch), ", ".join(f"{n} {k}" for k, n in sorted(counts.items())),
                             f"{payload / 1e6:.3f}", f"{sent / 1e6:.3f}", f"{sent / link * 1e6:.1f}"])
    print_table(f"communication per decode step at {args.world_size} ranks (tp = ep = {args.world_size}; "
                "one new token per sequence)",
                ["model", "target", "batch", "collectives", "payload MB", "sent per rank MB (ring)",
                 "NVLink us (bandwidth only)"], rows)


if __name__ == "__main__":
    main()
