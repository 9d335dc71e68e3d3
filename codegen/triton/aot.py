"""Ahead-of-time compile of kernel instances with `triton.compile` for sm_90a / sm_100a, no GPU.

Each (instance, arch) compiles once into a content-addressed entry of a compile cache shared by
builds (`<cache>/<key>/`: PTX, cubin, Triton's metadata JSON and a launch sidecar with the
signature and constants Triton's launcher needs). The key hashes the template sources, the
specialisation, the launch options, the arch and the Triton version, so anything that changes
the binary changes the key. Registers and spills come from cuobjdump (shipped with Triton's
wheel); shared memory from Triton's metadata; the tensor-core instructions from the PTX text."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemocompile.base.errors import CompileError

from .spec import ARCHS, KernelInstance

# FMA contraction is stated, not left to the default (Triton 3.9 warns that it changes in 3.10).
FP_FUSION = True
# Tensor-core instructions in PTX, with their shape/kind suffix (e.g. wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16).
TENSOR_CORE_INSTRUCTION = re.compile(r"\b(?:wgmma\.mma_async|tcgen05\.mma|mma\.sync)[a-z0-9_.:]*")
ARTIFACTS = ("ptx", "cubin", "json", "launch.json")


@dataclass(frozen=True)
class CompiledKernel:
    """One (instance, arch) binary in the cache: where its files are and what it uses."""

    name: str
    arch: str
    key: str
    directory: Path
    registers: int
    spills: int
    shared_bytes: int
    tensor_cores: tuple[str, ...]  # distinct tensor-core instructions in the PTX
    seconds: float
    cached: bool

    def file(self, artifact: str) -> Path:
        return self.directory / f"{self.key}.{artifact}"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "arch": self.arch, "key": self.key, "registers": self.registers,
                "spills": self.spills, "shared_bytes": self.shared_bytes, "tensor_cores": list(self.tensor_cores),
                "compile_seconds": round(self.seconds, 3), "cached": self.cached}


def triton_version() -> str:
    import triton

    return str(triton.__version__)


def _template_function(instance: KernelInstance) -> Any:
    """The template's jit function, imported with the interpreter off (compile needs a JITFunction)."""
    import triton

    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = False
        module = importlib.import_module(f"{__package__}.templates.{instance.template.module}")
    fn = getattr(module, instance.template.entry)
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise CompileError(f"kernel {instance.name}: {instance.template.entry} was imported as {type(fn).__name__} "
                           f"(TRITON_INTERPRET was on when the templates were first imported); the compiler "
                           f"needs a JITFunction")
    return fn


def compile_instance(instance: KernelInstance, arch: str, cache_dir: Path) -> CompiledKernel:
    """The binary of `instance` for `arch`, from the cache or compiled into it."""
    if arch not in ARCHS:
        raise CompileError(f"kernel {instance.name}: arch {arch} is not one of {', '.join(ARCHS)}")
    if arch not in instance.template.archs:
        raise CompileError(f"kernel {instance.name}: template {instance.template.entry} does not compile for {arch}")
    version = triton_version()
    key = instance.key(arch, version)
    entry = cache_dir / key
    start = time.perf_counter()
    cached = all((entry / f"{key}.{artifact}").is_file() for artifact in ARTIFACTS)
    if not cached:
        _compile_into(instance, arch, key, entry)
    return _describe(instance, arch, key, entry, time.perf_counter() - start, cached)


def _compile_into(instance: KernelInstance, arch: str, key: str, entry: Path) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _template_function(instance)
    signature = instance.signature()
    names = list(signature)
    attrs = {(names.index(param),): [["tt.divisibility", 16]] for param in instance.template.aligned}
    source = ASTSource(fn, signature, constexprs=instance.constexpr_values(), attrs=attrs)
    options = {"num_warps": instance.num_warps, "num_stages": instance.num_stages, "enable_fp_fusion": FP_FUSION}
    try:  # Triton's own cache is bypassed: the cache here is the one builds share, and timings stay honest
        with triton.knobs.compilation.scope():
            triton.knobs.compilation.always_compile = True
            kernel = triton.compile(source, target=GPUTarget("cuda", ARCHS[arch], 32), options=options)
    except Exception as error:  # Triton raises many types; one sentence names the kernel
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CompileError(f"kernel {instance.name} does not compile for {arch}: {first}") from error
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
    metadata = dict(kernel.metadata._asdict())
    metadata["target"] = {"backend": "cuda", "arch": ARCHS[arch], "warp_size": 32}
    launch = {"name": kernel.metadata.name, "signature": signature,
              "constants": [[list(k), v] for k, v in source.constants.items()], "arch": arch,
              "triton": triton_version()}
    (staging / f"{key}.ptx").write_text(kernel.asm["ptx"])
    (staging / f"{key}.cubin").write_bytes(kernel.asm["cubin"])
    (staging / f"{key}.json").write_text(json.dumps(metadata, sort_keys=True, default=str))
    (staging / f"{key}.launch.json").write_text(json.dumps(launch, sort_keys=True))
    try:
        os.rename(staging, entry)
    except OSError:  # another build filled the same entry first: its files are the same
        shutil.rmtree(staging, ignore_errors=True)


def _describe(instance: KernelInstance, arch: str, key: str, entry: Path, seconds: float,
              cached: bool) -> CompiledKernel:
    ptx = (entry / f"{key}.ptx").read_text()
    metadata = json.loads((entry / f"{key}.json").read_text())
    registers, spills = resource_usage(entry / f"{key}.cubin")
    found = tuple(sorted(set(TENSOR_CORE_INSTRUCTION.findall(ptx))))
    return CompiledKernel(instance.name, arch, key, entry, registers, spills, int(metadata.get("shared", 0)),
                          found, seconds, cached)


def cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resource_usage(cubin: Path) -> tuple[int, int]:
    """(registers per thread, stack bytes) of the one kernel in `cubin`, from cuobjdump."""
    try:
        text = subprocess.run([str(cuobjdump()), "--dump-resource-usage", str(cubin)], capture_output=True,
                              text=True, timeout=600, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise CompileError(f"cuobjdump could not read the resource usage of {cubin}: {error}") from error
    registers = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    if registers is None:
        raise CompileError(f"cuobjdump printed no register count for {cubin}")
    return int(registers.group(1)), int(stack.group(1)) if stack else 0
