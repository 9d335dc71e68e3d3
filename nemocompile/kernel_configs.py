"""The build's tuning stage: the config of every op's Triton kernels, from a tuning database when
one is given and its entry fits this build, else ranked by the cost model, and in either case
only once the numerics gate passed it (nemocompile/numerics_gate.py).

Each decision is a `KernelConfig` for the manifest (config, source: tuned / modelled / default,
why, check); entries of the database that do not fit this build are kept with their reason, and
the build names them."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nemocompile.base.settings import settings
from nemocompile.codegen.triton import templates_catalog as catalog
from nemocompile.codegen.triton.aot import triton_version
from nemocompile.codegen.triton.spec import KernelInstance
from nemocompile.codegen.tuning import cost_model, space
from nemocompile.codegen.tuning.db import MODELLED, TUNED, Entry, Environment, KernelKey, TuningDB, lookup
from nemocompile.codegen.tuning.workload import GEMM, Workload, workload_of
from nemocompile.graph.ir import Graph, Op
from nemocompile.graph.kernels import kernel_of
from nemocompile.graph.types import TensorType
from nemocompile.runtime.engine_format import KernelConfig
from nemocompile.targets import Target

from .numerics_gate import GateResult

# (graph name, op, its instances with the candidate config) -> the gate's verdict
Gate = Callable[[str, Op, Sequence[KernelInstance]], GateResult]


@functools.cache
def cuda_version() -> str:
    """The CUDA release of the ptxas that compiles the kernels (Triton ships it), e.g. 12.8."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        text = str(get_ptxas_version())
    except Exception:  # no NVIDIA backend or no ptxas: nothing compiles here either
        return ""
    found = re.search(r"release (\d+\.\d+)", text)
    return found.group(1) if found else text.strip()


@functools.cache
def driver_version() -> str:
    """The NVIDIA driver of this machine's GPU, "" without one."""
    import torch

    if not torch.cuda.is_available():
        return ""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return f"cuda-runtime-{torch.version.cuda}"
    return out.strip().splitlines()[0] if out.strip() else ""


def environment(target: Target, measured: bool = False) -> Environment:
    """This machine as a tuning key: the target's GPU and arch, the installed Triton and its CUDA,
    and (for measured entries, or a build on a GPU) the driver."""
    return Environment(target.name, target.arch, driver_version() if measured or driver_version() else "",
                       cuda_version(), triton_version())


def kernel_key(instance: KernelInstance, workload: Workload = GEMM) -> KernelKey:
    """The tuning key of an instance: its template, the problem (its constexprs less the config, and
    the op's runtime sizes and phase where the template takes them) and its formats."""
    problem = {**space.problem_of(instance), **workload.key_fields(instance.template.entry)}
    return KernelKey(instance.template.entry, space.template_hash(instance), json.dumps(problem, sort_keys=True),
                     space.formats_of(instance))


def design_tokens(graph: str) -> int:
    """The tokens per call a graph's kernels are chosen for (settings: tune_decode_tokens,
    tune_prefill_tokens)."""
    return settings().tune_decode_tokens if graph == "decode" else settings().tune_prefill_tokens


def ranked(instance: KernelInstance, tokens: int, target: Target,
           workload: Workload = GEMM) -> list[tuple[space.Config, float]]:
    """The instance's configs the target can run, fastest first by the cost model (the default
    first among equals)."""
    kept = space.prune(instance, space.configs(instance), target.arch, workload).kept
    scored = [(config, cost_model.seconds(instance, config, tokens, target, workload)) for config in kept]
    return sorted(scored, key=lambda item: item[1])


