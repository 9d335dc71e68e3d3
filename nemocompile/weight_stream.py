"""The streaming quantize stage of a build: read each weight from the mmap'd checkpoint (one
expert at a time when stacked), convert it to the format the IR gives it (NVFP4, FP8 or a float),
write it into the engine's safetensors file, and let it go. Peak host memory is a few times the
largest single checkpoint tensor, not the model. Weights stored quantized in the checkpoint are
copied bit for bit. Each quantized weight's error is measured against its source.

Every tensor is checked after its final conversion, just before it is written: floats finite
(a finite fp32 value past bf16's range becomes Inf in the conversion), FP8 E4M3 bytes never NaN
(0x7F, 0xFF; E4M3 has no Inf), and scales (ModelOpt's weight_scale, weight_scale_2 and
input_scale, taken bit for bit, or calibrated) positive normal float32s, except block scales,
which may be 0 (an all-zero block) but never negative."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from nemocompile.base.errors import CheckpointError
from nemocompile.graph.checkpoint import Checkpoint
from nemocompile.graph.ir import Graph, Weight
from nemocompile.graph.nemotron_h import INPUT_SCALE_CATEGORY
from nemocompile.graph.storage import component_name, stored_nbytes, stored_tensors
from nemocompile.runtime.dtypes import torch_dtype
from nemocompile.runtime.formats import (
    FP8Tensor,
    NVFP4Tensor,
    dequantize_fp8,
    dequantize_nvfp4,
    quantize_fp8,
    quantize_nvfp4,
)
from nemocompile.runtime.formats.fp8 import FLOAT32_TINY
from nemocompile.runtime.weights import WeightValue, assemble

from .safetensors_writer import SafetensorsWriter, data_start

ERROR_CHUNK_VALUES = 1 << 20
E4M3_NAN_BITS = 0x7F  # E4M3 (fn) has no Inf: S.1111.111 is NaN, the bytes 0x7F and 0xFF
FP32_SCALES = frozenset({"weight_scale_2", "input_scale"})  # and FP8's fp32 weight_scale
ProgressHook = Callable[[str, int, int], None]  # (what, bytes just processed, bytes in all)


@dataclass(frozen=True)
class QuantizationError:
    weight: str
    format: str
    rel_rms: float  # ||W - Q(W)|| / ||W||
    sqnr_db: float  # 10 log10(sum W^2 / sum (W - Q(W))^2)


def error_chunks(reference: torch.Tensor, dequantize_rows: Callable[[slice], torch.Tensor]) -> list[tuple[float, float]]:
    """(sum W^2, sum (W - Q(W))^2) over row chunks, so the fp32 copies stay small whatever the tensor."""
    chunks = []
    step = max(1, ERROR_CHUNK_VALUES // max(reference.shape[-1], 1))
    for start in range(0, reference.shape[0], step):
        rows = slice(start, start + step)
        exact = reference[rows].float()
        chunks.append((float(exact.square().sum()), float((exact - dequantize_rows(rows)).square().sum())))
    return chunks


@dataclass(frozen=True)
class _Converted:
    """One source tensor (expert) quantized: its codes, its scales and its error chunks."""

    codes: torch.Tensor
    scales: dict[str, torch.Tensor]
    errors: list[tuple[float, float]]
    count: int


class _ErrorSum:
    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.count = 0

    def add(self, reference: torch.Tensor, dequantize_rows: Callable[[slice], torch.Tensor]) -> None:
        self.extend(error_chunks(reference, dequantize_rows), reference.numel())

    def extend(self, chunks: list[tuple[float, float]], count: int) -> None:
        """Add the chunks' (signal, noise) in order: the same sums whichever thread computed them."""
        for signal, noise in chunks:
            self.signal += signal
            self.noise += noise
        self.count += count

    def result(self, weight: str, fmt: str) -> QuantizationError:
        rel = math.sqrt(self.noise / self.signal) if self.signal else 0.0
        sqnr = 10 * math.log10(self.signal / self.noise) if self.noise else math.inf
        return QuantizationError(weight, fmt, rel, sqnr)


def _nvfp4_rows(q: NVFP4Tensor, rows: slice) -> torch.Tensor:
    return dequantize_nvfp4(NVFP4Tensor(q.packed[rows], q.block_scale[rows], q.global_scale))


def _fp8_rows(q: FP8Tensor, rows: slice) -> torch.Tensor:
    scale = q.scale[rows] if q.scale.dim() else q.scale  # per-channel scales follow the rows
    return dequantize_fp8(FP8Tensor(q.data[rows], scale))


