"""Import a Hugging Face Nemotron-H checkpoint directory as released: config.json, one
safetensors file or a sharded index, `backbone.` prefix, routed experts stored per expert,
BF16/FP16/FP32 weights, or NVIDIA ModelOpt NVFP4/FP8/mixed-precision weights (graph/modelopt.py),
with ModelOpt's FP8 KV-cache scales where its config declares them.
Every expected tensor is checked (presence, shape, dtype) before anything is built, and all
problems are reported together. A tensor the model does not use is refused, unless it is one
known to be unused at inference (UNUSED_AT_INFERENCE: skipped and named in the report) or a
multi-token-prediction tensor (carried and counted). No weight bytes are read, except the two
fp32 KV-cache scalars of each attention layer of an FP8-KV checkpoint (checked positive)."""

from __future__ import annotations

import fnmatch
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemocompile.base.errors import CheckpointError, ConfigError, join_problems
from nemocompile.base.formats import indivisible_input

from .checkpoint import Checkpoint, check_tensors
from .config import ModelConfig, load_config
from .ir import Graph, TensorSource, Weight
from .modelopt import (
    KV_CACHE_ALGO,
    SCALAR_SHAPES,
    QuantConfig,
    kv_scale_tensor,
    read_quant_config,
    stored_layout,
    tensor_format,
)
from .nemotron_h import (
    DEFAULT_BOUNDS,
    FLOAT_DTYPES,
    INPUT_SCALE_CATEGORY,
    KV_SCALES,
    TORCH_DTYPE_TO_IR,
    WeightSource,
    WeightSpec,
    build_block_graph,
    kv_scale_name,
    model_weights,
)
from .storage import component_name
from .types import F32, SAFETENSORS_DTYPES, DType, TensorType

PREFIXES = ("backbone.", "model.")
MTP_PREFIX = "mtp."
# Checkpoint tensors known to be unused at inference: skipped, and named in the engine's report.
# Pattern (fnmatch, full tensor name) -> why it is not needed.
UNUSED_AT_INFERENCE: dict[str, str] = {
    "*.k_proj.k_scale": "a ModelOpt FP8 KV-cache scale, but the quantization config declares no "
                        "kv_cache_quant_algo, so the KV cache stays as the policy says",
    "*.v_proj.v_scale": "a ModelOpt FP8 KV-cache scale, but the quantization config declares no "
                        "kv_cache_quant_algo, so the KV cache stays as the policy says",
}
# the least FP8 KV-cache scale (the smallest normal float32, as every other scale: kernels flush denormals)
FLOAT32_TINY = 2.0 ** -126


@dataclass(frozen=True)
class ImportedModel:
    graph: Graph
    config: ModelConfig
    raw_config: dict[str, Any]
    checkpoint: Checkpoint
    skipped_tensors: tuple[str, ...] = ()  # known to be unused at inference (UNUSED_AT_INFERENCE)
    quirks: tuple[str, ...] = ()  # known quirks of ModelOpt's writers met in the checkpoint, tolerated
    # the checkpoint's quantized KV cache (KV_CACHE_ALGO) and where it says so; its scales are graph weights
    kv_cache: str | None = None
    kv_cache_source: str = ""


def _prefix(ckpt: Checkpoint) -> str:
    for prefix in PREFIXES:
        if ckpt.ref(f"{prefix}embeddings.weight") is not None:
            return prefix
    return PREFIXES[0]


GEMM_CATEGORIES = frozenset({"attention", "mamba_in_proj", "mamba_out_proj", "mlp", "shared_experts",
                             "routed_experts", "latent_projections", "lm_head"})
Expected = dict[str, tuple[tuple[int, ...], frozenset[str]]]
# Tensors only a quantized weight has beside it (input_scale alone would be ambiguous too, but
# the scale check of _input_scales names it).
QUANTIZED_ONLY_COMPONENTS = ("weight_scale", "weight_scale_2")


@dataclass(frozen=True)
class _Plan:
    """What the checkpoint must hold, and the stored format of each weight."""

    expected: Expected
    dtypes: dict[str, DType | None]  # weight name -> quantized stored format (None: float)
    problems: list[str]


def _module(tensor: str) -> str:
    return tensor[: -len(".weight")] if tensor.endswith(".weight") else tensor


def _format_name(dtype: DType | None) -> str:
    return dtype.format.modelopt_algo or dtype.name if dtype else "unquantized"


def _found_format(spec: WeightSpec, tensor: str, ckpt: Checkpoint, problems: list[str]) -> DType | None:
    """The format a module's tensors hold (its weight's dtype); a missing weight is reported later."""
    ref = ckpt.ref(tensor)
    if ref is None:
        return None
    try:
        found = tensor_format(ref.dtype)
    except ValueError as error:
        problems.append(f"{tensor} {error}")
        return None
    if found is None:
        scales = [name for name in (component_name(tensor, s) for s in QUANTIZED_ONLY_COMPONENTS) if ckpt.ref(name)]
        if scales:
            problems.append(f"{tensor} is {ref.dtype} (a float weight) but {', '.join(scales)} is stored beside it, "
                            "which only a quantized weight has")
    elif spec.category not in GEMM_CATEGORIES or spec.bias:
        problems.append(f"{tensor} is stored as {_format_name(found)}, but {spec.category} weights are kept in a float "
                        "format")
        return None
    return found


