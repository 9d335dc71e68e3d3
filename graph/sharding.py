"""How a Nemotron-H graph is split over ranks: the sharding of every weight and state slot for a
tensor-parallel degree `tp` and an expert-parallel degree `ep` (each 1 or the world size), the
checks that refuse a world size the model does not divide (naming the sizes it does), and the
rank's view of a sharded graph (weights and state as each rank holds them).

Per kind (passes/shard.py applies it and adds the communication):
- attention: q_proj split by query heads; k_proj / v_proj and the KV cache split by KV heads, or,
  with fewer KV heads than ranks, each rank holding the one KV head its query heads read
  (`pieces`); o_proj split by its input (row-parallel, a partial sum).
- Mamba: in_proj's rows (z, x, B, C, dt), the conv channels (x, B, C) and their biases split block
  by block (`blocks`), so each rank holds whole heads and whole groups; dt_bias, A_log, D, the
  gated norm's weight and the SSM state split by head; out_proj row-parallel.
- dense MLP and shared expert: up column-parallel, down row-parallel.
- embeddings and lm_head: split by vocabulary rows.
- routed experts (and their per-expert input scales): split by expert over the `ep` ranks.
- a row-parallel GEMM's bias: held by rank 0 (`partial`), so the all-reduce adds it once.
- norms, the router, the latent projections, scalar scales: whole on every rank."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from nemocompile.base.errors import IRError, UsageError

from .ir import Graph, StateSlot, Weight
from .types import Sharding, TensorType

INPUT_SCALE = ".input_scale"
COLUMN = frozenset({"q_proj", "up_proj", "shared_up", "up_proj_bias", "shared_up_bias"})
ROW = frozenset({"o_proj", "down_proj", "shared_down", "out_proj"})
ROW_BIAS = frozenset({"out_proj_bias", "down_proj_bias", "shared_down_bias"})
KV = frozenset({"k_proj", "v_proj"})
MAMBA_HEADS = frozenset({"dt_bias", "A_log", "D", "norm"})  # `norm` inside a Mamba mixer: the gated norm
MAMBA_IN = frozenset({"in_proj", "in_proj_bias"})
MAMBA_CONV = frozenset({"conv1d", "conv1d_bias"})
EXPERTS = frozenset({"experts_up", "experts_down"})
VOCAB = frozenset({"embeddings", "lm_head"})
# quantized formats whose scales are blocks along the input dim: a row-parallel piece must hold whole blocks
BLOCKED_INPUT = {"nvfp4": 16}
COUNT_ATTRS = ("num_heads", "n_groups", "num_kv_heads")  # attributes the shard pass makes rank-local


@dataclass(frozen=True)
class Layout:
    """Ranks per mesh axis: tensor parallel and expert parallel, each 1 or the world size."""

    world_size: int
    tp: int
    ep: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise UsageError(f"--world-size must be at least 1, got {self.world_size}")
        for option, value in (("--tp", self.tp), ("--ep", self.ep)):
            if value not in (1, self.world_size):
                raise UsageError(f"{option} must be 1 or the world size {self.world_size}, got {value}")

    @staticmethod
    def of(world_size: int, tp: int | None = None, ep: int | None = None) -> Layout:
        """The layout for the options given: tp and ep default to the world size."""
        return Layout(world_size, world_size if tp is None else tp, world_size if ep is None else ep)

    @property
    def sharded(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class _Mixer:
    kind: str  # "mamba" or "attention"
    heads: int
    head_dim: int
    groups: int = 0
    state: int = 0
    kv_heads: int = 0


def _mixers(graph: Graph) -> dict[str, _Mixer]:
    """Each Mamba and attention scope's head counts, from its block op or the core ops it became."""
    found: dict[str, _Mixer] = {}
    for op in graph.ops:
        a = op.attrs
        if op.opname in ("mamba2_mixer", "ssd_chunk_scan", "ssd_state_update"):
            found[op.scope] = _Mixer("mamba", a.int("num_heads"), a.int("head_dim"), a.int("n_groups"),
                                     a.int("state_size"))
        elif op.opname in ("attention", "attention_gqa"):
            found[op.scope] = _Mixer("attention", a.int("num_heads"), a.int("head_dim"),
                                     kv_heads=a.int("num_kv_heads"))
    return found


