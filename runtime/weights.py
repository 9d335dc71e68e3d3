"""Load an engine's weights: plain tensors as they are, quantized ones assembled from their
stored components into NVFP4Tensor / FP8Tensor (as NVIDIA ModelOpt lays them out)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from nemocompile.base.errors import EngineError
from nemocompile.graph.ir import Graph, Weight
from nemocompile.graph.storage import component_name, stored_tensors

from .dtypes import torch_dtype
from .formats import FP8Tensor, NVFP4Tensor

WeightValue = torch.Tensor | NVFP4Tensor | FP8Tensor


def assemble(weight: Weight, parts: dict[str, torch.Tensor]) -> WeightValue:
    name = weight.type.dtype.name
    if name == "nvfp4":
        return NVFP4Tensor(parts[""], parts["weight_scale"], parts["weight_scale_2"])
    if name == "fp8":
        return FP8Tensor(parts[""], parts["weight_scale"])
    return parts[""]


def load_weights(directory: Path, files: list[str], graph: Graph, device: torch.device) -> dict[str, WeightValue]:
    tensors: dict[str, torch.Tensor] = {}
    for relative in files:
        tensors.update(load_file(str(directory / relative), device=str(device)))
    weights: dict[str, WeightValue] = {}
    for weight in graph.weights:
        parts: dict[str, torch.Tensor] = {}
        for stored in stored_tensors(weight.type):
            name = component_name(weight.name, stored.component)
            tensor = tensors.get(name)
            if tensor is None:
                raise EngineError(f"{directory}: tensor {name} of weight {weight.name} is missing from the weight files")
            if tuple(tensor.shape) != stored.shape or tensor.dtype != torch_dtype(stored.dtype):
                raise EngineError(f"{directory}: tensor {name} is {tensor.dtype} {list(tensor.shape)}, the graph "
                                  f"says {stored.dtype} {list(stored.shape)}")
            parts[stored.component] = tensor
        weights[weight.name] = assemble(weight, parts)
    return weights
