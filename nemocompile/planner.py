"""Plan mode: build the graph from config.json alone (no weight bytes read or allocated) and
account parameters and bytes at the chosen precision."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemocompile.graph.config import ModelConfig, load_config
from nemocompile.graph.ir import Graph
from nemocompile.graph.nemotron_h import TORCH_DTYPE_TO_IR, build_block_graph, mtp_weight_estimate
from nemocompile.passes.manager import PassManager
from nemocompile.targets import Target, load_target

from .driver import pipeline
from .stats import ParamStats, param_stats

PRECISION_BITS = {"bf16": 16, "fp32": 32}


@dataclass(frozen=True)
class PlanResult:
    name: str
    config: ModelConfig
    target: Target
    precision: str
    graph: Graph  # core-op graph, weights without sources
    stats: ParamStats
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "target": self.target.name,
            "precision": self.precision,
            "layers": len(self.config.layer_kinds),
            "pattern": self.config.pattern,
            **self.stats.as_json(),
            "ops": self.graph.op_counts(),
            "seconds": round(self.seconds, 3),
        }


def plan_model(config_path: Path, target: str = "h100", precision: str = "bf16") -> PlanResult:
    start = time.perf_counter()
    target_info = load_target(target)
    config, _ = load_config(config_path)
    block_graph = build_block_graph(config, TORCH_DTYPE_TO_IR[config.torch_dtype])
    graph, _ = PassManager(pipeline(target_info, precision)).run(block_graph)
    stats = param_stats(graph, mtp_weight_estimate(config), PRECISION_BITS[precision])
    name = config_path.parent.name if config_path.name == "config.json" else config_path.stem
    return PlanResult(name, config, target_info, precision, graph, stats, time.perf_counter() - start)
