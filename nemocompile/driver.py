"""The build driver: checkpoint -> IR -> passes -> engine directory. The engine is written into a
staging directory and renamed into place, so a failed or killed build leaves nothing at OUT."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nemocompile.base.errors import UsageError
from nemocompile.base.settings import settings
from nemocompile.graph.importer import ImportedModel, import_checkpoint
from nemocompile.graph.ir import Graph, TensorSource, Weight
from nemocompile.graph.kernels import kernel_uses
from nemocompile.graph.text import print_graph
from nemocompile.passes.assign_precision import AssignPrecision
from nemocompile.passes.base import Pass
from nemocompile.passes.decompose import Decompose
from nemocompile.passes.manager import PassManager, PassRecord
from nemocompile.passes.precision_policy import PrecisionPolicy, resolve_policy
from nemocompile.passes.select_kernels import SelectKernels
from nemocompile.passes.set_precision import SetPrecision
from nemocompile.passes.specialize_decode import SpecializeDecode
from nemocompile.runtime.engine_format import (
    MANIFEST_NAME,
    GraphFiles,
    KernelUse,
    Manifest,
    PolicyInfo,
    RankFiles,
    SourceInfo,
    TargetInfo,
    weights_file,
)
from nemocompile.runtime.weights import load_weights
from nemocompile.targets import Target, load_target

from . import __version__
from .agreement import Agreement, measure_agreement
from .calibration import calibrate, calibration_batches, read_token_file, scales_needed
from .demo import DEMO_NAME, write_demo_checkpoint
from .engine_files import staged_directory, write_manifest
from .report import write_report
from .stats import ParamStats, param_stats
from .weight_stream import QuantizationError, WeightStream, read_weights

ProgressHook = Callable[[str, int, int], None]  # (description, bytes just written, bytes in all)


@dataclass(frozen=True)
class BuildOptions:
    target: str = "h100"
    precision: str = "auto"  # auto: the target's policy; bf16 / fp32: one float format throughout
    overrides: tuple[str, ...] = ()  # component=precision
    policy_file: Path | None = None
    exclude: tuple[str, ...] = ()  # weight-name patterns kept in the float base
    calibrate: int = 8  # token batches for activation scales (W4A4, W8A8)
    calibration_data: Path | None = None  # a file of token ids, one sequence per line
    # GPUs to plan for: sizes the report's "bytes per GPU at planned world size" line (and `plan`).
    # The engine itself holds one rank until sharding lands; its manifest says so.
    world_size: int = 1
    force: bool = False
    print_after: frozenset[str] = field(default_factory=frozenset)


def pipeline(target: Target, policy: PrecisionPolicy) -> list[Pass]:
    """The passes for a target, in order; decode specialisation follows on a copy, and kernel
    selection (the last pass) runs again on the decode graph."""
    return [SetPrecision(policy.base, policy.components.get("ssm_state", "fp32")), Decompose(),
            AssignPrecision(policy), SelectKernels(target.arch)]


@dataclass(frozen=True)
class BuildResult:
    out: Path
    manifest: Manifest
    stats: ParamStats
    passes: list[PassRecord]
    bytes_written: int
    seconds: float
    errors: list[QuantizationError]
    agreement: Agreement | None


@contextmanager
def _model_directory(model: Path | None) -> Iterator[tuple[Path, str]]:
    """The checkpoint to build: the given directory, or the demo written to a temporary one."""
    if model is not None:
        yield model, model.resolve().name
        return
    with tempfile.TemporaryDirectory(prefix="nemocompile-demo-") as tmp:
        yield write_demo_checkpoint(Path(tmp)), DEMO_NAME


def _engine_graph(graph: Graph) -> Graph:
    """The same graph with every weight sourced from the engine's own weight file."""
    weights = tuple(Weight(w.name, w.type, w.category, (TensorSource(weights_file(0), w.name),), w.type.dtype)
                    for w in graph.weights)
    return Graph(graph.name, graph.inputs, weights, graph.states, graph.ops, graph.outputs, graph.metadata)


def _kernel_uses(prefill: Graph, decode: Graph) -> tuple[KernelUse, ...]:
    return tuple(KernelUse(name, op, kernel, backend, count)
                 for name, graph in (("prefill", prefill), ("decode", decode))
                 for op, kernel, backend, count in kernel_uses(graph))


def _check_print_after(passes: list[Pass], print_after: frozenset[str]) -> None:
    known = {p.name for p in passes} | {SpecializeDecode.name, "all"}
    unknown = sorted(set(print_after) - known)
    if unknown:
        raise UsageError(f"--print-after names unknown pass '{unknown[0]}'; passes: {', '.join(sorted(known))}")


def _quantized(graph: Graph) -> bool:
    return any(w.type.dtype.quantized for w in graph.weights)


