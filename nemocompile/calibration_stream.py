"""Layer-streamed calibration: the float graph runs one block at a time over every calibration
batch, so only that block's weights are in memory (read from the memory-mapped checkpoint and let
go after it), plus the values that cross into later blocks (the hidden states of the calibration
tokens). Any model size calibrates in bounded memory.

Each op runs by the same implementation the whole-model executor picks, on the same inputs, so the
scales equal whole-model calibration (`calibration.calibrate`) bit for bit on the same device.
Blocks after the last GEMM that needs a scale (the final norm and lm_head, usually) are not run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from nemocompile.base.errors import IRError, UsageError
from nemocompile.graph.checkpoint import Checkpoint
from nemocompile.graph.ir import Graph, Op, StateSlot
from nemocompile.graph.nemotron_h import CACHE_LENS, SEQ_LENS
from nemocompile.passes.assign_precision import gemm_weight
from nemocompile.runtime.cache import Cache
from nemocompile.runtime.dtypes import value_dtype
from nemocompile.runtime.kernels import resolve
from nemocompile.runtime.step_results import wrong_result
from nemocompile.runtime.weights import WeightValue

from .calibration import AmaxObserver, Scales, finish_scales
from .weight_stream import read_weights

CPU = torch.device("cpu")
BlockDone = Callable[[str, int, int], None]  # (block, its number from 1, blocks to run)


def block_of(op: Op) -> str:
    """The block an op belongs to: `layers.N` for layer ops, else its scope's first part
    (`embeddings`, `norm_f`, `lm_head`)."""
    parts = op.scope.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


@dataclass(frozen=True)
class Segment:
    """A run of consecutive ops of one block, the weights and state slots they read, and which
    values they read from before the segment."""

    block: str
    ops: tuple[Op, ...]
    weights: frozenset[str]
    states: tuple[StateSlot, ...]


def segments(graph: Graph) -> list[Segment]:
    weight_names = {w.name for w in graph.weights}
    slots = {slot.name: slot for slot in graph.states}
    runs: list[tuple[str, list[Op]]] = []
    for op in graph.ops:
        block = block_of(op)
        if runs and runs[-1][0] == block:
            runs[-1][1].append(op)
        else:
            runs.append((block, [op]))
    found = []
    for block, ops in runs:
        read = {name for op in ops for name in op.operands if name is not None}
        found.append(Segment(block, tuple(ops), frozenset(read & weight_names),
                             tuple(slots[name] for name in sorted(read & slots.keys()))))
    return found


def _cache(graph: Graph, slots: tuple[StateSlot, ...], batch_size: int, device: torch.device) -> Cache:
    """A fresh cache of only these slots, made and grown exactly as the whole model's would be."""
    return Cache.for_graph(dataclasses.replace(graph, states=slots), batch_size, device)


class StreamedCalibration:
    """Runs `graph` (the float graph) block by block over the batches, reading each block's
    weights from `checkpoint` just before and letting them go just after."""

    def __init__(self, checkpoint: Checkpoint, graph: Graph, needed: Mapping[str, tuple[str, str]],
                 device: torch.device = CPU) -> None:
        unknown = [v.name for v in graph.inputs[1:] if v.name not in (CACHE_LENS, SEQ_LENS)]
        if unknown:
            raise IRError(f"graph {graph.name} has input %{unknown[0]}, which calibration does not bind")
        self.checkpoint, self.graph, self.needed, self.device = checkpoint, graph, needed, device
        all_segments = segments(graph)
        gemms = {weight for weight, _ in needed.values()}
        reads_needed = [index for index, segment in enumerate(all_segments)
                        if any(gemm_weight(op) in gemms for op in segment.ops)]
        # the blocks after the last GEMM that needs a scale change no scale
        self.segments = all_segments[:reads_needed[-1] + 1] if reads_needed else []
        # after segment i, keep only the values a later segment reads
        last_read: dict[str, int] = {}
        for index, segment in enumerate(self.segments):
            for op in segment.ops:
                for name in op.operands:
                    if name is not None:
                        last_read[name] = index
        self.keep_after = [{name for name, last in last_read.items() if last > index}
                           for index in range(len(self.segments))]
        self.peak_weight_bytes = 0

    def run(self, batches: Sequence[torch.Tensor], block_done: BlockDone | None = None) -> Scales:
        observer = AmaxObserver(self.needed)
        first = self.graph.inputs[0].name
        carried: list[dict[str, torch.Tensor]] = [{first: batch.to(self.device)} for batch in batches]
        for number, segment in enumerate(self.segments):
            weights = read_weights(self.checkpoint, self.graph, segment.weights)
            if self.device.type != "cpu":
                weights = {name: _to_device(value, self.device) for name, value in weights.items()}
            self.peak_weight_bytes = max(self.peak_weight_bytes, sum(_nbytes(v) for v in weights.values()))
            plan = [(op, resolve(op, self.device), tuple(value_dtype(r.type.dtype) for r in op.results))
                    for op in segment.ops]
            for values in carried:
                batch = values[first]
                cache = _cache(self.graph, segment.states, batch.shape[0], self.device)
                cache.reserve(batch.shape[1])
                # fresh sequences (cache_lens 0), every calibration token real (seq_lens = seq)
                full = torch.full_like(cache.lengths, batch.shape[1])
                values.update({v.name: full if v.name == SEQ_LENS else cache.lengths for v in self.graph.inputs[1:]})
                values.update(cache.tensors)
                for op, impl, dtypes in plan:
                    args = [None if name is None else values[name] if name in values else weights[name]
                            for name in op.operands]
                    observer(op, args)
                    for position, (value, tensor, dtype) in enumerate(zip(op.results, impl(op, args), dtypes,
                                                                          strict=True)):
                        error = wrong_result(op, position, tensor, dtype)
                        if error is not None or not isinstance(tensor, torch.Tensor):  # (a float graph: tensors)
                            raise IRError(error or f"calibration runs a float graph, but {op.opname} at {op.scope} "
                                                   f"produced NVFP4 codes")
                        values[value.name] = tensor
                for name in [name for name in values if name not in self.keep_after[number]]:
                    del values[name]
                values.setdefault(first, batch)  # the next block's cache is sized by the batch
            del weights
            self.checkpoint.close()  # drop the memory maps: resident pages would grow to the model's size
            if block_done is not None:
                block_done(segment.block, number + 1, len(self.segments))
        return finish_scales(self.needed, observer.amax)


def _to_device(value: WeightValue, device: torch.device) -> WeightValue:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return type(value)(*(part.to(device) for part in dataclasses.astuple(value)))


def _nbytes(value: WeightValue) -> int:
    parts = [value] if isinstance(value, torch.Tensor) else list(dataclasses.astuple(value))
    return sum(part.numel() * part.element_size() for part in parts)


def calibration_device(name: str) -> torch.device:
    """The device `--calibration-device` names: cpu, or cuda (one GPU) when there is one."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--calibration-device cuda needs a CUDA GPU, and torch sees none here; use cpu")
        return torch.device("cuda")
    raise UsageError(f"--calibration-device must be cpu or cuda, got {name!r}")


def calibrate_streamed(checkpoint: Checkpoint, float_graph: Graph, needed: Mapping[str, tuple[str, str]],
                       batches: Sequence[torch.Tensor], device: torch.device = CPU,
                       block_done: BlockDone | None = None) -> Scales:
    """The scales `calibration.calibrate` gives, computed one block at a time."""
    return StreamedCalibration(checkpoint, float_graph, needed, device).run(batches, block_done)
