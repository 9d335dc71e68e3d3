"""Build stages at real size: a seeded BF16 Nemotron-H checkpoint in the released layout (sharded,
one tensor per routed expert; default about 3 GB, `--gigabytes X`) built as a new user would,
with the default policy and default calibration, for b200 and h100, and again with
`--act-scales dynamic`. Each build runs in a child process that records, for every build phase,
its wall seconds, its CPU seconds (time.process_time: every thread of the process) and its own
peak RSS (the kernel's high-water mark is reset at each phase start by writing 5 to
/proc/self/clear_refs, then read from VmHWM at its end). Printed per stage: wall and CPU seconds,
GB/s of BF16 checkpoint input by wall time (checkpoint bytes / stage wall seconds) and by CPU time
(checkpoint bytes / stage CPU seconds: what one fully available core does, the figure to compare
on a machine other jobs load), peak RSS; per build: target, act-scales, the whole process's peak
RSS (the largest phase peak, as the resets also reset ru_maxrss) against the acceptance limits
(<= 1.5 GB and <= half the checkpoint), wall and CPU seconds (user + system from wait4).

Run: python bench/bench_build_stages.py [--gigabytes X] [--tmpdir DIR] [--targets b200,h100]
     [--act-scales static,dynamic] [--checkpoint DIR]
The checkpoint is generated into a temporary directory and deleted afterwards (never commit it);
with --checkpoint DIR it is generated into DIR once and kept, and taken from there on later runs."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

from bench_quantize import GB, MIB, dims_for_bytes, total_bytes, write_checkpoint
from report_tables import load_average, print_machine_facts, print_table

STAGES = ("calibration", "quantize-and-write")
RSS_LIMIT = 1.5 * GB
# The child: a phase listener that resets the peak RSS when a phase starts and reads it when it ends.
CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    from nemocompile.driver import build
    from nemocompile.options import BuildOptions

    def high_water_mark():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    class Stages:
        cpu = 0.0
        def phase_started(self, name, total, unit):
            Path("/proc/self/clear_refs").write_text("5")
            self.cpu = time.process_time()
        def phase_advanced(self, done, total, unit, detail):
            pass
        def phase_ended(self, record):
            print(json.dumps({"phase": record.name, "seconds": record.seconds, "peak_rss": high_water_mark(),
                              "cpu": time.process_time() - self.cpu, "summary": record.summary}), flush=True)

    model, out, target, act_scales = sys.argv[1:5]
    result = build(Path(model), Path(out), BuildOptions(target=target, act_scales=act_scales), progress=Stages())
    print(json.dumps({"calibration": result.calibration.as_json() if result.calibration else None,
                      "bytes_written": result.bytes_written}), flush=True)
""")


def run_build(checkpoint: Path, engine: Path, target: str,
              act_scales: str) -> tuple[list[dict[str, object]], dict[str, object], int, float, float]:
    """(phase records, result summary, peak RSS of the whole child, wall seconds, CPU seconds)."""
    start = time.perf_counter()
    env = {**os.environ, "NEMOCOMPILE_PROGRESS": "0"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(checkpoint), str(engine), target, act_scales],
                                stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"error: the {target} build failed:\n{err.read()[-3000:]}")
        lines = [json.loads(line) for line in out.read().splitlines() if line.startswith("{")]
    return ([line for line in lines if "phase" in line], lines[-1], usage.ru_maxrss * 1024, seconds,
            usage.ru_utime + usage.ru_stime)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=3.0, help="BF16 checkpoint size in GB (default 3)")
    parser.add_argument("--tmpdir", type=Path, default=None, help="where the checkpoint and engines go")
    parser.add_argument("--targets", default="b200,h100")
    parser.add_argument("--act-scales", default="static,dynamic")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="keep the generated checkpoint here (generated once; taken as it is when present)")
    args = parser.parse_args(argv)
    print_machine_facts("other processes share this machine: times vary with its load", memory=True)
    dims = dims_for_bytes(args.gigabytes * GB)
    size = total_bytes(dims)
    with tempfile.TemporaryDirectory(prefix="bench-stages-", dir=args.tmpdir) as tmp:
        checkpoint = args.checkpoint or Path(tmp) / "checkpoint"
        start = time.perf_counter()
        if (checkpoint / "config.json").is_file():
            how = f"taken from {checkpoint}"
            size = sum(path.stat().st_size for path in checkpoint.glob("*.safetensors"))
        else:
            write_checkpoint(checkpoint, dims)
            how = f"generated in {time.perf_counter() - start:.0f} s"
        shards = len(list(checkpoint.glob("*.safetensors")))
        print(f"\ncheckpoint: {size / GB:.2f} GB BF16 in {shards} shards, {dims.experts} routed experts per MoE layer "
              f"(one tensor each), pattern {dims.block_pattern * dims.repeats}; {how}")
        rows = []
        builds = []
        limit = min(RSS_LIMIT, size / 2)
        for act_scales in args.act_scales.split(","):
            for target in args.targets.split(","):
                engine = Path(tmp) / f"engine-{target}-{act_scales}"
                phases, result, peak, seconds, cpu = run_build(checkpoint, engine, target, act_scales)
                shutil.rmtree(engine)
                label = f"{target} {act_scales}"
                for phase in phases:
                    if phase["phase"] in STAGES or phase["phase"] == "write engine":
                        wall = float(phase["seconds"])  # type: ignore[arg-type]
                        stage_cpu = float(phase["cpu"])  # type: ignore[arg-type]
                        rows.append((label, str(phase["phase"]), f"{wall:.1f}", f"{stage_cpu:.1f}",
                                     _rate(size, wall), _rate(size, stage_cpu),
                                     f"{int(phase['peak_rss']) / MIB:,.0f}", str(phase["summary"])[:60]))  # type: ignore[call-overload]
                # resetting the high-water mark at each phase also resets ru_maxrss: the build's peak is
                # the largest of its phases' peaks
                peak = max([peak, *(int(phase["peak_rss"]) for phase in phases)])  # type: ignore[call-overload]
                builds.append((target, act_scales, f"{peak / MIB:,.0f}", f"{limit / MIB:,.0f}",
                               "ok" if peak <= limit else "OVER", f"{seconds:.0f}", f"{cpu:.0f}",
                               json.dumps(result["calibration"])[:70]))
        print_table("Build stages (GB/s of BF16 input: checkpoint bytes / stage wall seconds, and / stage CPU "
                    "seconds of all threads)",
                    ("build", "stage", "wall s", "CPU s", "GB/s wall", "GB/s per CPU-s", "peak RSS MiB", "summary"),
                    rows)
        print_table("Builds (peak RSS: the largest phase peak; limit: min(1.5 GB, half the checkpoint))",
                    ("target", "act-scales", "peak RSS MiB", "limit MiB", "", "wall s", "CPU s", "calibration"),
                    builds)
    print(f"\nload average now {load_average()}")


def _rate(size: float, seconds: float) -> str:
    return f"{size / seconds / GB:.2f}" if seconds > 0.01 else "-"


if __name__ == "__main__":
    main()
