"""Peak host memory of one prefill of a long prompt on a tiny fp32 engine: attention's queries in
chunks (runtime/reference/attention.py, SCORE_BUDGET score elements per chunk) against one chunk
for the whole prompt (the budget set past prompt x prompt, which is how attention ran before).

Each measurement runs in a fresh process (peak RSS from getrusage, minus the RSS just before the
forward call). Prints a table.

    python bench/bench_prefill_memory.py [--tokens 20000]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# 4 query heads of 8 over 2 KV heads, every block kind; fp32 weights
CONFIG = dict(
    vocab_size=64, hidden_size=32, hybrid_override_pattern="M*E-", num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8,
    chunk_size=64, conv_kernel=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=32, dtype="float32",
)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(engine: Path, tokens: int, budget: int | None) -> None:
    import torch

    import nemocompile
    from nemocompile.runtime.reference import attention

    if budget is not None:
        attention.SCORE_BUDGET = budget
    loaded = nemocompile.load(engine)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    before = _rss_mib()
    start = time.perf_counter()
    logits = loaded.forward(ids.tolist())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{peak - before:.0f} {seconds:.2f} {float(logits[0, -1].abs().max()):.6f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        engine, budget = args.child
        child(Path(engine), args.tokens, None if budget == "default" else int(budget))
        return

    import torch
    import transformers

    import nemocompile
    from nemocompile.runtime.reference.attention import SCORE_BUDGET

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        checkpoint = Path(tmp) / "tiny"
        transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**CONFIG)).save_pretrained(checkpoint)
        engine = Path(tmp) / "engine"
        nemocompile.build(checkpoint, engine, target="h100", precision="fp32", max_context=max(args.tokens, 1024))
        heads = CONFIG["num_attention_heads"]
        whole = heads * args.tokens * args.tokens  # score elements of one chunk for the whole prompt
        rows = []
        for label, budget in (("one chunk (before)", str(whole)), (f"chunked, budget {SCORE_BUDGET:,}", "default")):
            out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--child", str(engine), budget],
                                 capture_output=True, text=True, check=True).stdout.split()
            rows.append((label, float(out[0]), float(out[1]), out[2]))
    print(f"prefill of {args.tokens:,} tokens, tiny fp32 engine ({heads} query heads, pattern "
          f"{CONFIG['hybrid_override_pattern']}); one chunk's scores: {whole * 4 / 2**30:.1f} GiB in float32")
    print("| attention | peak RSS over the loaded engine (MiB) | seconds | max abs last logit |")
    print("|---|---:|---:|---:|")
    for label, mib, seconds, logit in rows:
        print(f"| {label} | {mib:,.0f} | {seconds:.2f} | {logit} |")


if __name__ == "__main__":
    main()
