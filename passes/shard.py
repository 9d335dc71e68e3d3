"""shard: one rank's program of a tensor- and expert-parallel engine (graph/sharding.py says how
each weight and state slot is split). Every rank runs the graph this pass writes on its own pieces:

- weights and state slots carry their sharding (`shard<tp=2, dim=0>`); ops see the rank's piece,
  and the head and group counts of attention and Mamba ops (and the Mamba splits) become the
  rank's own;
- a row-parallel GEMM (o_proj, out_proj, down_proj, shared_down) and the routed experts of a
  rank give a partial sum; partial sums that are added (the routed and the shared expert) stay
  partial, and one `all_reduce` completes a value where anything else reads it;
- the embedding becomes `vocab_embedding` (rows of other ranks give zeros) + `all_reduce`; the
  lm_head's logits, split by vocabulary, are put together by `all_gather`;
- the routed experts: every rank routes every token (the router is replicated and its input is
  the same on every rank), `local_experts` keeps the token-expert pairs of the rank's experts, and
  the experts' partial sum joins the shared expert's in one all-reduce (docs/distributed.md says
  why this beats an all-to-all dispatch here).
Counts: the communication ops added and the weights split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from nemocompile.graph.builder import GraphBuilder
from nemocompile.graph.ir import AttrValue, Graph, Op
from nemocompile.graph.opdef import opdef
from nemocompile.graph.sharding import COUNT_ATTRS, EXPERTS, VOCAB, Layout, local_count, shard_declarations

from .base import Pass, PassOutput

GEMMS = ("linear", "quant_linear")
EXPERT_OPS = ("moe_expert_up", "moe_expert_down")


@dataclass(frozen=True)
class Shard(Pass):
    name: ClassVar[str] = "shard"
    world_size: int = 1
    tp: int = 1
    ep: int = 1

    def apply(self, graph: Graph) -> PassOutput:
        layout = Layout(self.world_size, self.tp, self.ep)
        if not layout.sharded:
            return PassOutput(graph)
        return _Sharder(graph, layout).run()


class _Sharder:
    def __init__(self, graph: Graph, layout: Layout) -> None:
        self.graph, self.layout = graph, layout
        weights, states = shard_declarations(graph, layout)
        meta = {**dict(graph.metadata), "world_size": str(layout.world_size), "tp": str(layout.tp),
                "ep": str(layout.ep)}
        b = self.b = GraphBuilder(graph.name, meta, Shard.name)
        for value in graph.inputs:
            b.input(value.name, value.type)
        for weight in weights:
            b.add_weight(weight)
        for slot in states:
            b.state(slot.name, slot.kind, slot.type, slot.update)
        for bound in graph.dims:
            b.bound(bound.name, bound.low, bound.high)
        b.number_after([r.name for op in graph.ops for r in op.results])
        self.weights = {w.name: w for w in weights}
        self.mixer_scopes = {op.scope for op in graph.ops if any(k in op.attrs for k in COUNT_ATTRS)}
        self.partial: dict[str, str] = {}  # value -> the name of its partial sum, until all-reduced
        self.local_experts: dict[tuple[str, str], tuple[str, str]] = {}
        self.counts = {"all_reduce": 0, "all_gather": 0, "local_experts": 0, "vocab_embedding": 0,
                       "weights_split": sum(1 for w in weights if w.type.sharding is not None)}

    def run(self) -> PassOutput:
        for op in self.graph.ops:
            self.rewrite(op)
        for name in self.graph.outputs:
            self.full(name)
            self.b.output(name)
        for slot in self.graph.states:
            self.full(slot.update)
        return PassOutput(self.b.build(), self.counts)

    def full(self, name: str) -> str:
        """`name` complete on every rank: its partial sum all-reduced here, the first time it is read."""
        partial = self.partial.pop(name, None)
        if partial is not None:
            producer = self.b.producer(partial)
            self.b.op("all_reduce", [partial], {"axis": "tp" if self.layout.tp > 1 else "ep",
                                                "parts": self.layout.world_size},
                      producer.scope if producer is not None else "", [name])
            self.counts["all_reduce"] += 1
        return name

    def split_weight(self, op: Op, role_names: tuple[str, ...]) -> str | None:
        """The operand of `op` among `role_names` that is a sharded weight, if any."""
        definition = opdef(op.opname)
        for index, name in enumerate(op.operands):
            if name in self.weights and definition.operand_names[index] in role_names and \
                    self.weights[name].type.sharding is not None:
                return name
        return None

    def attrs(self, op: Op) -> dict[str, AttrValue]:
        attrs = dict(op.attrs.items)
        tp = self.layout.tp
        if tp > 1 and op.scope in self.mixer_scopes:
            for key in COUNT_ATTRS:
                if key in attrs:
                    attrs[key] = local_count(key, op.attrs.int(key), tp)
            if op.opname == "split":
                attrs["sizes"] = tuple(int(s) // tp for s in op.attrs.ints("sizes"))
        return attrs

    def rewrite(self, op: Op) -> None:
        b = self.b
        if op.opname == "add" and all(name in self.partial for name in op.operands if name is not None):
            (out,) = b.op("add", [self.partial.pop(n) for n in op.operands if n is not None], dict(op.attrs.items),
                          op.scope)
            self.partial[op.result.name] = out
            return
        operands = [None if name is None else self.full(name) for name in op.operands]
        attrs = self.attrs(op)
        weight = self.split_weight(op, ("weight", "table"))
        sharding = self.weights[weight].type.sharding if weight else None
        if op.opname == "embedding" and sharding is not None:
            (out,) = b.op("vocab_embedding", operands, {"axis": "tp", "parts": self.layout.tp}, op.scope)
            self.counts["vocab_embedding"] += 1
            self.partial[op.result.name] = out
            return
        if op.opname in GEMMS and sharding is not None and weight is not None:
            leaf = weight.rpartition(".")[2]
            if sharding.dim == 1:  # row-parallel: a partial sum
                (out,) = b.op(op.opname, operands, attrs, op.scope)
                self.partial[op.result.name] = out
                return
            if leaf in VOCAB:  # the logits, split by vocabulary
                (out,) = b.op(op.opname, operands, attrs, op.scope)
                rank = len(b.type_of(out).shape)
                b.op("all_gather", [out], {"axis": "tp", "parts": self.layout.tp, "dim": rank - 1}, op.scope,
                     [op.result.name])
                self.counts["all_gather"] += 1
                return
        if op.opname in EXPERT_OPS and weight is not None and weight.rpartition(".")[2] in EXPERTS:
            definition = opdef(op.opname)
            order_at, offsets_at = definition.index_of("order"), definition.index_of("offsets")
            order, offsets = operands[order_at], operands[offsets_at]
            assert order is not None and offsets is not None
            key = (offsets, order)
            if key not in self.local_experts:
                experts = self.weights[weight].type.shape[0]
                self.local_experts[key] = b.op("local_experts", [offsets, order],
                                               {"axis": "ep", "parts": self.layout.ep, "num_experts": experts},
                                               op.scope)  # type: ignore[assignment]
                self.counts["local_experts"] += 1
            local_offsets, local_order = self.local_experts[key]
            operands[order_at], operands[offsets_at] = local_order, local_offsets
            if op.opname == "moe_expert_down":  # this rank's experts' share of each token: a partial sum
                (out,) = b.op(op.opname, operands, attrs, op.scope)
                self.partial[op.result.name] = out
                return
        b.reemit(op, None, attrs, operands)
