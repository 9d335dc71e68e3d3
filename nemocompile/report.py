"""The human report written into every engine (report.md): what was built, the format of every
weight and activation, bits per element, bytes per GPU, per-layer quantization error, and the
quantized engine's agreement with the float one."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemocompile.graph.importer import why_unused
from nemocompile.graph.ir import Graph
from nemocompile.passes.assign_precision import act_quantization, any_gemm_weight
from nemocompile.passes.manager import PassRecord
from nemocompile.runtime.engine_format import EngineBounds, Manifest
from nemocompile.targets import Target

from .agreement import Agreement
from .memory_plan import MemoryPlan
from .pipeline import WRITE, PhaseRecord, fusion_counts
from .stats import ParamStats
from .weight_stream import QuantizationError

AGREEMENT_EXPLAINED = (
    "What these numbers measure: both engines read the same prompts, and at every position each gives a "
    "probability distribution over the next token. **Top-1 agreement** is the fraction of positions where "
    "both pick the same most likely token (1.0: the quantized engine would choose exactly what the float one "
    "chooses, greedily). **Mean KL** is KL(P_float || P_quantized) in nats averaged over the positions: how "
    "much probability the quantization moved, including where the top choice stayed (0: identical "
    "distributions). On a trained model the float engine is usually confident, so top-1 agreement near 1 and "
    "a KL of a few thousandths mean the quantization changed little. On random weights the next-token "
    "distribution is nearly flat, so tiny rounding errors reorder its top candidates: a top-1 agreement of "
    "0.4-0.5 with a small KL is what a correct quantization of a random model looks like, and says little "
    "about a trained one. The prompts are random token ids, not text, so they test the numerics rather than "
    "the model's knowledge.")


@dataclass(frozen=True)
class CalibrationInfo:
    """How the static activation scales were set: token batches through the float graph."""

    batches: int
    tokens: int
    source: str  # "random" or "file"
    seed: int | None  # random tokens: the generator's seed
    path: str | None  # file: where the token ids came from
    sha256: str | None  # file: the hash of its bytes
    scales: int  # activation scales set
    unreached: tuple[str, ...] = ()  # routed experts no calibration token reached ("WEIGHT expert N")
    kind: str | None = None  # file: how it was read (tokens, text or jsonl)
    file_tokens: int | None = None  # file: the tokens it holds (text: after tokenization)

    def describe(self) -> str:
        if self.source == "file":
            what = "token ids" if self.kind in (None, "tokens") else f"{self.kind} tokenized"
            origin = f"{what} from {self.path} (sha256 {self.sha256})"
        else:
            origin = f"random token ids (seed {self.seed})"
        unreached = f", {len(self.unreached)} experts reached by no token" if self.unreached else ""
        return (f"{self.batches:,} samples, {self.tokens:,} tokens of {origin}, {self.scales} activation scales "
                f"set{unreached}")

    def as_json(self) -> dict[str, object]:
        return {"batches": self.batches, "tokens": self.tokens, "source": self.source, "seed": self.seed,
                "path": self.path, "sha256": self.sha256, "scales": self.scales,
                "unreached_experts": list(self.unreached), "format": self.kind, "file_tokens": self.file_tokens}


def calibration_lines(calibration: CalibrationInfo | None) -> list[str]:
    lines = ["## Calibration", ""]
    if calibration is None:
        return [*lines, "- not run: no GEMM quantizes its activations with a scale the checkpoint lacks"]
    return [*lines,
            f"- samples: {calibration.batches} token sequences (one per batch), {calibration.tokens:,} tokens",
            "- source: " + ("random token ids, seed " + str(calibration.seed) if calibration.source == "random"
                            else f"file {calibration.path}, sha256 {calibration.sha256}"),
            *([] if calibration.source == "random" else [
                f"- file format: {calibration.kind}"
                + (" (tokenized with the checkpoint's tokenizer.json)" if calibration.kind != "tokens" else "")
                + f", {calibration.file_tokens:,} tokens in the file"]),
            "- method: the float engine (before quantization) runs every sample; each quantized activation's "
            "static scale is its largest magnitude seen divided by the format's largest value (amax / (6 x 448) "
            "for NVFP4, amax / 448 for FP8), one scale per expert for routed experts; the model runs one block "
            "at a time over all samples (only that block's weights in memory)",
            f"- activation scales set: {calibration.scales}",
            "- experts no sample reached: " + (
                "none" if not calibration.unreached else
                f"{len(calibration.unreached)}; each takes the largest amax the other experts of the same GEMM "
                "saw (so it clips no more than they do): " + ", ".join(calibration.unreached))]


# The seconds column of the build-phases table: the only bytes of an engine that differ between two
# builds of the same input (and so report.md's entry in the manifest).
_PHASE_SECONDS = re.compile(r"^(\| [^|\n]+ \| )\d+\.\d{3}( \|)", re.MULTILINE)
_PHASES_HEADING = "## Build phases"
_COMPILE_HEADING = "## Kernel compile times"
# Its rows (and summary line) differ between a cold and a warm build.
_COMPILE_ROW = re.compile(r"^(\| [^|\n]+ \| [^|\n]+ \| )\d+\.\d{3} \| [^|\n]+ \|$", re.MULTILINE)
_COMPILE_SUMMARY = re.compile(r"^Compiled: .*$", re.MULTILINE)


def without_build_times(report: str) -> str:
    """report.md with the build-phase times blanked: what two builds of one input agree on exactly."""
    report = _blank_section(report, _COMPILE_HEADING,
                            lambda table: _COMPILE_SUMMARY.sub("Compiled: -", _COMPILE_ROW.sub(r"\1- | - |", table)))
    return _blank_section(report, _PHASES_HEADING, lambda table: _PHASE_SECONDS.sub(r"\1-\2", table))


def _blank_section(report: str, heading: str, blank: Callable[[str], str]) -> str:
    head, found, tail = report.partition(heading)
    if not found:
        return report
    table, rest_found, rest = tail.partition("\n## ")
    return head + found + blank(table) + rest_found + rest


def comparable_engine_bytes(directory: Path) -> dict[str, bytes]:
    """Every file of an engine by relative path, as two builds of the same input must agree on it:
    report.md with its build-phase times blanked, manifest.json without report.md's hash and size."""
    files = {path.relative_to(directory).as_posix(): path.read_bytes()
             for path in sorted(directory.rglob("*")) if path.is_file()}
    if "report.md" in files:
        files["report.md"] = without_build_times(files["report.md"].decode()).encode()
    if "manifest.json" in files:
        manifest = json.loads(files["manifest.json"])
        manifest.get("files", {}).pop("report.md", None)
        files["manifest.json"] = json.dumps(manifest, indent=2, sort_keys=True).encode()
    return files


