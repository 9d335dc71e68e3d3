"""Precision policy: which format each model component gets on a target. Starts from the
target's policy (`--precision auto`) or one float format for everything (`bf16`, `fp32`),
then a TOML policy file, then `--override component=precision`; every choice is checked
against what the target can run."""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from nemocompile.base.errors import TargetError, UsageError
from nemocompile.targets import Target
from nemocompile.targets.model import POLICY_PRECISIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Precision:
    """A weight format and the format activations are quantized to before the GEMM (None: not)."""

    name: str
    weight_dtype: str  # IR dtype name: nvfp4, fp8, bf16, f32
    act_format: str | None
    label: str  # W4A4, W4A16, W8A8, ...


PRECISIONS: Mapping[str, Precision] = MappingProxyType({
    "nvfp4_w4a4": Precision("nvfp4_w4a4", "nvfp4", "nvfp4", "NVFP4 W4A4"),
    "nvfp4_w4a16": Precision("nvfp4_w4a16", "nvfp4", None, "NVFP4 W4A16"),
    "fp8_e4m3_w8a8": Precision("fp8_e4m3_w8a8", "fp8", "fp8", "FP8 W8A8"),
    "fp8_e4m3": Precision("fp8_e4m3", "fp8", None, "FP8 W8A16"),
    "bf16": Precision("bf16", "bf16", None, "BF16"),
    "fp16": Precision("fp16", "f16", None, "FP16"),
    "fp32": Precision("fp32", "f32", None, "FP32"),
})
ALIASES = {"fp8": "fp8_e4m3_w8a8", "w8a8": "fp8_e4m3_w8a8", "fp8_w8a8": "fp8_e4m3_w8a8",
           "nvfp4": "nvfp4_w4a4", "w4a4": "nvfp4_w4a4", "w4a16": "nvfp4_w4a16", "nvfp4_w4a16": "nvfp4_w4a16"}

# Policy component -> weight categories it covers (graph/nemotron_h.py CATEGORIES).
COMPONENT_CATEGORIES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "routed_experts": ("routed_experts",),
    "shared_experts": ("shared_experts",),
    "mamba_linears": ("mamba_in_proj", "mamba_out_proj"),
    "attention": ("attention",),
    "latent_projections": ("latent_projections",),
    "mlp": ("mlp",),
    "lm_head": ("lm_head",),
    "embeddings": ("embeddings",),
    "conv1d": ("conv1d",),
    "router": ("router",),
    "kv_cache": (),
    "ssm_state": (),
})
# Components whose weights feed GEMMs, so they may be quantized; the others take only these.
FLOAT_ONLY: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "embeddings": ("bf16", "fp32"), "conv1d": ("bf16", "fp32"), "router": ("fp32",),
    "kv_cache": ("bf16", "fp32"), "ssm_state": ("fp32", "fp16"),
})
# What to suggest when a target lacks the native format a precision needs.
FALLBACK = {"nvfp4_w4a4": "nvfp4_w4a16", "fp8_e4m3_w8a8": "bf16", "fp8_e4m3": "bf16"}


@dataclass(frozen=True)
class PrecisionPolicy:
    base: str  # bf16 or fp32: every float weight and activation not quantized
    components: Mapping[str, str] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()  # fnmatch patterns of weight names kept in the base format
    on_indivisible: str = "keep"  # NVFP4 needs in % 16 == 0: "keep" in fp8/base, or "refuse"
    native_formats: frozenset[str] = frozenset()  # the target's, for weights stored quantized
    # ModelOpt's four-over-six NVFP4 variant: each block scaled to 6 or to 4, whichever errs less
    nvfp4_four_over_six: bool = False

    def act_format_for_stored(self, stored: str, chosen: Precision | None) -> str | None:
        """Activations of a GEMM whose weight the checkpoint stores quantized: quantized to the
        stored format when the policy quantizes this component's activations and the target
        computes natively in that format (a ModelOpt NVFP4 layer runs W4A4 on Blackwell)."""
        if chosen is None or chosen.act_format is None:
            return None
        native = {"nvfp4": "nvfp4", "fp8": "fp8_e4m3"}[stored]
        return stored if native in self.native_formats else None

    def precision_of(self, category: str) -> Precision | None:
        """The quantized precision for weights of a category, or None to stay in the base format."""
        for component, categories in COMPONENT_CATEGORIES.items():
            if category in categories:
                chosen = PRECISIONS[self.components.get(component, self.base)]
                return chosen if chosen.weight_dtype in ("nvfp4", "fp8") else None
        return None

    def excluded(self, weight_name: str) -> bool:
        return any(fnmatch.fnmatchcase(weight_name, pattern) for pattern in self.exclude)

    def describe(self) -> dict[str, Any]:
        return {"base": self.base, "components": dict(sorted(self.components.items())),
                "exclude": list(self.exclude), "on_indivisible": self.on_indivisible,
                "nvfp4_four_over_six": self.nvfp4_four_over_six}