@dataclass
class ConfigChooser:
    """plan_kernels' `configure`: per op, each tunable instance's config; `choices` and `skipped`
    say what it decided and which database entries it could not use."""

    target: Target
    db: TuningDB | None = None
    gate: Gate | None = None
    gate_unavailable: str = ""  # why there is no gate (the config then stays the default)
    plan_only: bool = False  # `plan --explain`: no gate, report the config a build would try first
    graphs: Mapping[str, Graph] = field(default_factory=dict)  # by name: the ops' operand types (workloads)
    choices: list[KernelConfig] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # entry description -> why not used
    rejected: list[str] = field(default_factory=list)  # configs the gate rejected, with the message
    _ranked: dict[tuple[KernelInstance, int, Workload], list[tuple[space.Config, float]]] = field(default_factory=dict)
    _types: dict[str, Mapping[str, TensorType]] = field(default_factory=dict)

    def workload(self, graph: str, op: Op) -> Workload:
        if graph not in self._types:
            self._types[graph] = self.graphs[graph].value_types() if graph in self.graphs else {}
        return workload_of(op, self._types[graph], graph == "decode")

    def __call__(self, graph: str, op: Op, instances: tuple[KernelInstance, ...]) -> tuple[KernelInstance, ...]:
        result = list(instances)
        for position, instance in enumerate(instances):
            if space.space_of(instance) is None:
                continue
            chosen, source, why, check = self._choose(graph, op, result, position, self.workload(graph, op))
            result[position] = space.apply(instance, chosen)
            self.choices.append(KernelConfig(graph, op.results[0].name, op.opname, kernel_of(op),
                                             space.config_text(chosen), source, why, check))
        return tuple(result)

    def _candidates(self, graph: str, instance: KernelInstance,
                    workload: Workload) -> list[tuple[space.Config, str, str]]:
        """(config, source, why) in the order to try them."""
        tokens = design_tokens(graph)
        found: list[tuple[space.Config, str, str]] = []
        if self.db is not None:
            result = lookup(self.db, kernel_key(instance, workload), tokens, environment(self.target))
            for entry, reason in result.skipped:
                self.skipped[describe_entry(entry)] = reason
            if result.entry is not None:
                found.append(_from_entry(result.entry, self.db.path))
        default = space.config_of(instance)
        if (instance, tokens, workload) not in self._ranked:  # ops of both graphs share instances
            self._ranked[instance, tokens, workload] = ranked(instance, tokens, self.target, workload)
        order = self._ranked[instance, tokens, workload]
        default_time = cost_model.seconds(instance, default, tokens, self.target, workload) \
            if space.why_pruned(instance, default, self.target.arch, workload) is None else None
        for config, seconds in order:
            versus = f" (default {default_time * 1e6:.2f} us)" if default_time is not None else ""
            found.append((config, MODELLED, f"cost model: {seconds * 1e6:.2f} us at {tokens} tokens{versus}, "
                                            f"best of {len(order)} configs after pruning"))
        return found

    def _choose(self, graph: str, op: Op, instances: list[KernelInstance], position: int,
                workload: Workload) -> tuple[space.Config, str, str, str]:
        instance = instances[position]
        default = space.config_of(instance)
        if self.gate is None and self.plan_only:
            config, source, why = self._candidates(graph, instance, workload)[0]
            return config, source, why, "not run: plan reads no weights (the build runs the numerics gate)"
        if self.gate is None:
            return default, "default", f"the builder's config ({self.gate_unavailable})", \
                f"not run: {self.gate_unavailable}"
        for config, source, why in self._candidates(graph, instance, workload):
            trial = list(instances)
            trial[position] = space.apply(instance, config)
            verdict = self.gate(graph, op, catalog.with_split_k_reduces(trial))
            if verdict.passed:
                return config, source, why, verdict.message
            self.rejected.append(f"{op.opname} at {op.scope}: config {space.short(config)} ({source}) rejected by "
                                 f"the numerics gate: {verdict.message}")
        return default, "default", "every candidate config failed the numerics gate", "failed: see rejected configs"


def _from_entry(entry: Entry, path: Path) -> tuple[space.Config, str, str]:
    measured = "measured" if entry.source == TUNED else "modelled"
    versus = f", default {entry.default_seconds * 1e6:.2f} us" if entry.default_seconds else ""
    return (entry.config, TUNED if entry.source == TUNED else MODELLED,
            f"tuning database {path}: {measured} {entry.seconds * 1e6:.2f} us at bucket {entry.bucket}{versus}")


def describe_entry(entry: Entry) -> str:
    e = entry.environment
    return (f"{entry.key.kernel} {entry.key.problem} bucket {entry.bucket} ({entry.source}; {e.gpu} {e.arch}, "
            f"Triton {e.triton}, CUDA {e.cuda or 'none'}, driver {e.driver or 'none'})")


def tuning_lines(chooser: ConfigChooser) -> list[str]:
    """report.md's "Kernel configs" section: each op's config and why, the database entries the
    build skipped and the configs the gate rejected."""
    lines = ["## Kernel configs", ""]
    if not chooser.choices:
        lines.append(f"- no tunable Triton kernel{f' ({chooser.gate_unavailable})' if chooser.gate_unavailable else ''}")
    else:
        lines += ["| graph | value | op | kernel | config | source | why | check |", "|---|---|---|---|---|---|---|---|"]
        for c in chooser.choices:
            lines.append(f"| {c.graph} | {c.value} | {c.op} | {c.kernel} | {space.short(space.parse_config(c.config))} "
                         f"| {c.source} | {c.why} | {c.check} |")
    if chooser.skipped:
        lines += ["", "Tuning-database entries not used:", ""]
        lines += [f"- {entry}: {why}" for entry, why in sorted(chooser.skipped.items())]
    if chooser.rejected:
        lines += ["", "Configs the numerics gate rejected:", ""]
        lines += [f"- {message}" for message in chooser.rejected]
    return lines
