"""Per-rank weight files of a sharded engine. The build quantizes every weight whole (so each
rank's piece is bit for bit the piece of the one-rank engine's weight: NVFP4's global scales come
from the whole tensor) into one file; this splits that file into one file per rank, one tensor
and one rank's piece at a time, read through the file's memory map: no rank's weights, and no
whole tensor, are ever held in memory."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from nemocompile.graph.ir import Graph, Weight
from nemocompile.graph.sharding import rank_view
from nemocompile.graph.storage import StoredTensor, component_name, stored_tensors
from nemocompile.graph.types import Sharding

from .safetensors_writer import SafetensorsWriter
from .weight_stream import METADATA, engine_tensor_specs

PART_SUFFIX = ".part"


def _ranges(sharding: Sharding, whole: StoredTensor, logical: tuple[int, ...], rank: int) -> list[tuple[int, int]]:
    """The ranges of `whole` (a stored component of a weight of shape `logical`) along the split dim
    that `rank` holds; the whole dim when the component does not run along it (a scalar scale)."""
    dim = sharding.dim
    assert dim is not None
    if len(whole.shape) <= dim or (whole.shape[dim] == 1 and logical[dim] != 1):
        return []
    ratio = logical[dim] // whole.shape[dim]  # packed codes (2 per byte) or block scales (1 per 16)
    return [(start // ratio, stop // ratio) for start, stop in sharding.ranges(logical[dim], rank)]


def _piece(handle: object, name: str, weight: Weight, whole: StoredTensor, rank: int) -> torch.Tensor:
    sharding = weight.type.sharding
    logical = tuple(int(d) for d in weight.type.shape)
    sliced = handle.get_slice(name)  # type: ignore[attr-defined]
    if sharding is None or sharding.dim is None:
        tensor: torch.Tensor = sliced[:] if whole.shape else handle.get_tensor(name)  # type: ignore[attr-defined]
        if sharding is not None and sharding.partial and rank > 0:
            return torch.zeros_like(tensor)  # a partial-sum weight: rank 0 holds it, so the all-reduce adds it once
        return tensor
    ranges = _ranges(sharding, whole, logical, rank)
    if not ranges:
        return sliced[:] if whole.shape else handle.get_tensor(name)  # type: ignore[attr-defined,no-any-return]
    lead = (slice(None),) * sharding.dim
    pieces = [sliced[(*lead, slice(start, stop))] for start, stop in ranges]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=sharding.dim)


def split_ranks(directory: Path, whole_file: str, graph: Graph, rank_files: list[str]) -> None:
    """Write `rank_files[r]` (relative to `directory`) for every rank from `whole_file`, which holds
    `graph`'s weights whole; then remove `whole_file` (it may be one of the rank files' names)."""
    local = rank_view(graph)
    specs = engine_tensor_specs(local)
    writers = [SafetensorsWriter(directory / (name + PART_SUFFIX), specs, METADATA) for name in rank_files]
    try:
        with safe_open(str(directory / whole_file), "pt") as handle:
            for weight in graph.weights:
                for whole in stored_tensors(weight.type):
                    name = component_name(weight.name, whole.component)
                    for rank, writer in enumerate(writers):
                        writer.write(name, _piece(handle, name, weight, whole, rank))
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    (directory / whole_file).unlink()
    for name in rank_files:
        (directory / (name + PART_SUFFIX)).replace(directory / name)
