"""Read target data files (`data/<name>.json`) into `Target` values.

Each fact in a file is an object `{"value": ..., "source": "..."}`; `peak_tflops` maps each
dtype to such an object. Any problem with a file is one `TargetError` sentence that names the
file and every field at fault.
"""

from __future__ import annotations

import functools
import json
import os
from importlib import resources
from pathlib import Path
from typing import Protocol

from nemocompile.base.errors import TargetError, join_problems

from .model import Target

_DATA_PACKAGE = "nemocompile.targets"
_DATA_FOLDER = "data"

_PLAIN_FIELDS: tuple[str, ...] = ("name", "marketing_name", "arch")
_INTEGER_FIELDS: tuple[str, ...] = (
    "sm_count",
    "memory_bytes",
    "hbm_bandwidth_bytes_per_s",
    "nvlink_bandwidth_bytes_per_s",
)
_FILE_FIELDS: tuple[str, ...] = (
    *_PLAIN_FIELDS,
    "compute_capability",
    *_INTEGER_FIELDS,
    "peak_tflops",
    "precision_policy",
)


class _TextFile(Protocol):
    """A `pathlib.Path` or an importlib.resources `Traversable` (whose module moved between Python 3.10 and 3.11)."""

    def read_text(self, encoding: str | None = None) -> str: ...


def known_targets() -> list[str]:
    """Names of the targets shipped with nemocompile, sorted."""
    return list(_known_target_names())


def load_target(name: str) -> Target:
    """The shipped target called `name` (case-insensitive), loaded once and cached."""
    key = name.strip().lower()
    if key not in _known_target_names():
        raise TargetError(f"unknown target '{name}'; known targets: {', '.join(_known_target_names())}")
    return _load_shipped(key)


def load_target_file(path: str | os.PathLike[str]) -> Target:
    """The target described by the JSON file at `path` (not cached)."""
    return _load_file(Path(path))


@functools.cache
def _known_target_names() -> tuple[str, ...]:
    folder = resources.files(_DATA_PACKAGE).joinpath(_DATA_FOLDER)
    return tuple(
        sorted(entry.name[: -len(".json")] for entry in folder.iterdir() if entry.name.endswith(".json"))
    )


@functools.cache
def _load_shipped(key: str) -> Target:
    file = resources.files(_DATA_PACKAGE).joinpath(_DATA_FOLDER).joinpath(f"{key}.json")
    target = _load_file(file)
    if target.name != key:
        raise TargetError(f"target file {file} has field 'name' '{target.name}' but is named '{key}.json'.")
    return target


def _load_file(file: _TextFile) -> Target:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TargetError(f"target file {file} cannot be read: {exc}.") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TargetError(
            f"target file {file} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}."
        ) from exc
    return parse_target(data, origin=str(file))


