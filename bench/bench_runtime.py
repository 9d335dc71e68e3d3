"""Runtime benchmark: how fast nemocompile's reference runtime runs one model, in one process.

1. fp32 engine against transformers' eager NemotronHForCausalLM on the same random model (8 layers,
   hidden 512): prefill and decode tokens/s, interleaved repeats, with the targets (decode at least
   2x transformers, prefill at least 1x) and max|diff| of the logits; the runtime eager (default)
   and with the decode step compiled (`load(compile=True)`, runtime/compiled_step.py).
2. Decode tokens/s of the bf16 engine and the quantized h100 (NVFP4 W4A16 experts, FP8 W8A8) and
   b200 (NVFP4 W4A4) engines built from the same checkpoint; the target is within 2x of bf16.
3. Decode step time against context length (1k to 32k) for the fp32 engine, with the share of the
   attention layers and of the Mamba layers. The cache is filled with random keys, values and
   states rather than by a 32k-token prefill (the step's time does not depend on their values).

Run: python bench/bench_runtime.py [--quick] [--threads N] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import importlib
import io
import pstats
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from report_tables import print_machine_facts, print_table

SEED = 20261129
CONFIG: dict[str, Any] = dict(
    vocab_size=8192, hidden_size=512, hybrid_override_pattern="M*EMEM-E",
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, intermediate_size=2048,
    mamba_num_heads=16, mamba_head_dim=64, n_groups=2, ssm_state_size=64, conv_kernel=4, chunk_size=128,
    n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
    moe_shared_expert_intermediate_size=1024, n_group=1, topk_group=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, dtype="float32",
)
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)


def transformers_module() -> Any:
    return importlib.import_module("transformers")


def make_model(workdir: Path) -> Any:
    transformers = transformers_module()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(SEED)
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**CONFIG)).eval()
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():  # spread tokens over the experts; a non-trivial Mamba skip
        for layer in model.model.layers:
            if hasattr(layer.mixer, "gate"):
                layer.mixer.gate.e_score_correction_bias.normal_(0, 0.05, generator=g)
                layer.mixer.gate.weight.normal_(0, 0.3, generator=g)
            if hasattr(layer.mixer, "D"):
                layer.mixer.D.uniform_(0.5, 1.5, generator=g)
    model.save_pretrained(workdir / "checkpoint")
    return model


def build(workdir: Path, name: str, **options: Any) -> Any:
    import nemocompile

    nemocompile.build(workdir / "checkpoint", workdir / name, calibrate=2, **options)
    return nemocompile.load(workdir / name, device="cpu")


def compiled(engine: Any) -> Any:
    """The same engine directory loaded with the decode step compiled (compile=True)."""
    import nemocompile

    return nemocompile.load(engine.directory, device="cpu", compile=True)


def ours_decode(engine: Any, prompt: torch.Tensor, tokens: torch.Tensor) -> tuple[float, torch.Tensor]:
    cache = engine.new_cache(prompt.shape[0])
    engine.forward(prompt, cache)
    out = []
    start = time.perf_counter()
    for index in range(tokens.shape[1]):
        out.append(engine.forward(tokens[:, index:index + 1], cache))
    return time.perf_counter() - start, torch.cat(out, 1)


def theirs_decode(model: Any, prompt: torch.Tensor, tokens: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        state = model(prompt, use_cache=True).cache
        out = []
        start = time.perf_counter()
        for index in range(tokens.shape[1]):
            result = model(tokens[:, index:index + 1], cache=state, use_cache=True)
            state = result.cache
            out.append(result.logits)
    return time.perf_counter() - start, torch.cat(out, 1)


def ours_prefill(engine: Any, prompt: torch.Tensor) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    logits = engine.forward(prompt)
    return time.perf_counter() - start, logits


def theirs_prefill(model: Any, prompt: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(prompt, use_cache=True).logits
    return time.perf_counter() - start, logits


def interleaved(runs: dict[str, Callable[[], tuple[float, torch.Tensor]]], repeats: int,
                warm_up: dict[str, float] | None = None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Median seconds of each run (one warm-up each, then `repeats` rounds, alternating), and the
    logits of each warm-up; `warm_up` gets the warm-up's seconds (a compiled decode compiles then)."""
    logits = {}
    for name, run in runs.items():
        seconds, logits[name] = run()
        if warm_up is not None:
            warm_up[name] = seconds
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(run()[0])
    return {name: statistics.median(ts) for name, ts in times.items()}, logits


