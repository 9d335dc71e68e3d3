"""Quantize benchmark: how fast and how lean the streaming quantize stage of a build is.

1. Streaming build: a seeded random Nemotron-H checkpoint of several GB of BF16 (default about
   3 GB; `--gigabytes X`; `--quick` about 0.4 GB) is written shard by shard, tensor by tensor,
   so the generator itself stays small. It is then built by `nemocompile build CKPT --target h100
   --override shared_experts=fp8_e4m3 --override mamba_linears=fp8_e4m3` in a subprocess: routed
   experts NVFP4 (W4A16), shared experts and Mamba linears FP8 weight-only, so no calibration is
   needed. Reported: wall time, throughput (checkpoint bytes / build time), the build process's
   peak RSS (ru_maxrss from wait4, and /proc polling split into anonymous and file-backed pages)
   against the largest single tensor and the whole checkpoint, and the engine's bits per element
   (`nemocompile inspect --json`).
2. Quantizer throughput: nemocompile's `quantize_nvfp4` against ModelOpt's
   `NVFP4QTensor.quantize` on BF16 weights of the sizes above, in GB/s of BF16 input, and
   whether their packed codes and scales agree bit for bit.
1b. (--profile) cProfile of the same build in this process, top entries by own and cumulative time.

Run: python bench/bench_quantize.py [--quick] [--gigabytes X] [--tmpdir DIR] [--threads N] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from report_tables import load_average, print_machine_facts, print_table

from nemocompile.graph.checkpoint import INDEX_FILE_NAME
from nemocompile.graph.config import config_from_dict
from nemocompile.graph.nemotron_h import WeightSpec, model_weights
from nemocompile.runtime.formats import NVFP4Tensor, quantize_nvfp4
from nemocompile.safetensors_writer import SafetensorsWriter

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED = 20260214
GB = 1e9
MIB = 1 << 20
BUILD_OVERRIDES = ("shared_experts=fp8_e4m3", "mamba_linears=fp8_e4m3")
DISK_FACTOR = 3  # free space wanted, in checkpoint sizes (checkpoint + engine + slack)
SHARDS = 4  # the checkpoint is cut into about this many files
MAX_EXPERTS_PER_LAYER = 128  # beyond this the block pattern repeats instead
# The build runs the reference runtime (calibration, agreement check) only on models up to
# settings().reference_check_max_params; the child gets 0 so every size measures the stream alone.
CHILD_ENV = {"NEMOCOMPILE_REFERENCE_CHECK_MAX_PARAMS": "0", "NEMOCOMPILE_PROGRESS": "0"}
MODELOPT_HINT = "pip install nvidia-modelopt requests huggingface_hub"


# ---------------------------------------------------------------- the generated model


@dataclass(frozen=True)
class ModelDims:
    """The dims of a generated Nemotron-H; every GEMM input dim is a multiple of 16 (NVFP4 blocks)."""

    hidden: int
    vocab: int
    block_pattern: str  # repeated `repeats` times
    experts: int
    moe_intermediate: int
    shared_intermediate: int
    mamba_heads: int
    mamba_head_dim: int
    mamba_groups: int
    state_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    repeats: int = 1

    def __post_init__(self) -> None:
        gemm_inputs = {"hidden": self.hidden, "moe_intermediate": self.moe_intermediate,
                       "shared_intermediate": self.shared_intermediate,
                       "mamba_intermediate": self.mamba_heads * self.mamba_head_dim,
                       "attention": self.attention_heads * self.head_dim}
        bad = [name for name, dim in gemm_inputs.items() if dim % 16]
        if bad:
            raise ValueError(f"ModelDims: {', '.join(bad)} must be multiples of 16 for NVFP4")
        if self.experts < 4 or self.repeats < 1:
            raise ValueError(f"ModelDims needs at least 4 experts and 1 repeat, not {self.experts}, {self.repeats}")

    def config(self) -> dict[str, Any]:
        """A Hugging Face config.json for these dims."""
        return {
            "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
            "vocab_size": self.vocab, "hidden_size": self.hidden,
            "hybrid_override_pattern": self.block_pattern * self.repeats,
            "num_attention_heads": self.attention_heads, "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim, "intermediate_size": 4 * self.hidden, "mlp_hidden_act": "relu2",
            "mamba_num_heads": self.mamba_heads, "mamba_head_dim": self.mamba_head_dim,
            "n_groups": self.mamba_groups, "ssm_state_size": self.state_size, "conv_kernel": 4,
            "chunk_size": 128, "n_routed_experts": self.experts, "num_experts_per_tok": 4,
            "moe_intermediate_size": self.moe_intermediate,
            "moe_shared_expert_intermediate_size": self.shared_intermediate,
            "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
            "layer_norm_epsilon": 1e-5, "use_conv_bias": True, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }

    def specs(self) -> list[WeightSpec]:
        specs: list[WeightSpec] = model_weights(config_from_dict(self.config(), "generated config"))
        return specs


# Hidden 2048 for the several-GB sizes; hidden 1024 when even 4 experts of that overshoot.
BIG = ModelDims(hidden=2048, vocab=32000, block_pattern="MEME*E", experts=64, moe_intermediate=1536,
                shared_intermediate=4096, mamba_heads=64, mamba_head_dim=64, mamba_groups=8, state_size=128,
                attention_heads=16, kv_heads=4, head_dim=128)
SMALL = ModelDims(hidden=1024, vocab=32000, block_pattern="MEME*E", experts=16, moe_intermediate=1024,
                  shared_intermediate=2048, mamba_heads=32, mamba_head_dim=64, mamba_groups=4, state_size=64,
                  attention_heads=8, kv_heads=2, head_dim=128)


@dataclass(frozen=True)
class CheckpointTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype
    kind: str  # how its values are made, see tensor_values

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (4 if self.dtype == "F32" else 2)


def checkpoint_tensors(dims: ModelDims) -> list[CheckpointTensor]:
    """Every tensor of the checkpoint, one per routed expert, in forward order."""
    tensors = []
    for spec in dims.specs():
        shape = spec.shape[1:] if len(spec.tensors) > 1 else spec.shape
        for name in spec.tensors:
            leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
            kind = leaf if leaf in ("A_log", "D", "dt_bias", "e_score_correction_bias") else (
                "norm" if leaf in ("norm", "norm_f") else "random")
            tensors.append(CheckpointTensor(name, tuple(shape), "F32" if spec.keep_fp32 else "BF16", kind))
    return tensors


def total_bytes(dims: ModelDims) -> int:
    return sum(t.nbytes for t in checkpoint_tensors(dims))


def dims_for_bytes(target: float) -> ModelDims:
    """The dims whose checkpoint is closest to `target` bytes: the routed experts fill what the
    fixed part (embeddings, Mamba, attention, shared experts) leaves; past MAX_EXPERTS_PER_LAYER
    the block pattern repeats."""
    base = BIG if total_bytes(replace(BIG, experts=4)) < target else SMALL
    repeats = 1
    while True:
        at_four = total_bytes(replace(base, experts=4, repeats=repeats))
        per_expert = (total_bytes(replace(base, experts=8, repeats=repeats)) - at_four) / 4
        experts = max(4, 4 * round(((target - at_four) / per_expert + 4) / 4))
        if experts <= MAX_EXPERTS_PER_LAYER:
            return replace(base, experts=experts, repeats=repeats)
        repeats += 1


def tensor_values(tensor: CheckpointTensor, generator: torch.Generator) -> torch.Tensor:
    """Seeded values that look like a trained checkpoint's where the model would notice."""
    dtype = torch.float32 if tensor.dtype == "F32" else torch.bfloat16
    if tensor.kind == "norm" or tensor.kind == "D":
        return torch.ones(tensor.shape, dtype=dtype)
    if tensor.kind == "A_log":
        return torch.log(torch.arange(1, tensor.shape[0] + 1, dtype=torch.float32)).to(dtype)
    if tensor.kind == "dt_bias":
        dt = torch.exp(torch.rand(tensor.shape, generator=generator) * math.log(100.0) + math.log(0.001))
        return (dt + torch.log(-torch.expm1(-dt))).to(dtype)  # inverse softplus of dt in [1e-3, 1e-1]
    if tensor.kind == "e_score_correction_bias":
        return torch.zeros(tensor.shape, dtype=dtype)
    return torch.randn(tensor.shape, generator=generator, dtype=dtype).mul_(0.02)