def canonical_precision(name: str, where: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in PRECISIONS:
        known = ", ".join(sorted(set(PRECISIONS) | set(ALIASES)))
        raise UsageError(f"{where}: unknown precision '{name}'; known precisions: {known}")
    return key


def _set_component(components: dict[str, str], component: str, precision: str, where: str,
                   explicit: set[str]) -> None:
    if component not in COMPONENT_CATEGORIES:
        raise UsageError(f"{where}: unknown component '{component}'; components: "
                         f"{', '.join(COMPONENT_CATEGORIES)}")
    canonical = canonical_precision(precision, where)
    allowed = FLOAT_ONLY.get(component)
    if allowed is not None and canonical not in allowed:
        raise UsageError(f"{where}: {component} can only be {' or '.join(allowed)}, not {canonical}")
    if allowed is None and canonical == "fp16":
        raise UsageError(f"{where}: fp16 is an ssm_state option; GEMM weights are bf16, fp32, NVFP4 or FP8")
    components[component] = canonical
    explicit.add(component)


POLICY_FILE_KEYS = ("base", "components", "exclude", "on_indivisible", "nvfp4_four_over_six")


def _read_policy_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"policy file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
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
    return PRECISIONS[precision].weight_dtype in ("nvfp4", "fp8")


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
        native = POLICY_PRECISIONS.get(precision)
        if native is not None and not target.supports(native):
            fallback = FALLBACK.get(precision, "bf16")
            raise TargetError(f"{target.name} ({target.arch}) cannot run {PRECISIONS[precision].label} for "
                              f"{component}: it has no {native} tensor cores; use "
                              f"--override {component}={fallback} ({PRECISIONS[fallback].label})")


def resolve_policy(target: Target, precision: str = "auto", overrides: Sequence[str] = (),
                   policy_file: Path | None = None, exclude: Sequence[str] = ()) -> PrecisionPolicy:
    if precision not in ("auto", "bf16", "fp32"):
        raise UsageError(f"--precision must be auto, bf16 or fp32, got '{precision}'")
    base = "bf16" if precision == "auto" else precision
    components: dict[str, str] = {}
    if precision == "auto":
        for component, chosen in target.precision_policy.items():
            if component in COMPONENT_CATEGORIES:
                components[component] = canonical_precision(chosen, f"target {target.name}")
    explicit: set[str] = set()  # components the policy file or --override set
    patterns = list(exclude)
    on_indivisible = "keep"
    four_over_six = False
    if policy_file is not None:
        data = _read_policy_file(policy_file)
        where = f"policy file {policy_file}"
        if "base" in data:
            base = str(data["base"])
            if base not in ("bf16", "fp32"):
                raise UsageError(f"{where}: base must be bf16 or fp32, got '{base}'")
        for component, chosen in dict(data.get("components", {})).items():
            _set_component(components, component, str(chosen), where, explicit)
        patterns += [str(p) for p in data.get("exclude", [])]
        on_indivisible = str(data.get("on_indivisible", on_indivisible))
        if on_indivisible not in ("keep", "refuse"):
            raise UsageError(f"{where}: on_indivisible must be keep or refuse, got '{on_indivisible}'")
        four_over_six = data.get("nvfp4_four_over_six", False)
        if not isinstance(four_over_six, bool):
            raise UsageError(f"{where}: nvfp4_four_over_six must be true or false, got {four_over_six!r}")
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
            components[component] = "fp32" if component in ("router", "ssm_state") else base
    _check_float_components(components, base, explicit)
    _check_target(target, components)
    return PrecisionPolicy(base, MappingProxyType(components), tuple(patterns), on_indivisible,
                           frozenset(target.native_formats), four_over_six)