def _split(parts: int, dim: int, pieces: int | None = None, blocks: Iterable[int] = (), axis: str = "tp") -> Sharding:
    return Sharding(axis, parts, dim, pieces=pieces, blocks=tuple(blocks))


def _kv_pieces(kv_heads: int, tp: int) -> int | None:
    return kv_heads if kv_heads < tp else None


def weight_sharding(weight: Weight, mixers: dict[str, _Mixer], layout: Layout) -> Sharding | None:
    """How `weight` is split over the ranks (None: whole on every rank)."""
    tp, ep = layout.tp, layout.ep
    name = weight.name.removesuffix(INPUT_SCALE)
    scope, _, leaf = name.rpartition(".")
    if weight.name.endswith(INPUT_SCALE):  # an activation scale: per expert when the experts are split
        return _split(ep, 0, axis="ep") if leaf in EXPERTS and ep > 1 and weight.type.rank == 1 else None
    if leaf in EXPERTS:
        return _split(ep, 0, axis="ep") if ep > 1 else None
    if tp == 1:
        return None
    mixer = mixers.get(scope)
    if leaf in VOCAB and not scope:
        return _split(tp, 0)
    if leaf in COLUMN:
        return _split(tp, 0)
    if leaf in ROW:
        return _split(tp, weight.type.rank - 1)
    if leaf in ROW_BIAS:
        return Sharding("tp", tp, partial=True)
    if mixer is None:
        return None
    if mixer.kind == "attention" and leaf in KV:
        return _split(tp, 0, _kv_pieces(mixer.kv_heads, tp))
    if mixer.kind != "mamba":
        return None
    inner, grouped = mixer.heads * mixer.head_dim, mixer.groups * mixer.state
    if leaf in MAMBA_IN:
        return _split(tp, 0, blocks=(inner, inner, grouped, grouped, mixer.heads))
    if leaf in MAMBA_CONV:
        return _split(tp, 0, blocks=(inner, grouped, grouped))
    if leaf in MAMBA_HEADS:
        return _split(tp, 0)
    return None


def state_sharding(slot: StateSlot, mixers: dict[str, _Mixer], layout: Layout) -> Sharding | None:
    """KV cache split by KV heads (dim 1), conv window by channel blocks (dim 1), SSM state by head."""
    if layout.tp == 1:
        return None
    mixer = mixers.get(slot.name.rsplit(".", 1)[0] + ".mixer")
    if mixer is None:
        return None
    if slot.kind == "kv":
        return _split(layout.tp, 1, _kv_pieces(mixer.kv_heads, layout.tp))
    inner, grouped = mixer.heads * mixer.head_dim, mixer.groups * mixer.state
    if slot.kind == "conv":
        return _split(layout.tp, 1, blocks=(inner, grouped, grouped))
    return _split(layout.tp, 1)


def _count_problems(mixers: dict[str, _Mixer], layout: Layout) -> list[str]:
    problems = []
    tp = layout.tp
    for scope, mixer in mixers.items():
        if mixer.kind == "mamba":
            for what, count in (("Mamba heads", mixer.heads), ("Mamba groups (n_groups)", mixer.groups)):
                if count % tp:
                    problems.append(f"{scope} has {count} {what}, which {tp} tensor-parallel ranks do not divide")
        else:
            if mixer.heads % tp:
                problems.append(f"{scope} has {mixer.heads} attention heads, which {tp} tensor-parallel ranks do "
                                f"not divide")
            if mixer.kv_heads % tp and tp % mixer.kv_heads:
                problems.append(f"{scope} has {mixer.kv_heads} KV heads: {tp} ranks must divide them or be a "
                                f"multiple of them")
    return problems


