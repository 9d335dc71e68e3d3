"""The format reference (docs/formats.md), generated from the format registry so it cannot drift:
`python -m nemocompile.base.formatdoc > docs/formats.md`; a test checks the file is current."""

from __future__ import annotations

from .formats import ARCH_SOURCES, FORMATS, PRECISIONS, SCALE_LAYOUTS, NumberFormat, Scale


def _code(value: str | None) -> str:
    return f"`{value}`" if value else "-"


def _number(value: float) -> str:
    return f"{value:g}"


def _scale(fmt: NumberFormat, scale: Scale) -> str:
    layout = f"per {fmt.block_size}-block (input dim)" if scale.layout == "per_block" else scale.layout.replace("_", " ")
    source = "dynamic" if not scale.static else f"`{scale.tensor}`"
    return f"{source}: {scale.dtype}, {layout}" + (f"; {scale.doc}" if scale.doc else "")


def _format_row(fmt: NumberFormat) -> str:
    return (f"| `{fmt.name}` | {fmt.kind} | {fmt.bits} | {_number(fmt.max_value)} | {_code(fmt.safetensors)} | "
            f"{_code(fmt.torch_name)} | {', '.join(fmt.native_archs) or '-'} | {fmt.doc} |")


def _quantized_rows(fmt: NumberFormat) -> list[str]:
    weight = "<br>".join(_scale(fmt, s) for s in fmt.weight_scales()) or "-"
    act = "<br>".join(_scale(fmt, s) for s in fmt.activation_scales()) or "-"
    return [f"| `{fmt.name}` | {fmt.element} | {fmt.storage} | {fmt.block_size or '-'} | "
            f"{_number(fmt.scaled_max)} | {_code(fmt.modelopt_algo)} | {weight} | {act} |"]


def format_reference_markdown() -> str:
    ir = [f for f in FORMATS.values() if f.in_ir]
    other = [f for f in FORMATS.values() if not f.in_ir]
    header = ["| format | kind | bits | max | safetensors | torch | native on | what it is |",
              "|---|---|---:|---:|---|---|---|---|"]
    lines = [
        "# Number formats",
        "",
        "Generated from `base/formats.py` by `python -m nemocompile.base.formatdoc > docs/formats.md`; do not",
        "edit. Each format has one spelling, the one the IR text uses; every other table in nemocompile",
        "(IR dtypes, safetensors and torch mappings, ModelOpt layouts, calibration maxima, policy names,",
        "target native formats) is derived from the registry. `max` is the largest finite magnitude of an",
        "element (of a quantized format: of its codes). `native on` lists the architectures that compute in",
        "the format natively; a target's native formats are those of its arch.",
        "",
        "## IR formats",
        "",
        *header,
        *[_format_row(f) for f in ir],
        "",
        "## Quantized formats",
        "",
        "Stored as NVIDIA ModelOpt exports them: the codes in the `weight` tensor (packed two per byte when",
        "4-bit, even element in the low nibble), then the weight scales as `<module>.<tensor>`. A per-tensor",
        "scale of stacked experts is one per expert. `scaled max` is what a per-tensor scale divides amax by.",
        f"Scale layouts: {', '.join(SCALE_LAYOUTS)}.",
        "",
        "| format | element | stored as | block | scaled max | ModelOpt quant_algo | weight scales | "
        "activation scales |",
        "|---|---|---|---:|---:|---|---|---|",
        *[row for f in FORMATS.values() if f.quantized for row in _quantized_rows(f)],
        "",
        "## Other known formats",
        "",
        "Formats a checkpoint header or a GPU may name, which the IR does not use (yet).",
        "",
        *header,
        *[_format_row(f) for f in other],
        "",
        "## Precisions",
        "",
        "What a policy assigns to a model component (`--override component=PRECISION`, the policy file,",
        "a target's `precision_policy`). Names are case-insensitive; aliases are accepted anywhere.",
        "",
        "| precision | aliases | weights | activations quantized to | computes in | label | if not native |",
        "|---|---|---|---|---|---|---|",
        *[f"| `{p.name}` | {', '.join(f'`{a}`' for a in p.aliases) or '-'} | {p.weight_dtype} | "
          f"{p.act_format or '-'} | {p.computes_in} | {p.label} | {_code(p.fallback)} |" for p in PRECISIONS.values()],
        "",
        "## Architectures",
        "",
        "| arch | native formats | source |",
        "|---|---|---|",
        *[f"| {arch} | {', '.join(f.name for f in FORMATS.values() if arch in f.native_archs)} | {source} |"
          for arch, source in ARCH_SOURCES.items()],
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(format_reference_markdown(), end="")
