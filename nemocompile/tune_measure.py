"""Timing one kernel config on the device: synthetic inputs of the bucket's size (random
activations, uniformly random routing, random NVFP4 / FP8 weights), the config compiled ahead of
time and launched from its binary, CUDA events around each launch, the median of `repeats` after
`warmup` launches, and the L2 flushed before every timed launch (a write of FLUSH_BYTES).

On a CPU the same call runs in Triton's interpreter and is timed with the wall clock: the tests
use it to exercise the measured path; its times mean nothing for a GPU."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from nemocompile.base.errors import CompileError
from nemocompile.base.settings import settings
from nemocompile.codegen.triton.aot import ARTIFACTS, compile_instance
from nemocompile.codegen.triton.emit import INDEX, INDEX_VERSION, KERNELS_DIR
from nemocompile.codegen.triton.spec import TEMPLATE_DIR, KernelInstance
from nemocompile.codegen.triton.templates_catalog import with_split_k_reduces
from nemocompile.codegen.tuning.space import Config, apply
from nemocompile.codegen.tuning.workload import GEMM, Workload
from nemocompile.runtime.formats import FP8Tensor, NVFP4Tensor, fp8_codes, nvfp4_codes
from nemocompile.runtime.kernels import triton_gemm
from nemocompile.runtime.kernels.triton_loader import TritonKernels

FLUSH_BYTES = 256 << 20  # larger than the L2 of an H100/H200 (50 MB) or a B200 (126 MB)
GIB = 1 << 30


def compile_jobs() -> int:
    """Parallel compiles: one per CPU this process may use, at most one per 2 GiB of free memory
    (`NEMOCOMPILE_TUNE_COMPILE_JOBS` overrides)."""
    if settings().tune_compile_jobs:
        return settings().tune_compile_jobs
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return cpus
    return max(1, min(cpus, available // (2 * GIB)))


def compile_config(instance: KernelInstance, config: Config, arch: str, cache_dir: Path) -> str:
    """"" when the config compiles for `arch` (into the shared cache; a split-K config with its
    reduce kernel), else the compiler's sentence."""
    try:
        for kernel in with_split_k_reduces([apply(instance, config)]):
            compile_instance(kernel, arch, cache_dir)
    except CompileError as error:
        return str(error)
    return ""


def compile_all(instance: KernelInstance, configs: Sequence[Config], arch: str, cache_dir: Path) -> dict[Config, str]:
    """Compile `configs` in parallel (compile_jobs threads; ptxas runs as a child process); the
    failures with their errors."""
    with ThreadPoolExecutor(compile_jobs()) as pool:
        errors = pool.map(lambda config: compile_config(instance, config, arch, cache_dir), configs)
        return {config: error for config, error in zip(configs, errors, strict=True) if error}


def kernel_files(instances: Sequence[KernelInstance], arch: str, cache_dir: Path,
                 device: torch.device) -> dict[str, bytes]:
    """An engine-like kernels/ folder of some instances in memory (their binaries too on CUDA)."""
    files = {f"{KERNELS_DIR}/src/{name}": (TEMPLATE_DIR / name).read_bytes()
             for name in sorted({f for instance in instances for f in instance.template.files})}
    entries = []
    for instance in instances:
        entry = instance.describe()
        if device.type == "cuda":
            binary = compile_instance(instance, arch, cache_dir)
            entry["binary"] = {"key": binary.key}
            for artifact in ARTIFACTS:
                files[f"{KERNELS_DIR}/bin/{binary.key}.{artifact}"] = binary.file(artifact).read_bytes()
        entries.append(entry)
    import triton

    index = {"version": INDEX_VERSION, "triton": triton.__version__, "arch": arch, "kernels": entries, "bindings": {}}
    files[f"{KERNELS_DIR}/{INDEX}"] = json.dumps(index).encode()
    return files


