"""`Target`: what one GPU offers the compiler, as an immutable, self-checking value."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from nemocompile.base.errors import TargetError, join_problems
from nemocompile.base.formats import ARCH_SOURCES, FORMATS, PRECISIONS, native_formats

# Dense peak rates a target quotes, in TFLOP/s (TOP/s for int8). fp32 is the CUDA-core rate;
# the rest are tensor-core rates. fp4 exists only where the tensor cores take FP4.
PEAK_DTYPES: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16", "fp8", "fp4", "int8")
REQUIRED_PEAK_DTYPES: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8")

# The components of DESIGN.md's precision table, each of which a policy must assign: the one
# list (passes/precision_policy.py maps each to the weight categories it covers).
POLICY_COMPONENTS: tuple[str, ...] = (
    "routed_experts",
    "shared_experts",
    "mamba_linears",
    "attention",
    "latent_projections",
    "mlp",
    "embeddings",
    "lm_head",
    "conv1d",
    "router",
    "kv_cache",
    "ssm_state",
)

# Fields whose value is a measured or quoted fact and so must carry a source.
SOURCED_FIELDS: tuple[str, ...] = (
    "compute_capability",
    "sm_count",
    "memory_bytes",
    "hbm_bandwidth_bytes_per_s",
    "nvlink_bandwidth_bytes_per_s",
    "precision_policy",
)

_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_]*")
_ARCH_PATTERN = re.compile(r"sm_[0-9]+")


@dataclass(frozen=True)
class Target:
    """One GPU: identity, resources, dense peak rates and preferred precisions; the formats it
    computes in natively follow from its arch (the format registry, base/formats.py).

    Mappings are stored as read-only copies, so a `Target` never changes after it is built.
    `sources` maps each fact (`"sm_count"`, `"peak_tflops.bf16"`, ...) to where it comes from.
    """

    name: str
    marketing_name: str
    arch: str
    compute_capability: tuple[int, int]
    sm_count: int
    memory_bytes: int
    hbm_bandwidth_bytes_per_s: int
    peak_tflops: Mapping[str, float]
    nvlink_bandwidth_bytes_per_s: int
    precision_policy: Mapping[str, str]
    sources: Mapping[str, str]

    def __post_init__(self) -> None:
        # Copy into immutable containers so callers' dicts and lists cannot change the target.
        object.__setattr__(self, "compute_capability", tuple(self.compute_capability))
        object.__setattr__(self, "peak_tflops", MappingProxyType(dict(self.peak_tflops)))
        object.__setattr__(self, "precision_policy", MappingProxyType(dict(self.precision_policy)))
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))
        problems = _target_problems(self)
        if problems:
            raise TargetError(join_problems(f"target '{self.name}' is invalid", problems))

    @property
    def native_formats(self) -> tuple[str, ...]:
        """The registry formats this GPU computes in natively."""
        return native_formats(self.arch)

    def supports(self, format_name: str) -> bool:
        """Whether the GPU computes natively in `format_name` (a name of the format registry)."""
        key = format_name.strip().lower()
        if key not in FORMATS:
            raise TargetError(f"unknown number format '{format_name}'; known formats: {', '.join(FORMATS)}.")
        return key in self.native_formats

    def __hash__(self) -> int:
        return hash(
            (
                self.name,
                self.marketing_name,
                self.arch,
                self.compute_capability,
                self.sm_count,
                self.memory_bytes,
                self.hbm_bandwidth_bytes_per_s,
                tuple(sorted(self.peak_tflops.items())),
                self.nvlink_bandwidth_bytes_per_s,
                tuple(sorted(self.precision_policy.items())),
                tuple(sorted(self.sources.items())),
            )
        )

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # mappingproxy does not pickle; rebuild from plain dicts (and re-validate).
        return (
            Target,
            (
                self.name,
                self.marketing_name,
                self.arch,
                self.compute_capability,
                self.sm_count,
                self.memory_bytes,
                self.hbm_bandwidth_bytes_per_s,
                dict(self.peak_tflops),
                self.nvlink_bandwidth_bytes_per_s,
                dict(self.precision_policy),
                dict(self.sources),
            ),
        )


def required_source_keys(peak_dtypes: Iterable[str]) -> tuple[str, ...]:
    """The `sources` keys a target with these peak dtypes must have."""
    return SOURCED_FIELDS + tuple(f"peak_tflops.{dtype}" for dtype in peak_dtypes)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _target_problems(target: Target) -> list[str]:
    """Every way `target` is inconsistent, each naming the field at fault."""
    problems: list[str] = []

    if not isinstance(target.name, str) or not _NAME_PATTERN.fullmatch(target.name):
        problems.append(f"field 'name' must be lower-case letters, digits or '_', got {target.name!r}")
    if not isinstance(target.marketing_name, str) or not target.marketing_name.strip():
        problems.append("field 'marketing_name' must be a non-empty string")

    capability = target.compute_capability
    capability_ok = len(capability) == 2 and all(_is_int(part) and part >= 0 for part in capability)
    if not capability_ok:
        problems.append(f"field 'compute_capability' must be two non-negative integers, got {capability!r}")
    if not isinstance(target.arch, str) or not _ARCH_PATTERN.fullmatch(target.arch):
        problems.append(f"field 'arch' must look like 'sm_90', got {target.arch!r}")
    elif capability_ok:
        expected_arch = f"sm_{capability[0]}{capability[1]}"
        if target.arch != expected_arch:
            problems.append(
                f"field 'arch' is '{target.arch}' but compute capability "
                f"{capability[0]}.{capability[1]} means '{expected_arch}'"
            )
    if isinstance(target.arch, str) and target.arch not in ARCH_SOURCES:
        problems.append(
            f"field 'arch' is '{target.arch}', whose native formats the format registry "
            f"(base/formats.py) does not state; known: {', '.join(ARCH_SOURCES)}"
        )

    for field in ("sm_count", "memory_bytes", "hbm_bandwidth_bytes_per_s", "nvlink_bandwidth_bytes_per_s"):
        value = getattr(target, field)
        if not _is_int(value) or value <= 0:
            problems.append(f"field '{field}' must be a positive integer, got {value!r}")

    for dtype, rate in target.peak_tflops.items():
        if dtype not in PEAK_DTYPES:
            problems.append(
                f"field 'peak_tflops.{dtype}' is not a known dtype (known: {', '.join(PEAK_DTYPES)})"
            )
        elif not _is_number(rate) or rate <= 0:
            problems.append(f"field 'peak_tflops.{dtype}' must be a positive number, got {rate!r}")
    for dtype in REQUIRED_PEAK_DTYPES:
        if dtype not in target.peak_tflops:
            problems.append(f"field 'peak_tflops.{dtype}' is missing")

    formats = native_formats(target.arch) if isinstance(target.arch, str) else ()
    has_fp4 = "fp4e2m1" in formats
    if has_fp4 != ("fp4" in target.peak_tflops):
        problems.append(f"field 'peak_tflops.fp4' must be given exactly when the arch computes fp4e2m1 natively "
                        f"({', '.join(a for a in ARCH_SOURCES if 'fp4e2m1' in native_formats(a))})")

    policy = target.precision_policy
    for component in POLICY_COMPONENTS:
        if component not in policy:
            problems.append(f"field 'precision_policy.{component}' is missing")
    for component, precision in policy.items():
        if component not in POLICY_COMPONENTS:
            problems.append(f"field 'precision_policy.{component}' is not a known component")
        elif precision not in PRECISIONS:
            problems.append(
                f"field 'precision_policy.{component}' is {precision!r}, not one of {', '.join(PRECISIONS)}"
            )
        elif PRECISIONS[precision].computes_in not in formats:
            problems.append(
                f"field 'precision_policy.{component}' is '{precision}', which needs native "
                f"'{PRECISIONS[precision].computes_in}' that this target lacks"
            )

    required = required_source_keys(target.peak_tflops)
    for key in required:
        source = target.sources.get(key)
        if not isinstance(source, str) or not source.strip():
            problems.append(f"field '{key}' has no source")
    for key in target.sources:
        if key not in required:
            problems.append(f"source '{key}' names no field of the target")
    return problems