def engine_tensor_specs(graph: Graph) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every tensor the engine stores, in write order."""
    specs = []
    for weight in graph.weights:
        for stored in stored_tensors(weight.type):
            specs.append((component_name(weight.name, stored.component), stored.dtype.safetensors,
                          stored.shape))
    return specs


def _slices(ckpt: Checkpoint, weight: Weight, component: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """The weight's source tensors one at a time (one per expert when stacked). Scalar scales
    exported as [1] are read as 0-d."""
    (shape,) = [t.shape for t in stored_tensors(weight.type) if t.component == component]
    scalar = shape[1:] == () if weight.stacked else shape == ()
    for source in weight.sources:
        name = component_name(source.tensor, component)
        tensor = ckpt.read(name)
        if scalar and tensor.numel() == 1:
            tensor = tensor.reshape(())
        yield name, tensor.unsqueeze(0) if weight.stacked else tensor


def _is_finite(tensor: torch.Tensor) -> tuple[bool, float]:
    """(no NaN or Inf, the smallest value); NaN and Inf reach the extremes, so two values tell
    (much faster than isfinite over all)."""
    low, high = torch.aminmax(tensor.reshape(-1))
    return bool(torch.isfinite(low) & torch.isfinite(high)), float(low)


def checked(weight: Weight, name: str, stored: torch.Tensor, component: str = "",
            source: torch.Tensor | None = None) -> torch.Tensor:
    """`stored` (tensor `name` of `weight`, as the engine will hold it) if it is finite and valid;
    `source` is what it was converted from, so an overflow in the conversion is named as one."""
    where = f"tensor {name} (weight {weight.name})"
    if not stored.numel():
        return stored
    if stored.dtype == torch.float8_e4m3fn:
        bits = stored.view(torch.uint8)
        if bool(((bits & E4M3_NAN_BITS) == E4M3_NAN_BITS).any()):
            raise CheckpointError(f"{where} holds FP8 E4M3 NaN bytes (0x7F or 0xFF)")
        if component == "weight_scale" and bool(((bits > 0x80) & (bits < 0xFF)).any()):
            raise CheckpointError(f"{where} holds negative block scales; a scale must be positive (or 0 for "
                                  f"an all-zero block)")
    elif stored.is_floating_point():
        finite, low = _is_finite(stored)
        if not finite:
            if source is not None and source.dtype != stored.dtype and _is_finite(source)[0]:
                largest = torch.finfo(stored.dtype).max
                raise CheckpointError(f"{where} holds finite values beyond the range of "
                                      f"{str(stored.dtype).removeprefix('torch.')} (largest {largest:.3g}), "
                                      f"which become Inf when converted")
            raise CheckpointError(f"{where} holds NaN or Inf values")
        scale = component in FP32_SCALES or component == "weight_scale" or weight.category == INPUT_SCALE_CATEGORY
        if scale and low < FLOAT32_TINY:  # the zero/denormal rule of runtime/formats: kernels flush denormals
            raise CheckpointError(f"{where} is a scale and must be positive and a normal float32 (at least "
                                  f"2**-126), but holds {low:g}")
    return stored


def read_weights(ckpt: Checkpoint, graph: Graph, names: Collection[str] | None = None) -> dict[str, WeightValue]:
    """Every weight of `graph` (or those `names` it) in memory as the graph types it (reference checks
    on small models; one block at a time for calibration)."""
    weights: dict[str, WeightValue] = {}
    for weight in graph.weights:
        if not weight.sources or (names is not None and weight.name not in names):
            continue
        parts = {}
        for stored in stored_tensors(weight.type):
            dtype = None if weight.type.dtype.quantized else torch_dtype(weight.type.dtype)
            if not weight.stacked:
                (value,) = [tensor for _, tensor in _slices(ckpt, weight, stored.component)]
                parts[stored.component] = value if dtype is None else value.to(dtype)
                continue
            # one expert at a time into the stacked tensor, the memory maps dropped after each: the
            # block's weights are held once, never twice (pieces and stack) nor with their file pages
            stacked: torch.Tensor | None = None
            for index, (_, piece) in enumerate(_slices(ckpt, weight, stored.component)):
                if stacked is None:
                    stacked = torch.empty((len(weight.sources), *piece.shape[1:]), dtype=dtype or piece.dtype)
                stacked[index].copy_(piece[0])
                del piece
                ckpt.close()
            assert stacked is not None
            parts[stored.component] = stacked
        weights[weight.name] = assemble(weight, parts)
    return weights


METADATA = {"format": "pt"}


@dataclass(frozen=True)
class WrittenWeight:
    """A weight completely written: the tensors of the file up to and including it, where its bytes
    end in the data region, their sha256, and its quantization error (None for a copy)."""

    weight: str
    tensors: int
    end: int
    sha256: str
    error: QuantizationError | None


class WeightStream:
    """Writes a graph's weights into one safetensors file, converting each on the way."""

    def __init__(self, ckpt: Checkpoint, graph: Graph, scales: Mapping[str, torch.Tensor],
                 progress: ProgressHook | None = None, four_over_six: bool = False, threads: int = 1) -> None:
        self.ckpt = ckpt
        self.threads = max(1, threads)
        self.pool: ThreadPoolExecutor | None = None
        self.four_over_six = four_over_six
        self.graph = graph
        self.scales = scales
        self.progress = progress
        self.errors: list[QuantizationError] = []
        self.total = sum(stored_nbytes(w.type) for w in graph.weights)

    def data_start(self) -> int:
        """Where the weights file's data region starts."""
        return data_start(engine_tensor_specs(self.graph), METADATA)

    def write(self, path: Path, done: Sequence[WrittenWeight] = (),
              journal: Callable[[WrittenWeight], None] | None = None) -> int:
        """Write every weight into `path`. `done`: the leading weights a killed build of the same
        input already wrote (verified by their hash): the file is continued after them. `journal`
        hears of each weight once its bytes are in the file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        resume_at = (done[-1].tensors, done[-1].end) if done else None
        with SafetensorsWriter(path, engine_tensor_specs(self.graph), METADATA, resume_at=resume_at) as writer, \
                ThreadPoolExecutor(self.threads, thread_name_prefix="quantize") as pool:
            self.pool = pool if self.threads > 1 else None
            for index, weight in enumerate(self.graph.weights):
                if index < len(done):
                    error = done[index].error
                    if error is not None:
                        self.errors.append(error)
                else:
                    errors = len(self.errors)
                    writer.take_digest()
                    self._write_weight(writer, weight)
                    self.ckpt.close()  # drop the memory maps: resident pages would grow to the model's size
                    if journal is not None:
                        tensors, end = writer.position
                        journal(WrittenWeight(weight.name, tensors, end, writer.take_digest(),
                                              self.errors[-1] if len(self.errors) > errors else None))
                if self.progress:
                    self.progress(weight.name.rsplit(".", 1)[0], stored_nbytes(weight.type), self.total)
        return self.total

    def _write_weight(self, writer: SafetensorsWriter, weight: Weight) -> None:
        target = weight.type.dtype
        if not weight.sources:
            if weight.name not in self.scales:
                raise CheckpointError(f"weight {weight.name} has no source and no calibrated value")
            scale = self.scales[weight.name].to(torch_dtype(target)).reshape(tuple(int(d) for d in weight.type.shape))
            writer.write(weight.name, checked(weight, weight.name, scale, "input_scale"))
            return
        if weight.source_dtype == target or not target.quantized:
            # a copy (bit for bit when the format agrees) or a float conversion, component by component
            for stored in stored_tensors(weight.type):
                name = component_name(weight.name, stored.component)
                dtype = torch_dtype(stored.dtype)
                writer.write_parts(name, (checked(weight, source, t if target.quantized else t.to(dtype),
                                                  stored.component, t)
                                          for source, t in _slices(self.ckpt, weight, stored.component)))
            return
        self._quantize(writer, weight)

    def _convert(self, fmt: str, source_name: str, weight: Weight, flat: torch.Tensor) -> _Converted:
        """Quantize one source tensor (any thread): the quantizers refuse NaN and Inf."""
        try:
            if fmt == "nvfp4":
                nvfp4 = quantize_nvfp4(flat, four_over_six=self.four_over_six)
                return _Converted(nvfp4.packed, {"weight_scale": nvfp4.block_scale,
                                                 "weight_scale_2": nvfp4.global_scale},
                                  error_chunks(flat, partial(_nvfp4_rows, nvfp4)), flat.numel())
            fp8 = quantize_fp8(flat)
            return _Converted(fp8.data, {"weight_scale": fp8.scale}, error_chunks(flat, partial(_fp8_rows, fp8)),
                              flat.numel())
        except ValueError as error:
            raise CheckpointError(f"cannot quantize tensor {source_name} (weight {weight.name}) to {fmt}: "
                                  f"{error}") from None

    def _quantize(self, writer: SafetensorsWriter, weight: Weight) -> None:
        """Quantize one source tensor (expert) at a time: the codes stream out, the small scale
        tensors are collected and written after them."""
        fmt = weight.type.dtype.name
        errors = _ErrorSum()
        components: dict[str, list[torch.Tensor]] = {"weight_scale": [], "weight_scale_2": []}

        def finish(converted: _Converted) -> torch.Tensor:
            errors.extend(converted.errors, converted.count)
            for component, value in converted.scales.items():
                components[component].append(value)
            return converted.codes.unsqueeze(0) if weight.stacked else converted.codes

        def codes() -> Iterator[torch.Tensor]:
            # experts are read and written here, in order, while up to `threads` are being quantized
            pending: deque[Future[_Converted]] = deque()
            for source_name, part in _slices(self.ckpt, weight):
                flat = part[0] if weight.stacked else part
                if self.pool is None:
                    yield finish(self._convert(fmt, source_name, weight, flat))
                    continue
                pending.append(self.pool.submit(self._convert, fmt, source_name, weight, flat))
                if len(pending) > self.threads:
                    yield finish(pending.popleft().result())
            while pending:
                yield finish(pending.popleft().result())

        writer.write_parts(weight.name, codes())
        for stored in stored_tensors(weight.type)[1:]:
            parts = components[stored.component]
            value = torch.stack(parts) if weight.stacked else parts[0]
            name = component_name(weight.name, stored.component)
            writer.write(name, checked(weight, name, value.reshape(stored.shape), stored.component))
        self.errors.append(errors.result(weight.name, fmt))
