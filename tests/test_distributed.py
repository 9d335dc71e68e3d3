"""Sharded engines on CPU (gloo, fp32): engines built for 2, 4 and 8 ranks give the logits of the
one-rank engine (max relative error <= 1e-5) and the same greedy tokens over a prefill and 16
decode steps, with routing where some ranks get no tokens (2 sequences x top-2 over 8 experts on 8
ranks: at most 4 ranks hold a routed pair in a decode step), and so do the quantized h100 (NVFP4
W4A16 experts, FP8 W8A8) and b200 (NVFP4 W4A4) engines; `run --world-size 2 --json` prints the
one-rank engine's generated_ids; an engine built for 2 ranks started with 1 or 4 is refused; a
rank that dies makes the other fail with an error, not hang.

The oracle is the one-rank engine, itself checked against transformers' NemotronHForCausalLM in
test_model_vs_transformers.py. The ranks are real processes (one group per engine, started once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import nemocompile
from nemocompile.launch import free_port

WORKER = Path(__file__).with_name("rank_worker.py")
TINY = dict(vocab_size=128, hidden_size=32, hybrid_override_pattern="M*E-", num_attention_heads=8,
            num_key_value_heads=2, head_dim=8, intermediate_size=128, mamba_num_heads=8, mamba_head_dim=16,
            n_groups=8, ssm_state_size=8, chunk_size=4, conv_kernel=4, n_routed_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=16, moe_shared_expert_intermediate_size=128, n_group=1, topk_group=1,
            dtype="float32")
# (name, build keywords, world sizes): fp32 at every size; the quantized engines (the target's policy
# for every GEMM it quantizes, fp32 for the rest: `base = "fp32"`) at 1 and 8
FP32_BASE = "fp32-base.toml"
# W4A4 Mamba and MLP linears: the MLP layer's norm hands its column-parallel up_proj NVFP4 codes
W4A4_NORMS = "w4a4-norms.toml"
POLICY_FILES = {FP32_BASE: 'base = "fp32"\n',
                W4A4_NORMS: 'base = "fp32"\n[components]\nmlp = "nvfp4_w4a4"\nmamba_linears = "nvfp4_w4a4"\n'}
ENGINES = [("fp32", {"target": "h100", "precision": "fp32"}, (1, 2, 4, 8)),
           ("h100", {"target": "h100", "policy_file": FP32_BASE}, (1, 8)),
           ("b200", {"target": "b200", "policy_file": FP32_BASE}, (1, 8)),
           ("b200-w4a4-norms", {"target": "b200", "policy_file": W4A4_NORMS}, (1, 2))]


def ranks(world_size: int, *args: str, env: dict[str, str] | None = None,
          timeout: float = 300) -> list[subprocess.CompletedProcess[str]]:
    """Run the worker as `world_size` ranks (torchrun's environment) and wait for all of them."""
    port = str(free_port())
    processes = [subprocess.Popen([sys.executable, str(WORKER), *args], text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE,
                                  env={**os.environ, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank),
                                       "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                                       "MASTER_PORT": port})
                 for rank in range(world_size)]
    done = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return done


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers", reason="the checkpoint is saved by NemotronHForCausalLM")
    torch.manual_seed(0)
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**TINY))
    with torch.no_grad():  # non-trivial routing: the default router weights are zeros
        model.model.layers[2].mixer.gate.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(9))
    path = tmp_path_factory.mktemp("distributed") / "tiny"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(checkpoint: Path) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
    """Each engine built and run once: (name, world size) -> rank 0's logits and tokens."""
    found = {}
    for name, text in POLICY_FILES.items():
        (checkpoint.parent / name).write_text(text)
    for name, options, sizes in ENGINES:
        for world_size in sizes:
            engine = checkpoint.parent / f"{name}-{world_size}"
            chosen = {key: checkpoint.parent / value if key == "policy_file" else value
                      for key, value in options.items()}
            nemocompile.build(checkpoint, engine, world_size=world_size, calibrate=2, **chosen)  # type: ignore[arg-type]
            out = checkpoint.parent / f"{name}-{world_size}.pt"
            for done in ranks(world_size, str(engine), str(out)):
                assert done.returncode == 0, done.stderr
            found[(name, world_size)] = torch.load(out)
    return found