def shard_plan(tensors: Sequence[CheckpointTensor], shards: int) -> list[list[CheckpointTensor]]:
    """Consecutive runs of tensors of about equal bytes."""
    limit = sum(t.nbytes for t in tensors) / shards
    plan: list[list[CheckpointTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if plan[-1] and size + tensor.nbytes > limit and len(plan) < shards:
            plan.append([])
            size = 0
        plan[-1].append(tensor)
        size += tensor.nbytes
    return plan


def write_checkpoint(directory: Path, dims: ModelDims) -> list[CheckpointTensor]:
    """config.json, model-0000i-of-0000n.safetensors and the index; one tensor in memory at a time."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(dims.config(), indent=2, sort_keys=True) + "\n")
    tensors = checkpoint_tensors(dims)
    plan = shard_plan(tensors, SHARDS)
    generator = torch.Generator().manual_seed(SEED)
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(plan, start=1):
        file = f"model-{number:05d}-of-{len(plan):05d}.safetensors"
        specs = [(t.name, t.dtype, t.shape) for t in shard]
        with SafetensorsWriter(directory / file, specs, {"format": "pt"}) as writer:
            for tensor in shard:
                writer.write(tensor.name, tensor_values(tensor, generator))
                weight_map[tensor.name] = file
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (directory / INDEX_FILE_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return tensors


# ---------------------------------------------------------------- output


def mib(count: float) -> str:
    return f"{count / MIB:,.0f} MiB"


LOAD_WARNING = ("  warning: other jobs are using the CPUs; throughputs below are lower and noisier than on an idle\n"
                "  machine, and with more than one torch thread far lower (see section 2); --threads 1 is steadier")


# ---------------------------------------------------------------- 1. streaming build


@dataclass(frozen=True)
class ProcessMemory:
    """Peaks of one child process: ru_maxrss (from wait4) and the /proc polled split."""

    max_rss: int  # bytes; the kernel's high-water mark of anonymous + file-backed resident pages
    peak_anon: int  # bytes; polled RssAnon (heap, tensors)
    peak_file: int  # bytes; polled RssFile (mapped files, e.g. the mmap'd checkpoint)
    samples: int


@dataclass(frozen=True)
class ChildRun:
    returncode: int
    seconds: float
    memory: ProcessMemory
    stdout: str
    stderr: str


def _proc_rss(pid: int) -> tuple[int, int] | None:
    """(RssAnon, RssFile) of a live process in bytes, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            values[key] = int(rest.split()[0]) * 1024
    return (values["RssAnon"], values["RssFile"]) if len(values) == 2 else None


def run_measured(command: Sequence[str], env: dict[str, str], poll_seconds: float = 0.05) -> ChildRun:
    """Run command, polling its RSS, and reap it with wait4 for its own ru_maxrss."""
    peaks = [0, 0, 0]  # anon, file, samples
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO_ROOT, env={**os.environ, **env})
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                rss = _proc_rss(proc.pid)
                if rss is not None:
                    peaks[0], peaks[1] = max(peaks[0], rss[0]), max(peaks[1], rss[1])
                    peaks[2] += 1
                done.wait(poll_seconds)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            # The zombie keeps /proc/PID readable (with zero RSS) until this reaps it.
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C: do not leave the child writing into a deleted directory
            done.set()
            proc.kill()
            proc.wait()
            raise
        seconds = time.perf_counter() - start
        done.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildRun(proc.returncode, seconds, ProcessMemory(usage.ru_maxrss * 1024, peaks[0], peaks[1], peaks[2]),
                        out.read(), err.read())


def nemocompile_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "nemocompile.cli", *args]