def _routing(tokens: int, experts: int, top_k: int, device: torch.device,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets) of tokens routed to top_k distinct experts uniformly at random."""
    ids = torch.rand(tokens, experts, generator=generator).argsort(dim=1)[:, :top_k].reshape(-1)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=experts)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    return order.to(device), offsets.to(device)


# The templates synthetic_call makes inputs for; the sweep of the others on a GPU is --cost-model's.
MEASURED_TEMPLATES = frozenset({"moe_nvfp4_gemm", "moe_fp8_gemm", "fp8_linear"})


def synthetic_call(kernels: TritonKernels, instance: KernelInstance, tokens: int, device: torch.device,
                   reduce_name: str | None = None) -> tuple[Callable[[], None], torch.Tensor]:
    """A launch of `instance` (and of its split-K reduce kernel `reduce_name`) on `tokens` tokens of
    synthetic inputs (what gets timed; the same inputs for every config of an instance), and the
    tensor it writes."""
    values = dict(instance.constexprs)
    n, k = int(values["N"]), int(values["K"])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, k, generator=generator).to(torch.bfloat16)
    if instance.template.entry in ("moe_nvfp4_gemm", "moe_fp8_gemm"):
        experts, top_k = int(values["NUM_EXPERTS"]), int(values["TOP_K"])
        order, offsets = _routing(tokens, experts, top_k, device, generator)
        weight: NVFP4Tensor | FP8Tensor
        if instance.template.entry == "moe_fp8_gemm":  # E4M3 codes, a per-expert scale (ModelOpt's FP8 layout)
            e4m3 = (torch.randn(experts, n, k, generator=generator) * 0.1).to(torch.float8_e4m3fn)
            weight = FP8Tensor(e4m3.to(device), torch.full((experts,), 0.01, device=device))
        else:
            packed = torch.randint(0, 256, (experts, n, k // 2), generator=generator, dtype=torch.uint8)
            scales = (torch.rand(experts, n, k // 16, generator=generator) + 0.5).to(torch.float8_e4m3fn)
            weight = NVFP4Tensor(packed.to(device), scales.to(device), torch.full((experts,), 0.01, device=device))
        rows = tokens * top_k
        combine = bool(values["COMBINE"])
        out = torch.empty(rows, n, dtype=torch.float32 if combine else torch.bfloat16, device=device)
        routing = torch.rand(rows, device=device) if combine else None
        # a gathering GEMM reads token rows through `order`; the others read rows already in pair order
        source = (x if values.get("GATHER") else x.repeat_interleave(top_k, 0)).to(device)
        x_scale = None
        if dict(instance.pointer_types).get("x_ptr") == "u8":  # a fused norm's NVFP4 codes, as the binary reads them
            # (under the global scale the W4A4 call below quantizes with: its input_scale placeholder, 1.0)
            norm_codes = nvfp4_codes(source.cpu(), torch.tensor(1.0))
            source, x_scale = norm_codes.packed.to(device), norm_codes.block_scale.to(device)

        input_scale = torch.full((experts,), 0.02, device=device) if values.get("QUANT_ACT") else None

        def grouped() -> None:
            if isinstance(weight, FP8Tensor):
                triton_gemm.moe_fp8_gemm(kernels, instance.name, source, order, offsets, weight, input_scale, routing,
                                         out, rows)
            else:
                triton_gemm.moe_nvfp4_gemm(kernels, instance.name, source, order, offsets, weight, None, routing, out,
                                           rows, reduce_name, x_scale=x_scale)
        return grouped, out
    data = (torch.randn(n, k, generator=generator) * 0.1).to(torch.float8_e4m3fn)
    weight8 = FP8Tensor(data.to(device), torch.full((n,), 0.01, device=device))
    scale = torch.tensor([0.02], device=device) if values.get("QUANT_ACT") else None
    # an instance that reads a fused norm's output takes E4M3 codes (which mean codes * input_scale)
    codes = dict(instance.pointer_types).get("x_ptr") == "fp8e4nv"
    xd = fp8_codes(x, torch.tensor(0.02)).to(device) if codes else x.to(device)
    result = torch.empty(tokens, n, dtype=torch.bfloat16, device=device)

    def linear() -> None:
        triton_gemm.fp8_linear(kernels, instance.name, xd, weight8, scale, out=result, reduce_name=reduce_name)
    return linear, result


class MeasuredTimer:
    """The `measured` scorer: seconds of one launch of a config on `tokens` tokens."""

    scorer = "measured"
    templates = MEASURED_TEMPLATES

    def __init__(self, arch: str, cache_dir: Path, device: torch.device, repeats: int = 25, warmup: int = 5) -> None:
        self.arch = arch
        self.cache_dir = cache_dir
        self.device = device
        self.repeats = repeats
        self.warmup = warmup
        self.flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.float32, device=device) if device.type == "cuda" else None

    def prepare(self, instance: KernelInstance, configs: Sequence[Config]) -> dict[Config, str]:
        """Compile every config to be timed first, in parallel; the ones that failed."""
        return compile_all(instance, configs, self.arch, self.cache_dir)

    def __call__(self, instance: KernelInstance, config: Config, tokens: int, workload: Workload = GEMM) -> float:
        configured = with_split_k_reduces([apply(instance, config)])  # the GEMM, then its reduce if split
        kernels = TritonKernels.from_files(kernel_files(configured, self.arch, self.cache_dir, self.device),
                                           self.device)
        call, _ = synthetic_call(kernels, configured[0], tokens, self.device,
                                 configured[1].name if len(configured) > 1 else None)
        for _ in range(self.warmup):
            call()
        samples = []
        for _ in range(self.repeats):
            if self.flush is not None:
                self.flush.zero_()
                start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                start.record()
                call()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                began = time.perf_counter()
                call()
                samples.append(time.perf_counter() - began)
        return float(statistics.median(samples))
