"""Before/after check for any pass: random tiny-model weights and random token ids run through a
graph before and after the pass, prefill and then token-by-token decode with state, and the logits
must agree within the tolerance the pass promises.

- Structure-only passes (decompose, specialize_decode, select_kernels, set_precision to the same
  precision): exact, or within `STRUCTURAL` (1e-6 of max|logits|, fp32 reassociation).
- set_precision fp32 -> bf16: relative RMS within `BF16` (0.1). Not max|diff|: bf16 rounding
  can flip a routing decision (an expert's score next to the k-th), which moves the logits of
  that token a lot (seen: 17% of max|logits| at one position, 4% relative RMS overall).
- assign_precision: the graph after runs with the weights quantized from the same random float
  values (and activation scales calibrated on the graph before); it is compared with the graph
  before run on the *dequantized* weights, so weight-only formats (W4A16, W8A16) must agree to
  `STRUCTURAL`; with activation quantization (W4A4, W8A8) the logits must stay within
  `ACTIVATION_QUANT` (relative RMS) of the float ones.

Tests import this module (`from passcheck import check_pass`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from nemocompile.base.settings import override
from nemocompile.calibration import FORMAT_MAX, calibrate, calibration_batches, scales_needed
from nemocompile.graph.ir import Graph, Weight
from nemocompile.graph.verifier import verify
from nemocompile.passes.base import Pass, PassOutput
from nemocompile.runtime.cache import Cache
from nemocompile.runtime.dtypes import torch_dtype
from nemocompile.runtime.executor import Executor
from nemocompile.runtime.formats import (
    FP8Tensor,
    NVFP4Tensor,
    dequantize_fp8,
    dequantize_nvfp4,
    quantize_fp8,
    quantize_nvfp4,
)
from nemocompile.runtime.weights import WeightValue

STRUCTURAL = 1e-6
BF16 = 0.1
ACTIVATION_QUANT = 0.25


@dataclass(frozen=True)
class Comparison:
    max_abs_diff: float
    scale: float  # max|logits| of the graph before
    rel_rms: float  # RMS(after - before) / RMS(before)

    @property
    def relative(self) -> float:
        return self.max_abs_diff / max(self.scale, 1e-30)


def float_weights(graph: Graph, seed: int = 0) -> dict[str, torch.Tensor]:
    """Small random fp32 weights for the graph's weights: norms are ones, A_log = log(1..H), D = 1,
    dt_bias the inverse softplus of steps in [0.05, 0.5]; others N(0, 0.1^2)."""
    generator = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for weight in graph.weights:
        if weight.category == "activation_scales":
            continue  # set by calibration
        shape = [int(d) for d in weight.type.shape]
        leaf = weight.name.rsplit(".", 1)[-1]
        if weight.category == "norms" or leaf == "D":
            tensor = torch.ones(shape)
        elif leaf == "A_log":
            tensor = torch.log(torch.arange(1, shape[0] + 1, dtype=torch.float32))
        elif leaf == "dt_bias":
            step = torch.linspace(0.05, 0.5, shape[0])
            tensor = step + torch.log(-torch.expm1(-step))  # softplus^-1
        else:
            tensor = torch.randn(shape, generator=generator) * 0.1
        weights[weight.name] = tensor
    return weights


def _quantized(weight: Weight, value: torch.Tensor) -> WeightValue:
    """`value` in the weight's quantized format, one stacked slice (expert) at a time."""
    slices = list(value) if weight.type.rank == 3 else [value]
    if weight.type.dtype.name == "nvfp4":
        parts = [quantize_nvfp4(s) for s in slices]
        if weight.type.rank != 3:
            return parts[0]
        return NVFP4Tensor(torch.stack([p.packed for p in parts]), torch.stack([p.block_scale for p in parts]),
                           torch.stack([p.global_scale for p in parts]))
    fp8 = [quantize_fp8(s) for s in slices]
    if weight.type.rank != 3:
        return fp8[0]
    return FP8Tensor(torch.stack([p.data for p in fp8]), torch.stack([p.scale for p in fp8]))


def _dequantized(value: WeightValue) -> torch.Tensor:
    if isinstance(value, NVFP4Tensor):
        return dequantize_nvfp4(value, torch.float32)
    if isinstance(value, FP8Tensor):
        return dequantize_fp8(value, torch.float32)
    return value


def weights_for(graph: Graph, values: Mapping[str, torch.Tensor]) -> dict[str, WeightValue]:
    """The values in each weight's type: cast for float types, quantized for NVFP4 / FP8."""
    out: dict[str, WeightValue] = {}
    for weight in graph.weights:
        if weight.name not in values:
            continue
        value = values[weight.name]
        out[weight.name] = _quantized(weight, value) if weight.type.dtype.quantized else value.to(
            torch_dtype(weight.type.dtype))
    return out


