"""The human report written into every engine (report.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nemocompile.graph.ir import Graph
from nemocompile.passes.manager import PassRecord

from .stats import ParamStats


def _layer_rows(graph: Graph) -> list[str]:
    pattern = graph.meta("pattern") or ""
    names = {"M": "mamba2", "*": "attention", "E": "moe", "-": "mlp"}
    return [f"| {i} | {names[letter]} |" for i, letter in enumerate(pattern)]


def write_report(path: Path, manifest: dict[str, Any], graph: Graph, stats: ParamStats,
                 records: list[PassRecord]) -> None:
    lines = [
        f"# Engine: {manifest['source']['name']}",
        "",
        f"- target: {manifest['target']['name']} ({manifest['target']['arch']})",
        f"- precision: {manifest['precision']}",
        f"- world size: {manifest['world_size']}",
        f"- nemocompile {manifest['nemocompile_version']}, engine format {manifest['format_version']}",
        f"- source fingerprint: {manifest['source']['fingerprint']}",
        "",
        "## Parameters",
        "",
        f"- total (without MTP): {stats.params_total:,}",
        f"- active per token: {stats.params_active:,}",
        f"- MTP (carried, not executed): {stats.params_mtp:,}",
        f"- stored bytes: {stats.bytes_total:,} ({stats.bits_per_element:.2f} bits per element)",
        "",
        "| category | parameters | active | bytes |",
        "|---|---:|---:|---:|",
    ]
    for name, entry in stats.categories.items():
        lines.append(f"| {name} | {entry.params:,} | {round(entry.active):,} | {entry.bytes:,} |")
    lines += ["", "## Layers", "", "| layer | block |", "|---:|---|", *_layer_rows(graph)]
    lines += ["", "## Passes", "", "| pass | ops before | ops after | counts |", "|---|---:|---:|---|"]
    for record in records:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(record.counts.items())) or "-"
        lines.append(f"| {record.name} | {record.ops_before} | {record.ops_after} | {counts} |")
    lines += ["", "## Core ops", "", "| op | count |", "|---|---:|"]
    lines += [f"| {name} | {count} |" for name, count in graph.op_counts().items()]
    path.write_text("\n".join(lines) + "\n")
