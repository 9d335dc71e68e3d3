"""The streaming quantize stage of a build: read each weight from the checkpoint (one expert at a
time when stacked, in runs of rows when copied; plain reads into reused buffers, see
checkpoint_reader), convert it to the format the IR gives it (NVFP4, FP8 or a float) on worker
threads, write it into the engine's safetensors file in order, hashing it as it goes, and let it
go. Peak host memory is a few jobs' tensors (an expert to quantize, or a few io_chunk_bytes of rows
of a larger tensor to quantize, copy or convert), not the model. Weights stored quantized in the checkpoint are
copied bit for bit. Each quantized weight's error is measured against its source while it is
quantized.

Every tensor is checked after its final conversion, just before it is written: floats finite
(a finite fp32 value past bf16's range becomes Inf in the conversion), FP8 E4M3 bytes never NaN
(0x7F, 0xFF; E4M3 has no Inf), and scales (ModelOpt's weight_scale, weight_scale_2 and
input_scale, taken bit for bit, or calibrated) positive normal float32s, except block scales,
which may be 0 (an all-zero block) but never negative."""

from __future__ import annotations

import gc
import math
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Protocol, cast

import torch

from nemocompile.base.errors import CheckpointError
from nemocompile.base.settings import settings
from nemocompile.graph.checkpoint import Checkpoint
from nemocompile.graph.ir import Graph, Weight
from nemocompile.graph.nemotron_h import INPUT_SCALE_CATEGORY
from nemocompile.graph.storage import component_name, stored_nbytes, stored_tensors
from nemocompile.runtime.dtypes import torch_dtype
from nemocompile.runtime.formats import quantize_fp8_measured, quantize_nvfp4_measured
from nemocompile.runtime.formats.fp8 import FLOAT32_TINY
from nemocompile.runtime.weights import WeightValue, assemble

from .checkpoint_reader import CheckpointReader
from .safetensors_writer import SafetensorsWriter, data_start

E4M3_NAN_BITS = 0x7F  # E4M3 (fn) has no Inf: S.1111.111 is NaN, the bytes 0x7F and 0xFF
FP32_SCALES = frozenset({"weight_scale_2", "input_scale"})  # and FP8's fp32 weight_scale
ProgressHook = Callable[[str, int, int], None]  # (what, bytes just processed, bytes in all)


@dataclass(frozen=True)
class QuantizationError:
    weight: str
    format: str
    rel_rms: float  # ||W - Q(W)|| / ||W||
    sqnr_db: float  # 10 log10(sum W^2 / sum (W - Q(W))^2)


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
PREFETCH_PER_THREAD = 2  # conversions in flight per thread, ahead of the writer


@dataclass(frozen=True)
class WrittenWeight:
    """A weight completely written: the tensors of the file up to and including it, where its bytes
    end in the data region, the sha256 of the file from its first byte (the header) through them,
    and its quantization error (None for a copy)."""

    weight: str
    tensors: int
    end: int
    sha256: str
    error: QuantizationError | None


Job = Callable[[], object]


class WeightSink(Protocol):
    """What the stream writes into, tensor by tensor in declared order: a SafetensorsWriter, or
    rank_weights.RankSink (each rank's piece of each tensor into the rank's own file)."""

    @property
    def position(self) -> tuple[int, int]: ...  # (tensors written, where their bytes end)

    def sha256(self) -> str: ...  # of what is written so far

    def write(self, name: str, tensor: torch.Tensor) -> None: ...

    def write_parts(self, name: str, parts: Iterable[torch.Tensor]) -> None: ...

    def __enter__(self) -> WeightSink: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc_value: BaseException | None,
                 traceback: TracebackType | None) -> None: ...


SinkOpener = Callable[[tuple[int, int] | None], WeightSink]  # opened at resume_at (None: from the start)


