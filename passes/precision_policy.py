"""Precision policy: which format each model component gets on a target. Starts from the
target's policy (`--precision auto`) or one float format for everything (`bf16`, `fp32`),
then a TOML policy file, then `--override component=precision`; every choice is checked
against what the target can run."""

from __future__ import annotations

import dataclasses
import fnmatch
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from nemocompile.base.errors import TargetError, UsageError
from nemocompile.base.formats import BASE_PRECISIONS, PRECISIONS, Precision, precision_named
from nemocompile.base.inputs import MIB, read_regular_text
from nemocompile.graph.nemotron_h import FP32_CATEGORIES
from nemocompile.targets import Target
from nemocompile.targets.model import POLICY_COMPONENTS

# The KV cache's one quantized choice (passes/assign_kv_cache.py): FP8 E4M3 with a per-tensor scale.
FP8_KV_CACHE = "fp8_e4m3"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# Policy component (the one list: targets/model.py POLICY_COMPONENTS) -> the weight categories
# it covers (graph/nemotron_h.py CATEGORIES); a component not listed here covers its namesake.
_COVERS: Mapping[str, tuple[str, ...]] = {"mamba_linears": ("mamba_in_proj", "mamba_out_proj"),
                                          "kv_cache": (), "ssm_state": ()}
COMPONENT_CATEGORIES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {component: _COVERS.get(component, (component,)) for component in POLICY_COMPONENTS})
# Components whose weights do not feed GEMMs (or are state) take only these float precisions,
# the first being the default where the base is not allowed. The router's weights stay fp32
# (graph/nemotron_h.py FP32_CATEGORIES).
FLOAT_ONLY: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "embeddings": BASE_PRECISIONS, "conv1d": BASE_PRECISIONS, "kv_cache": (*BASE_PRECISIONS, FP8_KV_CACHE),
    "ssm_state": ("fp32", "fp16"),
    **{component: ("fp32",) for component, categories in COMPONENT_CATEGORIES.items()
       if categories and set(categories) <= FP32_CATEGORIES},
})


@dataclass(frozen=True)
class PrecisionPolicy:
    base: str  # bf16 or fp32: every float weight and activation not quantized
    components: Mapping[str, str] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()  # fnmatch patterns of weight names kept in the base format
    on_indivisible: str = "keep"  # input dim not a multiple of the block: "keep" in the base, or "refuse"
    native_formats: frozenset[str] = frozenset()  # the target's, for weights stored quantized
    # ModelOpt's four-over-six NVFP4 variant: each block scaled to 6 or to 4, whichever errs less
    nvfp4_four_over_six: bool = False
    # activation scales of W4A4 / W8A8 GEMMs: "static" (calibrated, or the checkpoint's input_scale)
    # or "dynamic" (computed from the activations on every call; no calibration)
    act_scales: str = "static"
    # the components the policy file or --override set (the others follow the target or the base)
    explicit: frozenset[str] = frozenset()

    def act_format_for_stored(self, stored: str, has_input_scale: bool) -> str | None:
        """Activations of a GEMM whose weight the checkpoint stores quantized, deployed as exported:
        in the stored format when the checkpoint gives them an input_scale and the target computes
        natively in that format (a ModelOpt NVFP4 layer runs W4A4 on Blackwell, W4A16 on Hopper;
        FP8 runs W8A8 on both); otherwise not quantized (weight-only)."""
        return stored if has_input_scale and stored in self.native_formats else None

    def precision_of(self, category: str) -> Precision | None:
        """The quantized precision for weights of a category, or None to stay in the base format."""
        for component, categories in COMPONENT_CATEGORIES.items():
            if category in categories:
                chosen = PRECISIONS[self.components.get(component, self.base)]
                return chosen if chosen.quantized else None
        return None

    def excluded(self, weight_name: str) -> bool:
        return any(fnmatch.fnmatchcase(weight_name, pattern) for pattern in self.exclude)

    def describe(self) -> dict[str, Any]:
        return {"base": self.base, "components": dict(sorted(self.components.items())),
                "exclude": list(self.exclude), "on_indivisible": self.on_indivisible,
                "nvfp4_four_over_six": self.nvfp4_four_over_six, "act_scales": self.act_scales}


