"""Plan as a user runs it: `nemocompile plan CONFIG --target T --json` as a whole process (interpreter
start, imports, config, graph, passes, report), five runs per published config and target.

Prints the median, min and max wall time, whether the process imported torch (it must not: the IR,
the passes `plan` runs and the planner are torch-free), and whether the plan's numbers are those in
bench/data/plan_numbers.json (recorded before the architecture change of issue 6; any difference
is listed).

    python bench/bench_plan.py [--runs 5] [--models-dir ../shared/models]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
EXPECTED = json.loads((HERE / "data" / "plan_numbers.json").read_text())
TARGET_SECONDS = 0.5  # acceptance: median whole-process plan of Ultra
PROBE = """
import sys
sys.argv = ["nemocompile", *sys.argv[1:]]
from nemocompile.cli import main
try:
    main()
except SystemExit as done:
    code = done.code
print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""


def find_models_dir(given: Path | None) -> Path:
    for candidate in ([given] if given else []) + [HERE.parent.parent / "shared" / "models",
                                                    Path("/work/shared/models")]:
        if candidate is not None and (candidate / "ultra.json").exists():
            return candidate
    raise SystemExit("error: no published configs found; pass --models-dir")


def timed_runs(command: list[str], runs: int) -> tuple[list[float], dict[str, Any]]:
    seconds, result = [], {}
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"error: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout)
    return seconds, result


def imports_torch(args: list[str]) -> bool:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=False)
    return "torch imported: True" in done.stderr


def differences(result: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    found = []
    for key, value in expected.items():
        if key == "categories":
            for name, numbers in value.items():
                got = result["categories"].get(name, {})
                found += [f"{name}.{k}: {got.get(k)} != {v}" for k, v in numbers.items() if got.get(k) != v]
        elif result.get(key) != value:
            found.append(f"{key}: {result.get(key)} != {value}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--models-dir", type=Path)
    options = parser.parse_args()
    models = find_models_dir(options.models_dir)
    executable = shutil.which("nemocompile")
    if executable is None:
        raise SystemExit("error: the nemocompile console script is not on PATH (pip install -e .)")
    print(f"Machine\n  python {platform.python_version()}, {platform.processor() or platform.machine()}")
    print(f"  command: nemocompile plan CONFIG --target T --json, {options.runs} runs each")
    rows, problems = [], []
    for name in ("nano", "super", "ultra"):
        for target in ("b200", "h100"):
            args = ["plan", str(models / f"{name}.json"), "--target", target, "--json"]
            seconds, result = timed_runs([executable, *args], options.runs)
            diff = differences(result, EXPECTED[f"{name}/{target}"])
            problems += [f"{name}/{target}: {d}" for d in diff]
            rows.append([name, target, f"{statistics.median(seconds):.3f}", f"{min(seconds):.3f}",
                         f"{max(seconds):.3f}", "yes" if imports_torch(args) else "no",
                         f"{result['params_total'] / 1e9:.2f} B", f"{result['bytes_total'] / 1e9:.2f} GB",
                         f"{result['bits_per_element']}", "same" if not diff else f"{len(diff)} differ"])
    headers = ["model", "target", "median s", "min s", "max s", "torch", "params", "bytes", "bits/elt",
               "numbers vs before"]
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    print("\nWhole-process plan")
    for row in [headers, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                                strict=True))))
    ultra = [float(r[2]) for r in rows if r[0] == "ultra"]
    print(f"\nUltra median {max(ultra):.3f} s (worst target) against the {TARGET_SECONDS} s target: "
          f"{'met' if max(ultra) < TARGET_SECONDS else 'NOT met'}")
    for problem in problems:
        print(f"  differs: {problem}")


if __name__ == "__main__":
    main()
