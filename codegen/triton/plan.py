"""Which kernel instances an engine needs: every op whose `kernel` attribute (set by
select_kernels) names a Triton kernel gets a specialisation for its shapes and formats, and a
binding from the op (by graph and result value name) to the instances that run it.

Identical specialisations are shared by every op that needs them; an instance's name is its
catalog kernel name plus a short hash of its specialisation, so it is stable across builds."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from nemocompile.base.errors import IRError
from nemocompile.graph.ir import Graph, Op
from nemocompile.graph.kernels import find, kernel_of
from nemocompile.graph.types import TensorType

from . import templates_catalog as catalog
from .spec import KernelInstance

# The triton kernels of graph/kernels.py that this codegen specialises (catalog name -> builder).
Builder = Callable[[Op, Mapping[str, TensorType], str], tuple[KernelInstance, ...]]


@dataclass(frozen=True)
class KernelPlan:
    instances: tuple[KernelInstance, ...]
    bindings: dict[str, dict[str, list[str]]]  # graph name -> op result name -> instance names, in launch order


def _dims(t: TensorType, what: str) -> tuple[int, ...]:
    if not all(isinstance(d, int) for d in t.shape):
        raise IRError(f"{what} has a symbolic dim in {t}; Triton kernels are specialised to the weight shapes")
    return tuple(int(d) for d in t.shape)  # type: ignore[arg-type]


TRITON_DTYPES = {"bf16": "bf16", "f16": "fp16", "f32": "fp32"}


def triton_dtype(t: TensorType, what: str) -> str:
    if t.dtype.name not in TRITON_DTYPES:
        raise IRError(f"{what} is {t.dtype.name}; the Triton kernels take {', '.join(TRITON_DTYPES)}")
    return TRITON_DTYPES[t.dtype.name]


def block_k_for(k: int) -> int:
    return next(b for b in (128, 64, 32, 16) if k % b == 0)


def _operand_type(op: Op, types: Mapping[str, TensorType], index: int) -> TensorType:
    value = op.operands[index]
    assert value is not None
    return types[value]


def _grouped_w4a16(op: Op, types: Mapping[str, TensorType], arch: str) -> tuple[KernelInstance, ...]:
    """grouped_gemm(x_sorted bf16, offsets, nvfp4 weight [E, N, K]) -> out."""
    experts, n, k = _dims(_operand_type(op, types, 2), f"{op.opname} weight")
    x_dtype = triton_dtype(_operand_type(op, types, 0), f"{op.opname} input")
    out_dtype = triton_dtype(op.results[0].type, f"{op.opname} result")
    return (catalog.moe_gemm("triton_nvfp4_grouped_w4a16", op.opname, n=n, k=k, experts=experts, top_k=1,
                             act_format="bf16", x_dtype=x_dtype, out_dtype=out_dtype, block_m=16, block_n=64,
                             block_k=block_k_for(k)),)


BUILDERS: dict[str, Builder] = {
    "triton_nvfp4_grouped_w4a16": _grouped_w4a16,
}


def _named(instance: KernelInstance) -> KernelInstance:
    text = json.dumps({k: v for k, v in instance.describe().items() if k != "name"}, sort_keys=True)
    return replace(instance, name=f"{instance.name}_{hashlib.sha256(text.encode()).hexdigest()[:10]}")


def plan_kernels(graphs: Mapping[str, Graph], arch: str) -> KernelPlan:
    """The instances and bindings of every op of `graphs` whose kernel is a Triton one."""
    instances: dict[str, KernelInstance] = {}
    bindings: dict[str, dict[str, list[str]]] = {}
    for graph_name, graph in graphs.items():
        types = graph.value_types()
        for op in graph.ops:
            name = kernel_of(op)
            spec = find(op.opname, name)
            if spec is None or spec.backend != "triton":
                continue
            builder = BUILDERS.get(name)
            if builder is None:
                raise IRError(f"{op.opname} at {op.scope} asks for Triton kernel {name}, which this codegen "
                              f"does not generate")
            named = [_named(i) for i in builder(op, types, arch)]
            for instance in named:
                instances.setdefault(instance.name, instance)
            bindings.setdefault(graph_name, {})[op.results[0].name] = [i.name for i in named]
    return KernelPlan(tuple(instances[n] for n in sorted(instances)), bindings)