@pytest.mark.parametrize(("name", "world_size"), [(name, n) for name, _, sizes in ENGINES for n in sizes if n > 1])
def test_sharded_engine_matches_one_rank(runs: dict[tuple[str, int], dict[str, torch.Tensor]], name: str,
                                         world_size: int) -> None:
    one, sharded = runs[(name, 1)], runs[(name, world_size)]
    scale = one["logits"].abs().amax(-1, keepdim=True)
    rel = ((sharded["logits"] - one["logits"]).abs() / scale).max().item()
    print(f"{name} world size {world_size}: max relative logit error {rel:.2e} over prefill + 16 decode steps")
    assert rel <= 1e-5
    assert torch.equal(sharded["tokens"], one["tokens"])
    assert len(set(one["tokens"].flatten().tolist())) > 2  # the greedy tokens are not one repeated id


def test_sharded_engine_files_and_graph(checkpoint: Path, runs: dict[tuple[str, int], dict[str, torch.Tensor]]) -> None:
    engine = checkpoint.parent / "b200-8"
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["world_size"] == 8
    assert [r["weights"] for r in manifest["ranks"]] == [[f"weights/rank{r}.safetensors"] for r in range(8)]
    text = (engine / "graph.txt").read_text()
    assert "tensor<nvfp4, [8, 16, 32], shard<ep=8, dim=0>>" in text  # one expert per rank
    assert "shard<tp=8, dim=1, pieces=2>" in text  # 2 KV heads on 8 ranks
    assert "blocks=[128, 128, 64, 64, 8]" in text  # in_proj: z, x, B, C, dt
    for op in ("all_reduce(", "all_gather(", "local_experts(", "vocab_embedding("):
        assert op in text


def test_nvfp4_codes_of_a_norm_feed_a_column_parallel_gemm(checkpoint: Path,
                                                          runs: dict[tuple[str, int], dict[str, torch.Tensor]]) -> None:
    """At world size 2 the MLP layer's norm (replicated) hands the whole row's NVFP4 codes to the
    up_proj, whose weight rows are split: each rank reads the same codes (test_sharded_engine_matches_
    one_rank compares the logits)."""
    text = (checkpoint.parent / "b200-w4a4-norms-2" / "graph.txt").read_text()
    norm = next(line for line in text.splitlines() if "= add_rms_norm(" in line and "nvfp4codes" in line)
    assert ": tensor<nvfp4codes, [batch, seq, 32]>," in norm  # replicated: no shard<...>
    assert "weight %layers.3.mixer.up_proj : tensor<nvfp4, [128, 32], shard<tp=2, dim=0>>" in text


