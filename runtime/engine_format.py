"""The engine format: `manifest.json` as a typed, validated value, owned by the runtime.

The build writes the manifest through `Manifest.to_json`; everything that reads an engine goes
through `Manifest.from_json`, which checks every field and names the field and the manifest path
when one is wrong. Nothing else reads manifest keys by string. Format 2 adds per-rank weight files,
the kernels select_kernels chose, and the name of the config file; format-1 engines are refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, TypeVar

from nemocompile.base.errors import EngineError

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
GRAPH_NAMES = ("prefill", "decode")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_T = TypeVar("_T")


def weights_file(rank: int) -> str:
    """The engine-relative path of rank `rank`'s weight file; the one place this name is made."""
    if rank < 0:
        raise ValueError(f"a rank is non-negative, got {rank}")
    return f"weights/rank{rank}.safetensors"


def is_inside_path(relative: str) -> bool:
    """Whether `relative` is a plain relative POSIX path that cannot leave the engine directory."""
    pure = PurePosixPath(relative)
    return bool(relative) and not pure.is_absolute() and not Path(relative).is_absolute() \
        and ".." not in pure.parts and "\\" not in relative


class _Fields:
    """Reads one JSON object of the manifest, naming `where.key` and the manifest path on errors."""

    def __init__(self, data: object, where: str, path: Path) -> None:
        self.where = where
        self.path = path
        if not isinstance(data, dict):
            if not where:
                raise EngineError(f"{path} is not an engine manifest: it holds {_kind(data)}, not an object.")
            raise self.error(f"field `{where}` must be an object, got {_kind(data)}")
        self.data: dict[str, Any] = data

    def error(self, message: str) -> EngineError:
        return EngineError(f"{self.path}: {message}; rebuild the engine with `nemocompile build`.")

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kinds: tuple[type, ...], what: str, optional: bool = False) -> Any:
        if key not in self.data:
            if optional:
                return None
            raise self.error(f"field `{self.name(key)}` is missing")
        value = self.data[key]
        if value is None and optional:
            return None
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise self.error(f"field `{self.name(key)}` must be {what}, got {_kind(value)}")
        return value

    def text(self, key: str, optional: bool = False) -> Any:
        value = self.get(key, (str,), "a string", optional)
        if value == "":
            raise self.error(f"field `{self.name(key)}` must not be empty")
        return value

    def number(self, key: str, minimum: int = 0) -> int:
        value: int = self.get(key, (int,), "an integer")
        if value < minimum:
            raise self.error(f"field `{self.name(key)}` must be at least {minimum}, got {value}")
        return value

    def flag(self, key: str) -> bool:
        value: bool = self.get(key, (bool,), "true or false")
        return value

    def relpath(self, key: str, optional: bool = False) -> Any:
        value = self.text(key, optional)
        if value is not None:
            self.inside(value, self.name(key))
        return value

    def inside(self, relative: str, where: str) -> None:
        if not is_inside_path(relative):
            raise EngineError(f"{self.path} names a path outside the engine directory: {relative} "
                              f"(field `{where}`)")

    def child(self, key: str) -> _Fields:
        return _Fields(self.get(key, (dict,), "an object"), self.name(key), self.path)

    def array(self, key: str) -> list[Any]:
        value: list[Any] = self.get(key, (list,), "a list")
        return value

    def only(self, known: tuple[str, ...]) -> None:
        unknown = sorted(set(self.data) - set(known))
        if unknown:
            raise self.error(f"unknown field `{self.name(unknown[0])}`")


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float | str):
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__


def _items(fields: _Fields, key: str, read: Callable[[_Fields], _T]) -> tuple[_T, ...]:
    return tuple(read(_Fields(item, f"{fields.name(key)}[{index}]", fields.path))
                 for index, item in enumerate(fields.array(key)))


@dataclass(frozen=True)
class TargetInfo:
    name: str
    arch: str
    compute_capability: tuple[int, int]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "arch": self.arch, "compute_capability": list(self.compute_capability)}

    @staticmethod
    def read(f: _Fields) -> TargetInfo:
        f.only(("name", "arch", "compute_capability"))
        capability = f.array("compute_capability")
        if len(capability) != 2 or not all(type(v) is int and v >= 0 for v in capability):
            raise f.error(f"field `{f.name('compute_capability')}` must be [major, minor], got {capability!r}")
        return TargetInfo(f.text("name"), f.text("arch"), (capability[0], capability[1]))