def canonical_precision(name: str, where: str) -> str:
    return precision_named(name, where).name


def _set_component(components: dict[str, str], component: str, precision: str, where: str,
                   explicit: set[str]) -> None:
    if component not in COMPONENT_CATEGORIES:
        raise UsageError(f"{where}: unknown component '{component}'; components: "
                         f"{', '.join(COMPONENT_CATEGORIES)}")
    canonical = canonical_precision(precision, where)
    if component == "kv_cache" and PRECISIONS[canonical].weight_dtype == PRECISIONS[FP8_KV_CACHE].weight_dtype:
        canonical = FP8_KV_CACHE  # fp8, fp8_e4m3: E4M3 codes with a per-tensor scale
    allowed = FLOAT_ONLY.get(component)
    if allowed is not None and canonical not in allowed:
        raise UsageError(f"{where}: {component} can only be {' or '.join(allowed)}, not {canonical}")
    if allowed is None and canonical == "fp16":
        raise UsageError(f"{where}: fp16 is an ssm_state option; GEMM weights are bf16, fp32, NVFP4 or FP8")
    components[component] = canonical
    explicit.add(component)


POLICY_FILE_KEYS = ("base", "components", "exclude", "on_indivisible", "nvfp4_four_over_six", "act_scales")
ACT_SCALES = ("static", "dynamic")
# A policy names a few components and patterns; a megabyte is far more than any needs.
POLICY_FILE_MAX_BYTES = MIB


def _read_policy_file(path: Path) -> dict[str, Any]:
    text = read_regular_text(path, "policy file", UsageError, POLICY_FILE_MAX_BYTES)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"policy file {path} is not valid TOML ({error})") from None
    unknown = set(data) - set(POLICY_FILE_KEYS)
    if unknown:
        raise UsageError(f"policy file {path}: unknown key '{sorted(unknown)[0]}'; keys: "
                         f"{', '.join(POLICY_FILE_KEYS)}")
    return data


def _follows_base(component: str) -> bool:
    """GEMM components and the KV cache take the base float format when not quantized."""
    return component not in FLOAT_ONLY or component == "kv_cache"


def _quantized(precision: str) -> bool:
    return PRECISIONS[precision].quantized


def _check_float_components(components: Mapping[str, str], base: str, explicit: set[str]) -> None:
    """GEMM weights are quantized or in the base float format, and the KV cache is in the base
    format: one float format per engine."""
    for component in sorted(explicit):
        chosen = components[component]
        if _follows_base(component) and not _quantized(chosen) and chosen != base:
            raise UsageError(f"{component}={chosen} differs from the float base {base}; float GEMM weights use "
                             f"the base format (choose it with --precision or base in the policy file)")


def _check_target(target: Target, components: Mapping[str, str]) -> None:
    for component, precision in sorted(components.items()):
        chosen = PRECISIONS[precision]
        if not target.supports(chosen.computes_in):
            fallback = PRECISIONS[chosen.fallback or BASE_PRECISIONS[0]]
            raise TargetError(f"{target.name} ({target.arch}) cannot run {chosen.label} for {component}: it has "
                              f"no {chosen.computes_in} tensor cores; use --override {component}={fallback.name} "
                              f"({fallback.label})")


