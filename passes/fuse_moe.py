"""fuse_experts and fuse_router: the routed experts of an MoE layer as two grouped GEMMs with
epilogues, and the router with the token permutation, as one op each.

fuse_experts (rule `fuse_experts`, rooted at `moe_combine`):
    x_sorted, offsets, order = moe_dispatch(r, ids)
    [q = quantize(x_sorted, s_up, offsets)]            (W4A4)
    h = activation(grouped_gemm(q | x_sorted, offsets, w_up))
    [q2 = quantize(h, s_down, offsets)]                (W4A4: the up-GEMM's output to NVFP4)
    out = moe_combine(grouped_gemm(q2 | h, offsets, w_down), order, weights)
becomes moe_expert_up(r, order, offsets, w_up, s_up) -> moe_expert_down(.., weights, s_down):
the up-GEMM gathers its rows through `order` (no x_sorted in memory), quantizes them on load and
applies the activation as its epilogue; the down-GEMM multiplies by the routing weight and sums
each token's experts as its epilogue. `r` is the layer's input, or its latent projection
(fc1_latent) in a latent MoE; the latent projections and the shared expert around the routed
experts are left as the GEMMs they are (fuse_dequant_gemm takes their activation quantization).
Every intermediate must have no other reader.

fuse_router (rule `fuse_router`, rooted at `moe_dispatch`): moe_router + moe_dispatch whose rows
nothing reads any more (fuse_experts gathers them) become moe_route, which emits the routing
weights, the expert ids, the expert offsets and the pair order. It runs after fuse_experts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from nemocompile.graph.builder import GraphBuilder
from nemocompile.graph.ir import AttrValue, Op
from nemocompile.graph.opdef import KERNEL_ATTR, operand

from .rewrite import Match, RewritePass, Rule, op, value


def present(attrs: Mapping[str, AttrValue]) -> dict[str, AttrValue]:
    """The attributes that have a value (an absent optional one is left out)."""
    return {key: val for key, val in attrs.items() if val is not None}


@dataclass(frozen=True)
class ExpertChain:
    """The core ops of one layer's routed experts, from dispatch to combine."""

    dispatch: Op
    up_quantize: Op | None
    up_gemm: Op
    activation: Op
    down_quantize: Op | None
    down_gemm: Op

    def absorbed(self) -> list[Op]:
        """The ops the fused pair replaces, last first (the order they can be dropped in)."""
        ops = [self.down_gemm, self.down_quantize, self.activation, self.up_gemm, self.up_quantize]
        return [found for found in ops if found is not None]


def _only_reader(match: Match, name: str, reader: Op) -> bool:
    assert match.graph is not None
    users = match.graph.users(name)
    return len(users) == 1 and users[0].results == reader.results


def _through_quantize(match: Match, name: str, reader: Op, offsets: str) -> tuple[Op | None, str] | None:
    """(the quantize op feeding `reader` by `name`, its input) or (None, name) when none does."""
    assert match.builder is not None
    producer = match.builder.producer(name)
    if producer is None or producer.opname != "quantize":
        return None, name
    if operand(producer, "offsets") != offsets or not _only_reader(match, name, reader):
        return None
    x = operand(producer, "x")
    assert x is not None
    return producer, x


def expert_chain(match: Match) -> ExpertChain | None:
    """The chain that ends in the matched moe_combine, or None when it is not one fuse_experts takes."""
    builder, combine = match.builder, match.root
    assert builder is not None
    down = builder.producer(match.value("y"))
    if down is None or down.opname != "grouped_gemm" or not _only_reader(match, match.value("y"), combine):
        return None
    offsets = operand(down, "offsets")
    assert offsets is not None
    found = _through_quantize(match, operand(down, "x") or "", down, offsets)
    if found is None:
        return None
    down_quantize, hidden = found
    activation = builder.producer(hidden)
    if activation is None or activation.opname != "activation" or \
            not _only_reader(match, hidden, down_quantize or down):
        return None
    up_out = operand(activation, "x") or ""
    up = builder.producer(up_out)
    if up is None or up.opname != "grouped_gemm" or operand(up, "offsets") != offsets or \
            not _only_reader(match, up_out, activation):
        return None
    found = _through_quantize(match, operand(up, "x") or "", up, offsets)
    if found is None:
        return None
    up_quantize, rows = found
    dispatch = builder.producer(rows)
    if dispatch is None or dispatch.opname != "moe_dispatch" or rows != dispatch.results[0].name:
        return None
    _, dispatch_offsets, dispatch_order = (r.name for r in dispatch.results)
    if offsets != dispatch_offsets or match.value("order") != dispatch_order or \
            not _only_reader(match, rows, up_quantize or up):
        return None
    chain = ExpertChain(dispatch, up_quantize, up, activation, down_quantize, down)
    return chain if builder.can_drop(*chain.absorbed()) else None