def run_logits(prefill: Graph, decode: Graph, weights: Mapping[str, WeightValue], ids: torch.Tensor,
               prompt: int) -> torch.Tensor:
    """Logits of a prefill over ids[:, :prompt] and then one decode step per remaining token. Every
    GEMM runs through torch's F.linear (no oneDNN packing, runtime/cpu_gemm.py): a composite op
    before a pass and the core ops after it then multiply with the same kernel, so that passes
    promising exactness can be held to it."""
    cache = Cache.for_graph(prefill, ids.shape[0], torch.device("cpu"))
    with override(cpu_onednn_gemm=False):
        pieces = [Executor(prefill, weights).run(ids[:, :prompt], cache)["logits"]]
        stepper = Executor(decode, weights)
    for position in range(prompt, ids.shape[1]):
        pieces.append(stepper.run(ids[:, position:position + 1], cache)["logits"])
    return torch.cat(pieces, dim=1).float()


def compare(before: torch.Tensor, after: torch.Tensor) -> Comparison:
    diff = (after - before).abs()
    rms = before.pow(2).mean().sqrt().item()
    return Comparison(diff.max().item(), before.abs().max().item(),
                      (after - before).pow(2).mean().sqrt().item() / max(rms, 1e-30))


def token_ids(vocab: int, batch: int = 2, total: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, total), generator=torch.Generator().manual_seed(seed))


def check_pass(pipeline_pass: Pass, graph: Graph, *, decode_pass: Pass | None = None, tolerance: float = STRUCTURAL,
               rel_rms: float | None = None, seed: int = 0, prompt: int = 6, total: int = 9,
               decode_only: bool = False) -> tuple[PassOutput, Comparison]:
    """Apply `pipeline_pass` to `graph`, verify the result, and compare logits before and after on
    random weights and tokens (prefill of `prompt` tokens, then decode steps up to `total`).

    decode_only: the pass makes a decode graph (specialize_decode): after = the graph before for
    prefill and the pass's result for the decode steps. decode_pass: a pass that must run on both
    sides to get a decode graph (specialize_decode for graphs whose decode needs it). The check
    is `max|diff| <= tolerance * max|before|`, or `rel_rms` (relative RMS) when given."""
    output = pipeline_pass.apply(graph)
    verify(output.graph, after=pipeline_pass.name)
    after = output.graph
    base = float_weights(graph, seed)
    before_weights: dict[str, WeightValue] = dict(weights_for(graph, base))
    after_weights = weights_for(after, base)
    quantized = [w.name for w in after.weights if w.type.dtype.quantized and w.name in base
                 and not graph.weight_map()[w.name].type.dtype.quantized]
    for name in quantized:  # the graph before sees the values the graph after deploys
        before_weights[name] = _dequantized(after_weights[name]).to(torch_dtype(graph.weight_map()[name].type.dtype))
    vocab = _vocab(graph)
    # A graph that already quantizes activations gets fixed scales (amax 1), the same on both sides.
    for scale, (_, fmt) in scales_needed(graph).items():
        shape = [int(d) for d in graph.weight_map()[scale].type.shape]
        before_weights[scale] = torch.full(shape, 1.0 / FORMAT_MAX[fmt])
    after_weights.update({name: value for name, value in before_weights.items() if name in after.weight_map()
                          and after.weight_map()[name].category == "activation_scales"})
    needed = {k: v for k, v in scales_needed(after).items() if k not in after_weights}
    if needed:  # scales the pass introduced: calibrated on the graph before, as the build does
        after_weights.update(calibrate(graph, before_weights, needed, calibration_batches(2, vocab, length=8)))
    ids = token_ids(vocab, total=total, seed=seed + 1)
    before_decode = decode_pass.apply(graph).graph if decode_pass else graph
    if decode_only:
        after_prefill, after_decode = graph, after
    else:
        after_prefill, after_decode = after, decode_pass.apply(after).graph if decode_pass else after
    expected = run_logits(graph, before_decode, before_weights, ids, prompt)
    actual = run_logits(after_prefill, after_decode, after_weights, ids, prompt)
    result = compare(expected, actual)
    assert torch.isfinite(actual).all(), f"{pipeline_pass.name}: non-finite logits after the pass"
    assert result.scale > 0, "the logits before are all zero: the check would prove nothing"
    if rel_rms is not None:
        assert result.rel_rms <= rel_rms, f"{pipeline_pass.name}: relative RMS {result.rel_rms:.3g} > {rel_rms}"
    else:
        assert result.relative <= tolerance, (
            f"{pipeline_pass.name}: max|diff| {result.max_abs_diff:.3g} is {result.relative:.3g} of max|logits|, "
            f"over {tolerance}")
    return output, result


def _vocab(graph: Graph) -> int:
    logits = graph.value_types()[graph.outputs[0]]
    last = logits.shape[-1]
    assert isinstance(last, int)
    return last