def _sharded_type(type_: TensorType, sharding: Sharding | None, what: str) -> TensorType:
    try:
        return type_.with_(sharding=sharding)
    except IRError as error:
        raise UsageError(f"{what} {type_} cannot be split: {error}") from None


def problems(graph: Graph, layout: Layout) -> list[str]:
    """Why `graph` cannot be split this way (empty when it can)."""
    mixers = _mixers(graph)
    found = _count_problems(mixers, layout)
    for weight in graph.weights:
        try:
            sharding = weight_sharding(weight, mixers, layout)
            sharded = _sharded_type(weight.type, sharding, f"weight {weight.name}")
        except (UsageError, IRError) as error:
            found.append(f"weight {weight.name} cannot be split: {error}" if isinstance(error, IRError) else str(error))
            continue
        block = BLOCKED_INPUT.get(weight.type.dtype.name)
        if block and sharding is not None and sharding.dim == weight.type.rank - 1:
            width = sharded.local_shape()[-1]
            if isinstance(width, int) and width % block:
                found.append(f"weight {weight.name} is {weight.type.dtype.name}: each rank's {width} input columns "
                             f"are not whole blocks of {block}")
    for slot in graph.states:
        try:
            _sharded_type(slot.type, state_sharding(slot, mixers, layout), f"state {slot.name}")
        except (UsageError, IRError) as error:
            found.append(f"state {slot.name} cannot be split: {error}" if isinstance(error, IRError) else str(error))
    return found


def valid_world_sizes(graph: Graph, layout: Layout, limit: int = 64) -> list[int]:
    """The world sizes up to `limit` that split `graph` the way `layout` does (tp and ep each 1 or all)."""
    return [n for n in range(1, limit + 1)
            if not problems(graph, Layout(n, n if layout.tp > 1 else 1, n if layout.ep > 1 else 1))]


def check_layout(graph: Graph, layout: Layout) -> None:
    """Refuse, in one sentence that lists the valid choices, a layout the model does not divide."""
    if not layout.sharded:
        return
    found = problems(graph, layout)
    if found:
        valid = valid_world_sizes(graph, layout)
        raise UsageError(f"--world-size {layout.world_size} (tp={layout.tp}, ep={layout.ep}) does not split this "
                         f"model: {found[0]}; valid world sizes: {', '.join(map(str, valid))}")


def shard_declarations(graph: Graph, layout: Layout) -> tuple[list[Weight], list[StateSlot]]:
    """The graph's weights and state slots with their shardings (checked first)."""
    check_layout(graph, layout)
    mixers = _mixers(graph)
    weights = [dataclasses.replace(w, type=w.type.with_(sharding=weight_sharding(w, mixers, layout)))
               for w in graph.weights]
    states = [dataclasses.replace(s, type=s.type.with_(sharding=state_sharding(s, mixers, layout)))
              for s in graph.states]
    return weights, states


def rank_view(graph: Graph) -> Graph:
    """`graph` with every weight and state slot as one rank holds it (local shapes, no sharding):
    what a rank's weight file stores and its cache allocates."""
    if not any(w.type.sharding for w in graph.weights) and not any(s.type.sharding for s in graph.states):
        return graph
    weights = tuple(dataclasses.replace(w, type=w.type.local()) for w in graph.weights)
    states = tuple(dataclasses.replace(s, type=s.type.local()) for s in graph.states)
    return dataclasses.replace(graph, weights=weights, states=states)


def local_count(key: str, value: int, tp: int) -> int:
    """A head or group count as one rank's ops hold it (KV heads: at least the one its queries read)."""
    if key == "num_kv_heads":
        return max(1, value // tp)
    return value // tp