def section_vs_transformers(model: Any, engines: dict[str, Any], prompt_tokens: int, steps: int,
                            repeats: int) -> None:
    """engines: the runtime's modes by name (eager, compiled), each raced against transformers."""
    rows = []
    g = torch.Generator().manual_seed(SEED + 2)
    for batch in (1, 4):
        prompt = torch.randint(0, CONFIG["vocab_size"], (batch, prompt_tokens), generator=g)
        tokens = torch.randint(0, CONFIG["vocab_size"], (batch, steps), generator=g)
        for phase, count in (("prefill", batch * prompt_tokens), ("decode", batch * steps)):
            runs: dict[str, Callable[[], tuple[float, torch.Tensor]]] = {}
            for name, engine in engines.items():
                runs[name] = ((lambda e=engine, p=prompt: ours_prefill(e, p)) if phase == "prefill" else
                              (lambda e=engine, p=prompt, t=tokens: ours_decode(e, p, t)))
            runs["transformers"] = ((lambda p=prompt: theirs_prefill(model, p)) if phase == "prefill" else
                                    (lambda p=prompt, t=tokens: theirs_decode(model, p, t)))
            first: dict[str, float] = {}
            seconds, logits = interleaved(runs, repeats, first)  # the warm-up compiles each batch size
            theirs = logits["transformers"]
            target = 2.0 if phase == "decode" else 1.0
            for name in engines:
                diff = float((logits[name] - theirs).abs().max() / theirs.abs().max())
                ratio = seconds["transformers"] / seconds[name]
                rows.append([phase, str(batch), name, f"{count / seconds[name]:.1f}",
                             f"{count / seconds['transformers']:.1f}", f"{ratio:.2f}x", f">= {target:.0f}x",
                             "yes" if ratio >= target else "NO", f"{diff:.1e}", f"{first[name]:.1f}"])
    print_table(f"1. fp32 engine vs transformers eager (prompt {prompt_tokens} tokens, {steps} decode steps, "
                f"median of {repeats}; compiled: load(compile=True); the first run, not counted, compiles the batch "
                f"size)",
                ["phase", "batch", "runtime", "ours tok/s", "transformers tok/s", "speed-up", "target", "met",
                 "rel max|diff|", "first run s"], rows)


def section_precisions(workdir: Path, fp32: Any, steps: int, repeats: int) -> None:
    eager = {"fp32": fp32, "bf16": build(workdir, "bf16", precision="bf16", target="h100"),
             "h100 (W4A16 + FP8)": build(workdir, "h100", target="h100"),
             "b200 (W4A4 + FP8)": build(workdir, "b200", target="b200")}
    engines = {(name, mode): engine if mode == "eager" else compiled(engine)
               for name, engine in eager.items() for mode in ("eager", "compiled")}
    g = torch.Generator().manual_seed(SEED + 3)
    prompt = torch.randint(0, CONFIG["vocab_size"], (1, 32), generator=g)
    tokens = torch.randint(0, CONFIG["vocab_size"], (1, steps), generator=g)
    runs = {f"{name} {mode}": (lambda e=engine: ours_decode(e, prompt, tokens))
            for (name, mode), engine in engines.items()}
    seconds, _ = interleaved(runs, repeats)
    rows = []
    for name, mode in engines:
        s, base = seconds[f"{name} {mode}"], seconds[f"bf16 {mode}"]
        rows.append([name, mode, f"{steps / s:.1f}", f"{s / base:.2f}x",
                     "" if name in ("fp32", "bf16") else ("yes" if s / base <= 2 else "NO")])
    print_table(f"2. decode by precision (batch 1, {steps} steps, median of {repeats}); target: quantized within 2x "
                f"of bf16 (in the same mode)", ["engine", "runtime", "tok/s", "time vs bf16", "within 2x"], rows)


