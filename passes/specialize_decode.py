"""specialize_decode: the graph for one-token decode steps. Mamba layers switch from the chunked
SSD scan to the single-step recurrence (constant cost per token, whatever the context length);
every downstream type is re-inferred (the step keeps the activation dtype, the scan is fp32).
One rewrite rule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from nemocompile.graph.builder import GraphBuilder

from .rewrite import Match, RewritePass, Rule, op


def _single_step(match: Match, builder: GraphBuilder) -> None:
    scan = match.root
    attrs = {key: value for key, value in scan.attrs.items if key != "chunk_size"}
    builder.reemit(scan, "ssd_state_update", attrs)


SCAN_TO_STEP = Rule("ssd_state_update", op("ssd_chunk_scan"), _single_step)


@dataclass(frozen=True)
class SpecializeDecode(RewritePass):
    name: ClassVar[str] = "specialize_decode"

    def rules(self) -> Sequence[Rule]:
        return (SCAN_TO_STEP,)
