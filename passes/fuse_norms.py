"""fuse_add_rms_norm: the residual add and the RMSNorm after it as one op, and with the
activation quantization that follows it (W4A4, W8A8) when the norm feeds only that `quantize`.

Rules:
- `add_rms_norm`: rms_norm(add(a, b)) -> add_rms_norm(x = b, residual = a), which defines both the
  norm's result and the sum (later layers read the sum as their residual).
- `add_rms_norm_quantize`: linear(quantize(add_rms_norm(...).out)), the norm and the quantize read by
  nothing else -> add_rms_norm {act_format} with the quantize's input_scale, whose `out` is the codes,
  and the linear becomes a quant_linear reading them with the same input_scale, so the GEMM loads
  the codes and rounds nothing again. FP8 (W8A8): E4M3 codes (`fp8e4m3`), 1 byte per activation.
  NVFP4 (W4A4): packed E2M1 codes and E4M3 block scales (`nvfp4codes`), 0.5 + 1/16 byte.

In a Nemotron-H graph every layer's residual add feeds the next layer's norm (or the final
norm_f), so the first rule fires once per layer; the second once per layer after the first whose
mixer quantizes its input (a Mamba layer with W8A8 in_proj; an MLP or Mamba layer of a W4A4
checkpoint). Layer 0's norm reads the embedding directly: nothing to add."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from nemocompile.graph.builder import GraphBuilder
from nemocompile.graph.opdef import operand

from .rewrite import ABSENT, Match, RewritePass, Rule, op


def _fuse_add(match: Match, builder: GraphBuilder) -> None:
    norm, add = match.root, match.ops["sum"]
    builder.drop(add)
    builder.op_named("add_rms_norm", {"x": operand(add, "b"), "residual": operand(add, "a"),
                                      "weight": operand(norm, "weight")},
                     {"eps": norm.attrs.float("eps")}, norm.scope, [norm.results[0].name, add.results[0].name])


def _addable(match: Match) -> bool:
    assert match.builder is not None
    add = match.ops["sum"]
    a, b = operand(add, "a"), operand(add, "b")
    assert a is not None and b is not None
    return match.builder.type_of(a) == match.builder.type_of(b) and match.builder.can_drop(add)


ADD_RMS_NORM = Rule("add_rms_norm", op("rms_norm", x=op("add", capture="sum")), _fuse_add, _addable)


def _fuse_quantize(match: Match, builder: GraphBuilder) -> None:
    linear, quantize, norm = match.root, match.ops["q"], match.ops["normed"]
    builder.drop(quantize)
    builder.drop(norm)
    fmt, scale = quantize.attrs.str("format"), operand(quantize, "input_scale")
    builder.op_named("add_rms_norm", {"x": operand(norm, "x"), "residual": operand(norm, "residual"),
                                      "weight": operand(norm, "weight"), "input_scale": scale},
                     {"eps": norm.attrs.float("eps"), "act_format": fmt}, norm.scope,
                     [quantize.results[0].name, norm.results[1].name])
    builder.op_named("quant_linear", {"x": quantize.results[0].name, "weight": operand(linear, "weight"),
                                      "input_scale": scale, "bias": operand(linear, "bias")},
                     {"act_format": fmt, "out_dtype": linear.attrs.str("out_dtype")}, linear.scope, match.results)


def _quantizable(match: Match) -> bool:
    assert match.builder is not None
    return (len(match.users("normed")) == 1 and len(match.users("q")) == 1
            and match.builder.can_drop(match.ops["q"], match.ops["normed"]))


ADD_RMS_NORM_QUANTIZE = Rule(
    "add_rms_norm_quantize",
    op("linear", x=op("quantize", capture="q", offsets=ABSENT,
                      x=op("add_rms_norm", capture="normed", attrs={"act_format": None}))),
    _fuse_quantize, _quantizable)


@dataclass(frozen=True)
class FuseAddRmsNorm(RewritePass):
    name: ClassVar[str] = "fuse_add_rms_norm"

    def rules(self) -> Sequence[Rule]:
        return (ADD_RMS_NORM, ADD_RMS_NORM_QUANTIZE)

