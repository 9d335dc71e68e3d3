"""The build driver: checkpoint -> IR -> passes -> engine directory. The engine is written into a
staging directory and renamed into place, so a failed or killed build leaves nothing at OUT."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from nemocompile.base.errors import CheckpointError, ConfigError, UsageError
from nemocompile.base.inputs import open_regular_file
from nemocompile.base.settings import settings
from nemocompile.codegen.triton.emit import EmittedKernels
from nemocompile.codegen.triton.emit import emit as emit_kernels
from nemocompile.codegen.triton.plan import BUILDERS as PLANNED
from nemocompile.codegen.triton.plan import plan_kernels
from nemocompile.codegen.tuning.db import TuningDB
from nemocompile.graph.importer import ImportedModel, import_checkpoint
from nemocompile.graph.ir import Graph, TensorSource, Weight
from nemocompile.graph.kernels import kernel_of, kernel_uses
from nemocompile.graph.nemotron_h import rebound
from nemocompile.graph.sharding import Layout, check_layout, rank_view
from nemocompile.graph.text import print_graph
from nemocompile.passes.assign_precision import exported_numerics
from nemocompile.passes.base import Pass
from nemocompile.passes.manager import PassRecord
from nemocompile.passes.precision_policy import PrecisionPolicy, resolve_policy, with_checkpoint_kv_cache
from nemocompile.passes.shard import Shard
from nemocompile.runtime.engine_format import (
    MANIFEST_NAME,
    EngineBounds,
    GraphFiles,
    KernelUse,
    Manifest,
    PolicyInfo,
    RankFiles,
    SourceInfo,
    TargetInfo,
    weights_file,
)
from nemocompile.runtime.tokenizer import ByteTokenizer
from nemocompile.runtime.weights import load_weights
from nemocompile.targets import Target, load_target

from . import __version__
from .agreement import Agreement, measure_agreement
from .calibration import calibration_batches, scales_needed
from .calibration_data import read_calibration_data
from .calibration_stream import calibrate_streamed, calibration_device
from .demo import DEMO_NAME, write_demo_checkpoint
from .engine_files import staged_directory, write_manifest
from .explain import explain, explained_lines
from .kernel_configs import ConfigChooser, tuning_lines
from .memory_plan import MemoryPlan, check_fits, plan_memory
from .memory_plan_bounds import Bounds, choose_bounds, context_limit
from .memory_plan_split import Parallelism
from .numerics_gate import EngineGate, GateCache
from .options import BuildOptions
from .pipeline import (
    AGREEMENT,
    DECODE,
    FLOAT,
    IMPORT,
    PREFILL,
    QUANTIZE,
    UNSHARDED,
    WRITE,
    PhaseListener,
    PhaseRecord,
    Phases,
    build_steps,
    check_print_after,
    graph_passes,
    run_steps,
)
from .rank_weights import HASH_SEPARATOR, RankSink
from .report import CalibrationInfo, write_report
from .resume import (
    Journal,
    build_key,
    load_calibration,
    read_journal,
    remove_resume_files,
    save_calibration,
    verified_prefix,
    verified_rank_prefix,
)
from .stats import ParamStats, param_stats
from .weight_stream import QuantizationError, WeightStream, WrittenWeight, read_weights

ProgressHook = Callable[[str, int, int], None]  # (description, bytes just written, bytes in all)
UNSHARDED_WEIGHTS = "weights/unsharded.safetensors"  # a sharded build's whole copy for the agreement check


class _WeightBytes:
    """A plain ProgressHook seen as a phase listener: it hears only the bytes of quantize-and-write."""

    def __init__(self, hook: ProgressHook) -> None:
        self.hook = hook
        self.phase = ""
        self.done = 0

    def phase_started(self, name: str, total: int | None, unit: str) -> None:
        self.phase, self.done = name, 0

    def phase_advanced(self, done: int, total: int | None, unit: str, detail: str) -> None:
        if self.phase == QUANTIZE and done > self.done:
            self.hook(detail, done - self.done, total or 0)
            self.done = done

    def phase_ended(self, record: PhaseRecord) -> None:
        self.phase = ""


def _listener(progress: ProgressHook | PhaseListener | None) -> PhaseListener | None:
    if progress is None or isinstance(progress, PhaseListener):
        return progress
    return _WeightBytes(progress)


def pipeline(target: Target, policy: PrecisionPolicy) -> list[Pass]:
    """The graph passes of the target's pipeline that make the engine graph (what `plan` runs);
    the whole pipeline, driver steps included, is `nemocompile.pipeline.build_steps`."""
    return graph_passes(build_steps(target, policy))


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
    phases: list[PhaseRecord] = dataclasses.field(default_factory=list)
    calibration: CalibrationInfo | None = None
    # a stored-quantized checkpoint the target cannot run as exported (NVFP4 W4A4 on Hopper): the
    # engine against the checkpoint's own numerics on the reference runtime
    deviation: Agreement | None = None
    # with --tensorrt: why the TensorRT engine itself was not built ("" when it was, or not asked)
    tensorrt_skipped: str = ""
    # tuning-database entries this build could not use (entry, why), and configs the gate rejected
    skipped_tuning: tuple[tuple[str, str], ...] = ()
    rejected_configs: tuple[str, ...] = ()
    bounds: Bounds | None = None  # the engine's run-time bounds, and which the build chose


def _build_inputs(model: Path | None, options: BuildOptions) -> list[tuple[str, Path]]:
    """The build's inputs as (what, path). The files among them are checked to be regular files
    before anything is read or written (a FIFO or /dev/zero is refused, even when unused), and the
    output may never be any of them or hold one (engine_files.check_output_path)."""
    inputs = [("input checkpoint", model)] if model is not None else []
    for what, path in (("policy file", options.policy_file), ("calibration data", options.calibration_data)):
        if path is not None:
            with open_regular_file(path, what, UsageError):
                pass
            inputs.append((what, path))
    return inputs


def _carry_tokenizer(model_dir: Path, stage: Path, vocab_size: int) -> bool:
    """Copy the checkpoint's tokenizer.json into the engine when it is a nemocompile byte tokenizer,
    checked exactly as the runtime will read it (another kind, e.g. Hugging Face's, is not carried)."""
    source = model_dir / "tokenizer.json"
    if not source.is_file():
        return False
    text = source.read_text(encoding="utf-8", errors="replace")
    if not ByteTokenizer.claims(text):
        return False
    ByteTokenizer.parse(text, str(source), vocab_size, error=CheckpointError)
    (stage / "tokenizer.json").write_text(text, encoding="utf-8")
    return True


@contextmanager
def _model_directory(model: Path | None) -> Iterator[tuple[Path, str]]:
    """The checkpoint to build: the given directory, or the demo written to a temporary one."""
    if model is not None:
        yield model, model.resolve().name
        return
    with tempfile.TemporaryDirectory(prefix="nemocompile-demo-") as tmp:
        yield write_demo_checkpoint(Path(tmp)), DEMO_NAME


def _engine_graph(graph: Graph, file: str = weights_file(0)) -> Graph:
    """The same graph with every weight sourced from the engine's own weight file (or `file`)."""
    weights = tuple(Weight(w.name, w.type, w.category, (TensorSource(file, w.name),), w.type.dtype)
                    for w in graph.weights)
    return dataclasses.replace(graph, weights=weights)


def _kernel_uses(prefill: Graph, decode: Graph) -> tuple[KernelUse, ...]:
    return tuple(KernelUse(name, op, kernel, backend, count)
                 for name, graph in (("prefill", prefill), ("decode", decode))
                 for op, kernel, backend, count in kernel_uses(graph))


def _write_kernels(stage: Path, prefill: Graph, decode: Graph, arch: str,
                   chooser: ConfigChooser | None = None) -> EmittedKernels | None:
    """The Triton kernels select_kernels chose, specialised (their configs as `chooser` picks
    them), compiled for `arch` (through the shared compile cache) and written under stage/kernels;
    None when no op runs on a Triton kernel."""
    kernel_plan = plan_kernels({"prefill": prefill, "decode": decode}, arch, chooser)
    if not kernel_plan.instances:
        return None
    cache = Path(settings().kernel_cache_dir).expanduser()
    return emit_kernels(kernel_plan.instances, stage, arch, cache, bindings=kernel_plan.bindings,
                        fallbacks=[f.describe() for f in kernel_plan.fallbacks])


def _shard(options: BuildOptions) -> Shard:
    return Shard(options.world_size, options.tensor_parallel, options.expert_parallel)


def _layout(options: BuildOptions) -> Layout:
    return Layout(options.world_size, options.tensor_parallel, options.expert_parallel)


def _quantized(graph: Graph) -> bool:
    return any(w.type.dtype.quantized for w in graph.weights)


class BuildContext:
    """One build: the imported model, the build's named graphs (prefill, float, decode) and what
    the driver steps made (activation scales, the weight stream). The pipeline's steps run on it."""

    def __init__(self, options: BuildOptions, imported: ImportedModel, stage: Path,
                 printer: Callable[[str, str], None] | None, phases: Phases, model_name: str = "model") -> None:
        self.options = options
        self.model_name = model_name
        self.imported = imported
        self.stage = stage
        self.printer = printer
        self.phases = phases
        self.calibration: CalibrationInfo | None = None
        self.target = load_target(options.target)
        self.policy = resolve_policy(self.target, options.precision, options.overrides, options.policy_file,
                                     options.exclude, options.act_scales)
        if imported.kv_cache is not None:  # a ModelOpt FP8 KV cache, deployed with the checkpoint's scales
            self.policy = with_checkpoint_kv_cache(self.policy, imported.kv_cache_source)
        self.steps = build_steps(self.target, self.policy, options.calibrate, options.calibration_data,
                                 _shard(options))
        check_print_after(self.steps, options.print_after)
        self.vocab_size = imported.config.vocab_size
        self.graphs: dict[str, Graph] = {PREFILL: imported.graph}
        self.scales: dict[str, torch.Tensor] = {}
        self.stream: WeightStream | None = None
        self.bytes_written = 0
        self.memory_plan: MemoryPlan | None = None
        self.bounds: Bounds | None = None  # the engine's run-time bounds, once planned
        self.discarded_calibration = ""  # why a resumed build's saved calibration was not taken
        # the file holding every weight whole, which the agreement check and the deviation load: the
        # weights file of a one-rank engine; for a sharded one a whole copy, written only when they run
        self.whole_weights = weights_file(0)

    def plan_memory(self) -> MemoryPlan:
        """The memory plan per GPU of the graph as its formats now stand, at the bounds given or, for
        those not given, the largest that fit (memory_plan_bounds.py); refuses a plan that does not fit.
        Chosen bounds replace the graphs' (the runtime's caches and checks size themselves by them)."""
        parallel = Parallelism(self.options.tensor_parallel, self.options.expert_parallel)
        plan = plan_memory(self.model_name, self.graphs[PREFILL], self.imported.config, self.target,
                           parallel, self.options.bounds)
        self.memory_plan, self.bounds = choose_bounds(plan, self.options.max_batch_size, self.options.max_context,
                                                      context_limit(self.imported.raw_config))
        check_fits(self.memory_plan)
        chosen = (self.bounds.max_batch_size, self.bounds.max_context)
        if chosen != self.options.bounds:
            self.graphs = {name: rebound(graph, self.imported.config, chosen) for name, graph in self.graphs.items()}
        self.options = dataclasses.replace(self.options, max_batch_size=chosen[0], max_context=chosen[1])
        return self.memory_plan

    def run(self) -> list[PassRecord]:
        return run_steps(self.steps, self, self.options.print_after, self.printer, self.phases)

    def _small_enough(self, graph: Graph) -> bool:
        params = sum(w.type.numel() for w in graph.weights)
        return params <= settings().reference_check_max_params

    def _quantizes_activations(self) -> bool:
        return any(True for _ in self.graphs[PREFILL].ops_named("quantize_dynamic"))

    def calibrate(self, batch_count: int, data_file: Path | None) -> dict[str, torch.Tensor]:
        """The calibrate step: scales for the quantize ops of prefill, on the float graph."""
        float_graph = self.graphs.get(FLOAT, self.graphs[PREFILL])
        needed = scales_needed(self.graphs[PREFILL])
        if not needed:
            self.phases.summarize("not needed: activation scales are dynamic (computed on every call)"
                                  if self.policy.act_scales == "dynamic" and self._quantizes_activations() else
                                  "not needed: no GEMM quantizes its activations")
            return {}
        if self._resumed_calibration():
            return self.scales
        data = None
        # within the engine's bounds: calibration runs the float graph, which shares them
        length = self.options.sample_length
        if data_file is not None:
            data = read_calibration_data(data_file, self.options.calibration_format,
                                         self.imported.checkpoint.directory / "tokenizer.json", self.vocab_size,
                                         batch_count, length)
        batches = calibration_batches(batch_count, self.vocab_size, length,
                                      data=data.sequences if data is not None else None)
        self.calibration = CalibrationInfo(
            batches=len(batches), tokens=batches.tokens,
            source="random" if data is None else "file", seed=0 if data is None else None,
            path=None if data_file is None else str(data_file),
            sha256=None if data is None else data.sha256,
            scales=len(needed), kind=None if data is None else data.kind,
            file_tokens=None if data is None else data.file_tokens)
        phases = self.phases
        phases.set_total(None, "blocks")

        blocks: list[str] = []

        def block_done(block: str, done: int, total: int) -> None:
            blocks.append(block)
            if done == 1:
                phases.set_total(total, "blocks")
            phases.advance(1, f"{block} over {len(batches)} batches")

        # one block at a time: bounded memory at any model size (the whole-model path is the tests' oracle)
        result = calibrate_streamed(self.imported.checkpoint, float_graph, needed, batches,
                                    calibration_device(self.options.calibration_device), block_done)
        self.scales = result.values
        self.calibration = dataclasses.replace(self.calibration, unreached=result.unreached)
        recomputed = f"; recomputed: {self.discarded_calibration}" if self.discarded_calibration else ""
        self.phases.summarize(self.calibration.describe() + recomputed)
        save_calibration(self.stage, self.scales, {"calibration": dataclasses.asdict(self.calibration),
                                                   "blocks": len(blocks)})
        return self.scales

    def _resumed_calibration(self) -> bool:
        """Take the calibration a killed build of the same input saved, when there is one and it still
        hashes to what was recorded (else it is recomputed, and the summary says why)."""
        saved = load_calibration(self.stage) if self.options.resume else None
        if isinstance(saved, str):
            self.discarded_calibration = saved
            return False
        if saved is None:
            return False
        self.scales, info = saved
        fields = dict(info["calibration"])
        fields["unreached"] = tuple(fields["unreached"])
        self.calibration = CalibrationInfo(**fields)
        self.phases.set_total(int(info["blocks"]), "blocks")
        self.phases.advance(int(info["blocks"]), "taken from the interrupted build")
        self.phases.summarize(self.calibration.describe())
        return True

    def quantize_weights(self, four_over_six: bool) -> dict[str, int]:
        """The quantize_weights step: every weight of prefill into the engine's weight file."""
        graph = self.graphs[PREFILL]
        phases = self.phases

        def wrote(description: str, advance: int, total: int) -> None:
            phases.advance(advance, description)

        threads = settings().quantize_threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                  else os.cpu_count() or 1)
        self.stream = WeightStream(self.imported.checkpoint, graph, self.scales, wrote, four_over_six=four_over_six,
                                   threads=threads)
        phases.set_total(self.stream.total, "bytes")
        path = self.stage / weights_file(0)
        names = [weight.name for weight in graph.weights]
        done: list[WrittenWeight] = []
        restarted = ""
        layout = _layout(self.options)
        if not layout.sharded:
            if self.options.resume:  # the weights a killed build wrote whose bytes still hash to its journal
                done = verified_prefix(read_journal(self.stage), path, self.stream.data_start(), names)
            journal = Journal(self.stage, done)
            self.bytes_written = self.stream.write(path, done, journal.record)
        else:  # each rank's piece of each tensor straight into the rank's file
            rank_paths = [self.stage / weights_file(rank) for rank in range(layout.world_size)]
            whole = None
            if _quantized(graph) and self._small_enough(graph):  # the agreement check runs the unsharded graph
                self.whole_weights = UNSHARDED_WEIGHTS
                whole = self.stage / UNSHARDED_WEIGHTS
            if self.options.resume and whole is None:
                done = verified_rank_prefix(read_journal(self.stage), rank_paths, RankSink.data_start(graph), names)
            elif self.options.resume:
                restarted = ("; written again, not resumed: this sharded model is small enough for the agreement "
                             "check, whose unsharded copy of the weights is not journaled")
            journal = Journal(self.stage, done)

            def sink(resume_at: tuple[int, int] | None) -> RankSink:
                return RankSink(graph, rank_paths, resume_at, whole)

            self.bytes_written = self.stream.write(path, done, journal.record, sink)
        phases.summarize(f"{len(graph.weights)} weights, {self.bytes_written:,} bytes{restarted}")
        counts: dict[str, int] = {}
        for weight in graph.weights:
            counts[weight.type.dtype.name] = counts.get(weight.type.dtype.name, 0) + 1
        return counts

    def config_chooser(self, graph: Graph, decode: Graph) -> ConfigChooser:
        """The tuning stage of this build: the tuning database (--tuning-db) or the cost model picks
        each Triton kernel's config, and the numerics gate checks it on the engine's own weights."""
        db = TuningDB(self.options.tuning_db) if self.options.tuning_db is not None else None
        graphs = {PREFILL: graph, DECODE: decode}  # the ops' operand types, for the cost model
        if not any(kernel_of(op) in PLANNED for g in (graph, decode) for op in g.ops):
            return ConfigChooser(self.target, db, None, "no op runs on a Triton kernel", graphs=graphs)
        if not self._small_enough(graph):
            return ConfigChooser(self.target, db, None, "the model is too big for the CPU numerics gate",
                                 graphs=graphs)
        if (graph.meta("world_size") or "1") != "1":  # the gate runs the graph in this one process
            return ConfigChooser(self.target, db, None, "the engine is sharded over ranks; the CPU numerics gate "
                                                        "runs one-rank engines", graphs=graphs)
        weights = load_weights(self.stage, [weights_file(0)], _engine_graph(graph), torch.device("cpu"))
        cache = GateCache(Path(settings().kernel_cache_dir).expanduser() / "gate")
        gate = EngineGate({PREFILL: _engine_graph(graph), DECODE: _engine_graph(decode)}, weights,
                          self.vocab_size, cache)
        return ConfigChooser(self.target, db, gate, graphs=graphs)

    def agreement(self, float_graph: Graph, graph: Graph) -> Agreement | None:
        # A checkpoint stored quantized has no float weights to compare with.
        if not _quantized(graph):
            self.phases.summarize("skipped: nothing was quantized")
            return None
        if _quantized(float_graph):
            self.phases.summarize("skipped: the checkpoint is stored quantized (no float weights to compare with)")
            return None
        if not self._small_enough(float_graph):
            self.phases.summarize("skipped: the model is too big for the CPU reference check")
            return None
        prompts = min(4, self.options.bounds[0])
        self.phases.set_total(prompts, "prompts")
        float_weights = read_weights(self.imported.checkpoint, float_graph)
        engine_graph = _engine_graph(graph, self.whole_weights)
        engine_weights = load_weights(self.stage, [self.whole_weights], engine_graph, torch.device("cpu"))
        phases = self.phases

        def measured(done: int) -> None:
            phases.advance(1, f"prompt {done} of {prompts}")

        agreement = measure_agreement(float_graph, float_weights, engine_graph, engine_weights,
                                      self.vocab_size, f"the {self.policy.base} engine of the same checkpoint",
                                      prompts=prompts, length=min(32, self.options.bounds[1]), progress=measured)
        phases.summarize(f"{agreement.prompts} random prompts, {agreement.tokens} positions: top-1 "
                         f"{agreement.top1:.4f}, mean KL {agreement.mean_kl:.3g} nats")
        return agreement


    def deviation(self, graph: Graph) -> Agreement | None:
        """The engine against the checkpoint's own numerics, where the target cannot run them."""
        found = exported_numerics(graph, self.imported.graph)
        if found is None:
            return None
        exported, added_scales = found
        if not self._small_enough(exported):
            self.phases.summarize("the target cannot run the checkpoint's own numerics; the model is too big to "
                                  "measure the deviation on the CPU reference runtime")
            return None
        prompts = min(4, self.options.bounds[0])
        self.phases.set_total(prompts, "prompts")
        engine_graph = _engine_graph(graph, self.whole_weights)
        engine_weights = load_weights(self.stage, [self.whole_weights], engine_graph, torch.device("cpu"))
        scales = read_weights(self.imported.checkpoint, dataclasses.replace(graph, weights=added_scales))
        exported_weights = {**engine_weights, **scales}
        phases = self.phases

        def measured(done: int) -> None:
            phases.advance(1, f"prompt {done} of {prompts}")

        deviation = measure_agreement(_engine_graph(exported, self.whole_weights), exported_weights, engine_graph,
                                      engine_weights,
                                      self.vocab_size, "the checkpoint's own numerics (every input_scale applied) "
                                      "on the reference runtime", prompts=prompts,
                                      length=min(32, self.options.bounds[1]), progress=measured)
        phases.summarize(f"against the checkpoint's own numerics: top-1 {deviation.top1:.4f}, mean KL "
                         f"{deviation.mean_kl:.3g} nats, relative logit error {deviation.rel_error:.3g}")
        return deviation