def parse_target(data: object, origin: str) -> Target:
    """Build a `Target` from parsed JSON `data`; `origin` names the file in error messages."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise TargetError(f"target file {origin} must hold a JSON object, not {_kind(data)}.")
    for field in _FILE_FIELDS:
        if field not in data:
            problems.append(f"field '{field}' is missing")
    for field in data:
        if field not in _FILE_FIELDS:
            problems.append(f"field '{field}' is not a target field")

    sources: dict[str, str] = {}
    plain = {field: _string(data, field, problems) for field in _PLAIN_FIELDS}
    capability = _capability(_sourced(data, "compute_capability", sources, problems), problems)
    integers = {
        field: _integer(_sourced(data, field, sources, problems), field, problems)
        for field in _INTEGER_FIELDS
    }
    peak_tflops = _peak_tflops(data, sources, problems)
    policy = _string_map(_sourced(data, "precision_policy", sources, problems), "precision_policy", problems)
    if problems:
        raise TargetError(join_problems(f"target file {origin} is invalid", problems))

    try:
        return Target(
            name=plain["name"],
            marketing_name=plain["marketing_name"],
            arch=plain["arch"],
            compute_capability=capability,
            sm_count=integers["sm_count"],
            memory_bytes=integers["memory_bytes"],
            hbm_bandwidth_bytes_per_s=integers["hbm_bandwidth_bytes_per_s"],
            peak_tflops=peak_tflops,
            nvlink_bandwidth_bytes_per_s=integers["nvlink_bandwidth_bytes_per_s"],
            precision_policy=policy,
            sources=sources,
        )
    except TargetError as exc:
        raise TargetError(f"target file {origin}: {exc}") from None


# Each reader below appends a problem naming the field when the value has the wrong shape, and
# returns a placeholder so that every field is checked and all problems are reported together.

_MISSING = object()


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    kinds = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}
    return kinds.get(type(value), type(value).__name__)


def _string(data: dict[str, object], field: str, problems: list[str]) -> str:
    value = data.get(field, _MISSING)
    if value is _MISSING:
        return ""
    if not isinstance(value, str) or not value.strip():
        problems.append(f"field '{field}' must be a non-empty string, not {_kind(value)}")
        return ""
    return value


def _sourced(
    data: dict[str, object], key: str, sources: dict[str, str], problems: list[str], label: str = ""
) -> object:
    """The `value` of `{"value": ..., "source": ...}` at `data[key]`, recording its source.

    `label` names the field in messages and in `sources` (default: `key`).
    """
    field = label or key
    entry = data.get(key, _MISSING)
    if entry is _MISSING:
        return _MISSING
    if not isinstance(entry, dict):
        problems.append(f"field '{field}' must be an object with 'value' and 'source', not {_kind(entry)}")
        return _MISSING
    for entry_key in entry:
        if entry_key not in ("value", "source"):
            problems.append(f"field '{field}' has unexpected key '{entry_key}' (only 'value' and 'source')")
    source = entry.get("source", _MISSING)
    if source is _MISSING:
        problems.append(f"field '{field}' has no source")
    elif not isinstance(source, str) or not source.strip():
        problems.append(f"field '{field}' source must be a non-empty string, not {_kind(source)}")
    else:
        sources[field] = source
    if "value" not in entry:
        problems.append(f"field '{field}' has no value")
        return _MISSING
    return entry["value"]


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    # JSON writers may spell 3.35e12; accept floats that are whole numbers.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _integer(value: object, field: str, problems: list[str]) -> int:
    if value is _MISSING:
        return 0
    result = _as_int(value)
    if result is None:
        problems.append(f"field '{field}' value must be an integer, not {_kind(value)}")
        return 0
    return result


def _capability(value: object, problems: list[str]) -> tuple[int, int]:
    if value is _MISSING:
        return (0, 0)
    parts = [_as_int(part) for part in value] if isinstance(value, list) else []
    if len(parts) != 2 or parts[0] is None or parts[1] is None:
        problems.append("field 'compute_capability' value must be a list of two integers [major, minor]")
        return (0, 0)
    return (parts[0], parts[1])


def _peak_tflops(data: dict[str, object], sources: dict[str, str], problems: list[str]) -> dict[str, float]:
    table = data.get("peak_tflops", _MISSING)
    if table is _MISSING:
        return {}
    if not isinstance(table, dict):
        problems.append(
            f"field 'peak_tflops' must be an object of dtype -> {{value, source}}, not {_kind(table)}"
        )
        return {}
    rates: dict[str, float] = {}
    for dtype in table:
        field = f"peak_tflops.{dtype}"
        value = _sourced(table, dtype, sources, problems, label=field)
        if value is _MISSING:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"field '{field}' value must be a number, not {_kind(value)}")
            continue
        rates[dtype] = float(value)
    return rates


def _string_map(value: object, field: str, problems: list[str]) -> dict[str, str]:
    if value is _MISSING:
        return {}
    if not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values()):
        problems.append(f"field '{field}' value must be an object of strings")
        return {}
    return {str(key): str(item) for key, item in value.items()}
