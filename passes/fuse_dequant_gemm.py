"""fuse_dequant_gemm: a `quantize` that feeds a GEMM (and nothing else) is folded into it, so the
kernel quantizes its activations as it loads them and the quantized copy never reaches memory.

Rules: `quant_linear` (quantize -> linear => quant_linear) and `quant_grouped_gemm` (quantize with
the GEMM's expert offsets -> grouped_gemm => quant_grouped_gemm). Each keeps the quantize's
format as `act_format`, its scale as `input_scale`, and the GEMM's out_dtype. The weights'
dequantization already happens inside every GEMM of a quantized weight (W4A16, W8A16): there is
no separate dequantize op to fold. Runs after fuse_experts and fuse_add_rms_norm, which absorb the
quantizes of the routed experts and of the norms."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from nemocompile.graph.builder import GraphBuilder
from nemocompile.graph.opdef import operand

from .rewrite import ABSENT, Match, RewritePass, Rule, op, value


def _foldable(match: Match) -> bool:
    assert match.builder is not None
    quantize = match.ops["q"]
    if match.root.opname == "grouped_gemm" and operand(quantize, "offsets") != operand(match.root, "offsets"):
        return False
    return len(match.users("q")) == 1 and match.builder.can_drop(quantize)


def _fold(match: Match, builder: GraphBuilder) -> None:
    gemm, quantize = match.root, match.ops["q"]
    builder.drop(quantize)
    attrs = {"act_format": quantize.attrs.str("format"), "out_dtype": gemm.attrs.str("out_dtype")}
    scale = operand(quantize, "input_scale")
    if gemm.opname == "linear":
        builder.op_named("quant_linear", {"x": operand(quantize, "x"), "weight": operand(gemm, "weight"),
                                          "input_scale": scale, "bias": operand(gemm, "bias")},
                         attrs, gemm.scope, match.results)
    else:
        builder.op_named("quant_grouped_gemm", {"x": operand(quantize, "x"), "offsets": operand(gemm, "offsets"),
                                                "weight": operand(gemm, "weight"), "input_scale": scale},
                         attrs, gemm.scope, match.results)


QUANT_LINEAR = Rule("quant_linear", op("linear", x=op("quantize", capture="q", offsets=ABSENT)), _fold, _foldable)
QUANT_GROUPED_GEMM = Rule("quant_grouped_gemm", op("grouped_gemm", x=op("quantize", capture="q", offsets=value())),
                          _fold, _foldable)


@dataclass(frozen=True)
class FuseDequantGemm(RewritePass):
    name: ClassVar[str] = "fuse_dequant_gemm"

    def rules(self) -> Sequence[Rule]:
        return (QUANT_LINEAR, QUANT_GROUPED_GEMM)
