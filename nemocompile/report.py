"""The human report written into every engine (report.md): what was built, the format of every
weight and activation, bits per element, bytes per GPU, per-layer quantization error, and the
quantized engine's agreement with the float one."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from nemocompile.graph.importer import why_unused
from nemocompile.graph.ir import Graph
from nemocompile.graph.opdef import operand
from nemocompile.passes.assign_precision import gemm_weight
from nemocompile.passes.manager import PassRecord
from nemocompile.runtime.engine_format import Manifest
from nemocompile.targets import Target

from .agreement import Agreement
from .stats import ParamStats
from .weight_stream import QuantizationError


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
        name, x = gemm_weight(op), operand(op, "x") if gemm_weight(op) else None
        if name is None or x is None:
            continue
        producer = graph.producer(x)
        act = producer.attrs.str("format") if producer is not None and producer.opname == "quantize" else None
        rows.append((name, weights[name].type.dtype.name, act or types[x].dtype.name))
    return rows


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


def _sqnr(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


def write_report(path: Path, manifest: Manifest, graph: Graph, stats: ParamStats, records: list[PassRecord],
                 errors: list[QuantizationError], agreement: Agreement | None, planned_world_size: int,
                 target: Target, unknown_keys: Sequence[str] = (), skipped_tensors: Sequence[str] = ()) -> None:
    per_gpu = stats.bytes_total / planned_world_size
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
        f"- bytes per GPU at planned world size {planned_world_size} (a plan; the engine is not sharded): "
        f"{per_gpu:,.0f} of {target.memory_bytes:,} "
        f"({'fits' if per_gpu <= target.memory_bytes else 'does not fit'})",
        "",
        "| category | parameters | active | bytes | bits/element |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, entry in stats.categories.items():
        lines.append(f"| {name} | {entry.params:,} | {round(entry.active):,} | {entry.bytes:,} | "
                     f"{stats.bits_of(name):.3f} |")
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
                  f"- mean KL(float || quantized): {agreement.mean_kl:.6f} nats"]
    lines += ["", *unused_input_lines(unknown_keys, skipped_tensors)]
    notes = [note for record in records for note in record.notes]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    lines += ["", "## Layers", "", "| layer | block |", "|---:|---|", *_layer_rows(graph)]
    lines += ["", "## Passes", "", "| pass | ops before | ops after | counts |", "|---|---:|---:|---|"]
    for record in records:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(record.counts.items())) or "-"
        lines.append(f"| {record.name} | {record.ops_before} | {record.ops_after} | {counts} |")
    lines += ["", "## Kernels", "", "| graph | op | kernel | backend | ops |", "|---|---|---|---|---:|"]
    lines += [f"| {k.graph} | {k.op} | {k.kernel} | {k.backend} | {k.count} |" for k in manifest.kernels]
    lines += ["", "## Core ops", "", "| op | count |", "|---|---:|"]
    lines += [f"| {name} | {count} |" for name, count in graph.op_counts().items()]
    path.write_text("\n".join(lines) + "\n")
