"""fuse_mamba_chain: the Mamba2 chain's causal conv1d with the SiLU after it (rule `conv1d_silu`):
activation{silu}(causal_conv1d(...)) -> causal_conv1d {activation = "silu"}, which keeps the
conv's state update. The gated RMSNorm (x * silu(gate), normalised per group) is one op,
`gated_rms_norm`, from decomposition on: nothing is left to fuse there."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from nemocompile.graph.builder import GraphBuilder

from .rewrite import Match, RewritePass, Rule, op


def _fusable(match: Match) -> bool:
    assert match.builder is not None
    return len(match.users("conv")) == 1 and match.builder.can_drop(match.ops["conv"])


def _fuse(match: Match, builder: GraphBuilder) -> None:
    activation, conv = match.root, match.ops["conv"]
    builder.drop(conv)
    attrs = {**{k: v for k, v in conv.attrs.items if v is not None}, "activation": "silu"}
    builder.op(conv.opname, conv.operands, attrs, conv.scope, [activation.results[0].name, conv.results[1].name])


CONV1D_SILU = Rule("conv1d_silu", op("activation", attrs={"kind": "silu"},
                                     x=op("causal_conv1d", capture="conv", attrs={"activation": None})),
                   _fuse, _fusable)


@dataclass(frozen=True)
class FuseMambaChain(RewritePass):
    name: ClassVar[str] = "fuse_mamba_chain"

    def rules(self) -> Sequence[Rule]:
        return (CONV1D_SILU,)