class _Ahead:
    """Runs jobs on a pool up to `depth` ahead of the consumer, and hands their results over in order."""

    def __init__(self, pool: ThreadPoolExecutor, jobs: Iterator[Job], depth: int) -> None:
        self.pool = pool
        self.jobs = jobs
        self.depth = depth
        self.pending: deque[Future[object]] = deque()

    def next(self) -> object:
        while len(self.pending) < self.depth:
            job = next(self.jobs, None)
            if job is None:
                break
            self.pending.append(self.pool.submit(job))
        return self.pending.popleft().result()


class _RunAmax:
    """The largest magnitude of one checkpoint tensor, read in runs of rows into the reading thread's
    buffer: computed once, by the first job that asks (the others wait for it)."""

    def __init__(self, reader: CheckpointReader, name: str, rows: int, step: int) -> None:
        self.reader = reader
        self.name = name
        self.rows = rows
        self.step = step
        self._lock = threading.Lock()
        self._value: torch.Tensor | None = None

    def value(self) -> torch.Tensor:
        """The amax, float32 0-d; ValueError if the tensor holds NaN or Inf."""
        with self._lock:
            if self._value is None:
                amax = torch.zeros((), dtype=torch.float32)
                for start in range(0, self.rows, self.step):
                    run = self.reader.read(self.name, slice(start, min(start + self.step, self.rows)), scratch=True)
                    low, high = torch.aminmax(run)  # NaN propagates
                    amax = torch.maximum(amax, torch.maximum(high, -low).to(torch.float32))
                if not bool(torch.isfinite(amax)):
                    raise ValueError("it holds NaN or Inf values")
                self._value = amax
            return self._value