def _kind_of(scope: str, pattern: str) -> str:
    parts = scope.split(".")
    if len(parts) >= 3 and parts[0] == "layers" and parts[2] == "mixer":
        return {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}[pattern[int(parts[1])]]
    return "other"


def timed_steps(engine: Any, totals: dict[str, float]) -> None:
    """Wrap each decode op so that its time is added to its layer kind in `totals`."""
    executor = engine._decode
    pattern = CONFIG["hybrid_override_pattern"]

    def wrap(impl: Any, kind: str) -> Any:
        def run(op: Any, args: Any) -> Any:
            start = time.perf_counter()
            out = impl(op, args)
            totals[kind] += time.perf_counter() - start
            return out
        return run

    executor.steps = [dataclasses.replace(step, impl=wrap(step.impl, _kind_of(step.op.scope, pattern)))
                      for step in executor.steps]


def fill_cache(engine: Any, context: int) -> Any:
    """A batch-1 cache holding `context` random tokens' worth of keys, values and states."""
    cache = engine.new_cache(1)
    cache.grow_to(context + 1)
    g = torch.Generator().manual_seed(SEED + 4)
    for name, tensor in cache.tensors.items():
        cache.tensors[name] = torch.randn(tensor.shape, generator=g, dtype=torch.float32).to(tensor.dtype) * 0.1
    cache.advance(context)
    return cache


def _step_ms(engine: Any, context: int, steps: int) -> float:
    cache = fill_cache(engine, context)
    engine.forward([[5]], cache)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        engine.forward([[5]], cache)
    return (time.perf_counter() - start) / steps * 1e3


def section_context(engine: Any, steps: int, contexts: Sequence[int]) -> None:
    fast = compiled(engine)
    totals: dict[str, float] = defaultdict(float)
    timed_steps(engine, totals)
    rows = []
    for context in contexts:
        totals.clear()
        step_ms = _step_ms(engine, context, steps)
        measured = sum(totals.values())
        rows.append([f"{context:,}", f"{step_ms:.2f}", f"{totals['attention'] / steps * 1e3:.2f}",
                     f"{100 * totals['attention'] / measured:.0f}%", f"{totals['mamba'] / steps * 1e3:.2f}",
                     f"{100 * totals['mamba'] / measured:.0f}%", f"{_step_ms(fast, context, steps):.2f}"])
    pattern = CONFIG["hybrid_override_pattern"]
    print_table(f"3. fp32 decode step vs context (batch 1, mean of {steps} steps; {pattern.count('*')} attention "
                f"layer(s), {pattern.count('M')} Mamba layers; shares of the measured op time, eager)",
                ["context", "step ms", "attention ms", "attention share", "mamba ms", "mamba share",
                 "compiled step ms"], rows)


def profile_decode(engine: Any, steps: int) -> None:
    g = torch.Generator().manual_seed(SEED + 5)
    prompt = torch.randint(0, CONFIG["vocab_size"], (1, 32), generator=g)
    tokens = torch.randint(0, CONFIG["vocab_size"], (1, steps), generator=g)
    profiler = cProfile.Profile()
    profiler.enable()
    ours_decode(engine, prompt, tokens)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
    print(text.getvalue())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and contexts up to 4k")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of b200 decode")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print_machine_facts("  (the machine is busy: timings swing; compare ratios, not absolute numbers)",
                        versions={"transformers": transformers_module().__version__})
    prompt_tokens, steps, repeats = (32, 8, 1) if args.quick else (128, 32, 3)
    contexts = CONTEXTS[:3] if args.quick else CONTEXTS
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = make_model(workdir)
        # section 3 fills the cache to 32k tokens, past the 4,096 of the config's max_position_embeddings
        # (transformers' default), which the build would otherwise take as the context bound
        fp32 = build(workdir, "fp32", precision="fp32", target="h100", max_context=CONTEXTS[-1] + 64)
        section_vs_transformers(model, {"eager": fp32, "compiled": compiled(fp32)}, prompt_tokens, steps, repeats)
        del model
        section_precisions(workdir, fp32, steps, repeats)
        if args.profile:
            profile_decode(build(workdir, "b200-profile", target="b200"), steps)
        section_context(fp32, 4 if args.quick else 8, contexts)


if __name__ == "__main__":
    main()
