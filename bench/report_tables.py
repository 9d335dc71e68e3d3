"""Output helpers shared by the benchmark scripts: aligned text tables, the load average and the
machine facts printed at the top of every run.

The scripts run as `python bench/<name>.py`, which puts bench/ first on sys.path, so they import
this module by its bare name: `from report_tables import print_table, ...`.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence

import torch


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Plain aligned text: the first column left-aligned, the others right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        return "  ".join([first.ljust(widths[0]), *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True))])

    print(f"\n{title}")
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, two decimals each, space-separated."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def print_machine_facts(load_warning: str, *, versions: Mapping[str, str] | None = None, memory: bool = False,
                        warn_single_threaded: bool = True) -> None:
    """Print the "Machine" block: versions, CPUs, torch threads, load average, processor.

    load_warning: printed (as is, after the facts) when the 1-minute load average exceeds half
    the usable CPUs. versions: extra library versions, listed right after torch's. memory: add a
    row with the physical memory in GB. warn_single_threaded: False to skip the warning when
    torch runs one thread.
    """
    usable_cpus = len(os.sched_getaffinity(0))
    facts = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        **(versions or {}),
        "cpu count (os)": str(os.cpu_count()),
        "cpus usable (affinity)": str(usable_cpus),
        "torch threads": str(torch.get_num_threads()),
    }
    if memory:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        facts["memory"] = f"{physical / 1e9:.1f} GB"
    facts["load average 1/5/15 min"] = load_average()
    facts["processor"] = platform.processor() or platform.machine()
    print("Machine")
    for key, value in facts.items():
        print(f"  {key:<26}{value}")
    if os.getloadavg()[0] > usable_cpus / 2 and (warn_single_threaded or torch.get_num_threads() > 1):
        print(load_warning)
