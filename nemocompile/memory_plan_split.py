"""What one rank holds of each weight and each state slot, by the rule the shard pass splits them
with (issue 12): query heads, Mamba heads and channels, dense, shared and latent MLP columns and
the vocabulary over the `tp` ranks; routed experts over the `ep` ranks; KV heads replicated when
there are fewer of them than ranks (each rank holds one), Mamba groups likewise; norms, routers,
per-tensor activation scales and row-parallel biases replicated.

The memory plan asks this module for per-rank shapes only, so once the shard pass writes per-rank
graphs, `rank_weight_bytes` and `rank_state_shape` can read those graphs' types instead. Where a
count does not divide, the largest rank's share (rounded up) is planned; the shard pass decides
whether such a split is allowed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType

from nemocompile.base.errors import IRError, UsageError
from nemocompile.graph.config import ModelConfig
from nemocompile.graph.ir import StateSlot, Weight
from nemocompile.graph.nemotron_h import BLOCK_WEIGHTS
from nemocompile.graph.storage import stored_nbytes

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Parallelism:
    """How the ranks split the model: `tp` ranks split heads, channels and the vocabulary, `ep`
    ranks split the routed experts (each 1 or the world size, as --tp and --ep)."""

    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for option, value in (("tp", self.tp), ("ep", self.ep)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"--{option} must be an integer of at least 1, got {value!r}")

    @property
    def world_size(self) -> int:
        return max(self.tp, self.ep)

    @property
    def communicators(self) -> int:
        """Process groups the ranks talk in: none alone, one when tp and ep span the same ranks."""
        if self.world_size == 1:
            return 0
        return 1 if self.tp == self.ep else 2


def share(count: int, ranks: int) -> int:
    """The largest rank's share of `count` items split over `ranks`."""
    return -(-count // ranks)


def local_kv_heads(c: ModelConfig, tp: int) -> int:
    """KV heads per rank: split when there are at least as many as ranks, else one per rank
    (each KV head replicated on the ranks whose query heads read it)."""
    return share(c.num_key_value_heads, tp) if c.num_key_value_heads >= tp else 1


def local_mamba_groups(c: ModelConfig, tp: int) -> int:
    """B/C groups per rank: split like KV heads (a rank needs the group its heads read)."""
    return share(c.n_groups, tp) if c.n_groups >= tp else 1


def _mamba_heads(c: ModelConfig, tp: int) -> int:
    return share(c.mamba_num_heads, tp)


def mamba_channels(c: ModelConfig, tp: int) -> int:
    """Conv channels per rank: x of its heads, then B and C of its groups."""
    return _mamba_heads(c, tp) * c.mamba_head_dim + 2 * local_mamba_groups(c, tp) * c.ssm_state_size


def _in_proj_rows(c: ModelConfig, tp: int) -> int:
    """in_proj rows per rank, in its layout (z, x, B, C, dt)."""
    heads = _mamba_heads(c, tp)
    return heads * c.mamba_head_dim + mamba_channels(c, tp) + heads


Rule = Callable[[ModelConfig, Parallelism, Shape], Shape]


def _rows(count: Callable[[ModelConfig, int], int]) -> Rule:
    return lambda c, p, s: (count(c, p.tp), *s[1:])


def _cols(count: Callable[[ModelConfig, int], int]) -> Rule:
    return lambda c, p, s: (*s[:-1], count(c, p.tp))


def _split_rows(c: ModelConfig, p: Parallelism, s: Shape) -> Shape:
    return (share(s[0], p.tp), *s[1:])


def _split_cols(c: ModelConfig, p: Parallelism, s: Shape) -> Shape:
    return (*s[:-1], share(s[-1], p.tp))


def _experts(c: ModelConfig, p: Parallelism, s: Shape) -> Shape:
    return (share(s[0], p.ep), *s[1:])


def _replicated(c: ModelConfig, p: Parallelism, s: Shape) -> Shape:
    return s


def _query_width(c: ModelConfig, tp: int) -> int:
    return share(c.num_attention_heads, tp) * c.head_dim


def _kv_width(c: ModelConfig, tp: int) -> int:
    return local_kv_heads(c, tp) * c.head_dim


def _mamba_width(c: ModelConfig, tp: int) -> int:
    return _mamba_heads(c, tp) * c.mamba_head_dim


# Weight key (the last component of its graph name; `mixer.norm` for the Mamba block's gated
# norm) -> its shape on one rank. A weight not listed is replicated.
RULES: Mapping[str, Rule] = MappingProxyType({
    "embeddings": _split_rows, "lm_head": _split_rows,  # vocabulary-parallel
    "q_proj": _rows(_query_width), "o_proj": _cols(_query_width),
    "k_proj": _rows(_kv_width), "v_proj": _rows(_kv_width),
    "in_proj": _rows(_in_proj_rows), "in_proj_bias": _rows(_in_proj_rows),
    "conv1d": _rows(mamba_channels), "conv1d_bias": _rows(mamba_channels),
    "dt_bias": _rows(_mamba_heads), "A_log": _rows(_mamba_heads), "D": _rows(_mamba_heads),
    "mixer.norm": _rows(_mamba_width), "out_proj": _cols(_mamba_width),
    # column- then row-parallel: the first GEMM's rows (and bias), the second's columns
    "up_proj": _split_rows, "up_proj_bias": _split_rows, "down_proj": _split_cols,
    "shared_up": _split_rows, "shared_up_bias": _split_rows, "shared_down": _split_cols,
    "fc1_latent": _split_rows, "fc1_latent_bias": _split_rows, "fc2_latent": _split_cols,
    "experts_up": _experts, "experts_down": _experts,
    # replicated: every rank routes all of its tokens; row-parallel biases are added once
    # after the reduction; norms are per token
    "router": _replicated, "router_bias": _replicated, "norm": _replicated, "norm_f": _replicated,
    "out_proj_bias": _replicated, "down_proj_bias": _replicated, "shared_down_bias": _replicated,
    "fc2_latent_bias": _replicated,
})
INPUT_SCALE_SUFFIX = ".input_scale"


def weight_key(name: str) -> str:
    if name.endswith(".mixer.norm"):
        return "mixer.norm"
    return name.rsplit(".", 1)[-1]


def rank_shape(name: str, shape: Shape, c: ModelConfig, p: Parallelism) -> Shape:
    """The shape one rank (the largest) holds of weight `name`."""
    if name.endswith(INPUT_SCALE_SUFFIX):
        # per-expert activation scales go with their experts; per-tensor ones are replicated
        owner = weight_key(name.removesuffix(INPUT_SCALE_SUFFIX))
        return _experts(c, p, shape) if owner.startswith("experts_") and shape else shape
    return RULES.get(weight_key(name), _replicated)(c, p, shape)


def _numel(shape: Shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def mtp_rank_fraction(c: ModelConfig, p: Parallelism) -> Fraction:
    """The share of the multi-token-prediction blocks one rank holds: their blocks split as the
    model's are, eh_proj column-parallel, their norms replicated."""
    hidden = c.hidden_size
    shapes: list[tuple[str, Shape]] = [("eh_proj", (hidden, 2 * hidden))] + [("norm", (hidden,))] * 3
    for kind in c.mtp_layer_kinds:
        shapes.append(("norm", (hidden,)))
        shapes += [(spec.name, spec.shape) for spec in BLOCK_WEIGHTS[kind](c, "mtp.mixer", "mtp.mixer")]
    total = sum(_numel(shape) for _, shape in shapes)
    local = sum(_numel(_split_rows(c, p, shape) if name == "eh_proj" else rank_shape(name, shape, c, p))
                for name, shape in shapes)
    return Fraction(local, total) if total else Fraction(1)


def rank_weight_bytes(weight: Weight, c: ModelConfig, p: Parallelism, mtp_fraction: Fraction) -> int:
    """Stored bytes of `weight` on the largest rank, at its format (scales included)."""
    full = stored_nbytes(weight.type)
    if weight.category == "mtp":  # checkpoint tensors carried as they are: split as their blocks are
        return -(-full * mtp_fraction.numerator // mtp_fraction.denominator)
    shape = tuple(int(d) for d in weight.type.shape)
    local = rank_shape(weight.name, shape, c, p)
    if local == shape:
        return full
    try:
        return stored_nbytes(weight.type.with_(shape=local))
    except IRError:  # a split that leaves a quantization block across ranks: proportional share
        return -(-full * _numel(local) // _numel(shape))


def rank_weight_bytes_by_category(weights: tuple[Weight, ...], c: ModelConfig, p: Parallelism,
                                  extra_mtp_bytes: int = 0) -> dict[str, int]:
    """Bytes per category on the largest rank; `extra_mtp_bytes` are MTP bytes known only from
    config.json (plan mode)."""
    fraction = mtp_rank_fraction(c, p)
    out: dict[str, int] = {}
    for weight in weights:
        out[weight.category] = out.get(weight.category, 0) + rank_weight_bytes(weight, c, p, fraction)
    if extra_mtp_bytes:
        out["mtp"] = out.get("mtp", 0) + -(-extra_mtp_bytes * fraction.numerator // fraction.denominator)
    return out


def rank_state_shape(slot: StateSlot, c: ModelConfig, p: Parallelism) -> tuple[int | str, ...]:
    """One rank's shape of a state slot: KV heads, conv channels or SSM heads (dim 1) split."""
    local = {"kv": local_kv_heads(c, p.tp), "conv": mamba_channels(c, p.tp),
             "ssm": _mamba_heads(c, p.tp)}[slot.kind]
    batch, _, *rest = slot.type.shape
    return (batch, local, *rest)


def per_sequence_bytes(slot: StateSlot, c: ModelConfig, p: Parallelism) -> int:
    """Bytes of one sequence's slot on one rank; per token of context for a KV slot (`ctx` dim)."""
    count = 1
    for dim in rank_state_shape(slot, c, p)[1:]:
        if isinstance(dim, int):
            count *= dim
        elif dim != "ctx":
            raise IRError(f"state {slot.name} has the symbolic dim {dim!r} besides batch and ctx")
    return count * slot.type.dtype.bits // 8
