"""The memory plan per GPU of the published Nemotron 3 configs (docs/memory-plan.md's table), and
how long planning takes (process CPU time beside wall time: on a shared machine wall time is
inflated by other jobs).

    python bench/bench_memory_plan.py [--models-dir ../shared/models]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench_plan import find_models_dir  # the published configs, found as bench_plan.py finds them

from nemocompile.memory_plan_table import memory_plan_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path)
    args = parser.parse_args()
    wall, cpu = time.perf_counter(), time.process_time()
    table = memory_plan_table(find_models_dir(args.models_dir))
    print(table)
    print(f"planned 6 deployments in {time.perf_counter() - wall:.2f} s wall, {time.process_time() - cpu:.2f} s CPU")


if __name__ == "__main__":
    main()