def build_command(checkpoint: Path, engine: Path) -> list[str]:
    overrides = [arg for override in BUILD_OVERRIDES for arg in ("--override", override)]
    return nemocompile_command("build", str(checkpoint), "--target", "h100", "-o", str(engine), *overrides, "--json")


def baseline_memory(env: dict[str, str]) -> ProcessMemory:
    """Memory of a process that only imports what the build command imports: ru_maxrss, and
    RssAnon / RssFile as it reads them itself once the imports are done."""
    code = ("import nemocompile.cli, nemocompile.driver; from pathlib import Path; "
            "print(Path('/proc/self/status').read_text())")
    run = run_measured([sys.executable, "-c", code], env)
    if run.returncode != 0:
        raise SystemExit(f"error: importing nemocompile in a child failed:\n{run.stderr[-2000:]}")
    fields = dict(line.split(":", 1) for line in run.stdout.splitlines() if ":" in line)
    anon, file = (int(fields[key].split()[0]) * 1024 for key in ("RssAnon", "RssFile"))
    return ProcessMemory(run.memory.max_rss, anon, file, 1)


def check_disk(directory: Path, needed: float) -> str | None:
    """A sentence saying why there is not room for the run, or None."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        return (f"section 1 skipped: {directory} has {free / GB:.1f} GB free, and a {needed / DISK_FACTOR / GB:.1f} GB "
                f"checkpoint needs {needed / GB:.1f} GB ({DISK_FACTOR}x: checkpoint, engine, slack); "
                "pass --tmpdir on a roomier disk or a smaller --gigabytes")
    return None


def describe_model(dims: ModelDims, tensors: Sequence[CheckpointTensor]) -> str:
    config = dims.config()
    return (f"pattern {config['hybrid_override_pattern']}, hidden {dims.hidden}, vocab {dims.vocab}, "
            f"{dims.experts} experts x moe_intermediate {dims.moe_intermediate}, shared {dims.shared_intermediate}, "
            f"Mamba {dims.mamba_heads}x{dims.mamba_head_dim}; {len(tensors)} tensors")


def print_build(dims: ModelDims, tensors: Sequence[CheckpointTensor], generate_seconds: float, generator_rss: int,
                run: ChildRun, summary: dict[str, Any], base: ProcessMemory, engine: dict[str, Any],
                env: dict[str, str]) -> None:
    ckpt_bytes = sum(t.nbytes for t in tensors)
    largest = max(tensors, key=lambda t: t.nbytes)
    build_seconds = float(summary["seconds"])
    mem = run.memory
    above_base = mem.max_rss - base.max_rss
    rows = [
        ["checkpoint (BF16, routers F32)", f"{ckpt_bytes / GB:.2f} GB", f"{len(tensors)} tensors, {SHARDS} shards"],
        ["largest tensor", mib(largest.nbytes), f"{largest.name} {list(largest.shape)}"],
        ["generate + write checkpoint", f"{generate_seconds:.1f} s",
         f"{ckpt_bytes / GB / generate_seconds:.2f} GB/s; this process's ru_maxrss {mib(generator_rss)}"],
        ["build wall (subprocess)", f"{run.seconds:.1f} s", "interpreter start and imports included"],
        ["build() in-process", f"{build_seconds:.1f} s", "from build --json 'seconds'"],
        ["throughput, wall", f"{ckpt_bytes / GB / run.seconds:.3f} GB/s", "checkpoint bytes / build wall"],
        ["throughput, build()", f"{ckpt_bytes / GB / build_seconds:.3f} GB/s", "checkpoint bytes / build() seconds"],
        ["engine bytes", f"{int(summary['bytes_written']) / GB:.2f} GB",
         f"{ckpt_bytes / int(summary['bytes_written']):.2f}x smaller"],
        ["peak RSS (ru_maxrss)", mib(mem.max_rss),
         f"{mem.max_rss / largest.nbytes:.1f}x largest tensor, {mem.max_rss / ckpt_bytes:.1%} of checkpoint"],
        ["  import baseline", mib(base.max_rss),
         f"a child that only imports nemocompile: RssAnon {mib(base.peak_anon)}, RssFile {mib(base.peak_file)}"],
        ["  peak above baseline", mib(above_base),
         f"{above_base / largest.nbytes:.1f}x largest tensor, {above_base / ckpt_bytes:.1%} of checkpoint"],
        ["  polled peak RssAnon", mib(mem.peak_anon),
         f"heap and tensors; {mib(mem.peak_anon - base.peak_anon)} above the import baseline"],
        ["  polled peak RssFile", mib(mem.peak_file),
         f"mapped files (checkpoint mmap, libraries); {mib(mem.peak_file - base.peak_file)} above the import "
         f"baseline; {mem.samples} samples"],
        ["engine bits / element", f"{engine['bits_per_element']:.3f}", "nemocompile inspect --json, all stored weights"],
    ]
    print_table(f"1. Streaming build ({describe_model(dims, tensors)})\n"
                f"   nemocompile build CKPT --target h100 -o OUT " + " ".join(f"--override {o}" for o in BUILD_OVERRIDES)
                + f" --json   (env: {' '.join(f'{k}={v}' for k, v in env.items())})",
                ["measure", "value", "note"], rows)
    categories = engine["categories"]
    cat_rows = [[name, f"{entry['params']:,}", f"{entry['bytes'] / MIB:,.1f}", f"{entry['bits_per_element']:.3f}"]
                for name, entry in categories.items() if entry["params"]]
    print_table("   engine by category (inspect --json)", ["category", "params", "MiB", "bits/elem"], cat_rows)
    errors = summary.get("quantization_errors") or []
    if errors:
        worst = min(errors, key=lambda e: e["sqnr_db"])
        by_format: dict[str, list[float]] = {}
        for entry in errors:
            by_format.setdefault(entry["format"], []).append(entry["sqnr_db"])
        print("   SQNR by format (dB, median / worst): " + "; ".join(
            f"{fmt} {statistics.median(v):.1f} / {min(v):.1f} over {len(v)} weights" for fmt, v in by_format.items())
              + f"; worst weight {worst['weight']}")


def bench_build(dims: ModelDims, workdir: Path, env: dict[str, str], profile: bool) -> None:
    checkpoint, engine = workdir / "checkpoint", workdir / "engine"
    start = time.perf_counter()
    tensors = write_checkpoint(checkpoint, dims)
    generate_seconds = time.perf_counter() - start
    generator_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base = baseline_memory(env)
    run = run_measured(build_command(checkpoint, engine), env)
    if run.returncode != 0:
        raise SystemExit(f"error: the build failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    summary = json.loads(run.stdout)
    inspected = subprocess.run(nemocompile_command("inspect", str(engine), "--json"), capture_output=True, text=True,
                               cwd=REPO_ROOT, check=False)
    if inspected.returncode != 0:
        raise SystemExit(f"error: nemocompile inspect failed (exit {inspected.returncode}):\n{inspected.stderr[-2000:]}")
    print_build(dims, tensors, generate_seconds, generator_rss, run, summary, base, json.loads(inspected.stdout), env)
    if profile:
        shutil.rmtree(engine)
        profile_build(checkpoint, workdir / "engine-profiled")


# ---------------------------------------------------------------- 2. quantizer vs ModelOpt


@dataclass(frozen=True)
class QuantizerRow:
    threads: int
    shape: tuple[int, ...]
    count: int
    ours_seconds: float  # median per tensor
    theirs_seconds: float
    exact: bool

    @property
    def nbytes(self) -> int:
        """BF16 bytes of one tensor."""
        return math.prod(self.shape) * 2


def modelopt_quantizer() -> Callable[[torch.Tensor], NVFP4Tensor] | None:
    """ModelOpt's NVFP4 weight quantizer in nemocompile's layout, or None when it is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ModelOpt warns about untested transformers versions on import
            from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    except ImportError:
        return None

    def quantize(x: torch.Tensor) -> NVFP4Tensor:
        qtensor, block_scale, global_scale = NVFP4QTensor.quantize(x, 16)
        return NVFP4Tensor(qtensor._quantized_data, block_scale, global_scale)

    return quantize