def _cross_checked_format(spec: WeightSpec, quant: QuantConfig | None, ckpt: Checkpoint, problems: list[str],
                          disagreements: list[str]) -> DType | None:
    """The one format of a weight (all its experts), read from the tensors and cross-checked with the config."""
    quantizable = spec.category in GEMM_CATEGORIES and not spec.bias
    found = {t: _found_format(spec, t, ckpt, problems) for t in spec.tensors}
    differing = [t for t in spec.tensors
                 if ckpt.ref(t) is not None and found[t] != (quant.dtype_of(_module(t)) if quant and quantizable
                                                             else None)]
    if differing:
        first = differing[0]
        said = quant.dtype_of(_module(first)) if quant and quantizable else None
        where = quant.describe(said) if quant else "unquantized: the checkpoint has no quantization config"
        more = f" (and {len(differing) - 1} more of its experts)" if len(differing) > 1 else ""
        why = indivisible_input(said.name, spec.shape[-1]) if said is not None else None
        disagreements.append(f"{_module(first)}{more} holds {_format_name(found[first])} tensors "
                             f"({first} is {ckpt.refs[first].dtype}) but is {where}"
                             + (f" ({why}, so it cannot be)" if why else ""))
    formats = {found[t] for t in spec.tensors if ckpt.ref(t) is not None}
    if len(formats) > 1:
        problems.append(f"the experts of {_module(spec.tensors[0]).rsplit('.experts.', 1)[0]} mix formats "
                        f"({', '.join(sorted(_format_name(f) for f in formats))})")
    return formats.pop() if len(formats) == 1 else None


def _plan(specs: list[WeightSpec], quant: QuantConfig | None, ckpt: Checkpoint) -> _Plan:
    """Each weight's format comes from its tensors, checked against the quantization config:
    every disagreement (and every tensor whose format is ambiguous) is refused together."""
    expected: Expected = {}
    dtypes: dict[str, DType | None] = {}
    problems: list[str] = []
    disagreements: list[str] = []
    for spec in specs:
        dtypes[spec.name] = _cross_checked_format(spec, quant, ckpt, problems, disagreements)
    if disagreements:
        where = quant.source if quant else "its (missing) quantization config"
        raise CheckpointError(join_problems(f"{ckpt.directory}: the tensors disagree with {where}",
                                            disagreements + problems))
    if problems:
        raise CheckpointError(join_problems(f"{ckpt.directory}: the format of some weights is ambiguous", problems))
    for spec in specs:
        shape = spec.shape[1:] if len(spec.tensors) > 1 else spec.shape
        dtype = dtypes[spec.name]
        for tensor in spec.tensors:
            if dtype is None:
                expected[tensor] = (shape, FLOAT_DTYPES)
                continue
            try:
                layout = stored_layout(dtype, shape)
            except CheckpointError as error:
                problems.append(f"{_module(tensor)} {error}")
                break
            for component, (component_shape, stored) in layout.items():
                name = component_name(tensor, component)
                ref = ckpt.ref(name)
                if not component_shape and ref is not None and ref.shape in SCALAR_SHAPES:
                    component_shape = ref.shape
                expected[name] = (component_shape, frozenset({stored}))
    return _Plan(expected, dtypes, problems)


def _input_scales(specs: list[WeightSpec], plan: _Plan, ckpt: Checkpoint) -> tuple[list[Weight], list[str]]:
    """ModelOpt's static activation scales, carried as graph weights `<weight>.input_scale`."""
    weights, problems = [], []
    for spec in specs:
        if plan.dtypes.get(spec.name) is None:
            continue
        names = [component_name(t, "input_scale") for t in spec.tensors]
        refs = [ckpt.ref(n) for n in names]
        if all(r is None for r in refs):
            continue
        bad = [n for n, r in zip(names, refs, strict=True)
               if r is None or r.shape not in SCALAR_SHAPES or r.dtype != F32.safetensors]
        if bad:
            problems.append(f"{bad[0]} must be an F32 scalar like the other input scales of {spec.name}")
            continue
        shape = (len(names),) if len(names) > 1 else ()
        sources = tuple(TensorSource(r.file, r.name) for r in refs if r is not None)
        weights.append(Weight(f"{spec.name}.input_scale", TensorType(F32, shape), INPUT_SCALE_CATEGORY, sources))
    return weights, problems


