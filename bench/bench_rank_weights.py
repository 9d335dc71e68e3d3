"""Peak disk and memory of a sharded build: a random Nemotron-H checkpoint (transformers'
NemotronHForCausalLM, bf16) built for --world-size N with the target's quantization policy, while a
thread samples the size of the build's staging directory. Prints the engine's bytes, the peak bytes
the build held on disk (the staging directory) against them, the process's peak RSS, and the time
(wall and CPU: wall time is inflated when other work shares the machine).

    python bench/bench_rank_weights.py --world-size 2 --hidden 1024 --experts 16

Each rank's piece of each tensor goes straight into its rank file as the stream produces it
(nemocompile/rank_weights.py), so the peak on disk is about the engine itself; the agreement check
of a model small enough for it also needs a whole copy of the weights, which NEMOCOMPILE_REFERENCE_
CHECK_MAX_PARAMS=0 turns off here by default, as it is off for any model past 300M parameters."""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _tree_bytes(root: Path) -> int:
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(directory, name)).st_size
            except OSError:  # removed or renamed while walking
                pass
    return total


def _checkpoint(path: Path, hidden: int, experts: int) -> int:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.NemotronHConfig(
        vocab_size=4096, hidden_size=hidden, hybrid_override_pattern="M*EME-", num_attention_heads=16,
        num_key_value_heads=4, head_dim=hidden // 16, intermediate_size=2 * hidden, mamba_num_heads=16,
        mamba_head_dim=hidden // 16, n_groups=4, ssm_state_size=64, chunk_size=64, conv_kernel=4,
        n_routed_experts=experts, num_experts_per_tok=2, moe_intermediate_size=hidden,
        moe_shared_expert_intermediate_size=hidden, n_group=1, topk_group=1, dtype="bfloat16")
    model = transformers.NemotronHForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--target", default="h100")
    parser.add_argument("--agreement", action="store_true", help="keep the agreement check (and its whole copy)")
    args = parser.parse_args()
    environment = dict(os.environ)
    if not args.agreement:
        environment["NEMOCOMPILE_REFERENCE_CHECK_MAX_PARAMS"] = "0"
    with tempfile.TemporaryDirectory(prefix="bench-rank-weights-") as tmp:
        root = Path(tmp)
        params = _checkpoint(root / "checkpoint", args.hidden, args.experts)
        out = root / "out" / "engine"
        out.parent.mkdir()
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _tree_bytes(out.parent))
                time.sleep(0.01)

        # the build runs in a child process, so its peak RSS is its own (not the checkpoint's model)
        build = (f"import nemocompile; nemocompile.build({str(root / 'checkpoint')!r}, {str(out)!r}, "
                 f"target={args.target!r}, world_size={args.world_size}, calibrate=2)")
        sampler = threading.Thread(target=sample, daemon=True)
        wall = time.perf_counter()
        sampler.start()
        try:
            subprocess.run([sys.executable, "-c", build], check=True, env=environment)
        finally:
            stop.set()
            sampler.join()
        wall = time.perf_counter() - wall
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu, rss = usage.ru_utime + usage.ru_stime, usage.ru_maxrss
        engine = _tree_bytes(out)
        weights = _tree_bytes(out / "weights")
        print(f"model: {params / 1e6:.1f}M parameters, checkpoint {_tree_bytes(root / 'checkpoint') / 1e6:.1f} MB; "
              f"{args.target}, world size {args.world_size}")
        print(f"engine {engine / 1e6:.1f} MB (rank weight files {weights / 1e6:.1f} MB); peak on disk during the "
              f"build {peak[0] / 1e6:.1f} MB = {peak[0] / engine:.2f} x the engine")
        print(f"peak RSS of the build {rss / 1024:.0f} MB; {wall:.1f} s wall, {cpu:.1f} s CPU")


if __name__ == "__main__":
    main()
