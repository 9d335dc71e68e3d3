"""How long the cost-model sweep of the demo engine takes (`nemocompile tune --cost-model`, every
tunable kernel, batch sizes 1, 8, 64, 256). The goal is under a minute on 2 cores with compiles
cached.

    python bench/bench_tune.py [--cache DIR]

It builds the h100 demo engine (kernels through the compile cache, default: the shared one), then
times three sweeps, each printing wall time and this process's CPU time (wall time is inflated on
a machine shared with other jobs; ptxas runs in child processes, whose time is not in the CPU
column):
1. into a new database: compiles of the chosen configs cold unless the cache has them;
2. into another new database: every compile and numerics-gate verdict cached (the goal's case);
3. again into the second database: the journal holds every score, nothing is scored again.
Nothing here asserts a time."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from nemocompile.api import build
from nemocompile.base.settings import override, settings
from nemocompile.codegen.tuning.space import short
from nemocompile.tune import TuneOptions, tune_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=settings().kernel_cache_dir, help="kernel compile cache")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{cpus} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp, override(kernel_cache_dir=args.cache, progress=False):
        root = Path(tmp)
        start, cpu = time.perf_counter(), time.process_time()
        build(None, root / "demo", target="h100")
        print(f"demo engine built in {time.perf_counter() - start:.1f} s wall, {time.process_time() - cpu:.1f} s CPU")
        print(f"{'sweep':44s} {'kernels':>7s} {'sweeps':>6s} {'configs':>8s} {'wall s':>7s} {'CPU s':>6s}")
        for label, db in (("1. new database", "a.sqlite"), ("2. new database, compiles and gate cached", "b.sqlite"),
                          ("3. resumed: every score in the journal", "b.sqlite")):
            start, cpu = time.perf_counter(), time.process_time()
            result = tune_engine(root / "demo", TuneOptions(db=root / db, cost_model=True))
            configs = sum(len(s.trials) for s in result.sweeps)
            print(f"{label:44s} {result.problems:7d} {len(result.sweeps):6d} {configs:8d} "
                  f"{time.perf_counter() - start:7.2f} {time.process_time() - cpu:6.2f}")
        gemms = [sw for sw in result.sweeps if sw.problem.instance.template.entry in ("moe_nvfp4_gemm", "fp8_linear")]
        split = [sw for sw in gemms if sw.chosen is not None and dict(sw.chosen).get("SPLIT_K", 1) != 1]
        print(f"split-K chosen by the cost model in {len(split)} of {len(gemms)} GEMM sweeps"
              + "".join(f"\n  {sw.problem.label} @ {sw.tokens} tokens: {short(sw.chosen)}" for sw in split if sw.chosen))
        print(f"report and plots of the last sweep: {result.report} (removed with the temporary directory)")


if __name__ == "__main__":
    main()
