"""What the cost model and the tuning key need of an op beyond its kernels' constexprs: the sizes a
kernel takes as runtime arguments (channels, heads, the router's hidden width, ...) and the phase
of the graph it runs in.

A GEMM template's constexprs hold its whole problem (N, K, experts), so its workload is empty. The
other templates take some sizes at run time: two causal convs with the same taps but different
channel counts share their constexprs, yet they are different problems, so those sizes go into the
problem key. The phase matters where a call of `tokens` tokens has a different shape in the two
graphs: in the decode graph it is `tokens` sequences of one token (over a cache of
DECODE_CONTEXT positions for attention), in the prefill graph one sequence of `tokens` tokens."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nemocompile.base.errors import IRError
from nemocompile.graph.ir import Op
from nemocompile.graph.types import TensorType

# Templates whose call shape differs between the decode and the prefill graph.
PHASED = frozenset({"causal_conv1d", "attention_gqa", "kv_cache_write"})
# The cache positions a decode step attends to in the model (a stated assumption of the model).
DECODE_CONTEXT = 1024


@dataclass(frozen=True)
class Workload:
    """Runtime sizes of one op (sorted name -> value pairs) and whether it is in the decode graph."""

    dims: tuple[tuple[str, int], ...] = ()
    decode: bool = False

    def get(self, name: str) -> int:
        found = dict(self.dims)
        if name not in found:
            raise IRError(f"the cost model needs the size {name!r}, which this op's workload lacks "
                          f"(it has {', '.join(found) or 'none'})")
        return found[name]

    def key_fields(self, entry: str) -> dict[str, object]:
        """What goes into the tuning key's problem next to the constexprs."""
        fields: dict[str, object] = {f"dim.{name}": value for name, value in self.dims}
        if entry in PHASED:
            fields["phase"] = "decode" if self.decode else "prefill"
        return fields

    def sequences(self, tokens: int) -> tuple[int, int]:
        """(sequences, tokens per sequence) of a call of `tokens` tokens."""
        return (tokens, 1) if self.decode else (1, tokens)


GEMM = Workload()


def _shape(types: Mapping[str, TensorType], op: Op, index: int) -> tuple[int, ...]:
    value = op.operands[index] if index < len(op.operands) else None
    if value is None or value not in types:
        raise IRError(f"{op.opname} at {op.scope}: operand {index} has no type for the cost model")
    shape = types[value].shape
    if not all(isinstance(d, int) for d in shape):
        raise IRError(f"{op.opname} at {op.scope}: operand {index} has a symbolic dim in {types[value]}")
    return tuple(int(d) for d in shape)  # type: ignore[arg-type]


def workload_of(op: Op, types: Mapping[str, TensorType], decode: bool) -> Workload:
    """The workload of `op` (its graph's value types; decode: whether the graph is the decode one)."""
    at = op.attrs
    dims: dict[str, int] = {}
    if op.opname == "causal_conv1d":
        dims["channels"] = _shape(types, op, 1)[0]
    elif op.opname in ("ssd_chunk_scan", "ssd_state_update"):
        dims.update({name: at.int(name) for name in ("num_heads", "head_dim", "n_groups", "state_size")})
    elif op.opname == "attention_gqa":
        dims.update({name: at.int(name) for name in ("num_heads", "num_kv_heads", "head_dim")})
    elif op.opname == "moe_route":
        experts, hidden = _shape(types, op, 1)
        dims.update({"experts": experts, "hidden": hidden, "top_k": at.int("top_k")})
    return Workload(tuple(sorted(dims.items())), decode)
