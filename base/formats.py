"""The registry of number formats: every format nemocompile knows, each described once.

A format is one entry of `FORMATS`, under ONE spelling (the IR text's: `f32`, `bf16`, `fp8e4m3`,
`nvfp4`, ...). An entry holds its element width and maximum, how a quantized format is stored
(the dtype of its codes, its block size and its scales, named as NVIDIA ModelOpt exports them),
its safetensors dtype string, the NAME of its torch dtype (the runtime maps names to dtypes, so
this module needs no torch), ModelOpt's `quant_algo` spelling, and the architectures whose
tensor cores (or CUDA cores, for fp32) compute in it natively. `PRECISIONS` are the activation
variants a user picks per component (`nvfp4_w4a4`, `fp8_e4m3_w8a8`, ...) with their aliases.

Every other table (IR dtypes, safetensors and torch mappings, ModelOpt layouts, calibration
maxima, policy aliases, target native formats) is derived from these two; `docs/formats.md` is
generated from them (`python -m nemocompile.base.formatdoc > docs/formats.md`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from nemocompile.base.errors import UsageError

KINDS = ("float", "int", "bool", "complex", "quantized")

# Where a scale applies: one for the whole tensor (per expert when experts are stacked), one per
# output row, or one per block of `block_size` consecutive elements along the input (last) dim.
SCALE_LAYOUTS = ("per_tensor", "per_channel", "per_block")

# The architectures nemocompile has targets for, and where their native formats are stated.
ARCH_SOURCES: Mapping[str, str] = MappingProxyType({
    "sm_90": "NVIDIA H100 Tensor Core GPU Architecture whitepaper: Hopper's fourth-generation Tensor Cores "
             "take FP64, TF32, BF16, FP16, FP8 (E4M3 and E5M2) and INT8; Hopper has no FP6/FP4 tensor cores",
    "sm_100": "NVIDIA Blackwell architecture technical brief: fifth-generation Tensor Cores add FP6 and FP4 with "
              "micro-tensor scaling (MXFP8/MXFP6/MXFP4 and NVFP4: E2M1 in blocks of 16 with E4M3 scales) to "
              "Hopper's FP64, TF32, BF16, FP16, FP8 and INT8",
})
ARCHS = tuple(ARCH_SOURCES)
HOPPER_AND_LATER = ("sm_90", "sm_100")
BLACKWELL = ("sm_100",)


@dataclass(frozen=True)
class Scale:
    """One scale tensor of a quantized format."""

    tensor: str  # the tensor name suffix in a ModelOpt export: weight_scale, weight_scale_2, input_scale
    dtype: str  # the registry format the scale is stored in
    layout: str  # one of SCALE_LAYOUTS
    of: str  # "weight": stored with the weight; "activation": scales the GEMM's input
    static: bool = True  # False: computed on the fly from the data (NVFP4's activation block scales)
    doc: str = ""

    def __post_init__(self) -> None:
        if self.layout not in SCALE_LAYOUTS:
            raise ValueError(f"scale {self.tensor}: layout {self.layout!r} is not one of {SCALE_LAYOUTS}")
        if self.of not in ("weight", "activation"):
            raise ValueError(f"scale {self.tensor}: 'of' must be weight or activation, not {self.of!r}")


@dataclass(frozen=True)
class NumberFormat:
    name: str  # the one spelling (IR text, policy act_format, engine report)
    kind: str  # one of KINDS
    bits: int  # per element (4 for NVFP4: two codes share a byte)
    doc: str
    max_value: float  # largest finite magnitude of an element (of a quantized format: of its codes)
    element: str | None = None  # quantized: the registry format of one element's code
    storage: str | None = None  # quantized: the registry format the codes are stored in (packed if narrower)
    block_size: int | None = None  # quantized: elements per block scale, along the input dim
    scales: tuple[Scale, ...] = ()
    safetensors: str | None = None  # the safetensors header dtype string
    torch_name: str | None = None  # the name of the torch dtype (torch.<name>)
    modelopt_algo: str | None = None  # ModelOpt's quant_algo for weights in this format
    native_archs: tuple[str, ...] = ()  # architectures that compute in this format natively
    in_ir: bool = False  # an IR dtype (graph/types.py DTYPES)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"format {self.name}: kind {self.kind!r} is not one of {KINDS}")
        if (self.kind == "quantized") != (self.element is not None and self.storage is not None):
            raise ValueError(f"format {self.name}: a quantized format, and only one, names its element and storage")
        if any(s.layout == "per_block" for s in self.scales) != (self.block_size is not None):
            raise ValueError(f"format {self.name}: a block size goes with a per_block scale")
        unknown = [arch for arch in self.native_archs if arch not in ARCH_SOURCES]
        if unknown:
            raise ValueError(f"format {self.name}: unknown architectures {unknown}")

    @property
    def quantized(self) -> bool:
        return self.kind == "quantized"

    @property
    def is_float(self) -> bool:
        return self.kind in ("float", "quantized")

    def weight_scales(self) -> tuple[Scale, ...]:
        """The scales stored beside the codes, in the order ModelOpt exports them."""
        return tuple(s for s in self.scales if s.of == "weight")

    def activation_scales(self) -> tuple[Scale, ...]:
        return tuple(s for s in self.scales if s.of == "activation")

    @property
    def block(self) -> int:
        """The block size of a block-scaled format."""
        if self.block_size is None:
            raise ValueError(f"format {self.name} has no blocks")
        return self.block_size

    @property
    def scaled_max(self) -> float:
        """The largest magnitude the codes times their block scales reach: a per-tensor scale is
        amax / scaled_max (ModelOpt: 6 * 448 for NVFP4, 448 for FP8)."""
        block_scales = [s for s in self.scales if s.layout == "per_block"]
        return self.max_value * (FORMATS[block_scales[0].dtype].max_value if block_scales else 1.0)


def _float(name: str, bits: int, max_value: float, doc: str, *, safetensors: str | None = None,
           torch_name: str | None = None, archs: tuple[str, ...] = (), in_ir: bool = False) -> NumberFormat:
    return NumberFormat(name, "float", bits, doc, max_value, safetensors=safetensors, torch_name=torch_name,
                        native_archs=archs, in_ir=in_ir)


def _int(name: str, bits: int, doc: str, *, signed: bool = True, safetensors: str | None = None,
         torch_name: str | None = None, archs: tuple[str, ...] = (), in_ir: bool = False) -> NumberFormat:
    largest = float(2 ** (bits - 1) - 1 if signed else 2**bits - 1)
    return NumberFormat(name, "int", bits, doc, largest, safetensors=safetensors, torch_name=torch_name,
                        native_archs=archs, in_ir=in_ir)


_PER_TENSOR_INPUT = Scale("input_scale", "f32", "per_tensor", "activation",
                          doc="static, set by calibration or taken from the checkpoint")

_FORMATS = (
    # Floats the IR computes in.
    _float("f32", 32, 3.4028234663852886e38, "IEEE float32", safetensors="F32", torch_name="float32",
           archs=HOPPER_AND_LATER, in_ir=True),
    _float("bf16", 16, 3.3895313892515355e38, "bfloat16 (8 exponent, 7 mantissa bits)", safetensors="BF16",
           torch_name="bfloat16", archs=HOPPER_AND_LATER, in_ir=True),
    _float("f16", 16, 65504.0, "IEEE float16", safetensors="F16", torch_name="float16",
           archs=HOPPER_AND_LATER, in_ir=True),
    # The raw FP8 element (codes of `fp8`, block scales of `nvfp4`).
    _float("fp8e4m3", 8, 448.0, "FP8 E4M3 element, finite-only (OCP e4m3fn)", safetensors="F8_E4M3",
           torch_name="float8_e4m3fn", archs=HOPPER_AND_LATER, in_ir=True),
    # Integer and bool element dtypes of the IR (token ids, offsets, packed codes, masks).
    _int("i64", 64, "signed 64-bit integer", safetensors="I64", torch_name="int64", in_ir=True),
    _int("i32", 32, "signed 32-bit integer", safetensors="I32", torch_name="int32", in_ir=True),
    _int("u8", 8, "unsigned byte (NVFP4 stores two codes per byte)", signed=False, safetensors="U8",
         torch_name="uint8", in_ir=True),
    NumberFormat("bool", "bool", 8, "boolean, one byte each", 1.0, safetensors="BOOL", torch_name="bool",
                 in_ir=True),
    # The quantized weight formats, stored as NVIDIA ModelOpt exports them.
    NumberFormat(
        "fp8", "quantized", 8, "FP8 E4M3 values with an FP32 per-tensor scale (value = code * scale)",
        448.0, element="fp8e4m3", storage="fp8e4m3",
        scales=(Scale("weight_scale", "f32", "per_tensor", "weight", doc="amax / 448"), _PER_TENSOR_INPUT),
        modelopt_algo="FP8", native_archs=HOPPER_AND_LATER, in_ir=True),
    NumberFormat(
        "nvfp4", "quantized", 4,
        "NVFP4: E2M1 codes, an E4M3 scale per 16 inputs and an FP32 per-tensor second scale",
        6.0, element="fp4e2m1", storage="u8", block_size=16,
        scales=(Scale("weight_scale", "fp8e4m3", "per_block", "weight",
                      doc="block_amax / (6 * weight_scale_2), rounded to E4M3"),
                Scale("weight_scale_2", "f32", "per_tensor", "weight", doc="amax / (6 * 448)"),
                Scale("block_scale", "fp8e4m3", "per_block", "activation", static=False,
                      doc="block_amax / (6 * input_scale), computed on the fly"),
                _PER_TENSOR_INPUT),
        modelopt_algo="NVFP4", native_archs=BLACKWELL, in_ir=True),
    # An NVFP4 activation as a fused norm hands it to the GEMM after it: the packed E2M1 codes and their
    # E4M3 block scales, which mean values only with the static global scale (input_scale) that the GEMM
    # takes as an operand, as `fp8e4m3` codes mean values with theirs. Never a weight.
    NumberFormat(
        "nvfp4codes", "quantized", 4,
        "NVFP4 activation codes: packed E2M1 codes and an E4M3 scale per 16 inputs, under the global input_scale "
        "the GEMM reading them takes (add_rms_norm's NVFP4 output)",
        6.0, element="fp4e2m1", storage="u8", block_size=16,
        scales=(Scale("block_scale", "fp8e4m3", "per_block", "activation", static=False,
                      doc="block_amax / (6 * input_scale), computed by the norm that wrote the codes"),
                _PER_TENSOR_INPUT),
        native_archs=BLACKWELL, in_ir=True),
    # Formats that checkpoints or tensor cores have but the IR does not use (yet): known so that
    # safetensors headers are read and targets state what they compute in.
    _float("f64", 64, 1.7976931348623157e308, "IEEE float64", safetensors="F64", torch_name="float64",
           archs=HOPPER_AND_LATER),
    _float("tf32", 32, 3.4028234663852886e38, "TensorFloat-32: fp32 range, 10 mantissa bits (tensor-core input)",
           archs=HOPPER_AND_LATER),
    _float("fp8e5m2", 8, 57344.0, "FP8 E5M2 element", safetensors="F8_E5M2", torch_name="float8_e5m2",
           archs=HOPPER_AND_LATER),
    _float("e8m0", 8, 2.0**127, "power-of-two scale element of the MX formats", safetensors="F8_E8M0",
           torch_name="float8_e8m0fnu"),
    _float("fp6e2m3", 6, 7.5, "FP6 E2M3 element", safetensors="F6_E2M3", archs=BLACKWELL),
    _float("fp6e3m2", 6, 28.0, "FP6 E3M2 element", safetensors="F6_E3M2", archs=BLACKWELL),
    _float("fp4e2m1", 4, 6.0, "FP4 E2M1 element: magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6", safetensors="F4",
           archs=BLACKWELL),
    _int("i8", 8, "signed 8-bit integer", safetensors="I8", torch_name="int8", archs=HOPPER_AND_LATER),
    _int("i16", 16, "signed 16-bit integer", safetensors="I16", torch_name="int16"),
    _int("u16", 16, "unsigned 16-bit integer", signed=False, safetensors="U16", torch_name="uint16"),
    _int("u32", 32, "unsigned 32-bit integer", signed=False, safetensors="U32", torch_name="uint32"),
    _int("u64", 64, "unsigned 64-bit integer", signed=False, safetensors="U64", torch_name="uint64"),
    NumberFormat("c64", "complex", 64, "complex of two float32", 3.4028234663852886e38, safetensors="C64", torch_name="complex64"),
    *(NumberFormat(f"mxfp{bits}", "quantized", bits, f"OCP MX: {element} elements, an E8M0 scale per 32",
                   maximum, element=element, storage="u8" if bits < 8 else element, block_size=32,
                   scales=(Scale("weight_scale", "e8m0", "per_block", "weight"),), native_archs=BLACKWELL)
      for bits, element, maximum in ((8, "fp8e4m3", 448.0), (6, "fp6e2m3", 7.5), (4, "fp4e2m1", 6.0))),
)

FORMATS: Mapping[str, NumberFormat] = MappingProxyType({f.name: f for f in _FORMATS})


@dataclass(frozen=True)
class Precision:
    """An activation variant of a format: what a user assigns to a model component."""

    name: str  # the option spelling (README): nvfp4_w4a4, fp8_e4m3_w8a8, bf16, ...
    weight_dtype: str  # the registry format weights are stored in
    act_format: str | None  # the registry format activations are quantized to before the GEMM; None: not
    computes_in: str  # the registry format the GPU must compute in natively
    label: str
    aliases: tuple[str, ...] = ()
    fallback: str | None = None  # what to suggest where `computes_in` is not native
    engine_base: bool = False  # may be an engine's float base (--precision)

    @property
    def quantized(self) -> bool:
        return FORMATS[self.weight_dtype].quantized


PRECISIONS: Mapping[str, Precision] = MappingProxyType({p.name: p for p in (
    Precision("nvfp4_w4a4", "nvfp4", "nvfp4", "nvfp4", "NVFP4 W4A4", ("nvfp4", "w4a4"), "nvfp4_w4a16"),
    # W4A16 and W8A16 dequantize the weights to BF16 before the GEMM, so they need only BF16.
    Precision("nvfp4_w4a16", "nvfp4", None, "bf16", "NVFP4 W4A16", ("w4a16",), "bf16"),
    Precision("fp8_e4m3_w8a8", "fp8", "fp8", "fp8", "FP8 W8A8", ("fp8", "w8a8", "fp8_w8a8"), "bf16"),
    Precision("fp8_e4m3", "fp8", None, "bf16", "FP8 W8A16", (), "bf16"),
    Precision("bf16", "bf16", None, "bf16", "BF16", engine_base=True),
    Precision("fp16", "f16", None, "f16", "FP16"),
    Precision("fp32", "f32", None, "f32", "FP32", engine_base=True),
)})
ALIASES: Mapping[str, str] = MappingProxyType({alias: p.name for p in PRECISIONS.values() for alias in p.aliases})
# The formats GEMM activations are quantized to (the IR's act_format values).
ACT_FORMATS = tuple(dict.fromkeys(p.act_format for p in PRECISIONS.values() if p.act_format))
# The float bases an engine may have (`--precision`), and the float formats model weights come in.
BASE_PRECISIONS = tuple(p.name for p in PRECISIONS.values() if p.engine_base)
FLOAT_FORMATS = tuple(p.weight_dtype for p in PRECISIONS.values() if not p.quantized)


def format_named(name: str) -> NumberFormat:
    """The registry entry called `name` (its one spelling); a UsageError names the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise UsageError(f"unknown number format '{name}'; known formats: {', '.join(FORMATS)}") from None


def precision_named(name: str, where: str) -> Precision:
    """The precision `name` or one of its aliases (any case); `where` names the option at fault."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in PRECISIONS:
        known = ", ".join(sorted({*PRECISIONS, *ALIASES}))
        raise UsageError(f"{where}: unknown precision '{name}'; known precisions: {known}")
    return PRECISIONS[key]


def native_formats(arch: str) -> tuple[str, ...]:
    """The formats `arch` computes in natively, in registry order."""
    return tuple(f.name for f in FORMATS.values() if arch in f.native_archs)


def ir_formats() -> tuple[NumberFormat, ...]:
    return tuple(f for f in FORMATS.values() if f.in_ir)


def indivisible_input(format_name: str, input_dim: int) -> str | None:
    """Why a weight with this input dim cannot be in the format (its blocks run along the input
    dim), or None when it can. The one place the block-divisibility rule lives."""
    fmt = format_named(format_name)
    if fmt.block_size is None or input_dim % fmt.block_size == 0:
        return None
    return f"{fmt.name} needs an input dim divisible by {fmt.block_size}, got {input_dim}"
