"""An FP8 KV cache (`kv_cache = fp8`): the attention reference against a pure-torch composition of
its numerics, the calibrated scales against the keys and values transformers' model computes, and
the logits of a trained model within a stated tolerance of the same engine with a BF16 cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nemocompile
from nemocompile.base.errors import IRError, UsageError
from nemocompile.calibration import calibration_batches
from nemocompile.demo import write_demo_checkpoint
from nemocompile.graph.text import print_graph
from nemocompile.graph.verifier import verify
from nemocompile.options import BuildOptions
from nemocompile.passes.precision_policy import resolve_policy
from nemocompile.planner import plan_model
from nemocompile.runtime.reference.attention import attention_gqa_cached
from nemocompile.targets import load_target

E4M3_MAX = 448.0
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
MODELS = Path("/work/shared/models") if Path("/work/shared/models").is_dir() else \
    Path(__file__).resolve().parents[2] / "shared" / "models"
# The trained demo with its keys and values in FP8 against the same engine with BF16 ones, over a
# prompt and 16 greedy steps: the largest relative L2 error of a position's logits, and the share
# of positions whose top-1 token changes.
LOGITS_REL_TOLERANCE = 0.02
TOP1_CHANGED_TOLERANCE = 0.05


def fp8_round_trip(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the E4M3 codes, what they stand for in float32): x / scale rounded to nearest even, saturated."""
    codes = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, codes.float() * scale