@dataclass(frozen=True)
class RankFiles:
    """What one rank loads: its weight file(s)."""

    rank: int
    weights: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "weights": list(self.weights)}

    @staticmethod
    def read(f: _Fields) -> RankFiles:
        f.only(("rank", "weights"))
        names = f.array("weights")
        if not names:
            raise f.error(f"field `{f.name('weights')}` must name at least one file")
        holder = _Fields({str(i): name for i, name in enumerate(names)}, f.name("weights"), f.path)
        return RankFiles(f.number("rank"), tuple(holder.relpath(str(i)) for i in range(len(names))))


@dataclass(frozen=True)
class GraphFiles:
    prefill: str
    decode: str

    def to_json(self) -> dict[str, Any]:
        return {"prefill": self.prefill, "decode": self.decode}

    @staticmethod
    def read(f: _Fields) -> GraphFiles:
        f.only(GRAPH_NAMES)
        return GraphFiles(f.relpath("prefill"), f.relpath("decode"))


TENSORRT_MODELS = ("prefill", "decode", "prefill_decomposed", "decode_decomposed")


@dataclass(frozen=True)
class TensorRTFiles:
    """The ONNX export for TensorRT (`build --tensorrt`): the prefill and decode graphs with plugin
    ops, the same two decomposed into standard ONNX ops, the external data file they share, the
    opset, and the serialized TensorRT engine when one was built (TensorRT installed)."""

    prefill: str
    decode: str
    prefill_decomposed: str
    decode_decomposed: str
    data: str
    opset: int
    engine: str | None = None

    def models(self) -> dict[str, str]:
        return {"prefill": self.prefill, "decode": self.decode, "prefill_decomposed": self.prefill_decomposed,
                "decode_decomposed": self.decode_decomposed}

    def to_json(self) -> dict[str, Any]:
        return {**self.models(), "data": self.data, "opset": self.opset, "engine": self.engine}

    @staticmethod
    def read(f: _Fields) -> TensorRTFiles:
        f.only((*TENSORRT_MODELS, "data", "opset", "engine"))
        return TensorRTFiles(f.relpath("prefill"), f.relpath("decode"), f.relpath("prefill_decomposed"),
                             f.relpath("decode_decomposed"), f.relpath("data"), f.number("opset", minimum=1),
                             f.relpath("engine", optional=True))


@dataclass(frozen=True)
class KernelUse:
    """How many ops of kind `op` in one graph run kernel `kernel` (of `backend`)."""

    graph: str
    op: str
    kernel: str
    backend: str
    count: int

    def to_json(self) -> dict[str, Any]:
        return {"graph": self.graph, "op": self.op, "kernel": self.kernel, "backend": self.backend,
                "count": self.count}

    @staticmethod
    def read(f: _Fields) -> KernelUse:
        f.only(("graph", "op", "kernel", "backend", "count"))
        graph = f.text("graph")
        if graph not in GRAPH_NAMES:
            raise f.error(f"field `{f.name('graph')}` must be one of {', '.join(GRAPH_NAMES)}, got {graph!r}")
        return KernelUse(graph, f.text("op"), f.text("kernel"), f.text("backend"), f.number("count", minimum=1))


@dataclass(frozen=True)
class KernelConfig:
    """The config one op's Triton kernel got, and where it came from: `tuned` (measured, from a
    tuning database), `modelled` (ranked by the cost model, in the build or in a database) or
    `default` (the builder's own); `check` is the numerics gate's result (docs/tuning.md)."""

    graph: str
    value: str  # the op's first result, as in kernels/kernels.json's bindings
    op: str
    kernel: str  # the instance name in kernels/kernels.json
    config: str  # JSON object: option -> value
    source: str
    why: str
    check: str

    def to_json(self) -> dict[str, Any]:
        return {"graph": self.graph, "value": self.value, "op": self.op, "kernel": self.kernel, "config": self.config,
                "source": self.source, "why": self.why, "check": self.check}

    @staticmethod
    def read(f: _Fields) -> KernelConfig:
        f.only(("graph", "value", "op", "kernel", "config", "source", "why", "check"))
        source = f.text("source")
        if source not in ("tuned", "modelled", "default"):
            raise f.error(f"field `{f.name('source')}` must be tuned, modelled or default, got {source!r}")
        return KernelConfig(f.text("graph"), f.text("value"), f.text("op"), f.text("kernel"), f.text("config"), source,
                            f.text("why"), f.text("check"))


