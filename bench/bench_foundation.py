"""Foundation benchmark: how long planning takes and how fast the reference runtime runs.

1. Plan: `plan_model` on each published config (nano, super, ultra) in a fresh Python process,
   so the memory it reports is the plan's own: wall time of the first call, ru_maxrss after the
   imports and after the plan, the VmRSS growth over the plan, and the tracemalloc peak of the
   Python heap (taken on a second, traced call, because tracing slows the call it watches).
2. Runtime: the same tiny random Nemotron-H (all four block kinds, a latent MoE with grouped
   routing, fp32) run by nemocompile's reference runtime and by transformers'
   NemotronHForCausalLM: prefill and token-by-token decode throughput, and max|diff| of the
   logits between the two. Decode feeds the same fixed random tokens to both (teacher
   forcing), so a tiny numeric difference cannot send them down different paths. The two
   runtimes alternate within each repeat, so a load change on a shared machine hits both.
3. (--profile) cProfile of nemocompile's decode loop, top entries by own time.

Run: python bench/bench_foundation.py [--quick] [--models-dir DIR] [--threads N] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import json
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from report_tables import load_average, print_machine_facts, print_table

REPO_ROOT = Path(__file__).resolve().parent.parent
FALLBACK_MODELS_DIR = Path("/work/shared/models")
MODEL_NAMES = ("nano", "super", "ultra")
PLAN_TARGET_SECONDS = 5.0  # acceptance target for one plan
MIB = 1 << 20
SEED = 20260101

# The tiny model: every block kind (M Mamba2, * attention, E MoE, - MLP), a latent MoE, n_group 2.
TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=1024, hidden_size=256, hybrid_override_pattern="M*EM-E",
    num_attention_heads=8, num_key_value_heads=2, head_dim=32, intermediate_size=1024,
    mamba_num_heads=16, mamba_head_dim=32, n_groups=2, ssm_state_size=64, conv_kernel=4, chunk_size=64,
    n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
    moe_shared_expert_intermediate_size=512, moe_latent_size=128, n_group=2, topk_group=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, dtype="float32",
)


@dataclass(frozen=True)
class RunSizes:
    prompt_tokens: int
    decode_steps: int
    batches: tuple[int, ...]
    warmups: int  # the first warm-up also supplies the logits compared between the runtimes
    repeats: int

    def __post_init__(self) -> None:
        if self.warmups < 1 or self.repeats < 1:
            raise ValueError("RunSizes needs at least one warm-up and one repeat")


FULL = RunSizes(prompt_tokens=128, decode_steps=32, batches=(1, 4), warmups=1, repeats=3)
QUICK = RunSizes(prompt_tokens=32, decode_steps=8, batches=(1, 4), warmups=1, repeats=1)


def transformers_module() -> Any:
    """transformers, imported late (the plan children must not pay for it) and untyped on purpose."""
    return importlib.import_module("transformers")


# ---------------------------------------------------------------- output


def billions(count: int) -> str:
    return f"{count / 1e9:,.2f} B"


def gigabytes(count: int) -> str:
    return f"{count / 1e9:,.1f} GB"


# Measured here: with 2 threads on a busy 2-core box one small op can wait a whole
# scheduler slice for its second thread, so per-token times grow 10x and swing wildly.
LOAD_WARNING = ("  warning: other jobs are using the CPUs; multi-threaded timings of small ops are "
                "unreliable, compare with --threads 1")


# ---------------------------------------------------------------- 1. plan


def current_rss_mib() -> float:
    """Resident set size now (VmRSS), unlike ru_maxrss which is the peak so far."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / MIB
    return float("nan")  # not Linux: the column shows nan


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # KiB on Linux