def same_nvfp4(a: NVFP4Tensor, b: NVFP4Tensor) -> bool:
    return (torch.equal(a.packed, b.packed)
            and torch.equal(a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8))
            and torch.equal(a.global_scale, b.global_scale))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure_quantizers(theirs: Callable[[torch.Tensor], NVFP4Tensor], threads: int, shape: tuple[int, int],
                       count: int, repeats: int) -> QuantizerRow:
    """`count` seeded tensors of `shape`, each quantized by both after a warm-up, alternating."""
    generator = torch.Generator().manual_seed(SEED + shape[0] * 7 + shape[1])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    ours_times: list[float] = []
    theirs_times: list[float] = []
    exact = True
    try:
        for _ in range(count):
            weight = torch.randn(shape, generator=generator, dtype=torch.bfloat16).mul_(0.02)
            quantize_nvfp4(weight), theirs(weight.clone())  # warm-up
            for _ in range(repeats):  # alternate, so a load change hits both
                seconds, ours_result = timed(partial(quantize_nvfp4, weight))
                ours_times.append(seconds)
                copy = weight.clone()  # ModelOpt may work in place; the copy is not timed
                seconds, theirs_result = timed(partial(theirs, copy))
                theirs_times.append(seconds)
            exact = exact and same_nvfp4(ours_result, theirs_result)
    finally:
        torch.set_num_threads(previous)
    return QuantizerRow(threads, shape, count, statistics.median(ours_times), statistics.median(theirs_times), exact)


