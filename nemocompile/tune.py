"""`nemocompile tune ENGINE`: sweep the config space of every tunable Triton kernel of an engine,
per shape bucket, and record the winners in a tuning database that `build --tuning-db` reads.

Per kernel problem (a template specialised to the engine's shapes and formats) and batch size:
1. the template's config space, pruned by the target's limits before anything compiles;
2. every kept config scored: by the cost model (`--cost-model`: ranked, nothing run), or measured
   on the GPU (compiled in parallel first, then timed one at a time); a config that fails to
   compile or run scores as infinitely slow and the sweep goes on. Each score is committed to the
   database's journal as it is taken, so an interrupted sweep resumes where it stopped;
3. the fastest config that compiles and passes the numerics gate (its op against the reference
   implementation, on the engine's own weights) becomes the entry; a rejected one is named.
The sweep stops starting configs when the budget is spent; run it again to continue."""

from __future__ import annotations

import contextlib
import fnmatch
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from nemocompile.base.errors import UsageError
from nemocompile.base.settings import settings
from nemocompile.codegen.triton import templates_catalog as catalog
from nemocompile.codegen.triton.plan import plan_kernels
from nemocompile.codegen.triton.spec import KernelInstance
from nemocompile.codegen.tuning import cost_model, space
from nemocompile.codegen.tuning.db import (
    MODELLED,
    TUNED,
    Entry,
    Environment,
    KernelKey,
    Trial,
    TuningDB,
    bucket_of,
)
from nemocompile.codegen.tuning.workload import Workload, workload_of
from nemocompile.graph.ir import Graph, Op
from nemocompile.runtime.engine import read_engine
from nemocompile.runtime.weights import load_weights
from nemocompile.targets import Target, load_target

from .kernel_configs import environment, kernel_key
from .numerics_gate import EngineGate, GateCache
from .tune_measure import compile_config

DEFAULT_BATCH_SIZES = (1, 8, 64, 256)


class Timer(Protocol):
    """Scores one config of an instance on `tokens` tokens, in seconds (raises when it cannot run);
    `prepare` readies the configs it will be asked for (compiles them) and returns the failures."""

    scorer: str  # "modelled" or "measured"

    def prepare(self, instance: KernelInstance, configs: Sequence[space.Config]) -> Mapping[space.Config, str]: ...

    def __call__(self, instance: KernelInstance, config: space.Config, tokens: int, workload: Workload) -> float: ...


class CostModelTimer:
    scorer = MODELLED

    def __init__(self, target: Target) -> None:
        self.target = target

    def prepare(self, instance: KernelInstance, configs: Sequence[space.Config]) -> Mapping[space.Config, str]:
        return {}  # nothing runs; the chosen config is compiled when it is selected

    def __call__(self, instance: KernelInstance, config: space.Config, tokens: int, workload: Workload) -> float:
        return cost_model.seconds(instance, config, tokens, self.target, workload)


class SweepListener(Protocol):
    """What follows a sweep (the CLI's progress bar)."""

    def started(self, label: str, total: int) -> None: ...

    def advanced(self, done: int, best: float, best_config: str) -> None: ...

    def ended(self) -> None: ...


@dataclass(frozen=True)
class TuneOptions:
    target: str | None = None  # default: the engine's
    kernels: str | None = None  # fnmatch pattern on the template, catalog kernel or op name
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    budget_seconds: float = 600.0
    db: Path = Path("tuning.sqlite")
    cost_model: bool = False
    report_dir: Path | None = None  # default: <db without suffix>-report next to the database
    plots: bool = True

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                       for b in self.batch_sizes):
            raise UsageError(f"--batch-sizes must be integers of at least 1, got {list(self.batch_sizes)}")
        if not self.budget_seconds > 0:
            raise UsageError(f"--budget must be positive, got {self.budget_seconds} s")

    @property
    def reports(self) -> Path:
        return self.report_dir or self.db.parent / f"{self.db.stem}-report"


