"""The engine's Triton kernels at run time, without the codegen: kernels/kernels.json says what
each kernel is; kernels/src/*.py are its template sources; kernels/bin/ holds its binaries.

`TritonKernels.from_files` takes the bytes the engine loader has already hash-verified (the
sources are executed only from those bytes, never re-read from disk). On a CPU the sources are
executed with Triton's interpreter on (TRITON_INTERPRET semantics, scoped to this import) and the
kernels run there with INTERPRET=True, which switches the templates to their interpreter-exact
paths. On CUDA the stored cubins are wrapped in Triton's CompiledKernel with the stored signature
and constants (what triton.compile itself does on a cache hit): nothing is JIT-compiled."""

from __future__ import annotations

import contextlib
import hashlib
import json
import linecache
import sys
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemocompile.base.errors import EngineError

INDEX = "kernels/kernels.json"
INDEX_VERSION = 1
ALIGNMENT_BYTES = 16  # what a binary compiled with tt.divisibility hints assumes of its "aligned" pointers


@dataclass(frozen=True)
class KernelEntry:
    name: str
    op: str
    module: str
    entry: str
    signature: tuple[str, ...]  # parameter names in order (constexprs included)
    constexprs: Mapping[str, Any]
    aligned: tuple[str, ...]
    binary_key: str | None


def _entry(raw: Mapping[str, Any]) -> KernelEntry:
    try:
        binary = raw.get("binary")
        return KernelEntry(str(raw["name"]), str(raw["op"]), str(raw["module"]), str(raw["entry"]),
                           tuple(raw["signature"]), dict(raw["constexprs"]), tuple(raw["aligned"]),
                           None if binary is None else str(binary["key"]))
    except (KeyError, TypeError) as error:
        raise EngineError(f"{INDEX}: a kernel entry lacks or mistypes {error}") from error


def _exec_package(sources: Mapping[str, bytes], interpret: bool) -> dict[str, types.ModuleType]:
    """Execute template sources (file name -> verified bytes) as modules of a private package, so
    their relative imports resolve to each other; the package name hashes the sources."""
    import triton

    digest = hashlib.sha256(b"".join(name.encode() + sources[name] for name in sorted(sources))).hexdigest()[:16]
    package_name = f"_nemocompile_kernels_{digest}_{'interp' if interpret else 'cuda'}"
    if package_name not in sys.modules:
        package = types.ModuleType(package_name)
        package.__path__ = []
        sys.modules[package_name] = package
    modules: dict[str, types.ModuleType] = {}
    pending = dict(sources)
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        while pending:  # a module whose sibling import is not loaded yet is retried after it
            progressed = False
            for file_name, data in sorted(pending.items()):
                stem = file_name.removesuffix(".py")
                qualified = f"{package_name}.{stem}"
                if qualified in sys.modules:
                    modules[stem] = sys.modules[qualified]
                    del pending[file_name]
                    progressed = True
                    continue
                text = data.decode("utf-8")
                origin = f"<engine kernels {digest}>/{file_name}"
                # Triton reads a jit function's source with inspect; it finds it in linecache
                linecache.cache[origin] = (len(text), None, text.splitlines(keepends=True), origin)
                module = types.ModuleType(qualified)
                module.__file__ = origin
                module.__package__ = package_name
                sys.modules[qualified] = module
                try:
                    exec(compile(text, origin, "exec"), module.__dict__)
                except ImportError:
                    del sys.modules[qualified]
                    continue
                modules[stem] = module
                del pending[file_name]
                progressed = True
            if not progressed:
                raise EngineError(f"the engine's kernel sources {sorted(pending)} import modules it does not hold")
    return modules


@contextlib.contextmanager
def _interpreted_library() -> Iterator[None]:
    """Triton's own library functions (tl.zeros, tl.sum, tl.max, ... in triton.language.standard)
    are @jit functions decorated when triton was imported; the interpreter can call them only if
    TRITON_INTERPRET was set before that import. The runtime cannot require that (the codegen in
    the same process needs them compiled), so for the duration of an interpreted launch they are
    swapped for interpreted twins, then put back."""
    import triton
    import triton.experimental.gluon.language as gluon_language  # the interpreter imports it lazily,
    import triton.language as tl  # and it checks it sees the originals: import it before the swap
    from triton.runtime.interpreter import InterpretedFunction

    del gluon_language

    saved: list[tuple[object, str, object]] = []
    # The interpreter patches triton.language's builtins for a launch and restores them, but a jit
    # function called from a kernel (InterpretedFunction.__call__) patches them and never restores:
    # a later triton.compile in the process then fails. Snapshot them, put back what changed.
    patched = (tl, tl.core, tl.math, tl.tensor, tl.core.tensor_descriptor_base)
    snapshot = [(owner, dict(vars(owner))) for owner in patched]
    try:
        for module in (tl, tl.standard, tl.math):
            for name, value in list(vars(module).items()):
                if isinstance(value, triton.runtime.jit.JITFunction):
                    twin = _TWINS.get(id(value))
                    if twin is None:
                        twin = _TWINS[id(value)] = InterpretedFunction(value.fn)
                    saved.append((module, name, value))
                    setattr(module, name, twin)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        for owner, attributes in snapshot:  # values only: names the interpreter adds must stay
            for name, value in attributes.items():
                if vars(owner).get(name) is not value:
                    setattr(owner, name, value)