def plan_child(config_path: Path) -> None:
    """Runs in a fresh process (torch is already imported): one plan timed without tracing, then
    one traced; prints the figures as one JSON line."""
    from nemocompile.options import BuildOptions
    from nemocompile.planner import plan_model

    baseline_peak, baseline_rss = max_rss_mib(), current_rss_mib()
    start = time.perf_counter()
    result = plan_model(config_path, BuildOptions(target="h100", precision="bf16"))
    seconds = time.perf_counter() - start
    peak, rss_after = max_rss_mib(), current_rss_mib()  # the plan result is still alive
    tracemalloc.start()
    plan_model(config_path, BuildOptions(target="h100", precision="bf16"))
    heap_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    stats = result.stats
    print(json.dumps({
        "layers": len(result.config.layer_kinds),
        "params_total": stats.params_total,
        "params_active": stats.params_active,
        "params_active_without_embeddings": stats.params_active_without_embeddings,
        "params_mtp": stats.params_mtp,
        "bytes_total": stats.bytes_total,
        "seconds": seconds,
        "baseline_peak_rss_mib": baseline_peak,
        "peak_rss_mib": peak,
        "rss_growth_mib": rss_after - baseline_rss,
        "heap_peak_mib": heap_peak / MIB,
    }))


def run_plan_in_child(config_path: Path) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--plan-child", str(config_path)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: planning {config_path} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def find_models_dir(given: Path | None) -> Path:
    if given is not None:
        return given
    beside_repo = REPO_ROOT.parent / "shared" / "models"
    return beside_repo if beside_repo.is_dir() else FALLBACK_MODELS_DIR


def bench_plan(models_dir: Path) -> None:
    missing = [f"{name}.json" for name in MODEL_NAMES if not (models_dir / f"{name}.json").is_file()]
    if missing:
        raise SystemExit(f"error: {models_dir} lacks {', '.join(missing)}; pass --models-dir")
    rows = []
    for name in MODEL_NAMES:
        r = run_plan_in_child(models_dir / f"{name}.json")
        rows.append([
            name, str(r["layers"]), billions(r["params_total"]), billions(r["params_active"]),
            billions(r["params_active_without_embeddings"]), billions(r["params_mtp"]),
            gigabytes(r["bytes_total"]), f"{r['seconds']:.3f}",
            "yes" if r["seconds"] < PLAN_TARGET_SECONDS else "NO",
            f"{r['baseline_peak_rss_mib']:.0f}", f"{r['peak_rss_mib']:.0f}",
            f"{r['rss_growth_mib']:.1f}", f"{r['heap_peak_mib']:.1f}",
        ])
    print_table(
        f"1. Plan (plan_model, target h100, bf16; one fresh process per config; {models_dir})",
        ["model", "layers", "params", "active", "active-emb", "MTP", "bytes bf16", "plan s",
         f"<{PLAN_TARGET_SECONDS:g}s", "base RSS MiB", "peak RSS MiB", "RSS +MiB", "py-heap peak MiB"],
        rows,
    )
    print("  active-emb: active parameters without the input embedding table. base / peak RSS: ru_maxrss\n"
          "  after the imports / after the plan. RSS +MiB: VmRSS after the plan (result alive) minus VmRSS\n"
          "  before it. py-heap peak: tracemalloc peak of a second plan_model call. bytes: MTP included.")


# ---------------------------------------------------------------- 2. runtime vs transformers


class Runner(Protocol):
    name: str

    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Logits [B, T, V] of a fresh batch, and the state to continue it."""

    def step(self, ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Logits [B, 1, V] of one more token per sequence, and the updated state."""


