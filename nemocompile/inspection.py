"""`nemocompile inspect`: what an engine holds, read from its verified manifest and graph."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemocompile.base.errors import EngineError
from nemocompile.graph.config import PATTERN_LETTERS
from nemocompile.graph.ir import Graph
from nemocompile.graph.text import parse_graph
from nemocompile.runtime.engine_files import verify_engine_files
from nemocompile.runtime.engine_format import Manifest

from .engine_files import remove_set_aside, restore_set_aside
from .stats import ParamStats, param_stats


@dataclass(frozen=True)
class EngineInfo:
    manifest: Manifest
    graph: Graph
    stats: ParamStats

    @property
    def layers(self) -> list[str]:
        return [PATTERN_LETTERS[letter] for letter in self.graph.meta("pattern") or ""]

    def as_json(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "source": m.source.to_json(),
            "target": m.target.to_json(),
            "precision": m.precision,
            "world_size": m.world_size,
            "format_version": m.format_version,
            "layers": self.layers,
            **self.stats.as_json(),
            "ops": self.graph.op_counts(),
            "kernels": [use.to_json() for use in m.kernels],
            "kernel_counts": m.kernel_counts(),
            "backends": list(m.backends),
            "files": {name: entry.to_json() for name, entry in m.files.items()},
        }


def inspect_engine(directory: Path) -> EngineInfo:
    restore_set_aside(directory)  # the engine an interrupted build set aside, when OUT is missing
    if not directory.is_dir():
        raise EngineError(f"{directory} is not an engine directory")
    manifest = verify_engine_files(directory)
    remove_set_aside(directory)  # older engines set aside, now that this one verified
    graph = parse_graph((directory / manifest.graphs.prefill).read_text())
    return EngineInfo(manifest, graph, param_stats(graph))