def compiled_kernel_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The Triton kernels compiled ahead of time: resources and tensor-core instructions (from the
    PTX), then the compile times, cold or from the shared compile cache (blanked for comparisons)."""
    lines = ["## Compiled kernels", "",
             "| kernel | arch | registers | stack bytes | shared bytes | tensor-core instructions |",
             "|---|---|---:|---:|---:|---|"]
    lines += [f"| {r['name']} | {r['arch']} | {r['registers']} | {r['spills']} | {r['shared_bytes']} | "
              f"{', '.join(r['tensor_cores']) or '-'} |" for r in rows]
    lines += ["", _COMPILE_HEADING, "", "| kernel | arch | seconds | from cache |", "|---|---|---:|---|"]
    lines += [f"| {r['name']} | {r['arch']} | {r['compile_seconds']:.3f} | {'yes' if r['cached'] else 'no'} |"
              for r in rows]
    cold = sum(r["compile_seconds"] for r in rows if not r["cached"])
    warm = sum(r["compile_seconds"] for r in rows if r["cached"])
    lines.append(f"| all | - | {cold + warm:.3f} | {sum(1 for r in rows if r['cached'])} of {len(rows)} |")
    lines += ["", f"Compiled: {cold:.3f} s; taken from the compile cache: {warm:.3f} s."]
    return lines


def phase_lines(phases: Sequence[PhaseRecord]) -> list[str]:
    lines = [_PHASES_HEADING, "", "| phase | seconds | progress | what it did |", "|---|---:|---:|---|"]
    for phase in phases:
        progress = f"{phase.done:,} {phase.unit}" if phase.unit else "-"
        lines.append(f"| {phase.name} | {phase.seconds:.3f} | {progress} | {phase.summary or '-'} |")
    total = sum(phase.seconds for phase in phases)
    lines += [f"| total before writing | {total:.3f} | - | - |", "",
              f"The {WRITE} phase (graph text, this report, the manifest with every file's sha256) follows; "
              "its time is in `build --json`."]
    return lines


def _layer_rows(graph: Graph) -> list[str]:
    pattern = graph.meta("pattern") or ""
    names = {"M": "mamba2", "*": "attention", "E": "moe", "-": "mlp"}
    return [f"| {i} | {names[letter]} |" for i, letter in enumerate(pattern)]


def gemm_formats(graph: Graph) -> list[tuple[str, str, str]]:
    """(weight, weight format, activation format) of every GEMM, in graph order; activations that a
    `quantize` op feeds it are in that op's format."""
    weights = graph.weight_map()
    types = graph.value_types()
    rows = []
    for op in graph.ops:
        name = any_gemm_weight(op)
        if name is None:
            continue
        x = op.operands[0]  # the GEMM's input (x, or the experts' hidden rows)
        assert x is not None
        quantized_on_load = act_quantization(op)
        # a quantized input's type is its format (a `quantize` or a norm that quantizes made it)
        act = quantized_on_load[1] if quantized_on_load else types[x].dtype.name
        producer = graph.producer(x)
        if producer is not None and producer.opname == "quantize_dynamic":
            act = f"{producer.attrs.str('format')} (dynamic)"
        rows.append((name, weights[name].type.dtype.name, act))
    return rows