class NemocompileRunner:
    name = "nemocompile"

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        cache = self.engine.new_cache(ids.shape[0])
        return self.engine.forward(ids, cache), cache

    def step(self, ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        return self.engine.forward(ids, state), state


class TransformersRunner:
    name = "transformers"

    def __init__(self, model: Any) -> None:
        self.model = model

    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        out = self.model(ids, use_cache=True)
        return out.logits, out.cache

    def step(self, ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        out = self.model(ids, cache=state, use_cache=True)
        return out.logits, out.cache


def randomize_routing(model: Any, generator: torch.Generator) -> None:
    """Spread tokens over the experts and make the Mamba skip non-trivial (the defaults are zeros and ones)."""
    with torch.no_grad():
        for layer in model.model.layers:
            mixer = layer.mixer
            if hasattr(mixer, "gate"):
                mixer.gate.e_score_correction_bias.normal_(0, 0.05, generator=generator)
                mixer.gate.weight.normal_(0, 0.3, generator=generator)
            if hasattr(mixer, "D"):
                mixer.D.uniform_(0.5, 1.5, generator=generator)


def make_tiny_pair(workdir: Path) -> tuple[Any, Any]:
    """A seeded random transformers model and the fp32 nemocompile engine built from its checkpoint."""
    import nemocompile

    transformers = transformers_module()
    transformers.logging.set_verbosity_error()  # the "falling back to its reference PyTorch" notices
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(SEED)
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**TINY_CONFIG)).eval()
    randomize_routing(model, torch.Generator().manual_seed(SEED + 1))
    model.save_pretrained(workdir / "checkpoint")
    nemocompile.build(workdir / "checkpoint", workdir / "engine", target="h100", precision="fp32")
    return model, nemocompile.load(workdir / "engine", device="cpu")


