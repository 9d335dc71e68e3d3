"""Model-level agreement of a quantized engine with its float reference on random prompts:
top-1 agreement of the next-token choice and mean KL(P_float || P_quantized) per position.
What the two numbers say (and what they cannot say on random weights) is in report.md's
explanation, `nemocompile.report.AGREEMENT_EXPLAINED`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from nemocompile.graph.ir import Graph
from nemocompile.runtime.cache import Cache
from nemocompile.runtime.executor import Executor
from nemocompile.runtime.weights import WeightValue


@dataclass(frozen=True)
class Agreement:
    prompts: int
    tokens: int
    top1: float
    mean_kl: float
    reference: str  # what the quantized engine was compared against
    rel_error: float = 0.0  # ||logits - reference logits|| / ||reference logits|| over every position

    def as_json(self) -> dict[str, object]:
        return {"prompts": self.prompts, "tokens": self.tokens, "top1_agreement": round(self.top1, 6),
                "mean_kl": float(f"{self.mean_kl:.6g}"), "relative_logit_error": float(f"{self.rel_error:.6g}"),
                "reference": self.reference}


def _logits(graph: Graph, weights: Mapping[str, WeightValue], ids: torch.Tensor) -> torch.Tensor:
    cache = Cache.for_graph(graph, ids.shape[0], torch.device("cpu"))
    return Executor(graph, weights).run(ids, cache)["logits"]


def measure_agreement(float_graph: Graph, float_weights: Mapping[str, WeightValue], quant_graph: Graph,
                      quant_weights: Mapping[str, WeightValue], vocab_size: int, reference: str,
                      prompts: int = 4, length: int = 32, seed: int = 1234,
                      progress: Callable[[int], None] | None = None) -> Agreement:
    """Both engines on the same random prompts, one prompt at a time (`progress` hears each one)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (prompts, length), generator=generator)
    agree, kl_sum, diff_sq, ref_sq = 0.0, 0.0, 0.0, 0.0
    for index in range(prompts):
        prompt = ids[index:index + 1]
        with torch.inference_mode():
            expected = _logits(float_graph, float_weights, prompt).float()
            got = _logits(quant_graph, quant_weights, prompt).float()
        log_p = torch.log_softmax(expected, dim=-1)
        log_q = torch.log_softmax(got, dim=-1)
        kl_sum += float((log_p.exp() * (log_p - log_q)).sum(-1).sum())
        agree += float((expected.argmax(-1) == got.argmax(-1)).sum())
        diff_sq += float((got - expected).square().sum())
        ref_sq += float(expected.square().sum())
        if progress:
            progress(index + 1)
    tokens = prompts * length
    rel_error = (diff_sq / ref_sq) ** 0.5 if ref_sq > 0 else 0.0
    return Agreement(prompts, tokens, agree / tokens, kl_sum / tokens, reference, rel_error)