def test_run_world_size_prints_the_one_rank_ids(checkpoint: Path,
                                                runs: dict[tuple[str, int], dict[str, torch.Tensor]]) -> None:
    def generated(engine: str, *extra: str) -> list[list[int]]:
        done = subprocess.run([sys.executable, "-m", "nemocompile", "run", str(checkpoint.parent / engine),
                               "--input-ids", "5,17,3,99,42", "--input-ids", "64,2", "--max-new-tokens", "16",
                               "--json", *extra], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        ids: list[list[int]] = json.loads(done.stdout)["generated_ids"]
        return ids

    one = generated("fp32-1")
    assert generated("fp32-2", "--world-size", "2") == one
    assert len(one) == 2 and len(one[0]) == 16


@pytest.mark.parametrize("world_size", ["1", "4"])
def test_engine_started_with_other_rank_count_is_refused(checkpoint: Path, world_size: str,
                                                         runs: dict[tuple[str, int], dict[str, torch.Tensor]]) -> None:
    extra = [] if world_size == "1" else ["--world-size", world_size]
    done = subprocess.run([sys.executable, "-m", "nemocompile", "run", str(checkpoint.parent / "fp32-2"),
                           "--input-ids", "1,2", "--json", *extra], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "built for 2 ranks" in done.stderr and done.stderr.count("\n") == 1


def test_a_dead_rank_fails_the_others_within_bounded_time(
        checkpoint: Path, runs: dict[tuple[str, int], dict[str, torch.Tensor]]) -> None:
    start = time.monotonic()
    rank0, rank1 = ranks(2, str(checkpoint.parent / "fp32-2"), str(checkpoint.parent / "dead.pt"), "die",
                         env={"NEMOCOMPILE_DISTRIBUTED_TIMEOUT_S": "20"}, timeout=120)
    assert rank1.returncode == 3
    assert rank0.returncode != 0
    assert "rank 0 of 2: all_reduce failed, another rank has died or did not arrive in time" in rank0.stderr
    assert time.monotonic() - start < 60


def test_world_size_the_model_does_not_divide_lists_valid_choices(checkpoint: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "nemocompile", "build", str(checkpoint), "--target", "h100",
                           "--precision", "fp32", "-o", str(tmp_path / "e"), "--world-size", "3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "valid world sizes: 1, 2, 4, 8" in done.stderr
    assert not (tmp_path / "e").exists()


def _expected_piece(weight: Any, component: str, whole: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank `rank`'s piece of the one-rank engine's stored tensor `whole`, sliced here from the IR's
    declared sharding (the ranges graph/types.py gives), on the whole tensor."""
    sharding = weight.type.sharding
    if sharding is None or sharding.dim is None:
        return torch.zeros_like(whole) if sharding is not None and sharding.partial and rank > 0 else whole
    dim, logical = sharding.dim, int(weight.type.shape[sharding.dim])
    if whole.dim() <= dim or (whole.shape[dim] == 1 and logical != 1):  # a per-tensor scale
        return whole
    ratio = logical // whole.shape[dim]  # NVFP4 codes two per byte, block scales one per 16
    return torch.cat([whole.narrow(dim, start // ratio, (stop - start) // ratio)
                      for start, stop in sharding.ranges(logical, rank)], dim=dim)


@pytest.mark.parametrize(("name", "world_size"), [("fp32", 2), ("fp32", 4), ("h100", 8), ("b200", 8)])
def test_rank_files_hold_the_one_rank_engines_tensors_sliced(checkpoint: Path, runs: Any, name: str,
                                                             world_size: int) -> None:
    from safetensors.torch import load_file

    from nemocompile.graph.storage import component_name, stored_tensors
    from nemocompile.graph.text import parse_graph

    one = load_file(str(checkpoint.parent / f"{name}-1" / "weights" / "rank0.safetensors"))
    engine = checkpoint.parent / f"{name}-{world_size}"
    # written per rank as the stream went: no whole copy is left, and nothing else
    assert sorted(p.name for p in (engine / "weights").iterdir()) == sorted(f"rank{r}.safetensors"
                                                                          for r in range(world_size))
    graph = parse_graph((engine / "graph.txt").read_text())
    sharded = 0
    for rank in range(world_size):
        held = load_file(str(engine / "weights" / f"rank{rank}.safetensors"))
        assert set(held) == set(one)
        for weight in graph.weights:
            for stored in stored_tensors(weight.type):
                tensor = component_name(weight.name, stored.component)
                expected = _expected_piece(weight, stored.component, one[tensor], rank)
                assert held[tensor].dtype == expected.dtype and held[tensor].shape == expected.shape, tensor
                assert torch.equal(held[tensor].reshape(-1).view(torch.uint8),
                                   expected.contiguous().reshape(-1).view(torch.uint8)), tensor
                sharded += held[tensor].shape != one[tensor].shape
    assert sharded > 0