@dataclass(frozen=True)
class KernelProblem:
    """One tunable kernel of the engine, and the op the gate checks it on."""

    key: KernelKey
    instance: KernelInstance  # with its builder's (default) config
    graph: str
    op: Op
    instances: tuple[KernelInstance, ...]  # the op's kernels, in launch order
    position: int  # this kernel among them
    workload: Workload  # the op's runtime sizes and phase

    @property
    def label(self) -> str:
        problem = space.problem_of(self.instance)
        dims = [f"{k}={problem[k]}" for k in ("N", "K", "NUM_EXPERTS", "TOP_K", "WIDTH", "GROUP_SIZE") if k in problem]
        dims += [f"{k}={problem[k]}" for k in ("ACT_FORMAT", "HAS_BIAS") if k in problem and problem[k] not in ("none", False)]
        dims += [f"{k}={v}" for k, v in self.workload.dims if k not in ("n_groups",)]
        pointers = dict(self.instance.pointer_types)
        dims += [f"{p.removesuffix('_ptr')}={pointers[p]}" for p in ("x_ptr", "out_ptr") if pointers.get(p, "bf16") != "bf16"]
        if self.instance.template.entry in ("causal_conv1d", "attention_gqa", "kv_cache_write"):
            dims.append("decode" if self.workload.decode else "prefill")
        return f"{self.instance.template.entry} {' '.join(dims)} ({self.op.opname})"

    @property
    def slug(self) -> str:
        import hashlib

        digest = hashlib.sha256(f"{self.key.problem}{self.key.formats}".encode()).hexdigest()[:8]
        return f"{self.instance.template.entry}_{digest}"


@dataclass
class Sweep:
    """One kernel problem at one batch size."""

    problem: KernelProblem
    tokens: int
    trials: dict[space.Config, Trial]
    pruned: tuple[tuple[space.Config, str], ...]
    default: space.Config
    resumed: int = 0  # configs the journal already held
    chosen: space.Config | None = None
    check: str = ""
    rejected: list[str] = field(default_factory=list)
    complete: bool = True

    @property
    def bucket(self) -> int:
        return bucket_of(self.tokens)

    def seconds(self, config: space.Config) -> float:
        trial = self.trials.get(config)
        return trial.seconds if trial is not None else math.inf

    @property
    def failed(self) -> int:
        return sum(1 for t in self.trials.values() if math.isinf(t.seconds))


@dataclass
class TuneResult:
    engine: Path
    target: Target
    scorer: str
    sweeps: list[Sweep]
    wall_seconds: float
    cpu_seconds: float
    report: Path | None = None
    plots: list[Path] = field(default_factory=list)
    stopped: str = ""  # why the sweep ended early ("" when it finished)
    problems: int = 0
    unmeasured: list[str] = field(default_factory=list)  # templates the device timer cannot time (--cost-model can)


def kernel_problems(graphs: Mapping[str, Graph], arch: str, pattern: str | None,
                    templates: frozenset[str] | None = None) -> list[KernelProblem]:
    """The engine's tunable kernel problems (one per distinct problem), in plan order (`templates`:
    only these template entries)."""
    typed = dict(graphs)
    plan = plan_kernels(typed, arch)
    by_name = {i.name: i for i in plan.instances}
    found: dict[KernelKey, KernelProblem] = {}
    for graph_name, bound in plan.bindings.items():
        ops = {op.results[0].name: op for op in typed[graph_name].ops if op.results}
        types = typed[graph_name].value_types()
        for value, names in bound.items():
            op = ops[value]
            instances = tuple(by_name[n] for n in names)
            for position, instance in enumerate(instances):
                if space.space_of(instance) is None or (templates is not None and
                                                        instance.template.entry not in templates):
                    continue
                if pattern and not any(fnmatch.fnmatchcase(text, pattern) for text in (
                        instance.template.entry, instance.name, op.opname, str(op.attrs.get("kernel")),
                        f"{op.opname}/{instance.template.entry}")):
                    continue
                workload = workload_of(op, types, graph_name == "decode")
                key = kernel_key(instance, workload)
                found.setdefault(key, KernelProblem(key, instance, graph_name, op, instances, position, workload))
    return list(found.values())


