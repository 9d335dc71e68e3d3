"""NVIDIA ModelOpt checkpoints as input: `hf_quant_config.json` (or `quantization_config` in
config.json) with `quant_algo` NVFP4, FP8 or MIXED_PRECISION (`quantized_layers`,
`exclude_modules`). Quantized tensors are taken as stored, bit for bit:
NVFP4: `weight` uint8 [out, in/2], `weight_scale` e4m3 [out, in/16], `weight_scale_2` fp32,
`input_scale` fp32; FP8: `weight` e4m3 [out, in], `weight_scale` fp32, `input_scale` fp32.

Each linear module's format is read from its tensors (`tensor_format`: the weight's dtype) and
cross-checked against the config (`QuantConfig.dtype_of`); the importer refuses a checkpoint
whose tensors and config disagree, naming every disagreement. Known quirks of ModelOpt's own
writers are tolerated and listed in `QuantConfig.quirks` (report.md names them): ModelOpt 0.47
appends a NUL-separated suffix to the module names it lists (`"lm_head.\\u0000backbone.pt_name_sentinel"`),
read here as the name before the NUL.

A quantized KV cache (`kv_cache_quant_algo: FP8`; config.json's `kv_cache_scheme`
`{"num_bits": 8, "type": "float", "dynamic": false}`) is deployed with the checkpoint's own scales:
ModelOpt 0.47's unified HF export writes, for each attention module, `<module>.k_proj.k_scale` and
`<module>.v_proj.v_scale`, F32 0-d tensors holding the static amax its `k_bmm_quantizer` /
`v_bmm_quantizer` calibrated on the keys / values the attention reads, divided by 448 (E4M3's
largest value). In Nemotron-H those are the k_proj / v_proj outputs as they are: its attention has
no rotary embedding. A KV-only export has `quant_algo: null` (every GEMM float). Any other KV-cache
format (INT8, NVFP4) is refused."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from nemocompile.base.errors import CheckpointError
from nemocompile.base.formats import FORMATS, indivisible_input
from nemocompile.base.inputs import MIB, read_regular_text

from .storage import stored_tensors
from .types import DTYPES, DType, TensorType

# quant_algo -> the IR dtype of weights in it, from the format registry
ALGO_DTYPES: Mapping[str, DType] = MappingProxyType(
    {dtype.format.modelopt_algo: dtype for dtype in DTYPES.values() if dtype.format.modelopt_algo})
SUPPORTED_ALGOS = (*ALGO_DTYPES, "MIXED_PRECISION")
# The one quantized KV cache nemocompile runs (passes/assign_kv_cache.py): FP8 E4M3, a scale per tensor.
KV_CACHE_ALGO = "FP8"
# config.json's spelling of it (ModelOpt's convert_hf_config writes compressed-tensors' scheme)
FP8_KV_SCHEME = {"num_bits": 8, "type": "float", "dynamic": False}
QUANT_CONFIG_FILE = "hf_quant_config.json"
# The storage dtype of a quantized weight -> its format (U8: NVFP4 codes, F8_E4M3: FP8)
STORED_FORMATS: Mapping[str, DType] = MappingProxyType(
    {DTYPES[dtype.format.storage].safetensors: dtype for dtype in ALGO_DTYPES.values() if dtype.format.storage})
# the float dtypes a checkpoint may store unquantized weights in, by their safetensors names
FLOAT_SAFETENSORS = frozenset(str(FORMATS[name].safetensors) for name in ("f32", "bf16", "f16"))
NUL_QUIRK = ("ModelOpt 0.47 writes module names with a NUL-separated suffix "
             "(e.g. 'lm_head.\\u0000backbone.pt_name_sentinel'); nemocompile reads each as the name before the NUL")
# scalar scales are exported as 0-d tensors by recent ModelOpt, as [1] by some older exports
SCALAR_SHAPES = ((), (1,))


@dataclass(frozen=True)
class QuantConfig:
    source: str
    algo: str | None  # None: no GEMM quantized (a KV-cache-only export)
    exclude_modules: tuple[str, ...] = ()
    quantized_layers: Mapping[str, str] = field(default_factory=dict)  # module -> NVFP4 | FP8
    quirks: tuple[str, ...] = ()  # known quirks of ModelOpt's writers met in this config, tolerated
    kv_cache: str | None = None  # KV_CACHE_ALGO when the checkpoint's KV cache is quantized, with its scales

    def dtype_of(self, module: str) -> DType | None:
        """The stored format of a linear module as the config says, or None when it keeps the
        module unquantized. A quantized_layers entry covers the module and the modules under it
        (ModelOpt names a layer's stacked experts `...mixer.experts`)."""
        if self.algo is None:
            return None
        if self.algo == "MIXED_PRECISION":
            for name, algo in self.quantized_layers.items():
                if module == name or module.startswith(name + "."):
                    return ALGO_DTYPES[algo]
            return None
        if any(fnmatch.fnmatchcase(module, p) or module.startswith(p.rstrip("*") + ".") or module == p
               for p in self.exclude_modules):
            return None
        return ALGO_DTYPES[self.algo]

    def describe(self, dtype: DType | None) -> str:
        return f"{dtype.format.modelopt_algo} by {self.source}" if dtype else f"unquantized by {self.source}"


def tensor_format(weight_dtype: str) -> DType | None:
    """The format a linear module's weight is stored in, from its safetensors dtype: NVFP4 (U8),
    FP8 (F8_E4M3) or None for a float weight. ValueError for any other dtype."""
    if weight_dtype in STORED_FORMATS:
        return STORED_FORMATS[weight_dtype]
    if weight_dtype in FLOAT_SAFETENSORS:
        return None
    raise ValueError(f"has dtype {weight_dtype}, which is neither a float (F32, BF16, F16) nor a ModelOpt "
                     f"quantized weight ({', '.join(f'{d.format.modelopt_algo}: {s}' for s, d in STORED_FORMATS.items())})")


def _module_name(name: str, quirks: set[str]) -> str:
    """A module name as ModelOpt meant it: ModelOpt 0.47 appends a NUL-separated suffix."""
    if "\x00" not in name:
        return name
    quirks.add(NUL_QUIRK)
    return name.split("\x00", 1)[0].rstrip(".")


def _algo(value: Any, where: str) -> str:
    algo = str(value).upper() if value is not None else ""
    if algo not in SUPPORTED_ALGOS:
        raise CheckpointError(f"{where}: quant_algo {value!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_ALGOS)}")
    return algo


def _kv_cache(section: Mapping[str, Any], where: str) -> str | None:
    """KV_CACHE_ALGO when the section declares a quantized KV cache, None when it does not; any
    other KV-cache format is refused."""
    kv_algo = section.get("kv_cache_quant_algo")
    if kv_algo is None and "kv_cache_scheme" in section:  # config.json's compressed-tensors spelling
        scheme = section["kv_cache_scheme"]
        if scheme is None:
            return None
        if isinstance(scheme, dict) and all(scheme.get(key, False) == value for key, value in FP8_KV_SCHEME.items()):
            return KV_CACHE_ALGO
        kv_algo = scheme if isinstance(scheme, str) else json.dumps(scheme)
    if kv_algo is None:
        return None
    if str(kv_algo).upper() != KV_CACHE_ALGO:
        raise CheckpointError(f"{where}: kv_cache_quant_algo {kv_algo!r} is not supported; nemocompile runs a "
                              f"quantized KV cache in {KV_CACHE_ALGO} only (E4M3 codes with the checkpoint's "
                              "k_scale and v_scale per attention layer)")
    return KV_CACHE_ALGO


def _check_group_size(entry: Mapping[str, Any], algo: str, where: str) -> None:
    group = entry.get("group_size")
    block = ALGO_DTYPES[algo].format.block_size if algo in ALGO_DTYPES else None
    if group is not None and block is not None and group != block:
        raise CheckpointError(f"{where}: group_size {group!r} is not {algo}'s block of {block}")


def _parse(section: Mapping[str, Any], where: str) -> QuantConfig:
    kv_cache = _kv_cache(section, where)
    # a KV-cache-only export (ModelOpt writes quant_algo null): every GEMM stays float
    algo = None if kv_cache and section.get("quant_algo") is None else _algo(section.get("quant_algo"), where)
    if algo is not None:
        _check_group_size(section, algo, where)
    exclude = section.get("exclude_modules") or section.get("ignore") or []
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        raise CheckpointError(f"{where}: exclude_modules must be a list of module names")
    quirks: set[str] = set()
    exclude = [_module_name(e, quirks) for e in exclude]
    layers: dict[str, str] = {}
    if algo == "MIXED_PRECISION":
        raw_layers = section.get("quantized_layers")
        if not isinstance(raw_layers, dict):
            raise CheckpointError(f"{where}: MIXED_PRECISION needs a quantized_layers object")
        for module, entry in raw_layers.items():
            layer_algo = _algo(entry.get("quant_algo") if isinstance(entry, dict) else entry,
                               f"{where}, quantized_layers[{module!r}]")
            if layer_algo == "MIXED_PRECISION":
                raise CheckpointError(f"{where}: layer {module} cannot itself be MIXED_PRECISION")
            if isinstance(entry, dict):
                _check_group_size(entry, layer_algo, f"{where}, quantized_layers[{module!r}]")
            layers[_module_name(module, quirks)] = layer_algo
    return QuantConfig(where, algo, tuple(exclude), layers, tuple(sorted(quirks)), kv_cache)


# It lists at most every quantized layer of the model: tens of kilobytes for the largest.
QUANT_CONFIG_MAX_BYTES = 64 * MIB


def read_quant_config(directory: Path, raw_config: Mapping[str, Any]) -> QuantConfig | None:
    """The checkpoint's quantization, from hf_quant_config.json or config.json; None when unquantized."""
    path = directory / QUANT_CONFIG_FILE
    if path.exists():
        text = read_regular_text(path, "quantization config", CheckpointError, QUANT_CONFIG_MAX_BYTES)
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path} is not valid JSON ({error})") from None
        section = data.get("quantization", data) if isinstance(data, dict) else None
        if not isinstance(section, dict):
            raise CheckpointError(f"{path} must hold a quantization object")
        return _parse(section, str(path))
    section = raw_config.get("quantization_config")
    if section is None:
        return None
    where = f"{directory / 'config.json'} quantization_config"
    if not isinstance(section, dict):
        raise CheckpointError(f"{where} must be an object")
    if ("quant_algo" not in section and "kv_cache_scheme" not in section
            and isinstance(section.get("quantization"), dict)):
        section = section["quantization"]
    return _parse(section, where)


def stored_layout(dtype: DType, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
    """component -> (shape, safetensors dtype) of one module's tensors in a ModelOpt export.
    Scalars are listed with shape () and accepted as [1] too."""
    reason = indivisible_input(dtype.name, shape[-1])
    if reason:
        raise CheckpointError(f"is {dtype.format.modelopt_algo} but {reason}")
    return {stored.component: (stored.shape, stored.dtype.safetensors)
            for stored in stored_tensors(TensorType(dtype, shape))}


def kv_scale_tensor(attention_module: str, which: str) -> str:
    """The checkpoint tensor ModelOpt writes for the scale of attention module `attention_module`'s
    key (`which` = "k") or value ("v") cache: `<module>.k_proj.k_scale`, `<module>.v_proj.v_scale`."""
    return f"{attention_module}.{which}_proj.{which}_scale"
