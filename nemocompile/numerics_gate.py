"""The numerics gate: a kernel config is checked against its op's reference implementation before
it can be selected, on calibration-like inputs (the operands each op sees when the engine's own
graphs run random token batches, as calibration does, on the reference runtime). On a CPU the
config's kernels run in Triton's interpreter; a config that disagrees beyond the tolerance, fails
to run, or writes NaN is rejected with a message.

The tolerance is stated once: |kernel - reference| <= TOLERANCE_ULPS bf16 ulps of the largest
|reference| value of the op's result (the kernels accumulate in fp32 and round once; the reference
may round intermediate results, which costs a few ulps, never a wrong element)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nemocompile.codegen.triton.emit import INDEX, INDEX_VERSION, KERNELS_DIR
from nemocompile.codegen.triton.spec import TEMPLATE_DIR, KernelInstance
from nemocompile.graph.ir import Graph, Op
from nemocompile.graph.kernels import kernel_of
from nemocompile.runtime.cache import Cache
from nemocompile.runtime.executor import Executor
from nemocompile.runtime.formats import NVFP4Tensor, dequantize_nvfp4
from nemocompile.runtime.kernels.triton_backend import LAUNCHERS, reference_only
from nemocompile.runtime.kernels.triton_loader import TritonKernels
from nemocompile.runtime.reference_dispatch import Args, reference_impl
from nemocompile.runtime.weights import WeightValue

TOLERANCE_ULPS = 4
BF16_MANTISSA_BITS = 7
CAPTURE_BATCH, CAPTURE_SEQ = 2, 8  # the prompts the graphs run to collect each op's operands


@dataclass(frozen=True)
class GateResult:
    passed: bool
    max_error: float
    tolerance: float
    message: str

    def describe(self) -> str:
        return self.message


class GateCache:
    """Verdicts of the gate by the instances' specialisation, kept beside the compile cache: a
    kernel's correctness is a property of its specialisation, not of the engine's weights. Warps
    and stages are left out of the key: the interpreter the gate runs ignores them."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.memory: dict[str, GateResult] = {}

    @staticmethod
    def key(graph: str, instances: Sequence[KernelInstance], sources: Mapping[str, bytes] | None) -> str:
        launch = ("num_warps", "num_stages")
        text = json.dumps([{k: v for k, v in i.describe().items() if k not in launch} for i in instances],
                          sort_keys=True)
        extra = b"".join(sorted((sources or {}).values()))
        return hashlib.sha256(graph.encode() + text.encode() + extra + _template_bytes(instances)).hexdigest()

    def get(self, key: str) -> GateResult | None:
        if key in self.memory:
            return self.memory[key]
        path = self.directory / f"{key}.json" if self.directory else None
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
                result = GateResult(bool(data["passed"]), float(data["max_error"]), float(data["tolerance"]),
                                    str(data["message"]))
            except (ValueError, KeyError, TypeError):
                return None
            self.memory[key] = result
            return result
        return None

    def put(self, key: str, result: GateResult) -> None:
        self.memory[key] = result
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"{key}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"passed": result.passed, "max_error": result.max_error,
                                       "tolerance": result.tolerance, "message": result.message}))
            tmp.replace(path)


def _template_bytes(instances: Sequence[KernelInstance]) -> bytes:
    return b"".join(i.template.source() for i in instances)


def tolerance_for(expected: torch.Tensor) -> float:
    largest = float(expected.float().abs().max()) if expected.numel() else 0.0
    if largest == 0.0 or not math.isfinite(largest):
        return TOLERANCE_ULPS * 2.0 ** -126
    return TOLERANCE_ULPS * 2.0 ** (math.floor(math.log2(largest)) - BF16_MANTISSA_BITS)


def _copy(value: WeightValue | None) -> WeightValue | None:
    return value.clone() if isinstance(value, torch.Tensor) else value


def capture_operands(graphs: Mapping[str, Graph], weights: Mapping[str, WeightValue], wanted: set[tuple[str, str]],
                     vocab_size: int, seed: int = 0) -> dict[tuple[str, str], tuple[Op, Args]]:
    """(graph name, op result name) -> (the op, its operand values) for the wanted ops, from one
    prefill call of CAPTURE_BATCH random prompts and one decode step after it."""
    found: dict[tuple[str, str], tuple[Op, Args]] = {}

    def observer_for(graph_name: str):  # type: ignore[no-untyped-def]
        def observe(op: Op, args: Sequence[WeightValue | None]) -> None:
            key = (graph_name, op.results[0].name) if op.results else None
            if key in wanted and key not in found:
                found[key] = (op, [_copy(a) for a in args])
        return observe

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (CAPTURE_BATCH, CAPTURE_SEQ), generator=generator)
    prefill = graphs["prefill"]
    cache = Cache.for_graph(prefill, CAPTURE_BATCH, torch.device("cpu"))
    with torch.inference_mode():
        Executor(prefill, weights, observer_for("prefill"), reference_only).run(ids, cache)
        if "decode" in graphs:
            Executor(graphs["decode"], weights, observer_for("decode"), reference_only).run(ids[:, -1:], cache)
    return found