def tune_engine(engine: Path, options: TuneOptions, timer: Timer | None = None,
                listener: SweepListener | None = None, sources: Mapping[str, bytes] | None = None) -> TuneResult:
    """Sweep every tunable kernel of `engine`; `timer` scores configs (default: the cost model with
    --cost-model, else CUDA events on this machine's GPU); `sources` replaces template files in the
    numerics gate (tests put a deliberately wrong kernel there)."""
    wall, cpu = time.perf_counter(), time.process_time()
    contents = read_engine(engine)
    target = load_target(options.target or contents.manifest.target.name)
    if target.arch != contents.manifest.target.arch:
        raise UsageError(f"engine {engine} was built for {contents.manifest.target.name} "
                         f"({contents.manifest.target.arch}); --target {target.name} is {target.arch}")
    graphs = {"prefill": contents.prefill, "decode": contents.decode}
    problems = kernel_problems(graphs, target.arch, options.kernels)
    if not problems:
        what = f" matching --kernels {options.kernels!r}" if options.kernels else ""
        raise UsageError(f"engine {engine} has no tunable Triton kernel{what}")
    if timer is None:
        timer = CostModelTimer(target) if options.cost_model else _device_timer(target)
    measurable = getattr(timer, "templates", None)  # a device timer makes inputs for these templates only
    unmeasured = sorted({p.instance.template.entry for p in problems if measurable is not None
                         and p.instance.template.entry not in measurable})
    problems = [p for p in problems if measurable is None or p.instance.template.entry in measurable]
    env = environment(target, measured=timer.scorer != MODELLED)
    cache_dir = Path(settings().kernel_cache_dir).expanduser()
    weights = load_weights(contents.directory, list(contents.manifest.weight_files(0)), contents.prefill,
                           torch.device("cpu"))
    gate = EngineGate(graphs, weights, contents.model_config.vocab_size, GateCache(cache_dir / "gate"), sources)
    db = TuningDB(options.db, create=True)
    result = TuneResult(engine, target, timer.scorer, [], 0.0, 0.0, problems=len(problems), unmeasured=unmeasured)
    deadline = time.monotonic() + options.budget_seconds
    try:
        for problem in problems:
            for tokens in options.batch_sizes:
                sweep = _sweep(problem, tokens, target, timer, db, env, deadline, listener, cache_dir)
                _select(sweep, problem, target, db, env, gate, cache_dir, timer.scorer)
                result.sweeps.append(sweep)
                if not sweep.complete:
                    result.stopped = (f"the budget of {options.budget_seconds:.0f} s was spent; run the same "
                                      f"command again to continue where it stopped")
                    break
            if result.stopped:
                break
    finally:
        db.close()
    result.wall_seconds, result.cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    from .tune_report import write_report

    write_report(result, options)
    return result


def _device_timer(target: Target) -> Timer:
    if not torch.cuda.is_available():
        raise UsageError("measuring kernels needs a CUDA GPU; on this machine use --cost-model")
    major, minor = torch.cuda.get_device_capability()
    if f"sm_{major}{minor}" != target.arch:
        raise UsageError(f"this GPU is sm_{major}{minor} ({torch.cuda.get_device_name()}); --target {target.name} "
                         f"is {target.arch}")
    from .tune_measure import MeasuredTimer

    return MeasuredTimer(target.arch, Path(settings().kernel_cache_dir).expanduser(), torch.device("cuda"))


