"""What a sweep shows: a summary table (printed by the CLI and written to report.md beside the
plots) and one PNG per kernel: time per config (measured or modelled), the best marked, the
default marked, the speedup over the default in the legend. Plots need matplotlib (the `tune`
extra); without it the report says so and the tables stand alone."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nemocompile.codegen.tuning import space

if TYPE_CHECKING:
    from .tune import Sweep, TuneOptions, TuneResult

COLUMNS = ("kernel", "tokens", "configs", "pruned", "failed", "default us", "best us", "speedup", "best config",
           "check")


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f}" if math.isfinite(seconds) else "-"


def summary_rows(sweeps: Sequence[Sweep]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for s in sweeps:
        default = s.seconds(s.default)
        best = s.seconds(s.chosen) if s.chosen is not None else math.inf
        speedup = f"{default / best:.2f}x" if math.isfinite(default) and math.isfinite(best) and best > 0 else "-"
        rows.append((s.problem.label, str(s.tokens), str(len(s.trials)), str(len(s.pruned)), str(s.failed),
                     _us(default), _us(best), speedup, space.short(s.chosen) if s.chosen else "none",
                     s.check + ("" if s.complete else " (stopped by the budget)")))
    return rows


def plot_kernel(sweeps: Sequence[Sweep], path: Path, scorer: str) -> None:
    """One kernel's sweeps (one series per batch size): configs sorted by time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for sweep in sweeps:
        scored = sorted((t.seconds, c) for c, t in sweep.trials.items() if math.isfinite(t.seconds))
        if not scored:
            continue
        times = [seconds * 1e6 for seconds, _ in scored]
        line = axes.plot(range(len(times)), times, marker=".", linewidth=1, label=f"{sweep.tokens} tokens")[0]
        default = sweep.seconds(sweep.default)
        best = sweep.seconds(sweep.chosen) if sweep.chosen is not None else math.inf
        if math.isfinite(best) and sweep.chosen is not None:
            position = [c for _, c in scored].index(sweep.chosen)
            speedup = f", {default / best:.2f}x over default" if math.isfinite(default) else ""
            axes.plot([position], [best * 1e6], marker="*", markersize=14, color=line.get_color(),
                      label=f"best @ {sweep.tokens}: {space.short(sweep.chosen or ())}{speedup}")
        if math.isfinite(default):
            axes.plot([[c for _, c in scored].index(sweep.default)], [default * 1e6], marker="D", markersize=7,
                      fillstyle="none", color=line.get_color())
    axes.set_yscale("log")
    axes.set_xlabel("config, fastest first (diamond: the default config)")
    axes.set_ylabel(f"{'modelled' if scorer == 'modelled' else 'measured'} time per call (us)")
    axes.set_title(sweeps[0].problem.label, fontsize=10)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(result: TuneResult, options: TuneOptions) -> None:
    directory = options.reports
    directory.mkdir(parents=True, exist_ok=True)
    by_kernel: dict[str, list[Sweep]] = {}
    for sweep in result.sweeps:
        by_kernel.setdefault(sweep.problem.slug, []).append(sweep)
    have_plots = options.plots and importlib.util.find_spec("matplotlib") is not None
    if have_plots:
        for slug, sweeps in by_kernel.items():
            path = directory / f"{slug}.png"
            plot_kernel(sweeps, path, result.scorer)
            result.plots.append(path)
    lines = [f"# Tuning: {result.engine.name} on {result.target.name} ({result.target.arch})", "",
             f"- scored by: {'the cost model (modelled)' if result.scorer == 'modelled' else 'CUDA events (measured)'}",
             f"- database: {options.db}",
             f"- {len(result.sweeps)} sweeps of {result.problems} kernels in {result.wall_seconds:.2f} s wall, "
             f"{result.cpu_seconds:.2f} s CPU",
             *([f"- stopped early: {result.stopped}"] if result.stopped else []),
             *([f"- not measured (no synthetic inputs on the device; `--cost-model` models them): "
                f"{', '.join(result.unmeasured)}"] if result.unmeasured else []),
             *([] if have_plots else ["- no plots: matplotlib is not installed (pip install 'nemocompile[tune]')"]),
             "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(result.sweeps)]
    rejected = [message for sweep in result.sweeps for message in sweep.rejected]
    if rejected:
        lines += ["", "## Rejected configs", "", *[f"- {m}" for m in rejected]]
    if result.plots:
        lines += ["", "## Plots", "", *[f"![{p.stem}]({p.name})" for p in result.plots]]
    result.report = directory / "report.md"
    result.report.write_text("\n".join(lines) + "\n")
