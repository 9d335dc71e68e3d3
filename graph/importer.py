"""Import a Hugging Face Nemotron-H checkpoint directory as released: config.json, one
safetensors file or a sharded index, `backbone.` prefix, routed experts stored per expert,
BF16/FP16/FP32 weights. Every expected tensor is checked (presence, shape, dtype) before
anything is built, and all problems are reported together. No weight bytes are read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemocompile.errors import CheckpointError, ConfigError, join_problems

from .checkpoint import Checkpoint, check_tensors
from .config import ModelConfig, load_config
from .ir import Graph, TensorSource, Weight
from .nemotron_h import (
    FLOAT_DTYPES,
    TORCH_DTYPE_TO_IR,
    WeightSource,
    WeightSpec,
    build_block_graph,
    model_weights,
)
from .types import SAFETENSORS_DTYPES, TensorType

PREFIXES = ("backbone.", "model.")
MTP_PREFIX = "mtp."


@dataclass(frozen=True)
class ImportedModel:
    graph: Graph
    config: ModelConfig
    raw_config: dict[str, Any]
    checkpoint: Checkpoint


def _prefix(ckpt: Checkpoint) -> str:
    for prefix in PREFIXES:
        if ckpt.ref(f"{prefix}embeddings.weight") is not None:
            return prefix
    return PREFIXES[0]


def _expected(specs: list[WeightSpec]) -> dict[str, tuple[tuple[int, ...], frozenset[str]]]:
    expected: dict[str, tuple[tuple[int, ...], frozenset[str]]] = {}
    for spec in specs:
        shape = spec.shape[1:] if len(spec.tensors) > 1 else spec.shape
        for tensor in spec.tensors:
            expected[tensor] = (shape, FLOAT_DTYPES)
    return expected


def _mtp_weights(ckpt: Checkpoint) -> list[Weight]:
    """Multi-token-prediction tensors are carried into the engine and counted, not executed."""
    weights = []
    for name in sorted(ckpt.refs):
        if not name.startswith(MTP_PREFIX):
            continue
        ref = ckpt.refs[name]
        if ref.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{ckpt.directory}: tensor {name} has unsupported dtype {ref.dtype}")
        weights.append(Weight(name, TensorType(SAFETENSORS_DTYPES[ref.dtype], ref.shape), "mtp",
                              (TensorSource(ref.file, name),)))
    return weights


def import_checkpoint(directory: Path) -> ImportedModel:
    if not directory.exists():
        raise ConfigError(f"{directory} does not exist")
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a checkpoint directory (expected config.json and *.safetensors)")
    config, raw = load_config(directory)
    ckpt = Checkpoint.open(directory)
    prefix = _prefix(ckpt)
    # transformers' Nemotron-H never ties lm_head to the embeddings: a checkpoint that carries
    # lm_head.weight uses it whatever tie_word_embeddings says.
    lm_head = not config.tie_word_embeddings or ckpt.ref("lm_head.weight") is not None
    specs = model_weights(config, prefix, lm_head)
    problems = check_tensors(ckpt, _expected(specs))
    if problems:
        raise CheckpointError(join_problems(f"{directory} does not match its config.json", problems))
    sources = {}
    for spec in specs:
        tensors = tuple(TensorSource(ckpt.refs[t].file, t) for t in spec.tensors)
        sources[spec.name] = WeightSource(tensors, SAFETENSORS_DTYPES[ckpt.refs[spec.tensors[0]].dtype])
    graph = build_block_graph(config, TORCH_DTYPE_TO_IR[config.torch_dtype], sources, _mtp_weights(ckpt),
                              {"source_fingerprint": ckpt.fingerprint()}, prefix, lm_head)
    return ImportedModel(graph, config, raw, ckpt)