class WeightStream:
    """Writes a graph's weights into one safetensors file, converting each on the way.

    Reading and converting run on `threads` worker threads (each with one torch thread: the
    conversions are many small, cache-sized steps, which a second torch thread per op only slows),
    up to PREFETCH_PER_THREAD jobs each ahead of the calling thread, which writes the results in
    file order and hashes them as they go. A job is one source tensor to quantize (an expert, or an
    unstacked weight of at most io_chunk_bytes), or a run of io_chunk_bytes of rows of a larger
    tensor to quantize, copy or convert, so memory holds a few jobs' tensors whatever the model's size."""

    def __init__(self, ckpt: Checkpoint, graph: Graph, scales: Mapping[str, torch.Tensor],
                 progress: ProgressHook | None = None, four_over_six: bool = False, threads: int = 1) -> None:
        self.ckpt = ckpt
        self.reader = CheckpointReader(ckpt)
        self.threads = max(1, threads)
        self.four_over_six = four_over_six
        self.graph = graph
        self.scales = scales
        self.progress = progress
        self.errors: list[QuantizationError] = []
        self.total = sum(stored_nbytes(w.type) for w in graph.weights)
        self.sha256 = ""  # the whole file's, once written
        self._results: _Ahead | None = None

    def data_start(self) -> int:
        """Where the weights file's data region starts."""
        return data_start(engine_tensor_specs(self.graph), METADATA)

    def write(self, path: Path, done: Sequence[WrittenWeight] = (),
              journal: Callable[[WrittenWeight], None] | None = None, sink: SinkOpener | None = None) -> int:
        """Write every weight into `path`, or into what `sink` opens (rank_weights.RankSink: each
        rank's piece into its own file). `done`: the leading weights a killed build of the same
        input already wrote (verified by their hash): the file is continued after them. `journal`
        hears of each weight once its bytes are in the file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        resume_at = (done[-1].tensors, done[-1].end) if done else None
        opener = sink or partial(SafetensorsWriter, path, engine_tensor_specs(self.graph), METADATA)
        torch_threads = torch.get_num_threads()
        # This thread only writes, hashes and checks the small scale tensors: with one torch thread it
        # never enters an OpenMP region, whose idle team would spin for CPU the workers need.
        torch.set_num_threads(1)
        # The objects alive now (the graphs, the checkpoint's index, modules) outlive the stage:
        # frozen, the collections the stage's small objects trigger do not walk them again and again.
        gc.freeze()
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="quantize", initializer=torch.set_num_threads,
                                  initargs=(1,))
        try:
            with opener(resume_at) as writer:
                self._results = _Ahead(pool, self._jobs(self.graph.weights[len(done):]),
                                       PREFETCH_PER_THREAD * self.threads)
                for index, weight in enumerate(self.graph.weights):
                    if index < len(done):
                        error = done[index].error
                        if error is not None:
                            self.errors.append(error)
                    else:
                        errors = len(self.errors)
                        self._write_weight(writer, weight)
                        if journal is not None:
                            tensors, end = writer.position
                            journal(WrittenWeight(weight.name, tensors, end, writer.sha256(),
                                                  self.errors[-1] if len(self.errors) > errors else None))
                    if self.progress:
                        self.progress(weight.name.rsplit(".", 1)[0], stored_nbytes(weight.type), self.total)
                self.sha256 = writer.sha256()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(torch_threads)  # this thread and the workers set 1
            gc.unfreeze()
            self.reader.close()
            self._results = None
        return self.total

    # ------------------------------------------------------------------------------ the jobs

    def _jobs(self, weights: Sequence[Weight]) -> Iterator[Job]:
        """Every job of these weights, in the order _write_weight takes their results."""
        for weight in weights:
            for _, jobs in self._plan(weight):
                yield from jobs

    def _plan(self, weight: Weight) -> list[tuple[str, list[Job]]]:
        """The weight's stored tensors (a quantized weight: its codes only, the scales come with them)
        and the jobs that make each one's rows, in order."""
        target = weight.type.dtype
        if not weight.sources:
            return []
        if weight.source_dtype == target or not target.quantized:
            return [(component_name(weight.name, stored.component), self._copy_jobs(weight, stored.component))
                    for stored in stored_tensors(weight.type)]
        fmt = target.name
        return [(weight.name, [job for source in weight.sources
                               for job in self._convert_jobs(fmt, weight, component_name(source.tensor, ""))])]

    def _convert_jobs(self, fmt: str, weight: Weight, name: str) -> list[Job]:
        """One job per source tensor (an expert), or, for an unstacked tensor larger than io_chunk_bytes,
        one per io_chunk_bytes of its rows, each quantized with the whole tensor's largest magnitude
        (found first, by one more read of the tensor in runs): the same bytes, but memory holds a run
        of rows, not the tensor (a 1 GB projection or embedding of a large model)."""
        ref = self.ckpt.ref(name)
        whole: list[Job] = [partial(self._convert, fmt, weight, name, None, None)]
        if weight.stacked or ref is None or len(ref.shape) != 2 or not ref.shape[0]:
            return whole
        nbytes, run_bytes = self.ckpt.location(name)[2], settings().io_chunk_bytes
        if nbytes <= run_bytes:
            return whole
        rows = ref.shape[0]
        step = max(1, run_bytes // max(1, nbytes // rows))
        amax = _RunAmax(self.reader, name, rows, step)
        return [partial(self._convert, fmt, weight, name, slice(start, min(start + step, rows)), amax)
                for start in range(0, rows, step)]

    def _copy_jobs(self, weight: Weight, component: str) -> list[Job]:
        """A copy (bit for bit when the format agrees) or a float conversion: one job per expert, or
        per io_chunk_bytes of rows of an unstacked tensor."""
        (stored,) = [t for t in stored_tensors(weight.type) if t.component == component]
        jobs: list[Job] = []
        for source in weight.sources:
            name = component_name(source.tensor, component)
            shape = stored.shape[1:] if weight.stacked else stored.shape
            if weight.stacked or len(shape) < 2:
                jobs.append(partial(self._copy, weight, component, name, None))
                continue
            row_bytes = max(1, stored.nbytes // max(shape[0], 1))
            step = max(1, settings().io_chunk_bytes // row_bytes)
            jobs.extend(partial(self._copy, weight, component, name, slice(start, min(start + step, shape[0])))
                        for start in range(0, shape[0], step))
        return jobs

    def _copy(self, weight: Weight, component: str, name: str, rows: slice | None) -> torch.Tensor:
        """Rows of one source tensor as the engine stores them (any thread)."""
        (stored,) = [t for t in stored_tensors(weight.type) if t.component == component]
        tensor = self.reader.read(name, rows)
        scalar = stored.shape[1:] == () if weight.stacked else stored.shape == ()
        if scalar and tensor.numel() == 1:  # scalar scales exported as [1] are read as 0-d
            tensor = tensor.reshape(())
        if weight.stacked:
            tensor = tensor.unsqueeze(0)
        target = weight.type.dtype
        converted = tensor if target.quantized else tensor.to(torch_dtype(stored.dtype))
        return checked(weight, name, converted, component, tensor)

    def _convert(self, fmt: str, weight: Weight, source_name: str, rows: slice | None,
                 run_amax: _RunAmax | None) -> _Converted:
        """Read one source tensor (an expert), or `rows` of it quantized with the whole tensor's
        largest magnitude `run_amax`, into this thread's buffer and quantize it, measuring the error
        on the way (any thread); the quantizers refuse NaN and Inf."""
        try:
            amax = run_amax.value() if run_amax is not None else None  # (before this thread's own read)
            flat = self.reader.read(source_name, rows, scratch=True)
            if fmt == "nvfp4":
                nvfp4, errors = quantize_nvfp4_measured(flat, four_over_six=self.four_over_six, amax=amax)
                return _Converted(nvfp4.packed, {"weight_scale": nvfp4.block_scale,
                                                 "weight_scale_2": nvfp4.global_scale}, errors, flat.numel())
            fp8, errors = quantize_fp8_measured(flat, amax=amax)
            return _Converted(fp8.data, {"weight_scale": fp8.scale}, errors, flat.numel())
        except ValueError as error:
            raise CheckpointError(f"cannot quantize tensor {source_name} (weight {weight.name}) to {fmt}: "
                                  f"{error}") from None

    # ------------------------------------------------------------------------------ writing

    def _next(self) -> object:
        assert self._results is not None
        return self._results.next()

    def _write_weight(self, writer: WeightSink, weight: Weight) -> None:
        target = weight.type.dtype
        if not weight.sources:
            if weight.name not in self.scales:
                raise CheckpointError(f"weight {weight.name} has no source and no calibrated value")
            scale = self.scales[weight.name].to(torch_dtype(target)).reshape(tuple(int(d) for d in weight.type.shape))
            writer.write(weight.name, checked(weight, weight.name, scale, "input_scale"))
            return
        if weight.source_dtype == target or not target.quantized:
            for name, jobs in self._plan(weight):
                writer.write_parts(name, (cast(torch.Tensor, self._next()) for _ in jobs))
            return
        self._quantize(writer, weight)

    def _quantize(self, writer: WeightSink, weight: Weight) -> None:
        """The codes stream out one job (an expert, or a run of rows) at a time, as the workers quantize
        them; the small scale tensors are collected and written after them."""
        fmt = weight.type.dtype.name
        errors = _ErrorSum()
        components: dict[str, list[torch.Tensor]] = {"weight_scale": [], "weight_scale_2": []}
        ((_, jobs),) = self._plan(weight)

        def codes() -> Iterator[torch.Tensor]:
            for _ in jobs:
                converted = cast(_Converted, self._next())
                errors.extend(converted.errors, converted.count)
                for component, value in converted.scales.items():
                    components[component].append(value)
                yield converted.codes.unsqueeze(0) if weight.stacked else converted.codes

        writer.write_parts(weight.name, codes())
        for stored in stored_tensors(weight.type)[1:]:
            parts = components[stored.component]
            if weight.stacked:
                value = torch.stack(parts)
            else:  # block scales come by runs of rows; a global scale is the same for every run
                value = torch.cat(parts) if parts[0].ndim else parts[0]
            name = component_name(weight.name, stored.component)
            writer.write(name, checked(weight, name, value.reshape(stored.shape), stored.component))
        self.errors.append(errors.result(weight.name, fmt))