def quantizer_cells(label: str, threads: int, count: int, nbytes: int, ours: float, modelopt: float,
                    exact: bool) -> list[str]:
    """ours / modelopt: seconds for one tensor of nbytes (or all of them, count=all)."""
    return [label, str(threads), str(count), f"{nbytes / MIB:.0f}", f"{ours * 1e3:.1f}", f"{modelopt * 1e3:.1f}",
            f"{nbytes / ours / GB:.3f}", f"{nbytes / modelopt / GB:.3f}", f"{modelopt / ours:.2f}",
            "yes" if exact else "NO"]


def bench_quantizer(shapes: Sequence[tuple[int, int]], count: int, repeats: int) -> None:
    theirs = modelopt_quantizer()
    if theirs is None:
        print(f"\n2. Quantizer vs ModelOpt: skipped, ModelOpt is not installed ({MODELOPT_HINT})")
        return
    from modelopt import __version__ as modelopt_version

    thread_counts = sorted({1, torch.get_num_threads()})
    table = []
    for threads in thread_counts:
        rows = [measure_quantizers(theirs, threads, shape, count, repeats) for shape in shapes]
        table += [quantizer_cells(f"{r.shape[0]}x{r.shape[1]}", threads, r.count, r.nbytes, r.ours_seconds,
                                  r.theirs_seconds, r.exact) for r in rows]
        table.append(quantizer_cells("all", threads, sum(r.count for r in rows),
                                     sum(r.nbytes * r.count for r in rows),
                                     sum(r.ours_seconds * r.count for r in rows),
                                     sum(r.theirs_seconds * r.count for r in rows), all(r.exact for r in rows)))
    print_table(f"2. NVFP4 weight quantizer: nemocompile quantize_nvfp4 vs ModelOpt {modelopt_version} "
                f"NVFP4QTensor.quantize\n   (BF16 normal(0, 0.02) weights; median of {repeats} per tensor after a "
                "warm-up, the two alternating)",
                ["shape", "threads", "tensors", "MiB each", "ours ms", "ModelOpt ms", "ours GB/s", "ModelOpt GB/s",
                 "ratio", "bit-exact"], table)
    print("  GB/s: BF16 input bytes per second. ratio: ours / ModelOpt throughput (above 1: nemocompile faster).\n"
          "  'all' rows: MiB in all and summed times. bit-exact: packed codes, E4M3 block scales and the FP32\n"
          "  global scale all equal. With more threads than idle cores each small op can wait a scheduler slice\n"
          "  for its partner thread; quantize_nvfp4 runs ~20 ops per 128K-value chunk, so it suffers most.")


