"""Kernel selection end to end: the catalog (graph/kernels.py), the select_kernels pass, and the
runtime registry that runs what the IR recorded, falling back to the reference implementation
with a record when the chosen kernel cannot run here."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from nemocompile.base.errors import IRError
from nemocompile.graph import kernels as catalog
from nemocompile.graph.builder import GraphBuilder
from nemocompile.graph.ir import Attrs, Graph, Op
from nemocompile.graph.opdef import REGISTRY
from nemocompile.graph.text import parse_graph, print_graph
from nemocompile.graph.types import BF16, F32, TensorType
from nemocompile.graph.verifier import verify
from nemocompile.passes.select_kernels import SelectKernels
from nemocompile.runtime import kernels as registry
from nemocompile.runtime.reference_dispatch import REFERENCE as REFERENCE_IMPLS
from nemocompile.runtime.reference_dispatch import reference_impl

# A test-only second candidate for `linear`: f32 weights, sm_90 only, a Triton kernel by name.
TEST_KERNEL = "test_linear_sm90"


class CallRecorder:
    """An implementation that counts its calls and computes what the reference computes."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, op: Op, *rest: Any) -> tuple[torch.Tensor, ...]:
        self.calls += 1
        return reference_impl(op.opname)(op, *rest)


@pytest.fixture
def test_kernel() -> Iterator[CallRecorder]:
    catalog.register(catalog.kernel(TEST_KERNEL, "linear", "triton", formats={"weight": ["f32"]},
                                    archs=["sm_90"], config_space={"block_m": [64, 128]}, priority=10))
    recorder = CallRecorder()
    registry.register("linear", TEST_KERNEL, recorder, devices=("cpu", "cuda"))
    yield recorder
    catalog.unregister("linear", TEST_KERNEL)
    registry.unregister("linear", TEST_KERNEL)


def _mlp_graph(dtype: Any = F32) -> Graph:
    """x -> linear -> relu2 -> linear: two linears, one other op (one with no compiled candidate)."""
    b = GraphBuilder("mlp")
    x = b.input("x", TensorType(dtype, ("batch", "seq", 8)))
    w1 = b.weight("w1", TensorType(dtype, (16, 8)), "mlp")
    w2 = b.weight("w2", TensorType(dtype, (4, 16)), "mlp")
    h = b.op1("linear", [x, w1])
    h = b.op1("activation", [h], {"kind": "relu2"})
    b.output(b.op1("linear", [h, w2]))
    return b.build()


def _weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"w1": torch.randn(16, 8, generator=generator),
            "w2": torch.randn(4, 16, generator=generator)}


# What an implementation takes after (op, args) when the op has no state: a side cache (None here)
# while implementations still take one, nothing once state is explicit in the IR.
_STATELESS_EXTRA = (None,) * (len(inspect.signature(reference_impl("linear")).parameters) - 2)


