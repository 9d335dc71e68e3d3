"""The fused MoE router: the fp32 router GEMM, sigmoid, correction bias, group-limited top-k,
normalisation and scaling in one kernel, then the token permutation sorted by expert.

Meaning: moe_route = runtime/reference/moe.moe_router, then moe_dispatch's expert offsets and
order (the pairs i = t*k + j sorted stably by expert). The router kernel gives each token's k
experts in descending order of biased score (the reference's torch.topk(sorted=False) order is
unspecified; the set and the weight of each expert are the meaning). The permutation kernel is one
program: a histogram of the experts, its prefix sum (the offsets), then each pair's place as its
expert's offset plus the pairs of that expert before it (a cumulative sum of one-hot rows), which
keeps the order stable without atomics.
"""

import triton
import triton.language as tl


@triton.jit
def moe_router(
    x_ptr, weight_ptr, bias_ptr, weights_out_ptr, ids_out_ptr,
    num_tokens, hidden, num_experts, scaling,
    HAS_BIAS: tl.constexpr, TOP_K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
    NORM_TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_SLOTS: tl.constexpr, BLOCK_G: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < num_tokens
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < num_experts
    logits = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for start in range(0, hidden, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        xs = tl.load(x_ptr + tokens[:, None].to(tl.int64) * hidden + ks[None, :],
                     mask=token_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        ws = tl.load(weight_ptr + experts[:, None] * hidden + ks[None, :],
                     mask=expert_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        logits += tl.dot(xs, tl.trans(ws), input_precision="ieee")  # the router is fp32, not tf32
    scores = tl.sigmoid(logits)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + experts, mask=expert_ok, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(expert_ok[None, :], choice, float("-inf"))
    if N_GROUP > 1:
        # Rate each group by its two best biased scores, keep the TOPK_GROUP best groups.
        group_size = num_experts // N_GROUP
        expert_group = experts // group_size
        groups = tl.arange(0, BLOCK_G)
        rating = tl.full((BLOCK_T, BLOCK_G), float("-inf"), dtype=tl.float32)
        for g in tl.static_range(N_GROUP):
            in_group = (expert_group == g)[None, :] & expert_ok[None, :]
            member = tl.where(in_group, choice, float("-inf"))
            best = tl.max(member, axis=1)
            best_id = tl.min(tl.where(member == best[:, None], experts[None, :], BLOCK_E), axis=1)
            second = tl.max(tl.where(experts[None, :] == best_id[:, None], float("-inf"), member), axis=1)
            rating = tl.where(groups[None, :] == g, (best + second)[:, None], rating)
        kept = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            top = tl.max(rating, axis=1)
            top_id = tl.min(tl.where(rating == top[:, None], groups[None, :], BLOCK_G), axis=1)
            kept = tl.where(groups[None, :] == top_id[:, None], 1, kept)
            rating = tl.where(groups[None, :] == top_id[:, None], float("-inf"), rating)
        expert_kept = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32)
        for g in tl.static_range(N_GROUP):
            group_kept = tl.sum(tl.where(groups[None, :] == g, kept, 0), axis=1)
            expert_kept = tl.where((expert_group == g)[None, :], group_kept[:, None], expert_kept)
        choice = tl.where(expert_kept != 0, choice, float("-inf"))
    slots = tl.arange(0, BLOCK_SLOTS)
    picked_weights = tl.zeros((BLOCK_T, BLOCK_SLOTS), dtype=tl.float32)
    picked_ids = tl.zeros((BLOCK_T, BLOCK_SLOTS), dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        top = tl.max(choice, axis=1)
        top_id = tl.min(tl.where(choice == top[:, None], experts[None, :], BLOCK_E), axis=1)
        hit = experts[None, :] == top_id[:, None]
        weight = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        picked_weights = tl.where(slots[None, :] == j, weight[:, None], picked_weights)
        picked_ids = tl.where(slots[None, :] == j, top_id[:, None].to(tl.int64), picked_ids)
        choice = tl.where(hit, float("-inf"), choice)
    if NORM_TOPK:
        picked_weights = picked_weights / (tl.sum(picked_weights, axis=1) + 1e-20)[:, None]
    out_offsets = tokens[:, None].to(tl.int64) * TOP_K + slots[None, :]
    out_mask = token_ok[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_out_ptr + out_offsets, picked_weights * scaling, mask=out_mask)
    tl.store(ids_out_ptr + out_offsets, picked_ids, mask=out_mask)


@triton.jit
def moe_permutation(
    ids_ptr, offsets_ptr, order_ptr, num_pairs, num_experts,
    BLOCK_PAIRS: tl.constexpr, BLOCK_E: tl.constexpr,
):
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int64)
    for start in range(0, num_pairs, BLOCK_PAIRS):
        pairs = start + tl.arange(0, BLOCK_PAIRS)
        ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int64), axis=0)
    ends = tl.cumsum(counts, axis=0)
    tl.store(offsets_ptr + 1 + experts, ends, mask=experts < num_experts)
    tl.store(offsets_ptr + experts, tl.zeros_like(ends), mask=experts == 0)
    placed = ends - counts  # the next free row of each expert
    for start in range(0, num_pairs, BLOCK_PAIRS):
        pairs = start + tl.arange(0, BLOCK_PAIRS)
        pair_ok = pairs < num_pairs
        ids = tl.load(ids_ptr + pairs, mask=pair_ok, other=-1)
        one_hot = (ids[:, None] == experts[None, :]).to(tl.int64)
        before = tl.cumsum(one_hot, axis=0) - one_hot  # earlier pairs of the same expert in this block
        row = tl.sum(one_hot * (before + placed[None, :]), axis=1)
        tl.store(order_ptr + row, pairs.to(tl.int64), mask=pair_ok)
        placed += tl.sum(one_hot, axis=0)