# ---------------------------------------------------------------- 1b. profile


def profile_build(checkpoint: Path, engine: Path, top: int = 20) -> None:
    """cProfile of nemocompile.build on the generated checkpoint, in this process."""
    from nemocompile.base.settings import override
    from nemocompile.driver import build
    from nemocompile.options import BuildOptions

    options = BuildOptions(target="h100", overrides=BUILD_OVERRIDES)
    profiler = cProfile.Profile()
    with override(reference_check_max_params=0):
        start = time.perf_counter()
        profiler.enable()
        build(checkpoint, engine, options)
        profiler.disable()
    seconds = time.perf_counter() - start
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(top)
        body = text.getvalue().strip()
        body = body[body.find("ncalls"):] if "ncalls" in body else body
        print(f"\n1b. cProfile of the same nemocompile.build in this process ({seconds:.1f} s under the profiler, "
              f"torch threads {torch.get_num_threads()}), top {top} by {key}")
        print(body)


# ---------------------------------------------------------------- main


@dataclass(frozen=True)
class RunSizes:
    gigabytes: float
    quantizer_shapes: tuple[tuple[int, int], ...]
    quantizer_count: int  # tensors per shape
    quantizer_repeats: int

    def __post_init__(self) -> None:
        if self.gigabytes <= 0 or self.quantizer_count < 1 or self.quantizer_repeats < 1:
            raise ValueError("RunSizes needs a positive size and at least one tensor and repeat")


