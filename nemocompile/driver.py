"""The build driver: checkpoint -> IR -> passes -> engine directory. The engine is written into a
staging directory and renamed into place, so a failed or killed build leaves nothing at OUT."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemocompile.graph.checkpoint import Checkpoint
from nemocompile.graph.importer import ImportedModel, import_checkpoint
from nemocompile.graph.ir import Graph, TensorSource, Weight
from nemocompile.graph.text import print_graph
from nemocompile.graph.types import SAFETENSORS_DTYPES
from nemocompile.passes.base import Pass
from nemocompile.passes.decompose import Decompose
from nemocompile.passes.manager import PassManager, PassRecord
from nemocompile.passes.set_precision import SetPrecision
from nemocompile.passes.specialize_decode import SpecializeDecode
from nemocompile.runtime.dtypes import torch_dtype
from nemocompile.targets import Target, load_target

from . import __version__
from .demo import DEMO_NAME, write_demo_checkpoint
from .engine_files import staged_directory, write_manifest
from .errors import UsageError
from .report import write_report
from .safetensors_writer import SafetensorsWriter
from .stats import ParamStats, param_stats

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights/rank0.safetensors"
IR_DTYPE_TO_SAFETENSORS = {dtype.name: name for name, dtype in SAFETENSORS_DTYPES.items()}

# (description, bytes just written, bytes in all)
ProgressHook = Callable[[str, int, int], None]


def pipeline(target: Target, precision: str) -> list[Pass]:
    """The passes for a target, in order. Precision per target policy and fusions come next."""
    return [SetPrecision(precision), Decompose()]


@dataclass(frozen=True)
class BuildResult:
    out: Path
    manifest: dict[str, Any]
    stats: ParamStats
    passes: list[PassRecord]
    bytes_written: int
    seconds: float


@contextmanager
def _model_directory(model: Path | None) -> Iterator[tuple[Path, str]]:
    """The checkpoint to build: the given directory, or the demo written to a temporary one."""
    if model is not None:
        yield model, model.resolve().name
        return
    with tempfile.TemporaryDirectory(prefix="nemocompile-demo-") as tmp:
        yield write_demo_checkpoint(Path(tmp)), DEMO_NAME


def _read_weight(ckpt: Checkpoint, weight: Weight) -> torch.Tensor:
    parts = [ckpt.read(source.tensor) for source in weight.sources]
    tensor = parts[0] if len(parts) == 1 else torch.stack(parts)
    return tensor.to(torch_dtype(weight.type.dtype))


def _write_weights(ckpt: Checkpoint, graph: Graph, path: Path, progress: ProgressHook | None) -> int:
    total = sum(w.type.nbytes() for w in graph.weights)
    entries = [(w.name, IR_DTYPE_TO_SAFETENSORS[w.type.dtype.name], tuple(int(d) for d in w.type.shape))
               for w in graph.weights]
    path.parent.mkdir(parents=True, exist_ok=True)
    with SafetensorsWriter(path, entries, {"format": "pt"}) as writer:
        for weight in graph.weights:
            writer.write(weight.name, _read_weight(ckpt, weight))
            if progress:
                progress(weight.name.rsplit(".", 1)[0], weight.type.nbytes(), total)
    return total


def _engine_graph(graph: Graph) -> Graph:
    """The same graph with every weight sourced from the engine's own weight file."""
    weights = tuple(Weight(w.name, w.type, w.category, (TensorSource(WEIGHTS_FILE, w.name),), w.type.dtype)
                    for w in graph.weights)
    return Graph(graph.name, graph.inputs, weights, graph.states, graph.ops, graph.outputs, graph.metadata)


def build(model: Path | None, out: Path, target: str = "h100", precision: str = "bf16", force: bool = False,
          print_after: frozenset[str] = frozenset(), printer: Callable[[str, str], None] | None = None,
          progress: ProgressHook | None = None) -> BuildResult:
    start = time.perf_counter()
    target_info = load_target(target)
    passes = pipeline(target_info, precision)
    known = {p.name for p in passes} | {SpecializeDecode.name, "all"}
    unknown = sorted(set(print_after) - known)
    if unknown:
        raise UsageError(f"--print-after names unknown pass '{unknown[0]}'; passes: {', '.join(sorted(known))}")
    with _model_directory(model) as (model_dir, source_name), staged_directory(out, force) as stage:
        imported: ImportedModel = import_checkpoint(model_dir)
        manager = PassManager(passes, print_after, printer)
        graph, records = manager.run(imported.graph)
        decode, decode_records = PassManager([SpecializeDecode()], print_after, printer).run(graph)
        records += decode_records
        bytes_written = _write_weights(imported.checkpoint, graph, stage / WEIGHTS_FILE, progress)
        (stage / "graph.txt").write_text(print_graph(_engine_graph(graph)))
        (stage / "graph.decode.txt").write_text(print_graph(_engine_graph(decode)))
        (stage / "config.json").write_text(json.dumps(imported.raw_config, indent=2, sort_keys=True) + "\n")
        tokenizer = model_dir / "tokenizer.json"
        has_byte_tokenizer = tokenizer.exists() and '"type": "bytes"' in tokenizer.read_text()
        if has_byte_tokenizer:
            shutil.copyfile(tokenizer, stage / "tokenizer.json")
        stats = param_stats(graph)
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "nemocompile_version": __version__,
            "target": {"name": target_info.name, "arch": target_info.arch,
                       "compute_capability": list(target_info.compute_capability)},
            "world_size": 1,
            "precision": precision,
            "source": {"name": source_name,
                       "fingerprint": imported.checkpoint.fingerprint()},
            "graphs": {"prefill": "graph.txt", "decode": "graph.decode.txt"},
            "weights": [WEIGHTS_FILE],
            "tokenizer": "tokenizer.json" if has_byte_tokenizer else None,
        }
        write_report(stage / "report.md", manifest, graph, stats, records)
        write_manifest(stage, manifest)
        imported.checkpoint.close()
    return BuildResult(out, manifest, stats, records, bytes_written, time.perf_counter() - start)