class _Build:
    """One build, step by step; the steps share the imported model and graphs."""

    def __init__(self, options: BuildOptions, imported: ImportedModel, stage: Path,
                 printer: Callable[[str, str], None] | None, progress: ProgressHook | None) -> None:
        self.options = options
        self.imported = imported
        self.stage = stage
        self.printer = printer
        self.progress = progress
        self.target = load_target(options.target)
        self.policy = resolve_policy(self.target, options.precision, options.overrides, options.policy_file,
                                     options.exclude)
        self.passes = pipeline(self.target, self.policy)
        _check_print_after(self.passes, options.print_after)
        self.vocab_size = imported.config.vocab_size

    def compile(self) -> tuple[Graph, Graph, Graph, list[PassRecord]]:
        """(float graph before precision assignment, engine graph, decode graph, pass records)"""
        opts = self.options
        float_graph, records = PassManager(self.passes[:-2], opts.print_after, self.printer).run(self.imported.graph)
        graph, more = PassManager(self.passes[-2:], opts.print_after, self.printer).run(float_graph)
        decode, last = PassManager([SpecializeDecode(), self.passes[-1]], opts.print_after,
                                   self.printer).run(graph)
        return float_graph, graph, decode, records + more + last

    def _small_enough(self, graph: Graph) -> bool:
        params = sum(w.type.numel() for w in graph.weights)
        return params <= settings().reference_check_max_params

    def scales(self, float_graph: Graph, graph: Graph) -> dict[str, Any]:
        needed = scales_needed(graph)
        if not needed:
            return {}
        if not self._small_enough(float_graph):
            raise UsageError(f"this policy quantizes activations, which needs calibration, and the model is too big "
                             f"to calibrate on the reference runtime (over {settings().reference_check_max_params:,} "
                             "parameters); use a ModelOpt checkpoint with input_scale, or weight-only precisions")
        data = None
        if self.options.calibration_data is not None:
            data = read_token_file(self.options.calibration_data, self.vocab_size)
        batches = calibration_batches(self.options.calibrate, self.vocab_size, data=data)
        weights = read_weights(self.imported.checkpoint, float_graph)
        return calibrate(float_graph, weights, needed, batches)

    def agreement(self, float_graph: Graph, graph: Graph) -> Agreement | None:
        # A checkpoint stored quantized has no float weights to compare with.
        if not _quantized(graph) or _quantized(float_graph) or not self._small_enough(float_graph):
            return None
        float_weights = read_weights(self.imported.checkpoint, float_graph)
        engine_weights = load_weights(self.stage, [weights_file(0)], _engine_graph(graph), torch.device("cpu"))
        return measure_agreement(float_graph, float_weights, _engine_graph(graph), engine_weights, self.vocab_size,
                                 f"the {self.policy.base} engine of the same checkpoint")


def build(model: Path | None, out: Path, options: BuildOptions | None = None,
          printer: Callable[[str, str], None] | None = None, progress: ProgressHook | None = None) -> BuildResult:
    start = time.perf_counter()
    options = options or BuildOptions()
    load_target(options.target)  # an unknown target is refused before anything is read
    if options.world_size < 1:
        raise UsageError(f"--world-size must be at least 1, got {options.world_size}")
    if options.calibrate < 1:
        raise UsageError(f"--calibrate must be at least 1, got {options.calibrate}")
    with _model_directory(model) as (model_dir, source_name), staged_directory(out, options.force) as stage:
        imported = import_checkpoint(model_dir)
        job = _Build(options, imported, stage, printer, progress)
        float_graph, graph, decode, records = job.compile()
        stream = WeightStream(imported.checkpoint, graph, job.scales(float_graph, graph), progress,
                              four_over_six=job.policy.nvfp4_four_over_six)
        bytes_written = stream.write(stage / weights_file(0))
        (stage / "graph.txt").write_text(print_graph(_engine_graph(graph)))
        (stage / "graph.decode.txt").write_text(print_graph(_engine_graph(decode)))
        (stage / "config.json").write_text(json.dumps(imported.raw_config, indent=2, sort_keys=True) + "\n")
        tokenizer = model_dir / "tokenizer.json"
        has_byte_tokenizer = tokenizer.exists() and '"type": "bytes"' in tokenizer.read_text()
        if has_byte_tokenizer:
            shutil.copyfile(tokenizer, stage / "tokenizer.json")
        agreement = job.agreement(float_graph, graph)
        stats = param_stats(graph)
        manifest = Manifest(
            nemocompile_version=__version__,
            target=TargetInfo(job.target.name, job.target.arch, job.target.compute_capability),
            ranks=(RankFiles(0, (weights_file(0),)),),  # one rank until sharding lands
            graphs=GraphFiles("graph.txt", "graph.decode.txt"),
            config="config.json",
            kernels=_kernel_uses(graph, decode),
            tokenizer="tokenizer.json" if has_byte_tokenizer else None,
            precision=options.precision,
            policy=PolicyInfo.from_description(job.policy.describe(), stage / MANIFEST_NAME),
            source=SourceInfo(source_name, imported.checkpoint.fingerprint()),
        )
        write_report(stage / "report.md", manifest, graph, stats, records, stream.errors, agreement,
                     options.world_size, job.target, imported.config.unknown_keys, imported.skipped_tensors)
        manifest = write_manifest(stage, manifest)
        imported.checkpoint.close()
    return BuildResult(out, manifest, stats, records, bytes_written, time.perf_counter() - start, stream.errors,
                       agreement)