def resolve_policy(target: Target, precision: str = "auto", overrides: Sequence[str] = (),
                   policy_file: Path | None = None, exclude: Sequence[str] = (),
                   act_scales: str | None = None) -> PrecisionPolicy:
    """The policy: the target's (or one float format), then the policy file, then the options
    (`overrides`, `exclude`, `act_scales`: None keeps the file's choice, else static)."""
    if precision != "auto" and precision not in BASE_PRECISIONS:
        raise UsageError(f"--precision must be auto, {' or '.join(BASE_PRECISIONS)}, got '{precision}'")
    base = BASE_PRECISIONS[0] if precision == "auto" else precision
    components: dict[str, str] = {}
    if precision == "auto":
        for component, chosen in target.precision_policy.items():
            if component in COMPONENT_CATEGORIES:
                components[component] = canonical_precision(chosen, f"target {target.name}")
    explicit: set[str] = set()  # components the policy file or --override set
    patterns = list(exclude)
    on_indivisible = "keep"
    four_over_six = False
    scales = "static"
    if policy_file is not None:
        data = _read_policy_file(policy_file)
        where = f"policy file {policy_file}"
        if "base" in data:
            base = str(data["base"])
            if base not in BASE_PRECISIONS:
                raise UsageError(f"{where}: base must be {' or '.join(BASE_PRECISIONS)}, got '{base}'")
        for component, chosen in dict(data.get("components", {})).items():
            _set_component(components, component, str(chosen), where, explicit)
        patterns += [str(p) for p in data.get("exclude", [])]
        on_indivisible = str(data.get("on_indivisible", on_indivisible))
        if on_indivisible not in ("keep", "refuse"):
            raise UsageError(f"{where}: on_indivisible must be keep or refuse, got '{on_indivisible}'")
        four_over_six = data.get("nvfp4_four_over_six", False)
        if not isinstance(four_over_six, bool):
            raise UsageError(f"{where}: nvfp4_four_over_six must be true or false, got {four_over_six!r}")
        scales = data.get("act_scales", scales)
        if scales not in ACT_SCALES:
            raise UsageError(f"{where}: act_scales must be static or dynamic, got {scales!r}")
    if act_scales is not None:
        if act_scales not in ACT_SCALES:
            raise UsageError(f"--act-scales must be static or dynamic, got {act_scales!r}")
        scales = act_scales
    for override in overrides:
        component, sep, chosen = override.partition("=")
        if not sep:
            raise UsageError(f"--override must look like component=precision, got '{override}'")
        _set_component(components, component.strip(), chosen, f"--override {override}", explicit)
    # the target's float GEMM components and KV cache follow the base (auto with base fp32: fp32 attention)
    for component, chosen in list(components.items()):
        if component not in explicit and _follows_base(component) and not _quantized(chosen):
            components[component] = base
    # Float-only components follow the base unless set explicitly.
    for component, allowed in FLOAT_ONLY.items():
        if components.get(component) not in allowed:
            components[component] = base if base in allowed else allowed[0]
    _check_float_components(components, base, explicit)
    _check_target(target, components)
    return PrecisionPolicy(base, MappingProxyType(components), tuple(patterns), on_indivisible,
                           frozenset(target.native_formats), four_over_six, scales, frozenset(explicit))


def with_checkpoint_kv_cache(policy: PrecisionPolicy, declared_by: str) -> PrecisionPolicy:
    """The policy for a checkpoint that declares an FP8 KV cache with its own scales (a ModelOpt
    export's kv_cache_quant_algo, named by `declared_by`): kv_cache = fp8, as deployed by vLLM and
    TensorRT-LLM. A kv_cache the user chose otherwise (--override, policy file) is refused."""
    chosen = policy.components.get("kv_cache", policy.base)
    if chosen == FP8_KV_CACHE:
        return policy
    if "kv_cache" in policy.explicit:
        raise UsageError(f"{declared_by} declares an FP8 KV cache with its own k_scale and v_scale, but the "
                         f"policy (--override or policy file) asks for kv_cache={chosen}; drop that choice or "
                         f"set kv_cache=fp8")
    return dataclasses.replace(policy, components=MappingProxyType({**policy.components, "kv_cache": FP8_KV_CACHE}))
