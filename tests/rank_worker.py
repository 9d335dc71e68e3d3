"""One rank of a sharded engine under test, started with torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT): `python tests/rank_worker.py ENGINE OUT [die]`. It loads the engine with
`nemocompile.load` (which joins the process group), prefills two prompts and decodes 16 greedy steps,
and rank 0 saves the logits of every step and the tokens to OUT (RANK_WORKER_VOCAB=N takes the
prompts' ids modulo N, for a model of a smaller vocabulary). With `die`, rank 1 exits right after
loading, so the test can watch the other ranks fail instead of hanging."""

from __future__ import annotations

import os
import sys

import torch

import nemocompile

PROMPTS = [[5, 17, 3, 99, 42], [64, 2, 2, 31, 7]]
DECODE_STEPS = 16


def main() -> None:
    engine_dir, out = sys.argv[1], sys.argv[2]
    engine = nemocompile.load(engine_dir, device="cpu")
    if len(sys.argv) > 3 and os.environ.get("RANK") == "1":
        os._exit(3)  # a rank that dies mid-run
    vocab = int(os.environ.get("RANK_WORKER_VOCAB", "0"))  # a model of a smaller vocabulary: ids modulo it
    prompts = [[token % vocab for token in prompt] for prompt in PROMPTS] if vocab else PROMPTS
    cache = engine.new_cache(len(prompts))
    steps = [engine.forward(prompts, cache)[:, -1]]
    tokens = [steps[-1].argmax(-1)]
    for _ in range(DECODE_STEPS):
        steps.append(engine.forward(tokens[-1][:, None], cache)[:, -1])
        tokens.append(steps[-1].argmax(-1))
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"logits": torch.stack(steps, 1), "tokens": torch.stack(tokens, 1)}, out)


if __name__ == "__main__":
    main()
