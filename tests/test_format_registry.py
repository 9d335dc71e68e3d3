"""The format registry (base/formats.py) is the one place each format fact lives: every derived
table agrees with it, its facts agree with torch, safetensors and NVIDIA ModelOpt, and the old
stray spellings and copied constants are gone from the source."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
import torch

from nemocompile.base.errors import UsageError
from nemocompile.base.formats import (
    ACT_FORMATS,
    ARCH_SOURCES,
    BASE_PRECISIONS,
    FORMATS,
    PRECISIONS,
    indivisible_input,
    native_formats,
    precision_named,
)
from nemocompile.calibration import ELEMENT_MAX, FORMAT_MAX
from nemocompile.graph.checkpoint import SAFETENSORS_DTYPE_BITS
from nemocompile.graph.modelopt import ALGO_DTYPES, SUPPORTED_ALGOS, stored_layout
from nemocompile.graph.nemotron_h import FLOAT_DTYPES, TORCH_DTYPE_TO_IR
from nemocompile.graph.storage import stored_tensors
from nemocompile.graph.types import DTYPES, SAFETENSORS_DTYPES, TensorType
from nemocompile.passes.precision_policy import COMPONENT_CATEGORIES, FLOAT_ONLY, canonical_precision
from nemocompile.runtime.dtypes import SAFETENSORS_TORCH_DTYPES as TORCH_DTYPES
from nemocompile.runtime.dtypes import TORCH_DTYPES as IR_TORCH_DTYPES
from nemocompile.runtime.formats import fp8 as fp8_format
from nemocompile.runtime.formats import nvfp4 as nvfp4_format
from nemocompile.targets import known_targets, load_target
from nemocompile.targets.model import POLICY_COMPONENTS

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("base", "graph", "passes", "runtime", "targets", "nemocompile", "codegen")
REGISTRY = ROOT / "base" / "formats.py"


# ---------------------------------------------------------------------------------------------
# the registry's facts against torch, safetensors and ModelOpt


@pytest.mark.parametrize("name", [f.name for f in FORMATS.values() if f.torch_name])
def test_torch_names_exist_and_their_maxima_agree(name: str) -> None:
    fmt = FORMATS[name]
    dtype = getattr(torch, fmt.torch_name or "")
    assert isinstance(dtype, torch.dtype)
    assert torch.empty((), dtype=dtype).element_size() * 8 == fmt.bits
    if dtype.is_floating_point:
        assert torch.finfo(dtype).max == fmt.max_value
    elif dtype not in (torch.bool, torch.complex64):
        assert float(torch.iinfo(dtype).max) == fmt.max_value


def test_safetensors_strings_agree_with_the_safetensors_library() -> None:
    from safetensors.torch import _TYPES

    for fmt in FORMATS.values():
        if fmt.safetensors and fmt.safetensors in _TYPES:
            assert _TYPES[fmt.safetensors] == getattr(torch, fmt.torch_name or ""), fmt.name
    # every IR dtype that is stored as one tensor round-trips through a safetensors file
    assert {d.safetensors for d in DTYPES.values() if not d.quantized} <= set(_TYPES)


def test_maxima_and_scales_agree_with_modelopt() -> None:
    pytest.importorskip("modelopt", reason="NVIDIA ModelOpt is the oracle for the NVFP4 constants")
    from modelopt.torch.export import model_config
    from modelopt.torch.export.quant_aware_conversion import _LEAF_SUFFIXES, _SCALAR_LEAF_SUFFIXES
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import E2M1_MAX, E4M3_MAX, NVFP4QTensor

    assert FORMATS["fp4e2m1"].max_value == E2M1_MAX
    assert FORMATS["fp8e4m3"].max_value == E4M3_MAX
    weight = torch.randn(8, 32) * 3
    expected = NVFP4QTensor.get_weights_scaling_factor_2(weight)
    assert torch.equal(weight.abs().amax().float() / FORMATS["nvfp4"].scaled_max, expected)
    assert FORMATS["nvfp4"].modelopt_algo == model_config.QUANTIZATION_NVFP4.upper()
    assert FORMATS["fp8"].modelopt_algo == model_config.QUANTIZATION_FP8.upper()
    for name in ("nvfp4", "fp8"):
        named = [s for s in FORMATS[name].scales if s.static]
        assert {f".{s.tensor}" for s in named} <= set(_LEAF_SUFFIXES)
    nvfp4_scalars = {f".{s.tensor}" for s in FORMATS["nvfp4"].scales if s.static and s.layout == "per_tensor"}
    assert nvfp4_scalars == set(_SCALAR_LEAF_SUFFIXES)


# ---------------------------------------------------------------------------------------------
# every derived table agrees with the registry


def test_ir_dtypes_are_the_registry_ir_formats() -> None:
    assert list(DTYPES) == [f.name for f in FORMATS.values() if f.in_ir]
    for name, dtype in DTYPES.items():
        fmt = FORMATS[name]
        assert (dtype.bits, dtype.quantized, dtype.block_size, dtype.is_float) == (
            fmt.bits, fmt.quantized, fmt.block_size, fmt.is_float)
        assert dtype.format is fmt
    assert DTYPES["nvfp4"].scale_dtype == "fp8e4m3" and DTYPES["fp8"].scale_dtype == "f32"
    assert {name: dtype.name for name, dtype in SAFETENSORS_DTYPES.items()} == {
        "F32": "f32", "BF16": "bf16", "F16": "f16", "F8_E4M3": "fp8e4m3", "I64": "i64", "I32": "i32",
        "U8": "u8", "BOOL": "bool"}


def test_torch_and_checkpoint_tables_follow_the_registry() -> None:
    for name, dtype in IR_TORCH_DTYPES.items():
        assert dtype == getattr(torch, FORMATS[name].torch_name or "")
    assert set(IR_TORCH_DTYPES) == {d.name for d in DTYPES.values() if not d.quantized}
    for fmt in FORMATS.values():
        if fmt.safetensors:
            assert SAFETENSORS_DTYPE_BITS[fmt.safetensors] == fmt.bits
            if fmt.torch_name and hasattr(torch, fmt.torch_name):
                assert TORCH_DTYPES[fmt.safetensors] == getattr(torch, fmt.torch_name)
    assert FLOAT_DTYPES == {"F32", "BF16", "F16"}
    assert {key: d.name for key, d in TORCH_DTYPE_TO_IR.items()} == {
        "float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def test_calibration_maxima_are_the_registry_maxima() -> None:
    # ModelOpt: input_scale = amax / (6 * 448) for NVFP4 activations, amax / 448 for FP8
    assert FORMAT_MAX == {"nvfp4": 6.0 * 448.0, "fp8": 448.0}
    assert ELEMENT_MAX == {"nvfp4": 6.0, "fp8": 448.0}
    assert set(ACT_FORMATS) == {p.act_format for p in PRECISIONS.values() if p.act_format}


def test_runtime_format_constants_are_the_registry_constants() -> None:
    assert fp8_format.E4M3_MAX == FORMATS["fp8e4m3"].max_value == 448.0
    assert nvfp4_format.E2M1_MAX == FORMATS["fp4e2m1"].max_value == 6.0
    assert nvfp4_format.BLOCK_SIZE == FORMATS["nvfp4"].block_size == 16
    assert nvfp4_format.E2M1_VALUES.max().item() == FORMATS["fp4e2m1"].max_value


def test_modelopt_tables_follow_the_registry() -> None:
    assert {algo: dtype.name for algo, dtype in ALGO_DTYPES.items()} == {"NVFP4": "nvfp4", "FP8": "fp8"}
    assert set(SUPPORTED_ALGOS) == {"NVFP4", "FP8", "MIXED_PRECISION"}
    # graph/modelopt.py reads exactly the tensors the registry names, with its safetensors strings
    assert stored_layout(DTYPES["nvfp4"], (8, 64)) == {
        "": ((8, 32), "U8"), "weight_scale": ((8, 4), "F8_E4M3"), "weight_scale_2": ((), "F32")}
    assert stored_layout(DTYPES["fp8"], (8, 40)) == {"": ((8, 40), "F8_E4M3"), "weight_scale": ((), "F32")}
    for name in ("nvfp4", "fp8"):
        layout = stored_layout(DTYPES[name], (4, 32))
        assert set(layout) == {"", *(s.tensor for s in FORMATS[name].weight_scales())}


def test_stored_tensors_of_stacked_experts_carry_a_scale_per_expert() -> None:
    parts = stored_tensors(TensorType(DTYPES["nvfp4"], (3, 8, 32)))
    assert [(p.component, p.dtype.name, p.shape) for p in parts] == [
        ("", "u8", (3, 8, 16)), ("weight_scale", "fp8e4m3", (3, 8, 2)), ("weight_scale_2", "f32", (3,))]
    parts = stored_tensors(TensorType(DTYPES["fp8"], (3, 8, 40)))
    assert [(p.component, p.dtype.name, p.shape) for p in parts] == [
        ("", "fp8e4m3", (3, 8, 40)), ("weight_scale", "f32", (3,))]


def test_the_block_rule_lives_in_one_helper() -> None:
    assert indivisible_input("nvfp4", 32) is None
    assert indivisible_input("fp8", 40) is None and indivisible_input("bf16", 3) is None
    assert indivisible_input("nvfp4", 40) == "nvfp4 needs an input dim divisible by 16, got 40"
    with pytest.raises(Exception, match="divisible by 16"):
        stored_tensors(TensorType(DTYPES["nvfp4"], (8, 40)))


@pytest.mark.parametrize(("spelling", "precision"), [
    ("nvfp4_w4a4", "nvfp4_w4a4"), ("nvfp4_w4a16", "nvfp4_w4a16"), ("fp8_e4m3_w8a8", "fp8_e4m3_w8a8"),
    ("fp8_e4m3", "fp8_e4m3"), ("bf16", "bf16"), ("fp32", "fp32"), ("nvfp4", "nvfp4_w4a4"),
    ("w4a16", "nvfp4_w4a16"), ("fp8", "fp8_e4m3_w8a8"), ("FP8", "fp8_e4m3_w8a8"), (" W4A4 ", "nvfp4_w4a4"),
])
def test_readme_precision_spellings_resolve(spelling: str, precision: str) -> None:
    assert precision_named(spelling, "--override").name == precision
    assert canonical_precision(spelling, "--override") == precision


def test_precisions_name_registry_formats_and_an_unknown_one_is_refused() -> None:
    for p in PRECISIONS.values():
        assert p.weight_dtype in FORMATS and p.computes_in in FORMATS
        assert p.act_format is None or FORMATS[p.act_format].quantized
        assert p.fallback is None or p.fallback in PRECISIONS
        assert not set(p.aliases) & set(PRECISIONS)
    assert BASE_PRECISIONS == ("bf16", "fp32")
    with pytest.raises(UsageError, match=r"--override x=fp4: unknown precision 'fp4'; known precisions: .*w4a16"):
        precision_named("fp4", "--override x=fp4")


@pytest.mark.parametrize("name", known_targets())
def test_each_target_natively_runs_registry_formats(name: str) -> None:
    target = load_target(name)
    assert target.arch in ARCH_SOURCES
    assert target.native_formats == native_formats(target.arch)
    assert set(target.native_formats) <= set(FORMATS)
    for precision in target.precision_policy.values():
        assert target.supports(PRECISIONS[precision].computes_in)
    blackwell = target.arch == "sm_100"
    assert target.supports("nvfp4") == blackwell == ("fp4" in target.peak_tflops)


def test_the_policy_and_the_targets_share_one_component_list() -> None:
    assert tuple(COMPONENT_CATEGORIES) == POLICY_COMPONENTS
    for name in known_targets():
        assert set(load_target(name).precision_policy) == set(POLICY_COMPONENTS)
    assert FLOAT_ONLY["router"] == ("fp32",)  # derived from graph/nemotron_h.py FP32_CATEGORIES


def test_the_registry_imports_neither_torch_nor_other_layers() -> None:
    tree = ast.parse(REGISTRY.read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {m for m in imported if m.startswith("nemocompile")} == {"nemocompile.base.errors"}
    code = "import sys, nemocompile.base.formats, nemocompile.base.formatdoc; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# the old spellings and copied constants are gone from the source


# Kernel templates are copied verbatim into engines and import only triton, so they cannot read the
# registry: they are not scanned, and their constants are checked against it instead (below).
TEMPLATES = ROOT / "codegen" / "triton" / "templates"


def _sources() -> list[Path]:
    files = [p for folder in SOURCE_FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]
    return [p for p in files if p != REGISTRY and TEMPLATES not in p.parents]


def test_the_kernel_templates_constants_are_the_registrys() -> None:
    pytest.importorskip("triton", reason="the kernel templates need the triton package")
    from nemocompile.codegen.triton.templates import quant_math

    assert quant_math.E4M3_MAX.value == FORMATS["fp8e4m3"].max_value
    assert quant_math.E2M1_MAX.value == FORMATS["fp4e2m1"].max_value
    assert quant_math.E4M3_MIN_SUBNORMAL.value == 2.0**-9  # the least positive E4M3 value
    assert torch.tensor(quant_math.E4M3_MIN_SUBNORMAL.value).to(torch.float8_e4m3fn).view(torch.uint8) == 1


# String literals that name a format outside the registry: safetensors strings, the FP8 torch
# name, the targets' old native-format names. (config.json's torch_dtype values and the targets'
# peak-rate keys are other vocabularies.)
STRAY_STRINGS = ({f.safetensors for f in FORMATS.values() if f.safetensors}
                 | {"float8_e4m3fn", "fp4_e2m1", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "int4", "fp64"})


def _strays(path: Path) -> list[str]:
    found = []
    tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    for index, token in enumerate(tokens):
        where = f"{path.relative_to(ROOT)}:{token.start[0]}"
        if token.type == tokenize.STRING and not token.string.startswith(('"""', "'''", "f", "r", "b")):
            if ast.literal_eval(token.string) in STRAY_STRINGS:
                found.append(f"{where}: {token.string}")
        elif token.type == tokenize.NUMBER and ast.literal_eval(token.string) == 448:
            found.append(f"{where}: the E4M3 maximum 448")
        elif (token.type == tokenize.OP and token.string == "%" and index + 1 < len(tokens)
              and tokens[index + 1].string == "16"):
            found.append(f"{where}: the NVFP4 block size 16")
    return found


