"""Snapshots: one sequence's state (KV caches trimmed to its length, conv windows, SSM states, the
token ids it holds and its pending token) in a safetensors file, tied to the engine that made it.

The file's metadata names the engine by `engine_identity`: a hash of what the state means something
to (the sha256 of every file of the engine, report.md's build times aside). Loading into any other
engine is refused in one sentence; loading into the same one gives back the very tensors saved, bit
for bit. Written to a temporary file and renamed into place: a failed save leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nemocompile.base.errors import StateError

from .cache import CTX, Cache, SequenceState
from .dtypes import torch_dtype
from .engine_format import Manifest

FORMAT = "nemocompile-sequence-state"
VERSION = "1"
UNHASHED = ("report.md",)  # carries build times: two builds of one input differ only there


def engine_identity(manifest: Manifest) -> str:
    """sha256 of the engine's files (path and sha256 of each, report.md aside), in hex."""
    entries = {path: entry.sha256 for path, entry in manifest.files.items() if path not in UNHASHED}
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def save_snapshot(path: str | Path, state: SequenceState, identity: str) -> Path:
    """Write `state` to `path` (safetensors), tagged with the engine `identity`."""
    target = Path(path)
    if target.is_dir():
        raise StateError(f"{target} is a directory; a snapshot is written to a file")
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.tensors.items()}
    metadata = {"format": FORMAT, "version": VERSION, "engine": identity, "length": str(state.length),
                "tokens": json.dumps(None if state.tokens is None else list(state.tokens)),
                "pending": json.dumps(list(state.pending))}
    staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        save_file(tensors, str(staging), metadata=metadata)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    return target


def _token_list(where: str, field: str, text: str | None, allow_none: bool) -> list[int] | None:
    try:
        value = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        value = "malformed"
    if value is None and allow_none:
        return None
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise StateError(f"{where}: its metadata field '{field}' is not a list of token ids")
    return value


def read_snapshot(path: str | Path, cache_template: Cache, identity: str, vocab_size: int) -> SequenceState:
    """The state saved at `path`, checked against the engine it is loaded into: its identity, every
    slot's tensor (name, dtype, shape) and the token ids."""
    source = Path(path)
    where = f"snapshot {source}"
    if not source.is_file():
        raise StateError(f"{where} does not exist or is not a regular file")
    try:
        with safe_open(str(source), framework="pt") as handle:
            metadata: dict[str, Any] = handle.metadata() or {}
            names = set(handle.keys())
            if metadata.get("format") != FORMAT:
                raise StateError(f"{where} is not a nemocompile sequence state (its metadata has no format "
                                 f"'{FORMAT}')")
            if metadata.get("version") != VERSION:
                raise StateError(f"{where} has version {metadata.get('version')!r}; this runtime reads {VERSION}")
            if metadata.get("engine") != identity:
                raise StateError(f"{where} was saved by another engine (identity {str(metadata.get('engine'))[:12]}, "
                                 f"this engine is {identity[:12]}); a sequence state is only valid in the engine "
                                 f"that computed it")
            try:
                length = int(metadata.get("length", ""))
            except ValueError:
                raise StateError(f"{where}: its metadata field 'length' is not a number") from None
            if not 0 <= length <= cache_template.max_context:
                raise StateError(f"{where} holds {length} tokens, outside the engine's context bound of "
                                 f"{cache_template.max_context}")
            wanted = {slot.name for slot in cache_template.slots}
            if names != wanted:
                extra, missing = sorted(names - wanted), sorted(wanted - names)
                raise StateError(f"{where} does not hold the engine's state slots (missing: {missing[:3]}, "
                                 f"unknown: {extra[:3]})")
            tensors: dict[str, torch.Tensor] = {}
            for slot in cache_template.slots:
                tensor = handle.get_tensor(slot.name)
                shape = [1 if dim == "batch" else length if dim == CTX else dim for dim in slot.type.shape]
                dtype = torch_dtype(slot.type.dtype)
                if list(tensor.shape) != shape or tensor.dtype != dtype:
                    raise StateError(f"{where}: tensor {slot.name} is {tensor.dtype} {list(tensor.shape)}, the "
                                     f"engine's slot needs {dtype} {shape}")
                tensors[slot.name] = tensor
    except StateError:
        raise
    except Exception as error:  # safetensors reports a bad header as several exception types
        raise StateError(f"{where} is not a readable safetensors file ({type(error).__name__})") from None
    tokens = _token_list(where, "tokens", metadata.get("tokens"), allow_none=True)
    pending = _token_list(where, "pending", metadata.get("pending", "[]"), allow_none=False) or []
    if tokens is not None and len(tokens) != length:
        raise StateError(f"{where} holds {length} tokens but lists {len(tokens)} token ids")
    for token in (tokens or []) + pending:
        if not 0 <= token < vocab_size:
            raise StateError(f"{where} lists token id {token}, outside the vocabulary of {vocab_size}")
    return SequenceState(tensors, length, None if tokens is None else tuple(tokens), tuple(pending))