def fusion_lines(counts: Mapping[str, int]) -> list[str]:
    """The report section on fusions: rewrites per fusion rule, as the passes counted them."""
    lines = ["## Fusions", "",
             "Rewrites per fusion rule (`inspect --json` shows the same as `fusions`, counted in the graph).", "",
             "| fusion | count |", "|---|---:|"]
    return lines + [f"| {name} | {count} |" for name, count in counts.items()]


def unused_input_lines(unknown_keys: Sequence[str], skipped_tensors: Sequence[str]) -> list[str]:
    """The report section on input nemocompile read but did not use."""
    lines = ["## Input not used", ""]
    keys = ", ".join(f"`{key}`" for key in unknown_keys) or "none"
    lines.append(f"- config.json keys nemocompile does not know (kept in config.json, not used): {keys}")
    if not skipped_tensors:
        lines.append("- checkpoint tensors skipped as unused at inference: none")
    else:
        lines.append("- checkpoint tensors skipped as unused at inference:")
        lines += [f"  - `{name}`: {why_unused(name)}" for name in skipped_tensors]
    return lines


def _stored_quantized(graph: Graph) -> bool:
    """Built from a ModelOpt export (graph/importer.py records its quant_algo)."""
    return any(name == "source_quantization" for name, _ in graph.metadata)


def deviation_lines(deviation: Agreement | None, graph: Graph) -> list[str]:
    """How far the engine is from the numerics the checkpoint was exported with."""
    lines = ["## Deviation from the checkpoint's own numerics", ""]
    if deviation is None:
        lines.append("- none: every GEMM runs as exported (each input_scale quantizes its activations in the "
                     "stored format), or the model is too big to measure it on the CPU reference runtime "
                     "(see Notes)")
        return lines
    return [
        *lines,
        "- this target cannot compute in every format the checkpoint was exported in, so those GEMMs run "
        "weight-only (see Notes); measured against the checkpoint's own numerics on the reference runtime:",
        f"- {deviation.prompts} random prompts, {deviation.tokens} positions",
        f"- top-1 agreement: {deviation.top1:.4f}",
        f"- mean KL(exported || engine): {deviation.mean_kl:.6f} nats",
        f"- relative logit error: {deviation.rel_error:.6f}",
    ]


