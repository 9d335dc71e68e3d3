"""Load an engine's weights: plain tensors as they are, quantized ones assembled from their
stored components into NVFP4Tensor / FP8Tensor (as NVIDIA ModelOpt lays them out).

Every weight file's header is read first and checked against the graph: each tensor the graph
stores with its dtype and shape, and nothing else. Only then is tensor data read, so a tampered
file can neither make the loader allocate what the graph does not hold nor fail inside safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nemocompile.base.errors import CheckpointError, EngineError, IRError
from nemocompile.graph.checkpoint import read_tensor_table
from nemocompile.graph.ir import Graph, Weight
from nemocompile.graph.storage import StoredTensor, component_name, stored_tensors

from .cpu_gemm import PackedLinear
from .formats import FP8Tensor, NVFP4Tensor

# PackedLinear: a float32 GEMM weight packed for oneDNN when a CPU engine loads (runtime/cpu_gemm.py).
WeightValue = torch.Tensor | NVFP4Tensor | FP8Tensor | PackedLinear


def assemble(weight: Weight, parts: dict[str, torch.Tensor]) -> WeightValue:
    name = weight.type.dtype.name
    if name == "nvfp4":
        return NVFP4Tensor(parts[""], parts["weight_scale"], parts["weight_scale_2"])
    if name == "fp8":
        return FP8Tensor(parts[""], parts["weight_scale"])
    return parts[""]


def expected_tensors(graph: Graph) -> dict[str, StoredTensor]:
    """Every tensor the weight files must hold for `graph`, by its stored name."""
    return {component_name(weight.name, stored.component): stored
            for weight in graph.weights for stored in stored_tensors(weight.type)}


def check_weight_files(directory: Path, files: list[str], graph: Graph) -> None:
    """Refuse weight files whose headers do not hold exactly the tensors `graph` stores (dtype and
    shape each); reads the headers only."""
    try:
        expected = expected_tensors(graph)
    except IRError as error:
        raise EngineError(f"{directory}: the graph's weights cannot be stored: {error}") from None
    found: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for relative in files:
        try:
            table = read_tensor_table(directory, relative)
        except CheckpointError as error:
            raise EngineError(f"engine weight file {error}") from None
        for name, ref in table.items():
            if name in found:
                raise EngineError(f"{directory}: tensor {name} is in both {found[name][2]} and {relative}")
            found[name] = (ref.dtype, ref.shape, relative)
    for name, stored in expected.items():
        if name not in found:
            raise EngineError(f"{directory}: tensor {name} is missing from the weight files")
        dtype, shape, relative = found[name]
        if (dtype, shape) != (stored.dtype.safetensors, stored.shape):
            raise EngineError(f"{directory / relative}: tensor {name} is {dtype} {list(shape)}, the graph says "
                              f"{stored.dtype.safetensors} {list(stored.shape)}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise EngineError(f"{directory / found[extra[0]][2]}: tensor {extra[0]} is not a weight of the graph")


def load_weights(directory: Path, files: list[str], graph: Graph, device: torch.device) -> dict[str, WeightValue]:
    """The weights of `graph` from the engine's weight `files`, checked against the graph first."""
    check_weight_files(directory, files, graph)
    tensors: dict[str, torch.Tensor] = {}
    for relative in files:
        try:
            tensors.update(load_file(str(directory / relative), device=str(device)))
        except (SafetensorError, OSError, RuntimeError, ValueError) as error:
            raise EngineError(f"{directory / relative} cannot be read as safetensors ({error})") from None
    weights: dict[str, WeightValue] = {}
    for weight in graph.weights:
        parts = {stored.component: tensors[component_name(weight.name, stored.component)]
                 for stored in stored_tensors(weight.type)}
        weights[weight.name] = assemble(weight, parts)
    return weights
