"""Train the embedded demo model on the project's own demo text and write its weights into the package.

    python tools/train_demo.py [--steps N] [--out nemocompile/demo_data/model.safetensors]

The model is the demo configuration (`nemocompile.demo.demo_config`: Mamba2, attention, a latent
MoE and a dense MLP, byte tokenizer) as transformers' `NemotronHForCausalLM`, trained on CPU to
continue `nemocompile/demo_data/demo_text.txt`. Each training sequence is BOS followed by a window
of the text starting at a random byte, so a prompt taken from anywhere in the text is continued.
Everything is seeded and runs on a fixed thread count, so two runs write the same bytes; on two
cores it takes a few minutes. The weights are stored as the demo checkpoint stores them (bf16,
with the tensors the importer keeps in fp32 in fp32) under the names the importer expects.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nemocompile.demo import DEMO_SEED, DEMO_TEXT, DEMO_WEIGHTS, demo_config
from nemocompile.graph.config import config_from_dict
from nemocompile.graph.nemotron_h import model_weights
from nemocompile.runtime.tokenizer import ByteTokenizer


def training_batch(data: torch.Tensor, batch: int, length: int, bos: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` rows of BOS + `length` bytes of the text from random starts (the text's start included)."""
    starts = torch.randint(0, len(data) - length + 1, (batch,), generator=generator)
    starts[0] = 0
    rows = torch.stack([data[s:s + length] for s in starts.tolist()])
    return torch.cat([torch.full((batch, 1), bos, dtype=rows.dtype), rows], dim=1)


def train(steps: int, batch: int, length: int, lr: float, log_every: int) -> dict[str, torch.Tensor]:
    import transformers

    torch.manual_seed(DEMO_SEED)
    torch.set_num_threads(2)  # fixed, so the float sums (and the weights) do not depend on the machine
    raw = demo_config()
    fields = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**fields, dtype="float32"))
    model.train()
    tokenizer = ByteTokenizer()
    data = torch.tensor(tokenizer.encode(DEMO_TEXT.read_text(), add_bos=False), dtype=torch.int64)
    generator = torch.Generator().manual_seed(DEMO_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    start = time.perf_counter()
    for step in range(steps):
        ids = training_batch(data, batch, length, tokenizer.bos_token_id, generator)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:7.1f} s", file=sys.stderr)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        saved = load_file(str(Path(tmp) / "model.safetensors"))
    return saved


def demo_tensors(saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained tensors under the importer's names, in the demo checkpoint's dtypes."""
    config = config_from_dict(demo_config(), "demo config")
    tensors: dict[str, torch.Tensor] = {}
    for spec in model_weights(config):
        for name in spec.tensors:
            if name not in saved:
                raise SystemExit(f"transformers saved no tensor {name}")
            value = saved.pop(name)
            tensors[name] = value.float() if spec.keep_fp32 else value.to(torch.bfloat16)
    if saved:
        raise SystemExit(f"transformers saved tensors the importer does not read: {sorted(saved)}")
    return {name: tensor.contiguous() for name, tensor in sorted(tensors.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", type=Path, default=DEMO_WEIGHTS)
    args = parser.parse_args()
    tensors = demo_tensors(train(args.steps, args.batch, args.length, args.lr, args.log_every))
    save_file(tensors, str(args.out), metadata={"trained_by": "tools/train_demo.py", "steps": str(args.steps)})
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