_TWINS: dict[int, Any] = {}


class TritonKernels:
    """The engine's kernels by name; `launch(name, grid, **args)` runs one."""

    def __init__(self, entries: Mapping[str, KernelEntry], device_type: str, functions: Mapping[str, Any]) -> None:
        self.entries = dict(entries)
        self.device_type = device_type
        self._functions = dict(functions)

    @property
    def interpret(self) -> bool:
        return self.device_type != "cuda"

    @staticmethod
    def from_files(files: Mapping[str, bytes], device: torch.device | str) -> TritonKernels:
        """files: engine-relative path -> verified bytes of kernels/kernels.json, kernels/src/*.py and
        (on CUDA) kernels/bin/*."""
        if INDEX not in files:
            raise EngineError(f"the engine has no {INDEX}")
        try:
            index = json.loads(files[INDEX])
        except ValueError as error:
            raise EngineError(f"{INDEX} is not valid JSON: {error}") from error
        if index.get("version") != INDEX_VERSION:
            raise EngineError(f"{INDEX} has version {index.get('version')!r}; this runtime reads {INDEX_VERSION}")
        entries = {e.name: e for e in map(_entry, index.get("kernels", []))}
        device_type = torch.device(device).type
        functions: dict[str, Any] = {}
        if device_type == "cuda":
            import triton

            if index.get("triton") != triton.__version__:
                raise EngineError(f"the engine's kernels were compiled by Triton {index.get('triton')}, but "
                                  f"Triton {triton.__version__} is installed; rebuild the engine or install that version")
            for entry in entries.values():
                functions[entry.name] = _compiled(entry, files)
        else:
            sources = {path.rsplit("/", 1)[1]: data for path, data in files.items() if path.startswith("kernels/src/")}
            modules = _exec_package(sources, interpret=True)
            for entry in entries.values():
                if entry.module not in modules or not hasattr(modules[entry.module], entry.entry):
                    raise EngineError(f"kernel {entry.name}: kernels/src/{entry.module}.py has no {entry.entry}")
                functions[entry.name] = getattr(modules[entry.module], entry.entry)
        return TritonKernels(entries, device_type, functions)

    @staticmethod
    def from_directory(root: Path, device: torch.device | str) -> TritonKernels:
        """From an engine-like directory read as it is (tests and benches; engines go through from_files)."""
        files = {str(p.relative_to(root)): p.read_bytes() for p in (root / "kernels").rglob("*") if p.is_file()}
        return TritonKernels.from_files(files, device)

    def constexpr(self, name: str, key: str) -> Any:
        return self.entries[name].constexprs[key]

    def launch(self, name: str, grid: tuple[int, ...], **args: Any) -> None:
        entry = self.entries[name]
        if not self.interpret:  # the binary was compiled assuming these pointers are 16-byte aligned
            for param in entry.aligned:
                value = args[param]
                if isinstance(value, torch.Tensor) and value.data_ptr() % ALIGNMENT_BYTES:
                    raise EngineError(f"kernel {name}: {param} is not 16-byte aligned, which its binary assumes")
        grid3 = (*grid, *(1,) * (3 - len(grid)))
        function = self._functions[name]
        if self.interpret:
            constexprs = {**entry.constexprs, "INTERPRET": True} if "INTERPRET" in entry.constexprs else entry.constexprs
            with _interpreted_library():
                function[grid3](**args, **constexprs)
        else:
            values = [args[p] if p in args else entry.constexprs[p] for p in entry.signature]
            function[grid3](*values)


class _Source:
    """What Triton's launcher needs of a kernel's source: its signature and constants."""

    def __init__(self, signature: Mapping[str, str], constants: Mapping[tuple[int, ...], Any]) -> None:
        self.signature = dict(signature)
        self.constants = dict(constants)


def _compiled(entry: KernelEntry, files: Mapping[str, bytes]) -> Any:
    """Triton's CompiledKernel over the stored binary. Triton's constructor reads its files from
    paths, so the verified bytes are written to a private temporary folder, read, and removed."""
    import tempfile

    from triton.compiler.compiler import CompiledKernel

    if entry.binary_key is None:
        raise EngineError(f"kernel {entry.name} has no compiled binary in this engine")
    launch_path = f"kernels/bin/{entry.binary_key}.launch.json"
    if launch_path not in files:
        raise EngineError(f"kernel {entry.name}: {launch_path} is missing")
    launch = json.loads(files[launch_path])
    source = _Source(launch["signature"], {tuple(k): v for k, v in launch["constants"]})
    with tempfile.TemporaryDirectory(prefix="nemocompile-kernel-") as scratch:
        paths = {}
        for artifact in ("json", "cubin", "ptx"):
            relative = f"kernels/bin/{entry.binary_key}.{artifact}"
            if relative not in files:
                raise EngineError(f"kernel {entry.name}: {relative} is missing")
            path = Path(scratch) / f"{entry.name}.{artifact}"
            path.write_bytes(files[relative])
            paths[f"{entry.name}.{artifact}"] = str(path)
        return CompiledKernel(source, paths, entry.binary_key)
