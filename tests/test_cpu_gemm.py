"""Float32 GEMM weights packed for oneDNN on the CPU (runtime/cpu_gemm.py): the same products as
the reference `linear` and `grouped_gemm` to float32 rounding, packed only where nothing but a
reference GEMM reads the weight, one copy held, and an engine that gives transformers' logits and
the same greedy tokens with packing on or off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nemocompile
from nemocompile.base.settings import override
from nemocompile.runtime.cpu_gemm import PackedLinear, available, pack, packable_weights
from nemocompile.runtime.reference.elementwise import linear
from nemocompile.runtime.reference.moe import grouped_gemm

transformers = pytest.importorskip("transformers", reason="the oracle is transformers' NemotronHForCausalLM")
pytestmark = pytest.mark.skipif(not available(), reason="this torch has no oneDNN")


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert float((ours - theirs).abs().max()) <= 1e-5 * max(1.0, float(theirs.abs().max()))


def test_packed_linear_is_the_reference_linear() -> None:
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(37, 64, generator=g), torch.randn(37, generator=g)
    packed = pack(weight)
    assert packed.shape == weight.shape and torch.equal(packed.dense(), weight)
    for shape in ((1, 64), (5, 64), (2, 3, 64), (1, 1, 64)):
        x = torch.randn(*shape, generator=g)
        _close(packed.linear(x, None), linear(x, weight))
        _close(packed.linear(x, bias), linear(x, weight, bias))
    strided = torch.randn(64, 4, generator=g).T  # a non-contiguous view
    _close(packed.linear(strided, bias), linear(strided, weight, bias))
    empty = torch.randn(0, 64)
    assert packed.linear(empty, bias).shape == (0, 37)


def test_packed_grouped_gemm_is_the_reference_grouped_gemm_with_an_empty_expert() -> None:
    g = torch.Generator().manual_seed(1)
    stacked = torch.randn(4, 24, 32, generator=g)
    packed = pack(stacked)
    assert len(packed.packed) == 4 and torch.equal(packed.dense(), stacked)
    offsets = torch.tensor([0, 3, 3, 4, 9])  # expert 1 gets no rows
    x = torch.randn(9, 32, generator=g)
    _close(packed.grouped(x, offsets), grouped_gemm(x, offsets, stacked))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = transformers.NemotronHConfig(
        vocab_size=97, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=8,
        conv_kernel=4, n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=24, hybrid_override_pattern="ME*-", tie_word_embeddings=True,
        dtype="float32")
    torch.manual_seed(7)
    model = transformers.NemotronHForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mixer, "gate"):
                layer.mixer.gate.weight.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("cpu-gemm") / "checkpoint"
    model.save_pretrained(path)
    return path


def test_engine_packs_gemm_weights_only_and_agrees_with_mkl(checkpoint: Path, tmp_path: Path) -> None:
    nemocompile.build(checkpoint, tmp_path / "fp32", target="h100", precision="fp32")
    engine = nemocompile.load(tmp_path / "fp32", device="cpu")
    with override(cpu_onednn_gemm=False):
        plain = nemocompile.load(tmp_path / "fp32", device="cpu")
    packed = {step.op.operands[1] for step in engine._decode.steps if step.op.opname == "linear"
              and isinstance(engine._decode.base[step.operands[1]], PackedLinear)}
    assert "layers.0.mixer.in_proj" in packed and "layers.3.mixer.up_proj" in packed
    experts = [engine._decode.base[step.operands[3]] for step in engine._decode.steps
               if step.op.opname == "moe_expert_up"]
    assert experts and all(isinstance(w, PackedLinear) and len(w.packed) == 6 for w in experts)
    # the embedding table is read by the lookup, not a GEMM: left dense
    table = [engine._decode.base[step.operands[1]] for step in engine._decode.steps if step.op.opname == "embedding"]
    assert table and isinstance(table[0], torch.Tensor)
    assert not any(isinstance(w, PackedLinear) for w in plain._decode.base)
    # one prepared copy, shared by the prefill and decode executors
    prefill_packed = {id(w) for w in engine._prefill.base if isinstance(w, PackedLinear)}
    assert prefill_packed and {id(w) for w in engine._decode.base if isinstance(w, PackedLinear)} <= prefill_packed

    prompt = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(3))
    _close(engine.forward(prompt), plain.forward(prompt))
    assert torch.equal(engine.generate(prompt, max_new_tokens=8), plain.generate(prompt, max_new_tokens=8))


def test_only_weights_that_reference_gemms_alone_read_are_packed() -> None:
    from nemocompile.graph.ir import Op
    from nemocompile.graph.kernels import REFERENCE

    def op(opname: str, *operands: str | None) -> Op:
        return Op(opname, tuple(operands), (), scope="s")

    weights = {"w": torch.randn(4, 4), "shared": torch.randn(4, 4), "bf16": torch.randn(4, 4).bfloat16(),
               "kernel": torch.randn(4, 4), "bias": torch.randn(4)}
    steps = [(op("linear", "x", "w", "bias"), REFERENCE), (op("linear", "x", "shared", None), REFERENCE),
             (op("embedding", "ids", "shared"), REFERENCE), (op("linear", "x", "bf16", None), REFERENCE),
             (op("linear", "x", "kernel", None), "triton")]
    assert packable_weights(steps, weights, torch.device("cpu")) == {"w"}
    assert packable_weights(steps, weights, torch.device("meta")) == set()
    with override(cpu_onednn_gemm=False):
        assert packable_weights(steps, weights, torch.device("cpu")) == set()


def test_bf16_engine_is_left_to_torch(checkpoint: Path, tmp_path: Path) -> None:
    nemocompile.build(checkpoint, tmp_path / "bf16", target="h100", precision="bf16")
    engine = nemocompile.load(tmp_path / "bf16", device="cpu")
    assert not any(isinstance(w, PackedLinear) for w in engine._decode.base)
