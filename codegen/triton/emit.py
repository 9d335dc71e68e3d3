"""Emission of an engine's Triton kernels into its kernels/ folder.

Layout (every file is hashed in the engine's manifest, like any other engine file):
- kernels/src/<template>.py: the template files, verbatim; the runtime imports them (and only
  them) after their hash is verified, to run them in the interpreter or to rebuild launchers;
- kernels/bin/<key>.{ptx,cubin,json,launch.json}: one content-addressed binary per (kernel, arch),
  copied from the shared compile cache;
- kernels/kernels.json: the index: Triton version, arch, and per kernel its op, template entry,
  signature, constexprs, launch options and binary key, with its registers, shared memory and
  tensor-core instructions; the bindings (graph -> op result -> kernels) and the fallbacks (ops whose
  chosen Triton kernel has no specialisation for them, with the reason)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .aot import ARTIFACTS, CompiledKernel, compile_instance, triton_version
from .spec import TEMPLATE_DIR, KernelInstance

KERNELS_DIR = "kernels"
INDEX = "kernels.json"
INDEX_VERSION = 1


@dataclass(frozen=True)
class EmittedKernels:
    """What emit() wrote: files relative to the engine directory, and per kernel its binary."""

    files: tuple[str, ...]
    compiled: tuple[CompiledKernel, ...]
    seconds: float
    fallbacks: tuple[Mapping[str, str], ...] = ()

    def report_rows(self) -> list[dict[str, Any]]:
        return [kernel.describe() for kernel in self.compiled]


def _check_unique(instances: Sequence[KernelInstance]) -> None:
    names = [i.name for i in instances]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"kernel names must be unique in an engine; repeated: {', '.join(duplicates)}")


def emit(instances: Sequence[KernelInstance], engine_dir: Path, arch: str, cache_dir: Path,
         compile_binaries: bool = True, bindings: Mapping[str, Mapping[str, list[str]]] | None = None,
         fallbacks: Sequence[Mapping[str, str]] = ()) -> EmittedKernels:
    """Write the sources (and, with compile_binaries, the binaries for `arch`) of `instances`, the
    bindings (graph -> op result name -> instance names) the runtime dispatches by, and the ops whose
    Triton kernel has no specialisation (graph, value, op, kernel, reason: they run their reference)."""
    _check_unique(instances)
    start = time.perf_counter()
    root = engine_dir / KERNELS_DIR
    (root / "src").mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    for name in sorted({f for i in instances for f in i.template.files}):
        shutil.copyfile(TEMPLATE_DIR / name, root / "src" / name)
        files.append(f"{KERNELS_DIR}/src/{name}")
    compiled: list[CompiledKernel] = []
    entries = []
    for inst in instances:
        entry: dict[str, Any] = inst.describe()
        if compile_binaries:
            binary = compile_instance(inst, arch, cache_dir)
            compiled.append(binary)
            (root / "bin").mkdir(exist_ok=True)
            for artifact in ARTIFACTS:
                target = root / "bin" / f"{binary.key}.{artifact}"
                if not target.exists():
                    shutil.copyfile(binary.file(artifact), target)
                files.append(f"{KERNELS_DIR}/bin/{target.name}")
            # what is the same in every build (compile time and cache hits go to the report's timing section)
            entry["binary"] = {k: v for k, v in binary.describe().items() if k not in ("compile_seconds", "cached")}
        entries.append(entry)
    index = {"version": INDEX_VERSION, "triton": triton_version(), "arch": arch, "kernels": entries,
             "bindings": {graph: dict(ops) for graph, ops in (bindings or {}).items()},
             "fallbacks": [dict(f) for f in fallbacks]}
    (root / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    files.append(f"{KERNELS_DIR}/{INDEX}")
    return EmittedKernels(tuple(sorted(set(files))), tuple(compiled), time.perf_counter() - start,
                          tuple(dict(f) for f in fallbacks))