def _run(graph: Graph, weights: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
    """Run each op as the executor does: the implementation the registry resolves for it."""
    values: dict[str, torch.Tensor] = {"x": x, **weights}
    resolutions = []
    for op in graph.ops:
        resolution = registry.resolve(op, registry.device_of(weights))
        resolutions.append(resolution)
        args = [None if name is None else values[name] for name in op.operands]
        results = resolution(op, args, *_STATELESS_EXTRA)
        values.update({value.name: tensor for value, tensor in zip(op.results, results, strict=True)})
    return values[graph.outputs[0]], resolutions


def _with_kernel(graph: Graph, index: int, kernel: Any) -> Graph:
    ops = list(graph.ops)
    ops[index] = replace(ops[index], attrs=Attrs.of({**dict(ops[index].attrs.items), "kernel": kernel}))
    return replace(graph, ops=tuple(ops))


def _kernels(graph: Graph) -> list[str]:
    return [catalog.kernel_of(op) for op in graph.ops]


# ---------------------------------------------------------------------------------------------
# the catalog


def test_every_op_has_the_reference_kernel_and_every_core_one_runs() -> None:
    for name in REGISTRY:
        first = catalog.candidates(name)[0]
        assert (first.name, first.backend, first.archs, first.config_space) == ("reference", "reference", (), ())
    core = {name for name, definition in REGISTRY.items() if definition.level == "core"}
    runnable = {op for op, kernel in registry.implementations() if kernel == "reference"}
    assert core <= runnable, f"core ops without a reference implementation: {sorted(core - runnable)}"
    assert runnable == set(REFERENCE_IMPLS)


def test_a_kernel_description_is_checked() -> None:
    with pytest.raises(IRError, match="backend 'opencl' is not one of"):
        catalog.kernel("k", "linear", "opencl")
    with pytest.raises(IRError, match="linear has no operand 'w'"):
        catalog.kernel("k", "linear", "triton", formats={"w": ["f32"]})
    with pytest.raises(IRError, match="only the kernel named 'reference'"):
        catalog.kernel("reference", "linear", "triton")
    with pytest.raises(IRError, match="unknown op 'lnear'"):
        catalog.kernel("k", "lnear", "triton")


def test_a_kernel_registered_twice_is_refused(test_kernel: CallRecorder) -> None:
    with pytest.raises(IRError, match="registered twice"):
        catalog.register(catalog.kernel(TEST_KERNEL, "linear", "triton"))
    with pytest.raises(IRError, match="registered twice"):
        registry.register("linear", TEST_KERNEL, test_kernel)


# ---------------------------------------------------------------------------------------------
# select_kernels


def test_without_candidates_every_op_gets_the_reference_kernel() -> None:
    output = SelectKernels("sm_90").apply(_mlp_graph())
    assert _kernels(output.graph) == ["reference"] * 3
    assert output.counts == {"reference": 3}


def test_the_test_kernel_is_chosen_where_its_arch_and_formats_match(test_kernel: CallRecorder) -> None:
    output = SelectKernels("sm_90").apply(_mlp_graph())
    assert _kernels(output.graph) == [TEST_KERNEL, "reference", TEST_KERNEL]
    assert output.counts == {"reference": 1, TEST_KERNEL: 2}


@pytest.mark.parametrize(("arch", "dtype", "backends"), [
    ("sm_100", F32, catalog.BACKENDS),  # another arch
    ("sm_90", BF16, catalog.BACKENDS),  # a weight format it does not take
    ("sm_90", F32, ("reference", "cutlass")),  # its backend not allowed
])
def test_the_test_kernel_is_not_chosen_otherwise(test_kernel: CallRecorder, arch: str, dtype: Any,
                                                 backends: tuple[str, ...]) -> None:
    output = SelectKernels(arch, backends).apply(_mlp_graph(dtype))
    assert _kernels(output.graph) == ["reference"] * 3
    assert output.counts == {"reference": 3}


def test_a_tuning_entry_overrides_priority_only_for_a_usable_kernel(test_kernel: CallRecorder) -> None:
    signature = catalog.signature("linear", {"x": "f32", "weight": "f32"})
    assert signature == "linear(weight=f32,x=f32)"
    tuned = SelectKernels("sm_90", tuning=catalog.Tuning.of({signature: "reference"})).apply(_mlp_graph())
    assert _kernels(tuned.graph) == ["reference"] * 3
    elsewhere = SelectKernels("sm_100", tuning=catalog.Tuning.of({signature: TEST_KERNEL})).apply(_mlp_graph())
    assert _kernels(elsewhere.graph) == ["reference"] * 3


def test_the_choice_is_in_the_ir_text_and_round_trips(test_kernel: CallRecorder) -> None:
    graph = verify(SelectKernels("sm_90").apply(_mlp_graph()).graph)
    text = print_graph(graph)
    assert text.count(f'kernel = "{TEST_KERNEL}"') == 2 and text.count('kernel = "reference"') == 1
    assert parse_graph(text) == graph
    again = SelectKernels("sm_90").apply(graph)
    assert again.graph == graph  # selecting twice changes nothing


def test_the_verifier_refuses_a_kernel_attribute_that_is_not_a_name() -> None:
    graph = _mlp_graph()
    with pytest.raises(IRError, match="attribute 'kernel' must name a kernel"):
        verify(_with_kernel(graph, 0, 3))
    verify(_with_kernel(graph, 0, "anything"))  # a name this build does not know is the runtime's concern


# ---------------------------------------------------------------------------------------------
# the runtime registry


def test_the_runtime_runs_the_recorded_kernel(test_kernel: CallRecorder) -> None:
    graph = SelectKernels("sm_90").apply(_mlp_graph()).graph
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    out, resolutions = _run(graph, _weights(), x)
    assert test_kernel.calls == 2
    assert [r.kernel for r in resolutions] == [TEST_KERNEL, "reference", TEST_KERNEL]
    assert all(r.fallback is None for r in resolutions)
    reference, _ = _run(_mlp_graph(), _weights(), x)
    assert torch.equal(out, reference)


def test_a_kernel_that_cannot_run_here_falls_back_with_a_record(test_kernel: CallRecorder) -> None:
    graph = SelectKernels("sm_90").apply(_mlp_graph()).graph
    registry.unregister("linear", TEST_KERNEL)
    registry.register("linear", TEST_KERNEL, test_kernel, devices=("cuda",))
    _, resolutions = _run(graph, _weights(), torch.randn(1, 2, 8))
    assert test_kernel.calls == 0
    linears = [r for r in resolutions if r.op == "linear"]
    assert [(r.requested, r.kernel) for r in linears] == [(TEST_KERNEL, "reference")] * 2
    assert linears[0].fallback == f"kernel {TEST_KERNEL} of linear runs on cuda, not cpu"


def test_a_kernel_this_runtime_does_not_have_falls_back_with_a_record() -> None:
    graph = _with_kernel(_mlp_graph(), 0, "gone")
    resolution = registry.resolve(graph.ops[0], "cpu")
    assert (resolution.requested, resolution.kernel) == ("gone", "reference")
    assert resolution.fallback == "kernel gone of linear is not in this runtime"


def test_the_reference_kernel_cannot_be_replaced() -> None:
    with pytest.raises(IRError, match="reference kernel of linear is its reference implementation"):
        registry.register("linear", "reference", reference_impl("linear"))


def _ops(graph: Graph, name: str) -> Sequence[Op]:
    return [op for op in graph.ops if op.opname == name]


# ---------------------------------------------------------------------------------------------
# through a whole engine: build, manifest, executor, inspect


@pytest.fixture(scope="module")
def engine_with_test_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, CallRecorder]]:
    """The demo built for h100 in fp32 with the test kernel available (f32 linears on sm_90)."""
    from nemocompile.api import build

    catalog.register(catalog.kernel(TEST_KERNEL, "linear", "triton", formats={"weight": ["f32"]},
                                    archs=["sm_90"], priority=10))
    recorder = CallRecorder()
    registry.register("linear", TEST_KERNEL, recorder, devices=("cpu",))
    try:
        out = tmp_path_factory.mktemp("kernels") / "engine"
        build(None, out, target="h100", precision="fp32")
        yield out, recorder
    finally:
        catalog.unregister("linear", TEST_KERNEL)
        registry.unregister("linear", TEST_KERNEL)


