"""The `triton` runtime backend: ops bound to Triton kernels in the engine's kernels/kernels.json
run through them (compiled binaries on CUDA, the interpreter on a CPU); every other op resolves
as the kernel registry says (its registered kernel, else the reference implementation). An op whose
IR names a Triton kernel the build could not specialise runs its reference implementation with the
build's reason (kernels.json `fallbacks`) as its Resolution's `fallback`: nothing falls back silently.

A launcher adapts an op's operands to a kernel's wrapper (runtime/kernels/triton_gemm.py, and
triton_ops.py through triton_op_launchers.py); the table is keyed by the catalog kernel name the
op's `kernel` attribute records."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import torch

from nemocompile.base.errors import EngineError
from nemocompile.graph.ir import Op
from nemocompile.graph.kernels import REFERENCE, kernel_of

from ..dtypes import torch_dtype
from ..engine_files import read_engine_bytes
from ..engine_format import Manifest
from ..formats import FP8Tensor, NVFP4Tensor
from ..reference_dispatch import Args, reference_impl
from . import triton_gemm
from .registry import Resolution, resolve
from .triton_loader import INDEX, TritonKernels
from .triton_op_launchers import OP_LAUNCHERS, Launcher


def _tensor(value: object, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise EngineError(f"{what} must be a tensor here, got {type(value).__name__}")
    return value


def _gemm_names(kernels: TritonKernels, names: Sequence[str]) -> tuple[str, str | None, Sequence[str]]:
    """(the GEMM, its split-K reduce kernel or None, the op's kernels after them): a GEMM with
    SPLIT_K > 1 is bound with its reduce kernel right after it (codegen: with_split_k_reduces); a
    template without SPLIT_K (the grouped FP8 GEMM) never splits."""
    if int(kernels.entries[names[0]].constexprs.get("SPLIT_K", 1)) > 1:
        if len(names) < 2:
            raise EngineError(f"kernel {names[0]} splits K but is bound without its reduce kernel")
        return names[0], names[1], names[2:]
    return names[0], None, names[1:]


def _grouped_w4a16(kernels: TritonKernels, names: Sequence[str], op: Op, args: Args) -> tuple[torch.Tensor, ...]:
    weight = args[2]
    if not isinstance(weight, NVFP4Tensor):
        raise EngineError(f"{op.opname} at {op.scope}: kernel {kernel_of(op)} needs an NVFP4 weight")
    out_dtype = torch_dtype(op.results[0].type.dtype)
    gemm, reduce, _ = _gemm_names(kernels, names)
    return (triton_gemm.grouped_gemm_w4a16(kernels, gemm, _tensor(args[0], "x"), _tensor(args[1], "offsets"),
                                           weight, out_dtype, reduce),)


def _nvfp4(op: Op, value: object) -> NVFP4Tensor:
    if not isinstance(value, NVFP4Tensor):
        raise EngineError(f"{op.opname} at {op.scope}: kernel {kernel_of(op)} needs an NVFP4 weight")
    return value


def _expert_weight(op: Op, value: object) -> NVFP4Tensor | FP8Tensor:
    """The stacked expert weight in the format the op's kernel takes (the FP8 kernels' names end in _fp8)."""
    if kernel_of(op).endswith("_fp8"):
        if not isinstance(value, FP8Tensor):
            raise EngineError(f"{op.opname} at {op.scope}: kernel {kernel_of(op)} needs an FP8 weight")
        return value
    return _nvfp4(op, value)


def _optional(value: object) -> torch.Tensor | None:
    return value if isinstance(value, torch.Tensor) else None


def _expert_up(kernels: TritonKernels, names: Sequence[str], op: Op, args: Args) -> tuple[torch.Tensor, ...]:
    x = _tensor(args[0], "x")
    gemm, reduce, _ = _gemm_names(kernels, names)
    return (triton_gemm.moe_expert_up(kernels, gemm, x.reshape(-1, x.shape[-1]), _tensor(args[1], "order"),
                                      _tensor(args[2], "offsets"), _expert_weight(op, args[3]), _optional(args[4]),
                                      out_dtype=torch_dtype(op.results[0].type.dtype), reduce_name=reduce),)


def _expert_down(kernels: TritonKernels, names: Sequence[str], op: Op, args: Args) -> tuple[torch.Tensor, ...]:
    routing = _tensor(args[4], "weights")
    gemm, reduce, rest = _gemm_names(kernels, names)
    if not rest:
        raise EngineError(f"{op.opname} at {op.scope}: kernel {gemm} is bound without its combine kernel")
    out = triton_gemm.moe_expert_down(
        kernels, gemm, rest[0], _tensor(args[0], "hidden"), _tensor(args[1], "order"),
        _tensor(args[2], "offsets"), _expert_weight(op, args[3]), routing.reshape(-1, routing.shape[-1]),
        _optional(args[5] if len(args) > 5 else None), reduce_name=reduce)
    return (out.view(*routing.shape[:-1], out.shape[-1]),)


def _per_channel_fp8(op: Op, weight: object) -> FP8Tensor:
    """The FP8 weight with its scale as one per output row (the kernel's PER_CHANNEL form)."""
    if not isinstance(weight, FP8Tensor):
        raise EngineError(f"{op.opname} at {op.scope}: kernel {kernel_of(op)} needs an FP8 weight")
    n = weight.shape[0]
    return FP8Tensor(weight.data, torch.broadcast_to(weight.scale.reshape(-1), (n,)).contiguous())


def _fp8_quant_linear(kernels: TritonKernels, names: Sequence[str], op: Op, args: Args) -> tuple[torch.Tensor, ...]:
    gemm, reduce, _ = _gemm_names(kernels, names)
    return (triton_gemm.fp8_linear(kernels, gemm, _tensor(args[0], "x"), _per_channel_fp8(op, args[1]),
                                   _tensor(args[2], "input_scale"), _optional(args[3] if len(args) > 3 else None),
                                   out_dtype=torch_dtype(op.results[0].type.dtype), reduce_name=reduce),)


def _fp8_linear(kernels: TritonKernels, names: Sequence[str], op: Op, args: Args) -> tuple[torch.Tensor, ...]:
    """linear(x, fp8 weight, bias?) with bf16 x (W8A16); no activation scale."""
    gemm, reduce, _ = _gemm_names(kernels, names)
    return (triton_gemm.fp8_linear(kernels, gemm, _tensor(args[0], "x"), _per_channel_fp8(op, args[1]), None,
                                   _optional(args[2] if len(args) > 2 else None),
                                   out_dtype=torch_dtype(op.results[0].type.dtype), reduce_name=reduce),)


def _nvfp4_linear(kernels: TritonKernels, names: Sequence[str], op: Op, args: Args) -> tuple[torch.Tensor, ...]:
    """linear(x, nvfp4 weight, bias?) (W4A16) or quant_linear(x, nvfp4 weight, input_scale, bias?) (W4A4),
    whose x may be the NVFP4 codes a fused norm wrote (an NVFP4Tensor)."""
    gemm, reduce, _ = _gemm_names(kernels, names)
    quantized = op.opname == "quant_linear"
    input_scale = _tensor(args[2], "input_scale") if quantized else None
    bias_index = 3 if quantized else 2
    x = args[0] if isinstance(args[0], NVFP4Tensor) else _tensor(args[0], "x")  # NVFP4 codes a fused norm wrote
    return (triton_gemm.nvfp4_linear(kernels, gemm, x, _nvfp4(op, args[1]), input_scale,
                                     _optional(args[bias_index] if len(args) > bias_index else None),
                                     out_dtype=torch_dtype(op.results[0].type.dtype), reduce_name=reduce),)


LAUNCHERS: dict[str, Launcher] = {
    "triton_nvfp4_grouped_w4a16": _grouped_w4a16,
    "triton_moe_up_w4a16": _expert_up,
    "triton_moe_up_w4a4": _expert_up,
    "triton_moe_down_w4a16": _expert_down,
    "triton_moe_down_w4a4": _expert_down,
    "triton_moe_up_fp8": _expert_up,
    "triton_moe_down_fp8": _expert_down,
    "triton_fp8_quant_linear": _fp8_quant_linear,
    "triton_fp8_linear": _fp8_linear,
    "triton_nvfp4_linear_w4a16": _nvfp4_linear,
    "triton_nvfp4_quant_linear_w4a4": _nvfp4_linear,
    **OP_LAUNCHERS,
}
# graph -> op result name -> why its Triton kernel was not built for it (codegen/triton/plan.Fallback)
Fallbacks = Mapping[str, Mapping[str, str]]


class TritonBackend:
    """Resolves ops for one engine: `resolver(graph)` is what its Executor calls per op."""

    def __init__(self, kernels: TritonKernels, bindings: Mapping[str, Mapping[str, Sequence[str]]],
                 fallbacks: Fallbacks | None = None) -> None:
        self.kernels = kernels
        self.bindings = bindings
        self.fallbacks = fallbacks or {}
        for graph, ops in bindings.items():
            for result, names in ops.items():
                missing = [n for n in names if n not in kernels.entries]
                if missing:
                    raise EngineError(f"kernels/kernels.json binds {graph} value {result} to unknown kernels {missing}")

    def resolver(self, graph: str) -> Callable[[Op, torch.device | str], Resolution]:
        bound = self.bindings.get(graph, {})
        planned = self.fallbacks.get(graph, {})

        def resolve_op(op: Op, device: torch.device | str) -> Resolution:
            names = bound.get(op.results[0].name) if op.results else None
            if names is None:
                why = planned.get(op.results[0].name) if op.results else None
                if why is not None:
                    requested = kernel_of(op)
                    return Resolution(op.opname, requested, REFERENCE, reference_impl(op.opname),
                                      f"the build made no {requested} kernel for it: {why}")
                return resolve(op, device)
            requested = kernel_of(op)
            launcher = LAUNCHERS.get(requested)
            if launcher is None:
                raise EngineError(f"{op.opname} at {op.scope} is bound to Triton kernel {requested}, which this "
                                  f"runtime cannot launch")
            impl = partial(launcher, self.kernels, tuple(names))
            return Resolution(op.opname, requested, requested, impl)

        return resolve_op


def reference_only(op: Op, device: torch.device | str) -> Resolution:
    """The `reference` backend: every op by its reference implementation, whatever its IR asks."""
    requested = kernel_of(op)
    why = None if requested == REFERENCE else f"the reference backend runs {op.opname} by its reference implementation"
    return Resolution(op.opname, requested, REFERENCE, reference_impl(op.opname), why)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def read_kernel_files(directory: Path, manifest: Manifest, device: torch.device) -> dict[str, bytes]:
    """The verified bytes of the engine's kernel index and sources (and binaries, on CUDA)."""
    wanted = [path for path in manifest.files
              if path == INDEX or path.startswith("kernels/src/") or (device.type == "cuda" and path.startswith("kernels/bin/"))]
    return {path: read_engine_bytes(directory, manifest, path) for path in sorted(wanted)}


def load_triton_backend(directory: Path, manifest: Manifest, device: torch.device) -> TritonBackend:
    """The engine's Triton kernels for `device`; EngineError when the engine has none or triton is missing."""
    if INDEX not in manifest.files:
        raise EngineError(f"{directory} has no Triton kernels (no {INDEX}); run it with backend 'reference'")
    if not triton_available():
        raise EngineError("the triton backend needs the triton package (pip install 'nemocompile[triton]')")
    files = read_kernel_files(directory, manifest, device)
    try:
        index = json.loads(files[INDEX])
        bindings = {str(graph): {str(k): [str(n) for n in v] for k, v in ops.items()}
                    for graph, ops in index["bindings"].items()}
        fallbacks: dict[str, dict[str, str]] = {}
        for entry in index.get("fallbacks", []):
            fallbacks.setdefault(str(entry["graph"]), {})[str(entry["value"])] = str(entry["reason"])
    except (ValueError, KeyError, AttributeError, TypeError) as error:
        raise EngineError(f"{INDEX} has no valid bindings: {error}") from error
    return TritonBackend(TritonKernels.from_files(files, device), bindings, fallbacks)