def measure_prefill(runner: Runner, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    logits, _ = runner.prefill(ids)
    return time.perf_counter() - start, logits


def measure_decode(runner: Runner, ids: torch.Tensor, tokens: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Prefill (not timed), then feed tokens[:, i] one at a time; returns the decode seconds and logits."""
    _, state = runner.prefill(ids)
    steps: list[torch.Tensor] = []
    start = time.perf_counter()
    for index in range(tokens.shape[1]):
        logits, state = runner.step(tokens[:, index:index + 1], state)
        steps.append(logits)
    seconds = time.perf_counter() - start
    return seconds, torch.cat(steps, dim=1)


@dataclass(frozen=True)
class PhaseResult:
    phase: str
    batch: int
    tokens: int  # tokens processed per run, all sequences together
    seconds: dict[str, float]  # median per runner
    max_abs_diff: float
    max_abs_logit: float


def bench_phase(phase: str, runners: Sequence[Runner], measure: Callable[[Runner], tuple[float, torch.Tensor]],
                batch: int, tokens: int, sizes: RunSizes) -> PhaseResult:
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    first_logits: dict[str, torch.Tensor] = {}
    for run in range(sizes.warmups + sizes.repeats):
        for runner in runners:
            seconds, logits = measure(runner)
            if run == 0:
                first_logits[runner.name] = logits
            if run >= sizes.warmups:
                times[runner.name].append(seconds)
    ours, theirs = (first_logits[r.name] for r in runners)
    return PhaseResult(phase, batch, tokens, {name: statistics.median(ts) for name, ts in times.items()},
                       float((ours - theirs).abs().max()), float(theirs.abs().max()))


def bench_runtime(model: Any, engine: Any, sizes: RunSizes) -> list[PhaseResult]:
    runners: list[Runner] = [NemocompileRunner(engine), TransformersRunner(model)]
    generator = torch.Generator().manual_seed(SEED + 2)
    vocab = int(TINY_CONFIG["vocab_size"])
    results = []
    with torch.inference_mode():
        for batch in sizes.batches:
            prompt = torch.randint(0, vocab, (batch, sizes.prompt_tokens), generator=generator)
            results.append(bench_phase("prefill", runners, partial(measure_prefill, ids=prompt),
                                       batch, batch * sizes.prompt_tokens, sizes))
        for batch in sizes.batches:
            prompt = torch.randint(0, vocab, (batch, sizes.prompt_tokens), generator=generator)
            fed = torch.randint(0, vocab, (batch, sizes.decode_steps), generator=generator)
            results.append(bench_phase("decode", runners, partial(measure_decode, ids=prompt, tokens=fed),
                                       batch, batch * sizes.decode_steps, sizes))
    return results


def print_runtime(model: Any, results: Sequence[PhaseResult], sizes: RunSizes) -> None:
    rows = []
    for r in results:
        ours, theirs = r.tokens / r.seconds["nemocompile"], r.tokens / r.seconds["transformers"]
        rows.append([r.phase, str(r.batch), str(r.tokens), f"{ours:,.0f}", f"{theirs:,.0f}",
                     f"{ours / theirs:.2f}", f"{r.max_abs_diff:.2e}", f"{r.max_abs_diff / r.max_abs_logit:.1e}"])
    params = sum(p.numel() for p in model.parameters())
    print_table(
        f"2. Reference runtime vs transformers (tiny {TINY_CONFIG['hybrid_override_pattern']}, hidden "
        f"{TINY_CONFIG['hidden_size']}, {params / 1e6:.1f} M params, fp32; prompt {sizes.prompt_tokens}, "
        f"{sizes.decode_steps} decode steps; median of {sizes.repeats} after {sizes.warmups} warm-up; "
        f"torch threads: {torch.get_num_threads()})",
        ["phase", "batch", "tokens", "nemocompile tok/s", "transformers tok/s", "ratio", "max|diff|", "rel"],
        rows,
    )
    print(f"  ratio: nemocompile / transformers (above 1: nemocompile faster). rel: max|diff| / max|logit|;\n"
          f"  decode diffs cover every step. transformers runs attn={model.config._attn_implementation}, "
          f"experts={model.config._experts_implementation}, Mamba kernels in their PyTorch fallback.")


def profile_decode(engine: Any, sizes: RunSizes, top: int = 15) -> None:
    """cProfile of nemocompile's decode loop at batch 1, top entries by own time."""
    runner = NemocompileRunner(engine)
    generator = torch.Generator().manual_seed(SEED + 3)
    vocab = int(TINY_CONFIG["vocab_size"])
    prompt = torch.randint(0, vocab, (1, sizes.prompt_tokens), generator=generator)
    fed = torch.randint(0, vocab, (1, sizes.decode_steps), generator=generator)
    with torch.inference_mode():
        _, state = runner.prefill(prompt)
        profiler = cProfile.Profile()
        profiler.enable()
        for index in range(fed.shape[1]):
            runner.step(fed[:, index:index + 1], state)
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    print(f"\n3. cProfile of nemocompile decode (batch 1, after a {sizes.prompt_tokens}-token prefill, "
          f"{sizes.decode_steps} steps)")
    print(text.getvalue().strip())


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke test of the benchmark")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="folder holding nano.json, super.json, ultra.json "
                             "(default: ../shared/models beside the repo, else /work/shared/models)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the runtime section (default: torch's own choice; "
                             "1 gives steadier numbers on a machine shared with other jobs)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of nemocompile's decode")
    parser.add_argument("--plan-child", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.plan_child is not None:
        plan_child(args.plan_child)
        return
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"error: --threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    start = time.perf_counter()
    print_machine_facts(LOAD_WARNING, versions={"transformers": transformers_module().__version__},
                        warn_single_threaded=False)
    bench_plan(find_models_dir(args.models_dir))
    print(f"  (section {time.perf_counter() - start:.1f} s)")
    section_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-foundation-") as tmp:
        model, engine = make_tiny_pair(Path(tmp))
    print_runtime(model, bench_runtime(model, engine, sizes), sizes)
    print(f"  (section {time.perf_counter() - section_start:.1f} s, engine build included)")
    if args.profile:
        profile_decode(engine, sizes)
    print(f"\ntotal {time.perf_counter() - start:.1f} s ({'quick' if args.quick else 'full'} run); "
          f"load average now {load_average()}")


if __name__ == "__main__":
    main()
