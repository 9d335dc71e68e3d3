"""Mixture of experts: the sigmoid top-k router, token dispatch by expert, grouped GEMM and the weighted combine."""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F


def moe_router(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick top_k experts per token and their weights, as NemotronHTopkRouter does.

    x [N, D], weight [E, D], bias (the e_score_correction_bias) [E] or None. Scores are
    ``sigmoid(x @ weight^T)`` in float32. The bias shifts scores only for choosing: experts
    fall into n_group groups, each group is rated by the sum of its two best biased scores,
    only the best topk_group groups stay eligible, and the top_k biased scores among them win.
    The weights are the unbiased scores of the winners, divided by their sum (+1e-20) when
    norm_topk_prob, then times routed_scaling_factor. Returns weights float32 [N, k] and ids
    int64 [N, k], in torch.topk(sorted=False) order.
    """
    num_experts = weight.shape[0]
    if num_experts % n_group != 0:
        raise ValueError(f"moe_router: {num_experts} experts do not split into n_group = {n_group} groups.")
    scores = F.linear(x.to(torch.float32), weight.to(torch.float32)).sigmoid()
    choice = scores if bias is None else scores + bias
    if topk_group < n_group:  # otherwise every group stays eligible
        group_scores = choice.view(-1, n_group, num_experts // n_group).topk(2, dim=-1).values.sum(dim=-1)
        best_groups = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False).indices
        group_kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        expert_kept = group_kept.repeat_interleave(num_experts // n_group, dim=1)
        choice = choice.masked_fill(~expert_kept, float("-inf"))
    topk_ids = torch.topk(choice, k=top_k, dim=-1, sorted=False).indices
    topk_weights = scores.gather(1, topk_ids)
    if norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_weights * routed_scaling_factor, topk_ids


def moe_dispatch(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather one row per (token, slot) pair, grouped by expert.

    x [N, D], topk_ids [N, k]. Pair i = t*k + j routes token t through expert
    topk_ids[t, j]. Returns x_sorted [N*k, D] with x_sorted[r] = x[order[r] // k],
    expert_offsets int64 [E+1] so that expert e owns rows offsets[e]:offsets[e+1], and
    order int64 [N*k], the pair indices sorted stably by expert.
    """
    expert_offsets, order = expert_order(topk_ids, num_experts)
    return gather_rows(x, order, topk_ids.shape[1]), expert_offsets, order


def expert_order(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grouping half of moe_dispatch: expert_offsets int64 [E+1] and order int64 [N*k], the
    pair indices t*k + j sorted stably by topk_ids[t, j]."""
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    if torch.compiler.is_compiling():  # bincount's size depends on the ids' values: count by comparison
        counts = (flat_ids[:, None] == torch.arange(num_experts, device=flat_ids.device)[None, :]).sum(0)
    else:
        counts = torch.bincount(flat_ids, minlength=num_experts)
    expert_offsets = F.pad(torch.cumsum(counts, dim=0), (1, 0)).to(torch.int64)
    return expert_offsets, order.to(torch.int64)


def gather_rows(x: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
    """The gathering half of moe_dispatch: row r is x[order[r] // top_k] (x [N, D] -> [N*k, D])."""
    return x[order // top_k]


def grouped_gemm(x_sorted: torch.Tensor, expert_offsets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Multiply each expert's rows by that expert's weight: rows r of expert e give x_sorted[r] @ weight[e]^T.

    x_sorted [M, K], expert_offsets int64 [E+1], weight [E, Nout, K] -> [M, Nout].
    """
    out = x_sorted.new_empty(x_sorted.shape[0], weight.shape[1])
    bounds = expert_offsets.tolist()
    for expert, (begin, end) in enumerate(pairwise(bounds)):
        if end > begin:
            out[begin:end] = F.linear(x_sorted[begin:end], weight[expert])
    return out


def moe_combine(
    y_sorted: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Sum each token's expert outputs, weighted by its routing weights.

    y_sorted [N*k, D] in dispatch order, order [N*k] from moe_dispatch, topk_weights [N, k].
    out[t] = sum_j topk_weights[t, j] * y(t, j), accumulated in topk_weights' dtype (float32)
    in expert order like NemotronHExperts, then cast to y_sorted's dtype. Returns [N, D].
    """
    top_k = topk_weights.shape[1]
    tokens = order // top_k
    weights = topk_weights[tokens, order % top_k]
    weighted = (y_sorted * weights[:, None]).to(topk_weights.dtype)
    out = torch.zeros(num_tokens, y_sorted.shape[1], dtype=topk_weights.dtype, device=y_sorted.device)
    out.index_add_(0, tokens, weighted)
    return out.to(y_sorted.dtype)