def memory_plan_lines(memory: MemoryPlan, bounds: EngineBounds | None = None) -> list[str]:
    """The memory plan per GPU and the largest batch x context that fits (docs/memory-plan.md)."""
    batch, context = memory.max_batch, memory.max_context
    longest_at_one, longest = memory.largest_context(1), memory.largest_context(batch)
    lines = [f"## Memory plan per GPU (world size {memory.parallelism.world_size}, tp {memory.parallelism.tp}, "
             f"ep {memory.parallelism.ep})", ""]
    if bounds is not None:
        lines += [_bounds_line(bounds), ""]
    lines += [
             f"At --max-batch-size {batch} and --max-context {context}, "
             f"{memory.step_tokens(batch, context)} tokens per forward step:", "",
             "| part | bytes |", "|---|---:|"]
    lines += [f"| {name} | {size:,} |" for name, size in memory.parts(batch, context).items()]
    lines += [f"| total | {memory.bytes_per_gpu:,} |", f"| GPU memory ({memory.target.name}) | "
              f"{memory.target.memory_bytes:,} |", "",
              f"- KV cache per token: {memory.kv_bytes_per_token:,} bytes; Mamba state per sequence: "
              f"{memory.ssm_state_bytes_per_sequence:,} bytes (conv {memory.conv_state_bytes_per_sequence:,}, "
              f"SSM {memory.ssm_bytes_per_sequence:,})",
              f"- largest batch x context that fits: {batch} x {_tokens(longest)} (at --max-batch-size), "
              f"{memory.largest_batch(context)} x {context} (at --max-context), 1 x {_tokens(longest_at_one)}"]
    return lines


def _bounds_line(bounds: EngineBounds) -> str:
    given = [option for option in ("--max-batch-size", "--max-context") if option not in bounds.chosen_automatically]
    text = f"Run-time bounds: {bounds.max_batch_size} sequences of up to {bounds.max_context} tokens"
    if not bounds.chosen_automatically:
        return text + " (both given)."
    chosen = " and ".join(bounds.chosen_automatically)
    text += f"; {chosen} chosen automatically (not given" + (f"; {given[0]} given" if given else "") + ")"
    return text + (f": {bounds.why}." if bounds.why else ": the defaults fit.")


def _tokens(count: int | None) -> str:
    return "unbounded (no attention layer)" if count is None else str(count)