def build(model: Path | None, out: Path, options: BuildOptions | None = None,
          printer: Callable[[str, str], None] | None = None,
          progress: ProgressHook | PhaseListener | None = None) -> BuildResult:
    """Build an engine; `progress` follows the build's phases (a PhaseListener), or only the bytes
    of quantize-and-write (a ProgressHook)."""
    start = time.perf_counter()
    options = options or BuildOptions()
    target = load_target(options.target)  # an unknown target is refused before anything is read
    if model is not None and not model.is_dir():  # the input is refused before the output is looked at
        raise ConfigError(f"{model} does not exist" if not model.exists() else
                          f"{model} is not a checkpoint directory (expected config.json and *.safetensors)")
    inputs = _build_inputs(model, options)
    # the precision policy and --print-after are refused before the first phase starts
    policy = resolve_policy(target, options.precision, options.overrides, options.policy_file, options.exclude,
                           options.act_scales)
    check_print_after(build_steps(target, policy), options.print_after)
    if options.tuning_db is not None:  # a missing or foreign database is refused before anything is written
        TuningDB(options.tuning_db).close()
    layout = _layout(options)
    if layout.sharded and options.tensorrt:
        raise UsageError(f"--tensorrt exports one-rank engines; this build asks for --world-size {options.world_size}")
    if options.tensor_parallel > 1 and policy.act_scales == "dynamic":
        # a row-parallel GEMM's rank holds a slice of each token's activations, so its per-token
        # scale would differ from the one-rank engine's
        raise UsageError(f"dynamic activation scales (--act-scales or the policy file) need each token's whole "
                         f"activation, which a tensor-parallel rank does not hold; use --act-scales static or "
                         f"--tp 1 (this build asks for --tp {options.tensor_parallel})")
    phases = Phases(_listener(progress))
    with _model_directory(model) as (model_dir, source_name), \
            staged_directory(out, options.force, inputs, lambda: build_key(model_dir, options), options.resume) as stage:
        with phases.phase(IMPORT):
            imported = import_checkpoint(model_dir, options.bounds)
            phases.summarize(f"{source_name}: {len(imported.config.layer_kinds)} layers "
                             f"({imported.config.pattern}), {len(imported.graph.weights)} weights")
        check_layout(imported.graph, layout)  # a world size the model does not divide, before any pass runs
        job = BuildContext(options, imported, stage, printer, phases, source_name)
        records = job.run()
        graph, decode = job.graphs[PREFILL], job.graphs[DECODE]
        float_graph = job.graphs.get(FLOAT, graph)
        whole = job.graphs.get(UNSHARDED, graph)  # the engine graph on one rank (the same one unsharded)
        stream, bytes_written = job.stream, job.bytes_written
        assert stream is not None, "the pipeline has no quantize_weights step"
        if options.tensorrt:  # an op the export has no form for is refused before the engine is written
            from .tensorrt_export import check_graphs  # onnx is an optional dependency
            check_graphs(graph, decode)
        with phases.phase(AGREEMENT):
            agreement = job.agreement(float_graph, whole)
            deviation = job.deviation(whole)
        with phases.phase(WRITE):
            rank_files = [weights_file(rank) for rank in range(layout.world_size)]
            (stage / UNSHARDED_WEIGHTS).unlink(missing_ok=True)  # the agreement check's whole copy, if any
            (stage / "graph.txt").write_text(print_graph(_engine_graph(graph)))
            (stage / "graph.decode.txt").write_text(print_graph(_engine_graph(decode)))
            chooser = job.config_chooser(graph, decode)
            compiled = _write_kernels(stage, rank_view(_engine_graph(graph)), rank_view(_engine_graph(decode)),
                                      job.target.arch, chooser)
            (stage / "config.json").write_text(json.dumps(imported.raw_config, indent=2, sort_keys=True) + "\n")
            has_byte_tokenizer = _carry_tokenizer(model_dir, stage, imported.config.vocab_size)
            exported = None
            if options.tensorrt:
                from .tensorrt_export import export_engine
                exported = export_engine(stage, _engine_graph(graph), _engine_graph(decode), stage / weights_file(0))
            stats = param_stats(graph)
            manifest = Manifest(
                nemocompile_version=__version__,
                target=TargetInfo(job.target.name, job.target.arch, job.target.compute_capability),
                ranks=tuple(RankFiles(rank, (name,)) for rank, name in enumerate(rank_files)),
                graphs=GraphFiles("graph.txt", "graph.decode.txt"),
                config="config.json",
                kernels=_kernel_uses(graph, decode),
                tokenizer="tokenizer.json" if has_byte_tokenizer else None,
                precision=options.precision,
                policy=PolicyInfo.from_description(job.policy.describe(), stage / MANIFEST_NAME),
                source=SourceInfo(source_name, imported.checkpoint.fingerprint()),
                tensorrt=exported.files if exported is not None else None,
                kernel_configs=tuple(chooser.choices),
                bounds=None if job.bounds is None else EngineBounds(
                    job.bounds.max_batch_size, job.bounds.max_context, job.bounds.automatic, job.bounds.why),
            )
            # the report holds every phase before this one (it is hashed by the manifest written last)
            write_report(stage / "report.md", manifest, graph, stats, records, stream.errors, agreement,
                         options.world_size, job.target, imported.config.unknown_keys, imported.skipped_tensors,
                         phases=phases.records, calibration=job.calibration, deviation=deviation,
                         checkpoint_quirks=imported.quirks,
                         compiled_kernels=compiled.report_rows() if compiled is not None else (),
                         kernel_config_lines=[*tuning_lines(chooser), "",
                                              *explained_lines(explain({PREFILL: graph, DECODE: decode}, job.policy,
                                                                       chooser.choices, job.target.arch))],
                         memory=job.memory_plan,
                         kernel_fallbacks=compiled.fallbacks if compiled is not None else ())
            remove_resume_files(stage)  # the engine is complete: nothing left to resume
            # the weights files were hashed as they were written: not read again
            known = dict(zip(rank_files, stream.sha256.split(HASH_SEPARATOR), strict=True))
            manifest = write_manifest(stage, manifest, known)
            phases.summarize(f"{len(manifest.files)} files, each with its sha256 in {MANIFEST_NAME}")
        imported.checkpoint.close()
    return BuildResult(out, manifest, stats, records, bytes_written, time.perf_counter() - start, stream.errors,
                       agreement, phases.records, job.calibration, deviation,
                       exported.skipped if exported is not None else "", tuple(chooser.skipped.items()),
                       tuple(chooser.rejected), job.bounds)
