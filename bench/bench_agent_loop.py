"""Agent loop: ten turns, each appending a 2,000-token tool result to the conversation and generating
100 tokens (greedy), on a small random hybrid model (fp32 engine, CPU).

1. Time per turn, three ways:
   - reuse: every turn is a stateless request holding the whole conversation (as an agent framework
     sends it); the engine's prefix store resumes it from the state kept at the end of the previous
     turn, so only the new tool result (and the previous turn's last token) is processed;
   - continue: the turns are appended to one cache (`engine.complete(..., cache=cache)`);
   - recompute: the same requests without a prefix store: the whole history is processed each turn.
   Wall and CPU time (`time.process_time`, all threads of this process) per turn, and each turn's time
   over the first turn's. On a machine shared with other jobs, wall time is inflated by their load;
   CPU time is the steadier number. Whether reuse, continue and recompute chose the same tokens is
   printed too (greedy; float rounding of the different blocking could in principle flip a near tie).
2. A snapshot of the bench model's sequence after the last turn: its file size against the size the
   slots imply (Mamba state + KV bytes per token x tokens).
3. Snapshot size per token of context for Nano, Super and Ultra, from their published configs (the
   engine's state slots at the default precision: KV cache BF16, conv window BF16, SSM state FP32):
   the fixed Mamba state (conv + SSM, all Mamba layers) and the KV bytes per token (all attention
   layers), and the snapshot at 2k, 32k and 128k tokens.

Run: python bench/bench_agent_loop.py [--turns 10] [--tool-tokens 2000] [--new-tokens 100] [--threads 1]
                                      [--models-dir DIR]
(about 4 min of CPU time at the defaults, most of it the recompute baseline)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from report_tables import print_machine_facts, print_table

import nemocompile
from nemocompile.graph.config import config_from_dict
from nemocompile.graph.ir import StateSlot
from nemocompile.graph.nemotron_h import build_block_graph
from nemocompile.graph.types import BF16
from nemocompile.runtime.dtypes import torch_dtype
from nemocompile.runtime.engine import Engine

HERE = Path(__file__).resolve().parent
SEED = 20261130
# Mostly Mamba and MLP layers with one small attention layer, as in Nemotron 3 (Nano: 6 attention
# layers of 52), so that the per-token cost of the weights dominates that of attending to the history.
CONFIG: dict[str, Any] = dict(
    vocab_size=4096, hidden_size=512, hybrid_override_pattern="M-M-M*M-M-",
    num_attention_heads=2, num_key_value_heads=1, head_dim=32, intermediate_size=1536,
    mamba_num_heads=16, mamba_head_dim=32, n_groups=2, ssm_state_size=32, conv_kernel=4, chunk_size=128,
    eos_token_id=2, dtype="float32",
)


@dataclass(frozen=True)
class Turn:
    context: int  # conversation tokens when the turn's request arrives
    processed: int  # tokens the engine ran a prefill over
    wall: float
    cpu: float
    generated: tuple[int, ...]


def build_engine(root: Path, max_context: int) -> Engine:
    import transformers

    torch.manual_seed(SEED)
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**CONFIG)).eval()
    model.save_pretrained(root / "checkpoint")
    nemocompile.build(root / "checkpoint", root / "engine", target="h100", precision="fp32", max_context=max_context)
    engine = nemocompile.load(root / "engine", device="cpu")
    assert isinstance(engine, Engine)
    return engine


def tool_result(turn: int, tokens: int) -> list[int]:
    g = torch.Generator().manual_seed(SEED + turn)
    return torch.randint(3, CONFIG["vocab_size"], (tokens,), generator=g).tolist()


def timed(engine: Engine, tokens: list[int], new_tokens: int, cache: Any = None) -> tuple[list[int], float, float]:
    """The tokens `engine.complete` generates for one sequence, its wall and CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = engine.complete([tokens], new_tokens, cache=cache)[0]
    return out, time.perf_counter() - wall, time.process_time() - cpu


def reuse_loop(engine: Engine, turns: int, tool_tokens: int, new_tokens: int) -> list[Turn]:
    store = engine.enable_prefix_reuse(max_bytes=1 << 30)
    history: list[int] = []
    out: list[Turn] = []
    for turn in range(turns):
        request = history + tool_result(turn, tool_tokens)
        reused = store.stats.reused_tokens
        generated, wall, cpu = timed(engine, request, new_tokens)
        out.append(Turn(len(request), len(request) - (store.stats.reused_tokens - reused), wall, cpu,
                        tuple(generated)))
        history = request + generated
    engine.disable_prefix_reuse()
    return out


def continue_loop(engine: Engine, turns: int, tool_tokens: int, new_tokens: int) -> tuple[list[Turn], Any]:
    cache = engine.new_cache(1)
    out: list[Turn] = []
    for turn in range(turns):
        tool = tool_result(turn, tool_tokens)
        context = cache.host_lengths[0] + len(cache.pending[0]) + len(tool)
        processed = len(cache.pending[0]) + len(tool)
        generated, wall, cpu = timed(engine, tool, new_tokens, cache)
        out.append(Turn(context, processed, wall, cpu, tuple(generated)))
    return out, cache