@dataclass(frozen=True)
class PolicyInfo:
    """The precision policy the engine was built with (passes/precision_policy.py describes it)."""

    base: str
    components: Mapping[str, str]
    exclude: tuple[str, ...]
    on_indivisible: str
    nvfp4_four_over_six: bool
    act_scales: str = "static"  # activation scales of W4A4 / W8A8 GEMMs: static or dynamic

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "components": dict(sorted(self.components.items())),
                "exclude": list(self.exclude), "on_indivisible": self.on_indivisible,
                "nvfp4_four_over_six": self.nvfp4_four_over_six, "act_scales": self.act_scales}

    @staticmethod
    def read(f: _Fields) -> PolicyInfo:
        f.only(("base", "components", "exclude", "on_indivisible", "nvfp4_four_over_six", "act_scales"))
        components = f.child("components")
        chosen = {key: components.text(key) for key in components.data}
        excluded = f.array("exclude")
        if not all(isinstance(pattern, str) for pattern in excluded):
            raise f.error(f"field `{f.name('exclude')}` must be a list of strings")
        act_scales = f.text("act_scales") if "act_scales" in f.data else "static"
        if act_scales not in ("static", "dynamic"):
            raise f.error(f"field `{f.name('act_scales')}` must be static or dynamic")
        return PolicyInfo(f.text("base"), MappingProxyType(chosen), tuple(excluded), f.text("on_indivisible"),
                          f.flag("nvfp4_four_over_six"), act_scales)

    @staticmethod
    def from_description(description: Mapping[str, Any], path: Path) -> PolicyInfo:
        return PolicyInfo.read(_Fields(dict(description), "policy", path))


@dataclass(frozen=True)
class SourceInfo:
    name: str
    fingerprint: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "fingerprint": self.fingerprint}

    @staticmethod
    def read(f: _Fields) -> SourceInfo:
        f.only(("name", "fingerprint"))
        return SourceInfo(f.text("name"), f.text("fingerprint"))


@dataclass(frozen=True)
class EngineBounds:
    """The run-time bounds the engine was built for (its graphs' batch and ctx dims) and which of them
    the build chose itself (options not given: shrunk to what the memory plan fits)."""

    max_batch_size: int
    max_context: int
    chosen_automatically: tuple[str, ...] = ()  # "--max-batch-size", "--max-context"
    why: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"max_batch_size": self.max_batch_size, "max_context": self.max_context,
                "chosen_automatically": list(self.chosen_automatically), "why": self.why}

    @staticmethod
    def read(f: _Fields) -> EngineBounds:
        f.only(("max_batch_size", "max_context", "chosen_automatically", "why"))
        chosen = f.array("chosen_automatically")
        if not all(option in ("--max-batch-size", "--max-context") for option in chosen):
            raise f.error(f"field `{f.name('chosen_automatically')}` may list only --max-batch-size and --max-context")
        return EngineBounds(f.number("max_batch_size", minimum=1), f.number("max_context", minimum=1), tuple(chosen),
                            f.get("why", (str,), "a string"))


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}

    @staticmethod
    def read(f: _Fields) -> FileEntry:
        f.only(("sha256", "size"))
        digest = f.text("sha256")
        if not _SHA256_HEX.fullmatch(digest):
            raise f.error(f"field `{f.name('sha256')}` must be 64 lowercase hex digits")
        return FileEntry(digest, f.number("size"))


_FIELDS = ("format_version", "nemocompile_version", "target", "world_size", "ranks", "graphs", "config",
           "kernels", "tokenizer", "precision", "policy", "source", "files", "tensorrt", "kernel_configs",
           "bounds")


