"""Plan mode: build the graph from config.json alone (no weight bytes read or allocated), assign
precision by the target's policy, account parameters and bytes, and plan the memory of each GPU
for a world size (weights, KV cache, Mamba state, workspace, communication: memory_plan.py). A
checkpoint directory whose ModelOpt quantization config declares an FP8 KV cache is planned with it,
as its build deploys it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemocompile.base.formats import BASE_PRECISIONS, FORMATS, PRECISIONS
from nemocompile.base.settings import settings
from nemocompile.graph.config import ModelConfig, load_config
from nemocompile.graph.ir import Graph
from nemocompile.graph.modelopt import read_quant_config
from nemocompile.graph.nemotron_h import TORCH_DTYPE_TO_IR, build_block_graph, mtp_weight_estimate
from nemocompile.passes.manager import PassManager, PassRecord
from nemocompile.passes.precision_policy import PrecisionPolicy, resolve_policy, with_checkpoint_kv_cache
from nemocompile.targets import Target, load_target

from .memory_plan import MemoryPlan, plan_memory
from .memory_plan_bounds import Bounds, choose_bounds, context_limit
from .memory_plan_split import Parallelism
from .options import BuildOptions
from .pipeline import build_steps, graph_passes
from .stats import ParamStats, param_stats

BASE_BITS = {name: FORMATS[PRECISIONS[name].weight_dtype].bits for name in BASE_PRECISIONS}


@dataclass(frozen=True)
class PlanResult:
    name: str
    config: ModelConfig
    target: Target
    policy: PrecisionPolicy
    precision: str
    world_size: int
    graph: Graph  # core-op graph after precision assignment, weights without sources
    stats: ParamStats
    records: list[PassRecord]
    memory: MemoryPlan
    seconds: float
    bounds: Bounds  # the bounds planned (memory's), and which of them were chosen automatically

    @property
    def bytes_per_gpu(self) -> int:
        """The full plan of the largest rank at --max-batch-size and --max-context."""
        return self.memory.bytes_per_gpu

    @property
    def fits(self) -> bool:
        return self.memory.fits

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "target": self.target.name,
            "precision": self.precision,
            "policy": self.policy.describe(),
            "layers": len(self.config.layer_kinds),
            "pattern": self.config.pattern,
            "unknown_config_keys": list(self.config.unknown_keys),
            **self.stats.as_json(),
            "world_size": self.world_size,
            "bytes_per_gpu": self.bytes_per_gpu,
            "gpu_memory_bytes": self.target.memory_bytes,
            "fits": self.fits,
            "weights_bytes_per_gpu": self.memory.weights_bytes,
            "kv_bytes_per_token": self.memory.kv_bytes_per_token,
            "ssm_state_bytes_per_sequence": self.memory.ssm_state_bytes_per_sequence,
            "max_context_at_batch_1": self.memory.largest_context(1),
            "bounds": self.bounds.as_json(),
            "memory_plan": self.memory.as_json(),
            "ops": self.graph.op_counts(),
            "notes": [note for record in self.records for note in record.notes],
            "seconds": round(self.seconds, 3),
        }


def plan_model(config_path: Path, options: BuildOptions | None = None) -> PlanResult:
    start = time.perf_counter()
    options = options or BuildOptions()
    target = load_target(options.target)
    policy = resolve_policy(target, options.precision, options.overrides, options.policy_file, options.exclude,
                           options.act_scales)
    config, raw = load_config(config_path)
    if config_path.is_dir() or config_path.name == "config.json":  # a checkpoint's: its KV cache as declared
        quant = read_quant_config(config_path if config_path.is_dir() else config_path.parent, raw)
        if quant is not None and quant.kv_cache is not None:
            policy = with_checkpoint_kv_cache(policy, quant.source)
    block_graph = build_block_graph(config, TORCH_DTYPE_TO_IR[config.torch_dtype], bounds=options.bounds)
    graph, records = PassManager(graph_passes(build_steps(target, policy)),
                                   verify_each=settings().verify_each_pass).run(block_graph)
    # MTP blocks are carried in the float base (as in NVIDIA's released mixed-precision checkpoints)
    stats = param_stats(graph, mtp_weight_estimate(config), BASE_BITS[policy.base])
    name = config_path.parent.name if config_path.name == "config.json" else config_path.stem
    memory = plan_memory(name, graph, config, target, Parallelism(options.tensor_parallel, options.expert_parallel),
                         options.bounds, stats.categories["mtp"].bytes if "mtp" in stats.categories else 0)
    # the bounds a build with these options takes: those given, the others the largest that fit
    memory, bounds = choose_bounds(memory, options.max_batch_size, options.max_context, context_limit(raw))
    return PlanResult(name, config, target, policy, options.precision, options.world_size, graph, stats, records,
                      memory, time.perf_counter() - start, bounds)