def recompute_loop(engine: Engine, reference: list[Turn], tool_tokens: int, new_tokens: int) -> list[Turn]:
    """The reuse run's requests (the same conversation), each processed whole."""
    history: list[int] = []
    out: list[Turn] = []
    for turn, seen in enumerate(reference):
        request = history + tool_result(turn, tool_tokens)
        generated, wall, cpu = timed(engine, request, new_tokens)
        out.append(Turn(len(request), len(request), wall, cpu, tuple(generated)))
        history = request + list(seen.generated)
    return out


def slot_bytes(slot: StateSlot, tokens: int) -> int:
    count = 1
    for dim in slot.type.shape:
        count *= 1 if dim == "batch" else tokens if dim == "ctx" else int(dim)
    return count * torch_dtype(slot.type.dtype).itemsize


def state_sizes(slots: tuple[StateSlot, ...]) -> tuple[int, int, int, int]:
    """(Mamba state bytes, KV bytes per token, Mamba layers, attention layers) of one sequence."""
    mamba = sum(slot_bytes(s, 0) for s in slots if s.kind in ("conv", "ssm"))
    kv = sum(slot_bytes(s, 1) for s in slots if s.kind == "kv")
    return mamba, kv, sum(s.kind == "ssm" for s in slots), sum(s.kind == "kv" for s in slots) // 2


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"


def find_models_dir(given: Path | None) -> Path | None:
    for candidate in ([given] if given else []) + [HERE.parent.parent / "shared" / "models",
                                                    Path("/work/shared/models")]:
        if candidate is not None and (candidate / "ultra.json").exists():
            return candidate
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--tool-tokens", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steady CPU times on a shared machine)")
    parser.add_argument("--models-dir", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print_machine_facts("warning: the machine is busy; wall times are inflated, compare the CPU times")
    context = args.turns * (args.tool_tokens + args.new_tokens) + 16
    with tempfile.TemporaryDirectory() as tmp:
        engine = build_engine(Path(tmp), context)
        print(f"\nmodel: {json.dumps({k: CONFIG[k] for k in ('hidden_size', 'hybrid_override_pattern')})}, "
              f"fp32 engine, context bound {context}")
        reuse = reuse_loop(engine, args.turns, args.tool_tokens, args.new_tokens)
        continued, cache = continue_loop(engine, args.turns, args.tool_tokens, args.new_tokens)
        recompute = recompute_loop(engine, reuse, args.tool_tokens, args.new_tokens)
        rows = []
        for turn, (a, b, c) in enumerate(zip(reuse, continued, recompute, strict=True)):
            same = "yes" if a.generated == b.generated == c.generated else "NO"
            rows.append([str(turn + 1), str(a.context), str(a.processed), f"{a.wall:.2f}", f"{a.cpu:.2f}",
                         f"{a.cpu / reuse[0].cpu:.2f}", f"{b.processed}", f"{b.wall:.2f}", f"{b.cpu:.2f}",
                         f"{b.cpu / continued[0].cpu:.2f}", str(c.processed), f"{c.wall:.2f}", f"{c.cpu:.2f}",
                         f"{c.cpu / recompute[0].cpu:.2f}", same])
        print_table(f"Agent loop: {args.turns} turns of +{args.tool_tokens} tool tokens and {args.new_tokens} "
                    f"generated (seconds; x1 = the turn's CPU time over turn 1's)",
                    ["turn", "context", "reuse: ran", "wall", "cpu", "x1", "continue: ran", "wall", "cpu", "x1",
                     "recompute: ran", "wall", "cpu", "x1", "same tokens"], rows)
        worst_reuse = max(t.cpu for t in reuse) / reuse[0].cpu
        worst_continue = max(t.cpu for t in continued) / continued[0].cpu
        print(f"\nlargest per-turn CPU time over the first turn's: reuse {worst_reuse:.2f}x, continue "
              f"{worst_continue:.2f}x (target: within 1.5x); recompute's last turn "
              f"{recompute[-1].cpu / recompute[0].cpu:.2f}x; totals (CPU s): reuse "
              f"{sum(t.cpu for t in reuse):.1f}, continue {sum(t.cpu for t in continued):.1f}, recompute "
              f"{sum(t.cpu for t in recompute):.1f}")

        path = engine.save_state(cache, 0, Path(tmp) / "conversation.safetensors")
        mamba, kv, _, _ = state_sizes(engine.graph.states)
        tokens = cache.host_lengths[0]
        print(f"\nsnapshot of the bench conversation ({tokens} tokens): file {human(path.stat().st_size)}; the slots "
              f"imply {human(mamba + kv * tokens)} (Mamba state {human(mamba)} + KV {kv} B/token x {tokens})")

    models = find_models_dir(args.models_dir)
    if models is None:
        print("\nno published configs found (nano.json, super.json, ultra.json); pass --models-dir")
        return
    rows = []
    for name in ("nano", "super", "ultra"):
        config = config_from_dict(json.loads((models / f"{name}.json").read_text()), f"{name}.json")
        mamba, kv, mamba_layers, attention_layers = state_sizes(build_block_graph(config, BF16).states)
        rows.append([name, f"{mamba_layers} / {attention_layers}", human(mamba), human(kv),
                     *(human(mamba + kv * n) for n in (2048, 32768, 131072)),
                     f"{mamba / kv:,.0f}"])
    print_table("Snapshot size of one sequence (KV cache BF16, conv BF16, SSM state FP32)",
                ["model", "Mamba / attention layers", "Mamba state", "KV per token", "at 2k", "at 32k", "at 128k",
                 "Mamba state = KV of N tokens"], rows)


if __name__ == "__main__":
    main()
