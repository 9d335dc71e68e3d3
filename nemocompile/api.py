"""The public Python API: `build`, `load`, and the number formats."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, overload

from nemocompile.base.errors import NemocompileError, UsageError
from nemocompile.runtime.engine import Engine
from nemocompile.runtime.engine import load as _load
from nemocompile.runtime.onnx_backend import OnnxEngine, load_onnx, load_tensorrt

from .driver import BuildResult
from .driver import build as _build
from .engine_files import remove_set_aside, restore_set_aside
from .options import BuildOptions

# The driver's messages name the CLI's options; through the API they name `build`'s arguments.
API_ARGUMENTS = {
    "--force": "force=True", "--target": "target", "--precision": "precision", "--override": "overrides",
    "--policy": "policy_file", "--exclude": "exclude", "--calibrate": "calibrate",
    "--calibration-data": "calibration_data", "--max-batch-size": "max_batch_size",
    "--max-context": "max_context", "--act-scales": "act_scales", "--resume": "resume=True",
    "--calibration-format": "calibration_format", "--calibration-length": "calibration_length", "--calibration-device": "calibration_device", "-o": "out",
}
_OPTION = re.compile(r"(?<![\w-])(" + "|".join(re.escape(o) for o in sorted(API_ARGUMENTS, key=len, reverse=True))
                     + r")(?![\w-])")


def api_message(message: str) -> str:
    """`message` with every CLI option it names replaced by the matching `build` argument."""
    return _OPTION.sub(lambda match: API_ARGUMENTS[match.group(1)], message)


def build(model: str | Path | None, out: str | Path, target: str = "h100", precision: str = "auto",
          force: bool = False, overrides: Sequence[str] = (), policy_file: str | Path | None = None,
          exclude: Sequence[str] = (), calibrate: int = 8, calibration_data: str | Path | None = None,
          max_batch_size: int | None = None, max_context: int | None = None, tensorrt: bool = False,
          calibration_device: str = "cpu", act_scales: str | None = None, calibration_format: str = "auto",
          calibration_length: int | None = None, resume: bool = False,
          tuning_db: str | Path | None = None, world_size: int = 1, tp: int | None = None,
          ep: int | None = None) -> BuildResult:
    """Compile the checkpoint directory `model` (None: the embedded demo model) into the engine
    directory `out` for `target`, split over `world_size` ranks (tensor-parallel `tp` and
    expert-parallel `ep` ranks, each 1 or the world size, by default the world size). precision:
    auto (the target's policy), bf16 or fp32;
    overrides: "component=precision" strings, e.g. "routed_experts=fp8". max_batch_size and
    max_context not given start at 256 and 131072 and shrink to what fits the target
    (docs/memory-plan.md); given, a plan that does not fit them is refused. Errors name these
    arguments (force=True), not the CLI's options."""
    try:
        options = BuildOptions(target=target, precision=precision, overrides=tuple(overrides),
                               policy_file=Path(policy_file) if policy_file else None, exclude=tuple(exclude),
                               calibrate=calibrate,
                               calibration_data=Path(calibration_data) if calibration_data else None,
                               act_scales=act_scales, calibration_format=calibration_format,
                               calibration_length=calibration_length, calibration_device=calibration_device,
                               max_batch_size=max_batch_size, max_context=max_context, force=force,
                               tensorrt=tensorrt, resume=resume,
                               tuning_db=Path(tuning_db) if tuning_db is not None else None,
                               world_size=world_size, tp=tp, ep=ep)
        return _build(Path(model) if model is not None else None, Path(out), options)
    except NemocompileError as error:
        renamed = api_message(str(error))
        if renamed == str(error):
            raise
        raise type(error)(renamed) from error


BACKENDS = ("reference", "triton", "onnx", "tensorrt")


@overload
def load(path: str | Path, device: str | None = None,
         backend: Literal["reference", "triton"] | None = None, compile: bool | None = None) -> Engine: ...


@overload
def load(path: str | Path, device: str | None = None, *, backend: str,
         compile: bool | None = None) -> Engine | OnnxEngine: ...


def load(path: str | Path, device: str | None = None, backend: str | None = None,
         compile: bool | None = None) -> Engine | OnnxEngine:
    """Load an engine directory; verifies every file's sha256 and the GPU arch first. When `path`
    is missing because a build died mid-swap, the engine it set aside is put back first; engines set
    aside by interrupted builds are deleted once `path` verified (a warning says which).
    backend: "triton" (the engine's Triton kernels: stored binaries on a GPU, Triton's interpreter on
    a CPU), "reference" (every op by its reference implementation), "onnx" (the decomposed ONNX export
    of an engine built with tensorrt=True, on the CPU), "tensorrt" (the TensorRT engine); by default
    triton where the engine has kernels, a GPU is present and triton is installed, else each op as
    the runtime's kernel registry says.
    compile: on the CPU, run the decode step compiled by torch.compile (each batch size compiles on
    its first decode step, tens of seconds cold; then float32 engines decode 2-3x faster, bf16 ones about 1.25x,
    quantized ones no faster: their quantized GEMMs stay eager); None: the
    `cpu_compile_decode` setting (NEMOCOMPILE_CPU_COMPILE_DECODE)."""
    if backend is not None and backend not in BACKENDS:
        raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if compile and backend in ("onnx", "tensorrt"):
        raise UsageError(f"compile applies to the reference and triton backends, not {backend}")
    restore_set_aside(Path(path))
    engine: Engine | OnnxEngine
    if backend == "onnx":
        engine = load_onnx(path)
    elif backend == "tensorrt":
        engine = load_tensorrt(path)
    else:
        engine = _load(path, device, backend, compile)
    remove_set_aside(Path(path))
    return engine