def _kernel_files(instances: Sequence[KernelInstance], sources: Mapping[str, bytes] | None) -> dict[str, bytes]:
    """An engine-like kernels/ folder in memory: the index and the template sources (`sources`
    replaces template files by name: tests put a deliberately wrong kernel there)."""
    files = {f"{KERNELS_DIR}/src/{name}": (sources or {}).get(name) or (TEMPLATE_DIR / name).read_bytes()
             for name in sorted({f for i in instances for f in i.template.files})}
    index = {"version": INDEX_VERSION, "kernels": [i.describe() for i in instances], "bindings": {}}
    files[f"{KERNELS_DIR}/{INDEX}"] = json.dumps(index).encode()
    return files


def _values(result: torch.Tensor | NVFP4Tensor) -> torch.Tensor:
    """A result as values: NVFP4 codes (a norm's nvfp4codes output) dequantized."""
    return dequantize_nvfp4(result) if isinstance(result, NVFP4Tensor) else result


def check(op: Op, args: Args, instances: Sequence[KernelInstance],
          sources: Mapping[str, bytes] | None = None) -> GateResult:
    """Run `op` through `instances` (its kernels, in launch order) in the interpreter and compare
    with its reference implementation."""
    launcher = LAUNCHERS.get(kernel_of(op))
    if launcher is None:
        return GateResult(False, math.inf, 0.0, f"no launcher for kernel {kernel_of(op)}")
    with torch.inference_mode():
        expected = _values(reference_impl(op.opname)(op, args)[0])
        try:
            kernels = TritonKernels.from_files(_kernel_files(instances, sources), "cpu")
            actual = _values(launcher(kernels, [i.name for i in instances], op, args)[0])
        except Exception as error:  # a config that fails to run is rejected, whatever Triton raised
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            return GateResult(False, math.inf, 0.0, f"failed in the interpreter: {first}")
    tolerance = tolerance_for(expected)
    if actual.shape != expected.shape:
        return GateResult(False, math.inf, tolerance, f"result shape {list(actual.shape)}, the reference's "
                                                      f"{list(expected.shape)}")
    difference = (actual.float() - expected.float()).abs()
    if bool(torch.isnan(difference).any()):
        return GateResult(False, math.inf, tolerance, "NaN where the reference has a number")
    worst = float(difference.max()) if difference.numel() else 0.0
    if worst > tolerance:
        return GateResult(False, worst, tolerance, f"max error {worst:.3g} against the reference exceeds the "
                                                   f"tolerance {tolerance:.3g} ({TOLERANCE_ULPS} bf16 ulps of the largest value)")
    return GateResult(True, worst, tolerance, f"passed: max error {worst:.3g} <= tolerance {tolerance:.3g}")


class EngineGate:
    """The gate of one build: operands captured once from the engine's graphs (on the first check),
    verdicts cached by the instances' specialisation and the graph whose inputs they ran on."""

    def __init__(self, graphs: Mapping[str, Graph], weights: Mapping[str, WeightValue], vocab_size: int,
                 cache: GateCache, sources: Mapping[str, bytes] | None = None) -> None:
        self.graphs = graphs
        self.weights = weights
        self.vocab_size = vocab_size
        self.cache = cache
        self.sources = sources
        self.operands: dict[tuple[str, str], tuple[Op, Args]] | None = None
        self.checked = 0  # interpreter runs (cache misses)

    def __call__(self, graph: str, op: Op, instances: Sequence[KernelInstance]) -> GateResult:
        key = GateCache.key(graph, instances, self.sources)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        if self.operands is None:
            wanted = {(name, o.results[0].name) for name, g in self.graphs.items() for o in g.ops
                      if o.results and kernel_of(o) in LAUNCHERS}
            self.operands = capture_operands(self.graphs, self.weights, wanted, self.vocab_size)
        found = self.operands.get((graph, op.results[0].name))
        if found is None:
            return GateResult(False, math.inf, 0.0, f"no operands were captured for {op.opname} at {op.scope}")
        result = check(found[0], found[1], instances, self.sources)
        self.checked += 1
        self.cache.put(key, result)
        return result
