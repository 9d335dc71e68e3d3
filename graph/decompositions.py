"""The decomposition of each block op into core ops: the one definition of what a block means.
The Decompose pass applies these to a whole graph; the runtime runs a block op (or any other
composite op) by applying its decomposition to that one op and executing the core ops it
becomes, so a composite's reference is the composition of the core references.
Each block's last core op keeps the block's result name, so the rest of the graph is untouched."""

from __future__ import annotations

from collections.abc import Callable

from .builder import GraphBuilder
from .ir import Op
from .opdef import operand


def _mamba2_mixer(b: GraphBuilder, op: Op) -> None:
    x, in_proj, conv_w, conv_b, dt_bias, a_log, d, norm_w, out_proj = (
        operand(op, n) for n in ("x", "in_proj", "conv_weight", "conv_bias", "dt_bias", "A_log", "D", "norm_weight",
                                 "out_proj"))
    assert x and in_proj and conv_w and dt_bias and a_log and d and norm_w and out_proj
    a, s = op.attrs, op.scope
    heads, head_dim, groups, state = a.int("num_heads"), a.int("head_dim"), a.int("n_groups"), a.int("state_size")
    inner = heads * head_dim
    conv_dim = inner + 2 * groups * state
    projected = b.op1("linear", [x, in_proj, operand(op, "in_proj_bias")], scope=s)
    gate, xbc, dt = b.op("split", [projected], {"sizes": (inner, conv_dim, heads)}, s)
    conv_next, ssm_next = (r.name for r in op.results[1:])
    # The conv and its activation are two core ops here; fuse_mamba_chain makes them one.
    (xbc, _) = b.op("causal_conv1d", [xbc, conv_w, conv_b, operand(op, "conv_state"), operand(op, "seq_lens")], {}, s,
                    [b.fresh(), conv_next])
    xbc = b.op1("activation", [xbc], {"kind": a.str("activation")}, s)
    xs, big_b, big_c = b.op("split", [xbc], {"sizes": (inner, groups * state, groups * state)}, s)
    (y, _) = b.op("ssd_chunk_scan", [xs, dt, a_log, big_b, big_c, d, dt_bias, operand(op, "ssm_state"),
                                    operand(op, "seq_lens")],
                  {"num_heads": heads, "head_dim": head_dim, "n_groups": groups, "state_size": state,
                   "chunk_size": a.int("chunk_size"), "dt_min": a.float("dt_min"), "dt_max": a.float("dt_max")},
                  s, [b.fresh(), ssm_next])
    y = b.op1("gated_rms_norm", [y, gate, norm_w], {"group_size": inner // groups, "eps": a.float("eps")}, s)
    # The scan accumulates in fp32; the output projection runs in the activation dtype.
    y = b.op1("cast", [y], {"dtype": b.type_of(x).dtype.name}, s)
    b.op("linear", [y, out_proj, operand(op, "out_proj_bias")], scope=s, result_names=[op.results[0].name])


def _attention(b: GraphBuilder, op: Op) -> None:
    x, q_proj, k_proj, v_proj, o_proj = (operand(op, n) for n in ("x", "q_proj", "k_proj", "v_proj", "o_proj"))
    a, s = op.attrs, op.scope
    q = b.op1("linear", [x, q_proj], scope=s)
    k = b.op1("linear", [x, k_proj], scope=s)
    v = b.op1("linear", [x, v_proj], scope=s)
    k_next, v_next = (r.name for r in op.results[1:])
    (attended, _, _) = b.op("attention_gqa",
                            [q, k, v, *(operand(op, n) for n in ("k_cache", "v_cache", "cache_lens"))],
                            {key: a[key] for key in a.keys()}, s, [b.fresh(), k_next, v_next])
    b.op("linear", [attended, o_proj], scope=s, result_names=[op.results[0].name])


def _mlp(b: GraphBuilder, op: Op) -> None:
    x, up, down = (operand(op, n) for n in ("x", "up_proj", "down_proj"))
    hidden = b.op1("linear", [x, up, operand(op, "up_bias")], scope=op.scope)
    hidden = b.op1("activation", [hidden], {"kind": op.attrs.str("activation")}, op.scope)
    b.op("linear", [hidden, down, operand(op, "down_bias")], scope=op.scope, result_names=[op.result.name])


def _moe(b: GraphBuilder, op: Op) -> None:
    x, router, router_bias, experts_up, experts_down, shared_up, shared_down, fc1, fc2 = (
        operand(op, n) for n in ("x", "router_weight", "router_bias", "experts_up", "experts_down", "shared_up",
                                 "shared_down", "fc1_latent", "fc2_latent"))
    assert x and experts_up
    a, s = op.attrs, op.scope
    activation = a.str("activation")
    weights, ids = b.op("moe_router", [x, router, router_bias],
                        {key: a[key] for key in ("top_k", "n_group", "topk_group", "norm_topk_prob",
                                                 "routed_scaling_factor")}, s)
    routed_in = b.op1("linear", [x, fc1, operand(op, "fc1_latent_bias")], scope=s) if fc1 else x
    experts = b.type_of(experts_up).shape[0]
    assert isinstance(experts, int)
    x_sorted, offsets, order = b.op("moe_dispatch", [routed_in, ids], {"num_experts": experts}, s)
    hidden = b.op1("grouped_gemm", [x_sorted, offsets, experts_up], scope=s)
    hidden = b.op1("activation", [hidden], {"kind": activation}, s)
    hidden = b.op1("grouped_gemm", [hidden, offsets, experts_down], scope=s)
    routed = b.op1("moe_combine", [hidden, order, weights], scope=s)
    if fc2:
        routed = b.op1("linear", [routed, fc2, operand(op, "fc2_latent_bias")], scope=s)
    shared = b.op1("linear", [x, shared_up, operand(op, "shared_up_bias")], scope=s)
    shared = b.op1("activation", [shared], {"kind": activation}, s)
    shared = b.op1("linear", [shared, shared_down, operand(op, "shared_down_bias")], scope=s)
    b.op("add", [routed, shared], scope=s, result_names=[op.result.name])


Decomposition = Callable[[GraphBuilder, Op], None]

DECOMPOSITIONS: dict[str, Decomposition] = {
    "mamba2_mixer": _mamba2_mixer,
    "attention": _attention,
    "mlp": _mlp,
    "moe": _moe,
}