@dataclass(frozen=True)
class Manifest:
    """Everything an engine directory holds and how it was made. `files` (size and sha256 of
    every other file) is filled in by the writer once the engine's files are final."""

    nemocompile_version: str
    target: TargetInfo
    ranks: tuple[RankFiles, ...]
    graphs: GraphFiles
    config: str
    kernels: tuple[KernelUse, ...]
    tokenizer: str | None
    precision: str
    policy: PolicyInfo
    source: SourceInfo
    files: Mapping[str, FileEntry] = field(default_factory=lambda: MappingProxyType({}))
    format_version: int = FORMAT_VERSION
    tensorrt: TensorRTFiles | None = None  # present when built with --tensorrt
    kernel_configs: tuple[KernelConfig, ...] = ()  # per op on a Triton kernel: its config and why
    bounds: EngineBounds | None = None  # absent in engines built before it was recorded

    def __post_init__(self) -> None:
        if [r.rank for r in self.ranks] != list(range(len(self.ranks))) or not self.ranks:
            raise ValueError(f"ranks must be numbered 0..n-1, got {[r.rank for r in self.ranks]}")

    @property
    def world_size(self) -> int:
        """The ranks this engine holds: one per weight shard set, never what a report planned for."""
        return len(self.ranks)

    def weight_files(self, rank: int) -> tuple[str, ...]:
        return self.ranks[rank].weights

    def with_files(self, files: Mapping[str, FileEntry]) -> Manifest:
        return replace(self, files=MappingProxyType(dict(sorted(files.items()))))

    def named_files(self) -> list[tuple[str, str]]:
        """(field, path) of every file another field names; each must be among `files`."""
        named = [("graphs.prefill", self.graphs.prefill), ("graphs.decode", self.graphs.decode),
                 ("config", self.config)]
        named += [(f"ranks[{r.rank}].weights", path) for r in self.ranks for path in r.weights]
        if self.tokenizer is not None:
            named.append(("tokenizer", self.tokenizer))
        if self.tensorrt is not None:
            named += [(f"tensorrt.{key}", path) for key, path in self.tensorrt.models().items()]
            named.append(("tensorrt.data", self.tensorrt.data))
            if self.tensorrt.engine is not None:
                named.append(("tensorrt.engine", self.tensorrt.engine))
        return named

    def kernel_counts(self) -> dict[str, int]:
        """Ops per kernel over both graphs."""
        counts: dict[str, int] = {}
        for use in self.kernels:
            counts[use.kernel] = counts.get(use.kernel, 0) + use.count
        return dict(sorted(counts.items()))

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(sorted({use.backend for use in self.kernels}))

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "nemocompile_version": self.nemocompile_version,
            "target": self.target.to_json(),
            "world_size": self.world_size,
            "ranks": [r.to_json() for r in self.ranks],
            "graphs": self.graphs.to_json(),
            "config": self.config,
            "kernels": [k.to_json() for k in self.kernels],
            "tokenizer": self.tokenizer,
            "precision": self.precision,
            "policy": self.policy.to_json(),
            "source": self.source.to_json(),
            "files": {name: entry.to_json() for name, entry in sorted(self.files.items())},
            **({"tensorrt": self.tensorrt.to_json()} if self.tensorrt is not None else {}),
            **({"kernel_configs": [c.to_json() for c in self.kernel_configs]} if self.kernel_configs else {}),
            **({"bounds": self.bounds.to_json()} if self.bounds is not None else {}),
        }

    @staticmethod
    def from_json(data: object, path: Path) -> Manifest:
        """The manifest `data` (parsed JSON read from `path`), every field checked; EngineError
        names the field and `path` otherwise."""
        f = _Fields(data, "", path)
        version = f.data.get("format_version")
        if type(version) is not int:  # true == 1 and 2.0 == 2 in Python; neither is a format number
            raise f.error(f"field `format_version` must be {FORMAT_VERSION}, got {_kind(version)}")
        if version == 1:
            raise EngineError(f"{path}: this engine has format 1, which this nemocompile no longer reads "
                              f"(it reads format {FORMAT_VERSION}); rebuild it with `nemocompile build`.")
        if version != FORMAT_VERSION:
            raise f.error(f"field `format_version` must be {FORMAT_VERSION}, got {_kind(version)}")
        f.only(_FIELDS)
        ranks = _items(f, "ranks", RankFiles.read)
        if not ranks or [r.rank for r in ranks] != list(range(len(ranks))):
            raise f.error(f"field `ranks` must list ranks 0..n-1 in order, got {[r.rank for r in ranks]}")
        world_size = f.number("world_size", minimum=1)
        if world_size != len(ranks):
            raise f.error(f"field `world_size` is {world_size} but `ranks` lists {len(ranks)}")
        files_fields = f.child("files")
        files = {}
        for name in files_fields.data:
            files_fields.inside(name, "files")
            files[name] = FileEntry.read(files_fields.child(name))
        manifest = Manifest(
            nemocompile_version=f.text("nemocompile_version"),
            target=TargetInfo.read(f.child("target")),
            ranks=ranks,
            graphs=GraphFiles.read(f.child("graphs")),
            config=f.relpath("config"),
            kernels=_items(f, "kernels", KernelUse.read),
            tokenizer=f.relpath("tokenizer", optional=True),
            precision=f.text("precision"),
            policy=PolicyInfo.read(f.child("policy")),
            source=SourceInfo.read(f.child("source")),
            tensorrt=TensorRTFiles.read(f.child("tensorrt")) if f.data.get("tensorrt") is not None else None,
            kernel_configs=_items(f, "kernel_configs", KernelConfig.read) if "kernel_configs" in f.data else (),
            bounds=EngineBounds.read(f.child("bounds")) if f.data.get("bounds") is not None else None,
        ).with_files(files)
        for where, named in manifest.named_files():
            if named not in files:
                raise f.error(f"field `{where}` names {named}, which is not among the hashed `files`")
        return manifest
