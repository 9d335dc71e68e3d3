"""`nemocompile inspect`: what an engine holds. By default the engine is read with every check
`load` makes (hashes, graphs against config.json, weight headers, tokenizer), so inspect succeeds
exactly on the engines `run` accepts; `verify=False` (`--no-verify`) reads the manifest and graph
as they are, for forensics on an engine that is refused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemocompile.graph.config import PATTERN_LETTERS
from nemocompile.graph.fused_ops import fusions_in
from nemocompile.graph.ir import Graph
from nemocompile.runtime.engine import read_engine, read_engine_unverified
from nemocompile.runtime.engine_format import Manifest

from .engine_files import remove_set_aside, restore_set_aside
from .stats import ParamStats, param_stats


@dataclass(frozen=True)
class EngineInfo:
    manifest: Manifest
    graph: Graph
    stats: ParamStats
    verified: bool = True

    @property
    def layers(self) -> list[str]:
        return [PATTERN_LETTERS.get(letter, f"unknown '{letter}'") for letter in self.graph.meta("pattern") or ""]

    def as_json(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "verified": self.verified,
            "source": m.source.to_json(),
            "target": m.target.to_json(),
            "precision": m.precision,
            "world_size": m.world_size,
            "format_version": m.format_version,
            "layers": self.layers,
            **self.stats.as_json(),
            "ops": self.graph.op_counts(),
            "fusions": fusions_in(self.graph),
            "kernels": [use.to_json() for use in m.kernels],
            "kernel_counts": m.kernel_counts(),
            "kernel_configs": [c.to_json() for c in m.kernel_configs],
            "backends": list(m.backends),
            "files": {name: entry.to_json() for name, entry in m.files.items()},
        }


def inspect_engine(directory: Path, verify: bool = True) -> EngineInfo:
    restore_set_aside(directory)  # the engine an interrupted build set aside, when OUT is missing
    if verify:
        contents = read_engine(directory)
        remove_set_aside(directory)  # older engines set aside, now that this one verified
        return EngineInfo(contents.manifest, contents.prefill, param_stats(contents.prefill))
    manifest, graph = read_engine_unverified(directory)
    return EngineInfo(manifest, graph, param_stats(graph), verified=False)
