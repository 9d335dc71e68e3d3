"""Next-token choice: greedy at temperature 0, else temperature + nucleus (top-p) sampling from a
seeded generator, so a seed reproduces a run."""

from __future__ import annotations

import torch

from nemocompile.base.errors import UsageError


def check_sampling(temperature: float, top_p: float) -> None:
    if temperature < 0:
        raise UsageError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1], got {top_p}")


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # keeps at least the top token
        probs = torch.zeros_like(probs).scatter(-1, sorted_ids, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