def test_no_format_spelling_or_constant_is_copied_outside_the_registry() -> None:
    found = [stray for path in _sources() for stray in _strays(path)]
    assert found == [], "format facts outside base/formats.py:\n" + "\n".join(found)


def test_the_stray_check_catches_what_it_looks_for(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('X = {"F8_E4M3": 1}\nY = 448.0\nZ = n % 16\nW = "fp4_e2m1"\nV = "bf16"\n"""F32 448"""\n')
    found = _strays_at(sample)
    assert [line.split(": ", 1)[1] for line in found] == [
        '"F8_E4M3"', "the E4M3 maximum 448", "the NVFP4 block size 16", '"fp4_e2m1"']


def _strays_at(path: Path) -> list[str]:
    global ROOT
    saved, ROOT = ROOT, path.parent
    try:
        return _strays(path)
    finally:
        ROOT = saved


def test_one_table_per_kind() -> None:
    """No module but the registry defines a precision, alias or format table of its own."""
    owned = {"PRECISIONS", "ALIASES", "FALLBACK", "KNOWN_FORMATS", "POLICY_PRECISIONS", "IR_TO_SAFETENSORS"}
    found = []
    for path in _sources():
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, ast.AnnAssign) else []
            found += [f"{path.relative_to(ROOT)}: {t.id}" for t in targets
                      if isinstance(t, ast.Name) and t.id in owned]
    assert found == []