def attention_by_sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, past: int) -> torch.Tensor:
    """Causal GQA of q [B, T, Hq*Dh] at positions past.. over keys/values [B, Hkv, past+T, Dh]."""
    batch, length, _ = q.shape
    q_heads = q.reshape(batch, length, HEADS, HEAD_DIM).transpose(1, 2)
    keys = keys.repeat_interleave(HEADS // KV_HEADS, dim=1)
    values = values.repeat_interleave(HEADS // KV_HEADS, dim=1)
    visible = torch.arange(keys.shape[2])[None, :] <= (torch.arange(length) + past)[:, None]
    out = F.scaled_dot_product_attention(q_heads, keys, values, attn_mask=visible, scale=HEAD_DIM ** -0.5)
    return out.transpose(1, 2).reshape(batch, length, HEADS * HEAD_DIM)


def test_fp8_cached_attention_is_the_round_trip_composition() -> None:
    generator = torch.Generator().manual_seed(0)
    batch, prompt, capacity = 2, 7, 16
    k_scale, v_scale = 0.011, 0.023  # keys of up to about 5, values of up to about 10: no saturation
    k_cache = torch.zeros(batch, KV_HEADS, capacity, HEAD_DIM, dtype=torch.float8_e4m3fn)
    v_cache = torch.zeros_like(k_cache)
    lens = torch.zeros(batch, dtype=torch.int64)
    stored_k: list[torch.Tensor] = []
    stored_v: list[torch.Tensor] = []
    for length in (prompt, 1, 1):  # prefill, then two decode steps
        q = torch.randn(batch, length, HEADS * HEAD_DIM, generator=generator)
        k = 1.5 * torch.randn(batch, length, KV_HEADS * HEAD_DIM, generator=generator)
        v = 3.0 * torch.randn(batch, length, KV_HEADS * HEAD_DIM, generator=generator)
        out, k_cache, v_cache = attention_gqa_cached(
            q, k, v, k_cache, v_cache, lens, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
            scale=HEAD_DIM ** -0.5, k_scale=torch.tensor(k_scale), v_scale=torch.tensor(v_scale))
        stored_k.append(k.reshape(batch, length, KV_HEADS, HEAD_DIM).transpose(1, 2))
        stored_v.append(v.reshape(batch, length, KV_HEADS, HEAD_DIM).transpose(1, 2))
        past = int(lens[0])
        lens = lens + length
        k_codes, keys = fp8_round_trip(torch.cat(stored_k, dim=2), k_scale)
        v_codes, values = fp8_round_trip(torch.cat(stored_v, dim=2), v_scale)
        end = past + length
        # the cache holds exactly the E4M3 codes, and attention reads exactly what they stand for
        assert torch.equal(k_cache[:, :, :end].view(torch.uint8), k_codes.view(torch.uint8))
        assert torch.equal(v_cache[:, :, :end].view(torch.uint8), v_codes.view(torch.uint8))
        torch.testing.assert_close(out, attention_by_sdpa(q, keys, values, past), rtol=1e-5, atol=1e-5)


def test_fp8_codes_saturate_instead_of_overflowing() -> None:
    k = torch.full((1, 1, KV_HEADS * HEAD_DIM), 1e4)
    k_cache = torch.zeros(1, KV_HEADS, 4, HEAD_DIM, dtype=torch.float8_e4m3fn)
    _, k_cache, _ = attention_gqa_cached(
        torch.ones(1, 1, HEADS * HEAD_DIM), k, -k, k_cache, k_cache.clone(), torch.zeros(1, dtype=torch.int64),
        num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, scale=1.0, k_scale=torch.tensor(1.0),
        v_scale=torch.tensor(1.0))
    assert k_cache[0, :, 0].float().eq(E4M3_MAX).all()


def test_kv_cache_fp8_is_a_policy_choice_that_halves_the_kv_bytes(tmp_path: Path) -> None:
    target = load_target("h100")
    assert resolve_policy(target, overrides=["kv_cache=fp8"]).components["kv_cache"] == "fp8_e4m3"
    policy = tmp_path / "policy.toml"
    policy.write_text('[components]\nkv_cache = "fp8"\n')
    assert resolve_policy(target, policy_file=policy).components["kv_cache"] == "fp8_e4m3"
    with pytest.raises(UsageError, match="kv_cache can only be"):
        resolve_policy(target, overrides=["kv_cache=nvfp4"])
    bf16 = plan_model(MODELS / "ultra.json", BuildOptions(world_size=8, max_batch_size=1, max_context=1 << 20))
    fp8 = plan_model(MODELS / "ultra.json", BuildOptions(world_size=8, max_batch_size=1, max_context=1 << 20,
                                                         overrides=("kv_cache=fp8",)))
    assert fp8.memory.kv_bytes_per_token * 2 == bf16.memory.kv_bytes_per_token
    assert fp8.memory.largest_context(1) > bf16.memory.largest_context(1)  # type: ignore[operator]


@pytest.fixture(scope="module")
def demo_engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kv-fp8")
    checkpoint = write_demo_checkpoint(root / "demo")
    engines = {}
    for name, overrides in (("bf16", ()), ("fp8", ("kv_cache=fp8",))):
        nemocompile.build(checkpoint, root / name, target="h100", precision="bf16", overrides=overrides)
        engines[name] = root / name
    engines["checkpoint"] = checkpoint
    return engines


def test_the_engine_graph_stores_fp8_keys_and_values_with_their_scales(demo_engines: dict[str, Path]) -> None:
    engine = nemocompile.load(demo_engines["fp8"])
    text = print_graph(engine.graph)
    slots = [slot for slot in engine.graph.states if slot.kind == "kv"]
    assert slots and all(slot.type.dtype.name == "fp8e4m3" for slot in slots)
    for slot in slots:
        layer = slot.name.rsplit(".", 1)[0]
        assert f"%{layer}.mixer.k_scale, %{layer}.mixer.v_scale)" in text


def test_calibrated_scales_are_the_amax_of_transformers_keys_and_values_over_448(
        demo_engines: dict[str, Path]) -> None:
    transformers = pytest.importorskip("transformers", reason="the oracle is NemotronHForCausalLM")
    from safetensors.torch import load_file

    model = transformers.NemotronHForCausalLM.from_pretrained(demo_engines["checkpoint"], dtype=torch.bfloat16)
    amax: dict[str, float] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
            amax[name] = max(amax.get(name, 0.0), float(out.float().abs().max()))
        return record

    for index, layer in enumerate(model.model.layers):
        if hasattr(layer.mixer, "k_proj"):
            layer.mixer.k_proj.register_forward_hook(hook(f"layers.{index}.mixer.k_scale"))
            layer.mixer.v_proj.register_forward_hook(hook(f"layers.{index}.mixer.v_scale"))
    with torch.no_grad():  # the build's calibration: 8 random batches of 64 tokens, seed 0
        for batch in calibration_batches(8, model.config.vocab_size, 64):
            model(batch)
    stored = load_file(str(demo_engines["fp8"] / "weights" / "rank0.safetensors"))
    assert amax
    for name, value in amax.items():
        assert float(stored[name]) == pytest.approx(value / E4M3_MAX, rel=2e-2)


def test_fp8_kv_logits_stay_within_tolerance_of_bf16_kv(demo_engines: dict[str, Path]) -> None:
    reference, quantized = nemocompile.load(demo_engines["bf16"]), nemocompile.load(demo_engines["fp8"])
    text = (Path(nemocompile.__file__).parent / "demo_data" / "demo_text.txt").read_text()
    prompts = [list(text[start:start + 48].encode()) for start in (0, 400, 1200)]
    errors, changed, positions = [], 0, 0
    for prompt in prompts:
        caches = reference.new_cache(1), quantized.new_cache(1)
        ids = torch.tensor([prompt])
        for _ in range(17):  # the prompt, then 16 greedy steps of the bf16 engine fed to both
            want = reference.forward(ids, caches[0])[0, -1]
            got = quantized.forward(ids, caches[1])[0, -1]
            errors.append(float((got - want).norm() / want.norm()))
            changed += int(got.argmax() != want.argmax())
            positions += 1
            ids = want.argmax().reshape(1, 1)
    assert max(errors) <= LOGITS_REL_TOLERANCE, max(errors)
    assert changed <= TOP1_CHANGED_TOLERANCE * positions


def test_an_fp8_cache_without_its_scales_does_not_verify(demo_engines: dict[str, Path]) -> None:
    graph = nemocompile.load(demo_engines["fp8"]).graph
    attention = next(graph.ops_named("attention_gqa"))
    unscaled = dataclasses.replace(attention, operands=(*attention.operands[:6], None, None))
    broken = dataclasses.replace(graph, ops=tuple(unscaled if op is attention else op for op in graph.ops))
    with pytest.raises(IRError, match="needs fp32 scalar k_scale and v_scale"):
        verify(broken)


def test_the_onnx_export_refuses_an_fp8_cache(demo_engines: dict[str, Path]) -> None:
    pytest.importorskip("onnx", reason="the export is optional")
    from nemocompile.codegen.tensorrt.export import check_exportable

    with pytest.raises(IRError, match=r"state layers\.1\.k is an fp8e4m3 KV cache \(kv_cache = fp8\)"):
        check_exportable(nemocompile.load(demo_engines["fp8"]).graph)


def test_the_triton_backend_runs_fp8_cached_attention_as_the_reference_does(
        demo_engines: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The FP8 cache's attention runs its Triton kernel (codes written and read with their scales) in
    the interpreter, with the reference's logits and greedy tokens, prefill and decode; its launches
    with FP8 caches are counted."""
    pytest.importorskip("triton", reason="the Triton kernels need the triton package")
    import json

    from nemocompile.runtime.kernels import triton_ops

    launched: list[torch.dtype] = []
    original = triton_ops.attention_gqa_cached

    def counted(*args: object, **kwargs: object) -> object:
        launched.append(args[6].dtype)  # type: ignore[attr-defined]  # k_cache
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_ops, "attention_gqa_cached", counted)

    kernels = json.loads((demo_engines["fp8"] / "kernels" / "kernels.json").read_text())
    assert not [f for f in kernels["fallbacks"] if f["op"] == "attention_gqa"]
    attention = [k for k in kernels["kernels"] if k["op"] == "attention_gqa"]
    assert attention and all(k["signature"]["k_cache_ptr"] == "*fp8e4nv" for k in attention)
    reference = nemocompile.load(demo_engines["fp8"], backend="reference")
    triton = nemocompile.load(demo_engines["fp8"], backend="triton")
    prompts = [[72, 101, 108, 108, 111, 44, 32, 119], [84, 104, 101, 32, 113, 117, 105, 99]]
    expected, actual = reference.forward(prompts), triton.forward(prompts)
    error = float((expected - actual).abs().max())
    print(f"fp8 KV cache: logits max |triton - reference| = {error:.2e} (max |logit| {float(expected.abs().max()):.2f})")
    assert error <= 1e-2 * float(expected.abs().max())
    mixed = [[72, 101, 108], [84, 104, 101, 32, 113, 117, 105]]
    assert reference.complete(mixed, 8) == triton.complete(mixed, 8)
    assert launched and set(launched) == {torch.float8_e4m3fn}, launched