def _fuse_experts(match: Match, builder: GraphBuilder) -> None:
    chain = expert_chain(match)
    assert chain is not None
    for absorbed in chain.absorbed():
        builder.drop(absorbed)
    rows_in = operand(chain.dispatch, "x")
    _, offsets, order = (r.name for r in chain.dispatch.results)
    weights = match.value("weights")
    top_k = builder.type_of(weights).shape[-1]
    scope = match.root.scope

    def quantized(quantize: Op | None) -> tuple[str | None, dict[str, AttrValue]]:
        if quantize is None:
            return None, {}
        return operand(quantize, "input_scale"), {"act_format": quantize.attrs.str("format")}

    up_scale, up_attrs = quantized(chain.up_quantize)
    (hidden,) = builder.op_named(
        "moe_expert_up",
        {"x": rows_in, "order": order, "offsets": offsets, "weight": operand(chain.up_gemm, "weight"),
         "input_scale": up_scale},
        present({"top_k": top_k, "activation": chain.activation.attrs.str("kind"), **up_attrs,
                 "out_dtype": chain.up_gemm.attrs.get("out_dtype")}), scope)
    down_scale, down_attrs = quantized(chain.down_quantize)
    builder.op_named(
        "moe_expert_down",
        {"hidden": hidden, "order": order, "offsets": offsets, "weight": operand(chain.down_gemm, "weight"),
         "weights": weights, "input_scale": down_scale},
        present({"top_k": top_k, **down_attrs, "out_dtype": chain.down_gemm.attrs.get("out_dtype")}),
        scope, match.results)


FUSE_EXPERTS = Rule("fuse_experts", op("moe_combine", y=value("y"), order=value("order"), weights=value("weights")),
                    _fuse_experts, lambda match: expert_chain(match) is not None)


def _router_fusable(match: Match) -> bool:
    dispatch, router = match.root, match.ops["router"]
    assert match.graph is not None and match.builder is not None
    rows = dispatch.results[0].name
    return (not match.graph.users(rows) and len(match.users("router")) == 1
            and match.builder.can_drop(router))


def _fuse_router(match: Match, builder: GraphBuilder) -> None:
    dispatch, router = match.root, match.ops["router"]
    builder.drop(router)
    _, offsets, order = (r.name for r in dispatch.results)
    builder.op_named(
        "moe_route", {"x": operand(router, "x"), "weight": operand(router, "weight"), "bias": operand(router, "bias")},
        {**{k: v for k, v in router.attrs.items if k != KERNEL_ATTR}, "num_experts": dispatch.attrs.int("num_experts")}, router.scope,
        [*(r.name for r in router.results), offsets, order])


FUSE_ROUTER = Rule("fuse_router", op("moe_dispatch", ids=op("moe_router", capture="router")), _fuse_router,
                   _router_fusable)


@dataclass(frozen=True)
class FuseExperts(RewritePass):
    name: ClassVar[str] = "fuse_experts"

    def rules(self) -> Sequence[Rule]:
        return (FUSE_EXPERTS,)


@dataclass(frozen=True)
class FuseRouter(RewritePass):
    name: ClassVar[str] = "fuse_router"

    def rules(self) -> Sequence[Rule]:
        return (FUSE_ROUTER,)