def test_an_engine_records_and_runs_the_chosen_kernel(engine_with_test_kernel: tuple[Path, CallRecorder]) -> None:
    from nemocompile.api import load

    out, recorder = engine_with_test_kernel
    engine = load(out)
    prefill_linears = _ops(engine.graph, "linear")
    assert prefill_linears and {catalog.kernel_of(op) for op in prefill_linears} == {TEST_KERNEL}
    uses = {(u.graph, u.op): (u.kernel, u.backend, u.count) for u in engine.manifest.kernels}
    assert uses["prefill", "linear"] == (TEST_KERNEL, "triton", len(prefill_linears))
    assert uses["decode", "linear"] == (TEST_KERNEL, "triton", len(prefill_linears))
    assert uses["prefill", "embedding"][:2] == ("reference", "reference")
    assert engine.manifest.backends == ("reference", "triton")
    before = recorder.calls
    engine.forward([[1, 2, 3]])
    assert recorder.calls - before == len(prefill_linears)
    assert {r.kernel for r in engine.kernels() if r.op == "linear"} == {TEST_KERNEL}


def test_inspect_shows_each_op_kinds_kernel(engine_with_test_kernel: tuple[Path, CallRecorder]) -> None:
    import json

    from click.testing import CliRunner

    from nemocompile.cli import main

    out, _ = engine_with_test_kernel
    result = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    rows = {(k["graph"], k["op"]): k["kernel"] for k in info["kernels"]}
    assert rows["prefill", "linear"] == TEST_KERNEL and rows["decode", "embedding"] == "reference"
    assert info["backends"] == ["reference", "triton"]
    assert info["kernel_counts"][TEST_KERNEL] == sum(
        k["count"] for k in info["kernels"] if k["kernel"] == TEST_KERNEL)
    table = CliRunner().invoke(main, ["inspect", str(out)])
    assert table.exit_code == 0, table.output
    assert "kernels" in table.output and TEST_KERNEL in table.output


def test_an_engine_whose_kernel_this_runtime_lacks_runs_the_reference(
        engine_with_test_kernel: tuple[Path, CallRecorder]) -> None:
    from nemocompile.api import load

    out, recorder = engine_with_test_kernel
    registry.unregister("linear", TEST_KERNEL)
    try:
        engine = load(out)
        before = recorder.calls
        logits = engine.forward([[1, 2, 3]])
        assert recorder.calls == before and torch.isfinite(logits).all()
        fallbacks = {r.fallback for r in engine.kernels() if r.op == "linear"}
        assert fallbacks == {f"kernel {TEST_KERNEL} of linear is not in this runtime"}
    finally:
        registry.register("linear", TEST_KERNEL, recorder, devices=("cpu",))
