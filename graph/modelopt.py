"""NVIDIA ModelOpt checkpoints as input: `hf_quant_config.json` (or `quantization_config` in
config.json) with `quant_algo` NVFP4, FP8 or MIXED_PRECISION (`quantized_layers`,
`exclude_modules`). Quantized tensors are taken as stored, bit for bit:
NVFP4: `weight` uint8 [out, in/2], `weight_scale` e4m3 [out, in/16], `weight_scale_2` fp32,
`input_scale` fp32; FP8: `weight` e4m3 [out, in], `weight_scale` fp32, `input_scale` fp32."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from nemocompile.base.errors import CheckpointError
from nemocompile.base.formats import indivisible_input
from nemocompile.base.inputs import MIB, read_regular_text

from .storage import stored_tensors
from .types import DTYPES, DType, TensorType

# quant_algo -> the IR dtype of weights in it, from the format registry
ALGO_DTYPES: Mapping[str, DType] = MappingProxyType(
    {dtype.format.modelopt_algo: dtype for dtype in DTYPES.values() if dtype.format.modelopt_algo})
SUPPORTED_ALGOS = (*ALGO_DTYPES, "MIXED_PRECISION")
QUANT_CONFIG_FILE = "hf_quant_config.json"
# scalar scales are exported as 0-d tensors by recent ModelOpt, as [1] by some older exports
SCALAR_SHAPES = ((), (1,))


@dataclass(frozen=True)
class QuantConfig:
    source: str
    algo: str
    exclude_modules: tuple[str, ...] = ()
    quantized_layers: Mapping[str, str] = field(default_factory=dict)  # module -> NVFP4 | FP8

    def dtype_of(self, module: str) -> DType | None:
        """The stored format of a linear module, or None when the checkpoint keeps it unquantized."""
        if self.algo == "MIXED_PRECISION":
            algo = self.quantized_layers.get(module)
            return ALGO_DTYPES[algo] if algo else None
        if any(fnmatch.fnmatchcase(module, p) or module.startswith(p.rstrip("*") + ".") or module == p
               for p in self.exclude_modules):
            return None
        return ALGO_DTYPES[self.algo]


def _algo(value: Any, where: str) -> str:
    algo = str(value).upper() if value is not None else ""
    if algo not in SUPPORTED_ALGOS:
        raise CheckpointError(f"{where}: quant_algo {value!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_ALGOS)}")
    return algo


def _parse(section: Mapping[str, Any], where: str) -> QuantConfig:
    algo = _algo(section.get("quant_algo"), where)
    exclude = section.get("exclude_modules") or section.get("ignore") or []
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        raise CheckpointError(f"{where}: exclude_modules must be a list of module names")
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
            layers[module] = layer_algo
    return QuantConfig(where, algo, tuple(exclude), layers)


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
    if "quant_algo" not in section and isinstance(section.get("quantization"), dict):
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