def _read_f32_scalar(ckpt: Checkpoint, name: str) -> float:
    """One stored F32 scalar (4 bytes), read without torch."""
    path, offset, count = ckpt.location(name)
    with path.open("rb") as file:
        file.seek(offset)
        data = file.read(count)
    if len(data) != 4:
        raise CheckpointError(f"{path} changed after the checkpoint was opened (tensor {name})")
    return float(struct.unpack("<f", data)[0])


def _kv_scales(config: ModelConfig, prefix: str, quant: QuantConfig | None,
               ckpt: Checkpoint) -> tuple[list[Weight], list[str]]:
    """ModelOpt's FP8 KV-cache scales, `{prefix}layers.N.mixer.k_proj.k_scale` and `...v_proj.v_scale`,
    carried as the graph weights `layers.N.mixer.k_scale` / `.v_scale` that assign_kv_cache gives
    attention (so calibration leaves them): one positive F32 scalar each, for every attention layer."""
    if quant is None or quant.kv_cache != KV_CACHE_ALGO:
        return [], []
    weights: list[Weight] = []
    problems: list[str] = []
    for index, kind in enumerate(config.layer_kinds):
        if kind != "attention":
            continue
        scope = f"layers.{index}.mixer"
        for scale in KV_SCALES:
            which = scale.removesuffix("_scale")
            tensor = kv_scale_tensor(f"{prefix}{scope}", which)
            ref = ckpt.ref(tensor)
            if ref is None:
                problems.append(f"{tensor} is missing ({quant.source} declares kv_cache_quant_algo "
                                f"{quant.kv_cache}, which needs a k_scale and a v_scale for every attention layer)")
                continue
            if ref.shape not in SCALAR_SHAPES or ref.dtype != F32.safetensors:
                problems.append(f"{tensor} is {ref.dtype} {list(ref.shape)}, but an FP8 KV-cache scale is an F32 "
                                "scalar (amax / 448)")
                continue
            value = _read_f32_scalar(ckpt, tensor)
            if not (math.isfinite(value) and value >= FLOAT32_TINY):
                problems.append(f"{tensor} is {value:g}, but an FP8 KV-cache scale must be a positive, finite "
                                "normal float32")
                continue
            weights.append(Weight(kv_scale_name(scope, which), TensorType(F32, ()), INPUT_SCALE_CATEGORY,
                                  (TensorSource(ref.file, tensor),)))
    return weights, problems


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


def why_unused(tensor: str) -> str | None:
    """Why a checkpoint tensor is not needed at inference, or None when it is not known to be."""
    for pattern, why in UNUSED_AT_INFERENCE.items():
        if fnmatch.fnmatchcase(tensor, pattern):
            return why
    return None


def _unused_tensors(ckpt: Checkpoint, used: set[str]) -> tuple[list[str], list[str]]:
    """(tensors known to be unused at inference, tensors the model does not use at all)."""
    skipped: list[str] = []
    unexpected: list[str] = []
    for name in sorted(set(ckpt.refs) - used):
        if not name.startswith(MTP_PREFIX):
            (skipped if why_unused(name) else unexpected).append(name)
    return skipped, unexpected


def import_checkpoint(directory: Path, bounds: tuple[int, int] = DEFAULT_BOUNDS) -> ImportedModel:
    """The block graph of the checkpoint at `directory`; `bounds` = (largest batch, longest context)."""
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
    quant = read_quant_config(directory, raw)
    plan = _plan(specs, quant, ckpt)
    scales, scale_problems = _input_scales(specs, plan, ckpt)
    kv_scales, kv_problems = _kv_scales(config, prefix, quant, ckpt)
    scales += kv_scales
    problems = plan.problems + check_tensors(ckpt, plan.expected) + scale_problems + kv_problems
    if problems:
        raise CheckpointError(join_problems(f"{directory} does not match its config.json", problems))
    used = set(plan.expected) | {source.tensor for weight in scales for source in weight.sources}
    skipped, unexpected = _unused_tensors(ckpt, used)
    if unexpected:
        raise CheckpointError(f"{directory} holds {len(unexpected)} tensor(s) that its config.json does not use, "
                              f"which nemocompile refuses rather than ignore: {', '.join(unexpected)}")
    sources = {}
    for spec in specs:
        tensors = tuple(TensorSource(ckpt.refs[t].file, t) for t in spec.tensors)
        stored = plan.dtypes[spec.name] or SAFETENSORS_DTYPES[ckpt.refs[spec.tensors[0]].dtype]
        sources[spec.name] = WeightSource(tensors, stored)
    metadata = {"source_fingerprint": ckpt.fingerprint()}
    if quant is not None and quant.algo is not None:
        metadata["source_quantization"] = quant.algo
    graph = build_block_graph(config, TORCH_DTYPE_TO_IR[config.torch_dtype], sources, scales + _mtp_weights(ckpt),
                              metadata, prefix, lm_head, bounds)
    return ImportedModel(graph, config, raw, ckpt, tuple(skipped), quant.quirks if quant else (),
                         quant.kv_cache if quant else None, quant.source if quant else "")
