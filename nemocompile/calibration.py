"""Calibration: run token batches through the unquantized model on the reference runtime and
set the static scale of each `quantize` op from the largest activation its GEMM saw
(`input_scale = amax / (6 * 448)` for NVFP4, `amax / 448` for FP8, as ModelOpt sets them).
Stacked experts get one scale each; an expert that saw no token takes the largest of the others.

The build runs the model one block at a time (calibration_stream); `calibrate` here is the
whole-model definition it equals bit for bit."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from nemocompile.base.errors import UsageError
from nemocompile.base.formats import ACT_FORMATS, FORMATS
from nemocompile.graph.ir import Graph, Op
from nemocompile.graph.nemotron_h import INPUT_SCALE_CATEGORY, KV_SCALES
from nemocompile.graph.opdef import operand
from nemocompile.passes.assign_precision import act_quantization, any_gemm_weight, gemm_weight
from nemocompile.runtime.cache import Cache
from nemocompile.runtime.executor import Executor
from nemocompile.runtime.weights import WeightValue

# An FP8 KV cache's scales: the attention_gqa operand each observes, and their format (amax / 448).
KV_OPERANDS = {"k": 1, "v": 2}
KV_CACHE_FORMAT = "fp8"


def is_kv_scale(scale: str) -> bool:
    return scale.rpartition(".")[2] in KV_SCALES


# input_scale = amax / FORMAT_MAX[act_format], from the format registry (6 * 448, 448).
FORMAT_MAX = {name: FORMATS[name].scaled_max for name in ACT_FORMATS}
# An activation that was always zero gets the format's element maximum as amax (as ModelOpt's
# export does), so its scale is finite and non-zero.
ELEMENT_MAX = {name: FORMATS[name].max_value for name in ACT_FORMATS}


def scales_needed(quantized: Graph) -> dict[str, tuple[str, str]]:
    """input_scale weight -> (the GEMM weight whose input it scales, activation format), for the
    scales of `quantize` ops that have no source (a ModelOpt checkpoint brings its own); and each
    FP8 KV cache scale -> (the k_proj or v_proj whose output the cache stores, fp8)."""
    needed: dict[str, tuple[str, str]] = {}
    weights = quantized.weight_map()
    for quantize in quantized.ops:
        found = act_quantization(quantize)
        if found is None:
            continue
        scale, fmt = found
        if scale not in weights or weights[scale].category != INPUT_SCALE_CATEGORY or weights[scale].sources:
            continue
        # a fused GEMM quantizes its own input; a quantize (or a norm that quantizes) feeds one
        gemms = [quantize] if any_gemm_weight(quantize) else \
            [user for user in quantized.users(quantize.results[0].name) if any_gemm_weight(user)]
        if not gemms:
            raise UsageError(f"{quantize.opname} at {quantize.scope} feeds no GEMM, so calibration cannot set {scale}")
        weight = any_gemm_weight(gemms[0])
        assert weight is not None
        needed[scale] = (weight, fmt)
    for attention in quantized.ops_named("attention_gqa"):
        for which in KV_OPERANDS:
            kv_scale = operand(attention, f"{which}_scale")
            if kv_scale is None or weights[kv_scale].sources:
                continue
            source = operand(attention, which)
            producer = quantized.producer(source) if source is not None else None
            projection = any_gemm_weight(producer) if producer is not None else None
            if projection is None:
                raise UsageError(f"attention at {attention.scope} takes its {which} from no GEMM, so calibration "
                                 f"cannot set {kv_scale}")
            needed[kv_scale] = (projection, KV_CACHE_FORMAT)  # the GEMM whose output the cache stores
    return needed


# --calibrate N: more batches than this would run the reference model for days on a CPU.
MAX_CALIBRATION_BATCHES = 100_000


class CalibrationBatches(Sequence[torch.Tensor]):
    """Token batches [1, tokens], made one at a time as they are taken (never all up front):
    `count` random batches of `length` tokens, or the first `count` sequences of `data` (so
    their number is bounded by the data)."""

    def __init__(self, count: int, vocab_size: int, length: int, seed: int,
                 data: Sequence[Sequence[int]] | None) -> None:
        self.vocab_size, self.length, self.seed, self.data = vocab_size, length, seed, data
        self.size = min(count, len(data)) if data is not None else count

    def __len__(self) -> int:
        return self.size

    @property
    def tokens(self) -> int:
        """Tokens in all batches, without making them."""
        if self.data is None:
            return self.size * self.length
        return sum(len(self.data[index]) for index in range(self.size))

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.data is not None:
            for index in range(self.size):
                yield torch.tensor([list(self.data[index])], dtype=torch.int64)
            return
        generator = torch.Generator().manual_seed(self.seed)  # one stream: batch i is the i-th draw
        for _ in range(self.size):
            yield torch.randint(0, self.vocab_size, (1, self.length), generator=generator)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if not 0 <= index < self.size:
            raise IndexError(f"calibration batch {index} of {self.size}")
        for number, batch in enumerate(self):
            if number == index:
                return batch
        raise AssertionError("unreachable")


def calibration_batches(count: int, vocab_size: int, length: int = 64, seed: int = 0,
                        data: Sequence[Sequence[int]] | None = None) -> CalibrationBatches:
    if not 1 <= count <= MAX_CALIBRATION_BATCHES:
        raise UsageError(f"--calibrate must be from 1 to {MAX_CALIBRATION_BATCHES:,} token batches, got {count:,}")
    return CalibrationBatches(count, vocab_size, length, seed, data)


class AmaxObserver:
    """An executor observer that keeps the largest activation magnitude each needed scale's GEMM
    reads: one value per GEMM, one per expert for a grouped GEMM (0 for an expert no token reached)."""

    def __init__(self, needed: Mapping[str, tuple[str, str]]) -> None:
        self.by_weight = {weight: scale for scale, (weight, _) in needed.items() if not is_kv_scale(scale)}
        # an FP8 KV cache's scales: the keys and values its attention receives, by scope
        self.kv: dict[str, list[tuple[int, str]]] = {}
        for scale in needed:
            if is_kv_scale(scale):
                scope, _, name = scale.rpartition(".")
                self.kv.setdefault(scope, []).append((KV_OPERANDS[name.removesuffix("_scale")], scale))
        self.amax: dict[str, torch.Tensor] = {}

    def _see(self, scale: str, seen: torch.Tensor) -> None:
        seen = seen.cpu()
        self.amax[scale] = seen if scale not in self.amax else torch.maximum(self.amax[scale], seen)

    def __call__(self, op: Op, args: Sequence[WeightValue | None]) -> None:
        if op.opname == "attention_gqa":
            for index, scale in self.kv.get(op.scope, ()):
                values = args[index]
                assert isinstance(values, torch.Tensor)
                self._see(scale, values.float().abs().amax())
            return
        weight = gemm_weight(op)
        if weight not in self.by_weight:
            return
        x = args[0]
        assert isinstance(x, torch.Tensor)
        if op.opname == "grouped_gemm":
            offsets = args[1]
            assert isinstance(offsets, torch.Tensor)
            bounds = offsets.tolist()
            seen = torch.stack([x[bounds[e]:bounds[e + 1]].float().abs().amax() if bounds[e + 1] > bounds[e]
                                else torch.zeros((), device=x.device) for e in range(len(bounds) - 1)])
        else:
            seen = x.float().abs().amax()
        self._see(self.by_weight[weight], seen)


@dataclass(frozen=True)
class Scales:
    """Calibrated scales by input_scale weight, and the routed experts no calibration token reached
    (as "WEIGHT expert INDEX"), which took the unreached-expert rule."""

    values: dict[str, torch.Tensor]
    unreached: tuple[str, ...]


def finish_scales(needed: Mapping[str, tuple[str, str]], amax: Mapping[str, torch.Tensor]) -> Scales:
    """input_scale = amax / the format's largest value. An expert that saw no token takes the largest
    amax of the other experts of the same GEMM (the range its siblings met, so it clips no more than
    they do); an activation that was always zero (or a GEMM whose experts all saw none) takes the
    format's element maximum as amax, as ModelOpt's export does."""
    scales: dict[str, torch.Tensor] = {}
    unreached: list[str] = []
    for scale, (weight, act_format) in needed.items():
        if scale not in amax:
            raise UsageError(f"calibration never reached {weight}; give more or longer calibration batches")
        value = amax[scale]
        if value.dim():
            unreached += [f"{weight} expert {index}" for index in (value <= 0).nonzero().flatten().tolist()]
            value = torch.where(value > 0, value, value.max())
        value = torch.where(value > 0, value, torch.tensor(ELEMENT_MAX[act_format]))
        scales[scale] = (value / FORMAT_MAX[act_format]).to(torch.float32)
    return Scales(scales, tuple(unreached))


def calibrate(float_graph: Graph, float_weights: Mapping[str, WeightValue], needed: Mapping[str, tuple[str, str]],
              batches: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole-model calibration: every weight in memory, each batch through the whole float graph.
    The build calibrates block by block (calibration_stream.calibrate_streamed); this is the
    definition it is tested against, and what tests use on graphs that are not a model."""
    observer = AmaxObserver(needed)
    executor = Executor(float_graph, float_weights, observer=observer)
    for batch in batches:
        executor.run(batch, Cache.for_graph(float_graph, batch.shape[0], torch.device("cpu")))
    return finish_scales(needed, observer.amax).values