def _sweep(problem: KernelProblem, tokens: int, target: Target, timer: Timer, db: TuningDB, env: Environment,
           deadline: float, listener: SweepListener | None, cache_dir: Path) -> Sweep:
    instance = problem.instance
    pruned = space.prune(instance, space.configs(instance), target.arch, problem.workload)
    bucket = bucket_of(tokens)
    done = db.trials(problem.key, bucket, env, timer.scorer)
    sweep = Sweep(problem, tokens, dict(done), pruned.dropped, space.config_of(instance),
                  resumed=sum(1 for c in pruned.kept if c in done))
    # the most promising first (the cost model's order), so a budget covers them before the rest; a
    # pruned default is scored last, for the speedup over it (it is never selected)
    order = sorted(pruned.kept, key=lambda c: cost_model.seconds(instance, c, tokens, target, problem.workload))
    order += [sweep.default] if sweep.default not in pruned.kept else []
    pending = [c for c in order if c not in done]
    if listener:
        listener.started(f"{problem.label} @ {tokens} tokens", len(order))
        _advance(listener, sweep, len(order) - len(pending))
    compile_errors = timer.prepare(instance, pending) if pending else {}  # measured: compiled in parallel first
    # modelled scores are cheap to take again: one commit per sweep; measured ones commit one by one
    with db.transaction() if timer.scorer == MODELLED else contextlib.nullcontext():
        _score(sweep, pending, len(order), problem, bucket, timer, db, env, deadline, listener, compile_errors)
    if listener:
        listener.ended()
    return sweep


def _score(sweep: Sweep, pending: list[space.Config], total: int, problem: KernelProblem, bucket: int, timer: Timer,
           db: TuningDB, env: Environment, deadline: float, listener: SweepListener | None,
           compile_errors: Mapping[space.Config, str]) -> None:
    instance, tokens = problem.instance, sweep.tokens
    for count, config in enumerate(pending, start=total - len(pending) + 1):
        if time.monotonic() > deadline:
            sweep.complete = False
            break
        error = compile_errors.get(config, "")
        seconds = math.inf
        if not error:
            try:
                seconds = timer(instance, config, tokens, problem.workload)
            except Exception as failure:  # a config that fails to run scores infinitely slow
                error = f"{type(failure).__name__}: {str(failure).strip().splitlines()[0] if str(failure).strip() else ''}"
        trial = Trial(config, seconds, error)
        db.record_trial(problem.key, bucket, env, timer.scorer, trial)
        sweep.trials[config] = trial
        if listener:
            _advance(listener, sweep, count)


def _advance(listener: SweepListener, sweep: Sweep, done: int) -> None:
    finite = [(t.seconds, c) for c, t in sweep.trials.items() if math.isfinite(t.seconds)]
    best = min(finite, default=(math.inf, ()))
    listener.advanced(done, best[0], space.short(best[1]) if best[1] else "-")


def _select(sweep: Sweep, problem: KernelProblem, target: Target, db: TuningDB, env: Environment,
            gate: EngineGate, cache_dir: Path, scorer: str) -> None:
    """The fastest scored config that compiles and passes the gate becomes the entry."""
    ranked = sorted((t.seconds, c) for c, t in sweep.trials.items() if math.isfinite(t.seconds)
                    and space.why_pruned(problem.instance, c, target.arch, problem.workload) is None)
    for seconds, config in ranked:
        error = compile_config(problem.instance, config, target.arch, cache_dir) if scorer == MODELLED else ""
        if not error:
            trial_instances = list(problem.instances)
            trial_instances[problem.position] = space.apply(problem.instance, config)
            verdict = gate(problem.graph, problem.op, catalog.with_split_k_reduces(trial_instances))
            if verdict.passed:
                sweep.chosen, sweep.check = config, verdict.message
                default = sweep.seconds(sweep.default)
                db.record_entry(Entry(problem.key, sweep.bucket, env, TUNED if scorer != MODELLED else MODELLED,
                                      config, seconds, default if math.isfinite(default) else None, verdict.message))
                return
            error = f"numerics gate: {verdict.message}"
        sweep.rejected.append(f"{problem.label}: config {space.short(config)} rejected: {error}")
        rejected = Trial(config, math.inf, error)
        db.record_trial(problem.key, sweep.bucket, env, scorer, rejected)
        sweep.trials[config] = rejected
    sweep.check = "no config passed"
