"""Build-time cost of every Triton kernel an engine of a model compiles, per arch: the expert GEMMs
(W4A16 on sm_90a and sm_100a, W4A4 on sm_100a), the FP8 linear, and the norm, conv1d, SSD,
attention and router kernels in the variants engines use, at the model's shapes. Each kernel is
compiled cold (a fresh compile cache) and then again with the cache warm; the table gives the wall
seconds and the CPU seconds (this process and its ptxas/cuobjdump children; wall time is inflated on
a shared machine, CPU time much less), its registers, shared memory and tensor-core instructions.

    python bench/bench_kernel_compile.py [--model /work/shared/models/nano.json] [--arch sm_90 sm_100]

No GPU needed (triton.compile with a GPUTarget). Nothing is asserted."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import gpu_check  # bench/gpu_check.py: the GEMM kernel set
import ops_check  # bench/ops_check.py: the norm, Mamba, attention and router kernel set

from nemocompile.codegen.triton.aot import compile_instance
from nemocompile.codegen.triton.spec import KernelInstance


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def instances(config: dict[str, int], arch: str) -> list[KernelInstance]:
    d, i = config["hidden_size"], config["moe_intermediate_size"]
    experts, top_k = config["n_routed_experts"], config["num_experts_per_tok"]
    found = gpu_check.kernel_set(d, i, experts, top_k, "bf16")
    if arch == "sm_100":  # W4A4 (tl.dot_scaled) exists on sm_100a only
        found += [replace(k, name=f"{k.name}_w4a4") for k in gpu_check.kernel_set(d, i, experts, top_k, "nvfp4")
                  if k.name in ("up", "down")]
    return found + ops_check.kernel_set(config)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/work/shared/models/nano.json", help="config.json with the shapes")
    parser.add_argument("--arch", nargs="+", default=["sm_90", "sm_100"], choices=["sm_90", "sm_100"])
    args = parser.parse_args()
    config = json.loads(Path(args.model).read_text())
    print(f"{Path(args.model).name}: compile cost per kernel, cold (fresh cache) and warm")
    print(f"{'kernel':32s} {'arch':6s} {'cold s':>7} {'cold cpu':>8} {'warm s':>7} {'regs':>4} {'smem B':>7} "
          "tensor cores")
    for arch in args.arch:
        totals = [0.0, 0.0, 0.0]
        with tempfile.TemporaryDirectory() as cache:
            for kernel in instances(config, arch):
                wall, cpu = time.perf_counter(), _cpu()
                cold = compile_instance(kernel, arch, Path(cache))
                wall, cpu = time.perf_counter() - wall, _cpu() - cpu
                start = time.perf_counter()
                warm = compile_instance(kernel, arch, Path(cache))
                warm_s = time.perf_counter() - start
                assert warm.cached and not cold.cached
                totals = [totals[0] + wall, totals[1] + cpu, totals[2] + warm_s]
                print(f"{kernel.name:32s} {arch:6s} {wall:7.2f} {cpu:8.2f} {warm_s:7.3f} {cold.registers:4d} "
                      f"{cold.shared_bytes:7d} {', '.join(cold.tensor_cores) or '-'}")
        print(f"{'all':32s} {arch:6s} {totals[0]:7.2f} {totals[1]:8.2f} {totals[2]:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