def _sqnr(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


def write_report(path: Path, manifest: Manifest, graph: Graph, stats: ParamStats, records: list[PassRecord],
                 errors: list[QuantizationError], agreement: Agreement | None, planned_world_size: int,
                 target: Target, unknown_keys: Sequence[str] = (), skipped_tensors: Sequence[str] = (),
                 phases: Sequence[PhaseRecord] = (), calibration: CalibrationInfo | None = None,
                 deviation: Agreement | None = None, checkpoint_quirks: Sequence[str] = (),
                 compiled_kernels: Sequence[Mapping[str, Any]] = (), kernel_config_lines: Sequence[str] = (),
                 memory: MemoryPlan | None = None, kernel_fallbacks: Sequence[Mapping[str, str]] = ()) -> None:
    per_gpu = memory.bytes_per_gpu if memory is not None else stats.bytes_total / planned_world_size
    lines = [
        f"# Engine: {manifest.source.name}",
        "",
        f"- target: {manifest.target.name} ({manifest.target.arch})",
        f"- precision: {manifest.precision} (base {manifest.policy.base})",
        f"- world size: {manifest.world_size} (ranks this engine holds)",
        f"- nemocompile {manifest.nemocompile_version}, engine format {manifest.format_version}",
        f"- source fingerprint: {manifest.source.fingerprint}",
        "",
        "## Parameters and bytes",
        "",
        f"- total (without MTP): {stats.params_total:,}",
        f"- active per token: {stats.params_active:,}",
        f"- MTP (carried, not executed): {stats.params_mtp:,}",
        f"- stored bytes: {stats.bytes_total:,} ({stats.bits_per_element:.3f} bits per element)",
        f"- bytes per GPU at world size {planned_world_size} (the weights split evenly; each rank's file is in "
        f"the manifest): "
        f"{per_gpu:,.0f} of {target.memory_bytes:,} "
        f"({'fits' if per_gpu <= target.memory_bytes else 'does not fit'}; the memory plan below)",
        "",
        "| category | parameters | active | bytes | bits/element |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, entry in stats.categories.items():
        lines.append(f"| {name} | {entry.params:,} | {round(entry.active):,} | {entry.bytes:,} | "
                     f"{stats.bits_of(name):.3f} |")
    if memory is not None:
        lines += ["", *memory_plan_lines(memory, manifest.bounds)]
    lines += ["", "## Precision policy", ""]
    lines += [f"- {component}: {chosen}" for component, chosen in manifest.policy.components.items()]
    if manifest.policy.exclude:
        lines.append(f"- excluded (kept {manifest.policy.base}): {', '.join(manifest.policy.exclude)}")
    lines += ["", "## GEMM formats", "", "| weight | weight format | activations |", "|---|---|---|"]
    lines += [f"| {w} | {fmt} | {act} |" for w, fmt, act in gemm_formats(graph)]
    if errors:
        lines += ["", "## Quantization error per weight", "",
                  "| weight | format | relative RMS | SQNR dB |", "|---|---|---:|---:|"]
        lines += [f"| {e.weight} | {e.format} | {e.rel_rms:.5f} | {_sqnr(e.sqnr_db)} |" for e in errors]
    lines += ["", "## Agreement with the float engine", ""]
    if agreement is None:
        lines.append("- not measured: nothing was quantized, the checkpoint is stored quantized (no float weights "
                     "to compare with), or the model is too big for the CPU reference check")
    else:
        lines += [f"- against {agreement.reference}, {agreement.prompts} random prompts, {agreement.tokens} positions",
                  f"- top-1 agreement: {agreement.top1:.4f}",
                  f"- mean KL(float || quantized): {agreement.mean_kl:.6f} nats",
                  "", AGREEMENT_EXPLAINED]
    if _stored_quantized(graph):
        lines += ["", *deviation_lines(deviation, graph)]
    lines += ["", *calibration_lines(calibration)]
    lines += ["", *unused_input_lines(unknown_keys, skipped_tensors)]
    if checkpoint_quirks:
        lines += ["", "## Checkpoint quirks tolerated", "", *[f"- {quirk}" for quirk in checkpoint_quirks]]
    notes = [note for record in records for note in record.notes]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    if phases:
        lines += ["", *phase_lines(phases)]
    lines += ["", "## Layers", "", "| layer | block |", "|---:|---|", *_layer_rows(graph)]
    lines += ["", "## Passes", "", "| pass | ops before | ops after | counts |", "|---|---:|---:|---|"]
    for record in records:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(record.counts.items())) or "-"
        lines.append(f"| {record.name} | {record.ops_before} | {record.ops_after} | {counts} |")
    lines += ["", *fusion_lines(fusion_counts(records))]
    lines += ["", "## Kernels", "", "| graph | op | kernel | backend | ops |", "|---|---|---|---|---:|"]
    lines += [f"| {k.graph} | {k.op} | {k.kernel} | {k.backend} | {k.count} |" for k in manifest.kernels]
    if kernel_fallbacks:
        lines += ["", "## Kernel fallbacks", "",
                  "These ops chose a Triton kernel that has no specialisation for them; they run their reference "
                  "implementation.", "", "| graph | value | op | kernel | reason |", "|---|---|---|---|---|"]
        lines += [f"| {f['graph']} | %{f['value']} | {f['op']} | {f['kernel']} | {f['reason']} |"
                  for f in kernel_fallbacks]
    if compiled_kernels:
        lines += ["", *compiled_kernel_lines(compiled_kernels)]
    if kernel_config_lines:
        lines += ["", *kernel_config_lines]
    lines += ["", "## Core ops", "", "| op | count |", "|---|---:|"]
    lines += [f"| {name} | {count} |" for name, count in graph.op_counts().items()]
    path.write_text("\n".join(lines) + "\n")