FULL = RunSizes(gigabytes=3.0, quantizer_shapes=((2048, 2048), (4096, 1024), (1536, 2048)), quantizer_count=2,
                quantizer_repeats=3)
QUICK = RunSizes(gigabytes=0.4, quantizer_shapes=((2048, 2048), (4096, 1024)), quantizer_count=1,
                 quantizer_repeats=2)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~0.4 GB checkpoint and fewer tensors: a smoke run")
    parser.add_argument("--gigabytes", type=float, default=None,
                        help="BF16 size of the generated checkpoint in GB (default 3, or 0.4 with --quick)")
    parser.add_argument("--tmpdir", type=Path, default=None,
                        help="where the checkpoint and engine are written (default: the system temp dir)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads here and for the build child (default: torch's choice)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the build in this process with cProfile (best with --quick)")
    parser.add_argument("--skip-build", action="store_true", help="run only section 2")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.gigabytes is not None:
        if args.gigabytes <= 0:
            raise SystemExit(f"error: --gigabytes must be positive, got {args.gigabytes}")
        sizes = replace(sizes, gigabytes=args.gigabytes)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"error: --threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print_machine_facts(LOAD_WARNING, memory=True)
    if not args.skip_build:
        dims = dims_for_bytes(sizes.gigabytes * GB)
        parent = args.tmpdir or Path(tempfile.gettempdir())
        refusal = check_disk(parent, DISK_FACTOR * total_bytes(dims))
        if refusal:
            print(f"\n1. Streaming build: {refusal}")
        else:
            with tempfile.TemporaryDirectory(prefix="bench-quantize-", dir=parent) as tmp:
                env = CHILD_ENV if args.threads is None else {**CHILD_ENV, "OMP_NUM_THREADS": str(args.threads)}
                bench_build(dims, Path(tmp), env, args.profile)
            print(f"  (section {time.perf_counter() - start:.1f} s, checkpoint generation included)")
    section_start = time.perf_counter()
    bench_quantizer(sizes.quantizer_shapes, sizes.quantizer_count, sizes.quantizer_repeats)
    print(f"  (section {time.perf_counter() - section_start:.1f} s)")
    print(f"\ntotal {time.perf_counter() - start:.1f} s ({'quick' if args.quick else 'full'} run); "
          f"load average now {load_average()}")


if __name__ == "__main__":
    main()
