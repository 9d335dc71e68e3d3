"""Communication ops and the rank-local ops of a sharded graph (passes/shard.py makes them).

A sharded graph is one rank's program: every rank runs the same ops on its own pieces of the
weights and state. These ops are where ranks meet (`all_reduce`, `all_gather`, `reduce_scatter`,
`all_to_all`, over the ranks of mesh axis `axis`, `parts` of them) or where a rank's work depends
on which rank it is (`vocab_embedding`, `local_experts`). Their reference implementations
(runtime/reference/comm.py) run on torch.distributed; with one rank each is the identity."""

from __future__ import annotations

from collections.abc import Sequence

from nemocompile.base.errors import IRError

from .ir import Attrs
from .opdef import define, require
from .types import I64, MESH_AXES, TensorType

Types = Sequence[TensorType | None]
_MESH = [("axis", "str"), ("parts", "int")]


def _verify_mesh(types: Types, attrs: Attrs) -> str | None:
    if attrs.str("axis") not in MESH_AXES:
        return f"axis {attrs.str('axis')!r} is not one of {', '.join(MESH_AXES)}"
    if attrs.int("parts") < 1:
        return f"parts must be a positive rank count, got {attrs.int('parts')}"
    return None


def _verify_dim(types: Types, attrs: Attrs) -> str | None:
    problem = _verify_mesh(types, attrs)
    if problem:
        return problem
    x, dim = require(types, 0), attrs.int("dim")
    if not 0 <= dim < x.rank:
        return f"dim {dim} is not a dim of {x}"
    return None


def _same(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    return (require(types, 0),)


def _resized(types: Types, attrs: Attrs, grow: bool) -> tuple[TensorType, ...]:
    x, dim, parts = require(types, 0), attrs.int("dim"), attrs.int("parts")
    if not 0 <= dim < x.rank:
        raise IRError(f"dim {dim} is not a dim of {x}")
    size = x.shape[dim]
    if isinstance(size, int):
        if not grow and size % parts:
            raise IRError(f"dim {dim} of {x} does not split into {parts} equal parts")
        size = size * parts if grow else size // parts
    return (x.with_(shape=(*x.shape[:dim], size, *x.shape[dim + 1:])),)


define("all_reduce", "core", ["x"], ["out"], _MESH, infer=_same, verify=_verify_mesh,
       doc="the sum of x over the ranks of axis, on every rank (accumulated in fp32, result in x's dtype)")
define("all_gather", "core", ["x"], ["out"], [*_MESH, ("dim", "int")],
       infer=lambda types, attrs: _resized(types, attrs, grow=True), verify=_verify_dim,
       doc="every rank's x concatenated along dim in rank order, on every rank")
define("reduce_scatter", "core", ["x"], ["out"], [*_MESH, ("dim", "int")],
       infer=lambda types, attrs: _resized(types, attrs, grow=False), verify=_verify_dim,
       doc="the sum of x over the ranks of axis, split into parts equal pieces along dim: rank r keeps piece r")
define("all_to_all", "core", ["x"], ["out"], [*_MESH, ("dim", "int")], infer=_same, verify=_verify_dim,
       doc="x split into parts equal pieces along dim; rank r sends piece j to rank j and concatenates what it "
           "receives along dim in rank order")


def _infer_vocab_embedding(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    ids, table = require(types, 0), require(types, 1)
    if ids.dtype.is_float:
        raise IRError(f"vocab_embedding ids must be integers, got {ids.dtype}")
    if table.rank != 2:
        raise IRError(f"vocab_embedding table must be [vocab / parts, hidden], got {table}")
    return (TensorType(table.dtype, (*ids.shape, table.shape[1])),)


define("vocab_embedding", "core", ["ids:index", "table:weight"], ["out"], _MESH,
       infer=_infer_vocab_embedding, verify=_verify_mesh,
       doc="rank r holds rows [r * V/parts, (r + 1) * V/parts) of the table: out[b, s] is table row ids[b, s] when "
           "this rank holds it, else zeros (a partial sum; all_reduce completes it)")


def _infer_local_experts(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    offsets, order = require(types, 0), require(types, 1)
    experts, parts = attrs.int("num_experts"), attrs.int("parts")
    if experts % parts:
        raise IRError(f"{experts} experts do not split into {parts} equal parts")
    if offsets.rank != 1 or order.rank != 1 or offsets.dtype.is_float or order.dtype.is_float:
        raise IRError(f"local_experts takes integer offsets and order vectors, got {offsets} and {order}")
    return (TensorType(I64, (experts // parts + 1,)), TensorType(I64, ("routed",)))


define("local_experts", "core", ["offsets:index", "order:index"], ["local_offsets", "local_order"],
       [*_MESH, ("num_experts", "int")], infer=_infer_local_experts, verify=_verify_mesh,
       doc="the rows of this rank's experts (rank r holds experts [r * E/parts, (r + 1) * E/parts)): their "
           "token-expert pairs of order and their offsets, rebased to start at 0")
