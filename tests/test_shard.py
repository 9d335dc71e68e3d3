"""The shard pass and its pieces, in one process: the sharding attribute (pieces, blocks) prints and
parses back; the pass splits each op kind as docs/distributed.md says and counts what it added; a
world size the model does not divide is refused with the valid ones listed; the communication
references are the identity on one rank; the rank weight files put back together are the whole
weights, bit for bit. Multi-rank numerics (quantized engines' split codes and scales included):
test_distributed.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from nemocompile.base.errors import IRError, UsageError
from nemocompile.graph.config import config_from_dict
from nemocompile.graph.ir import Graph
from nemocompile.graph.nemotron_h import build_block_graph
from nemocompile.graph.sharding import Layout, check_layout, rank_view
from nemocompile.graph.text import parse_graph, print_graph
from nemocompile.graph.types import F32, NVFP4, Sharding, TensorType
from nemocompile.graph.verifier import verify
from nemocompile.passes.decompose import Decompose
from nemocompile.passes.manager import PassManager
from nemocompile.passes.shard import Shard
from nemocompile.pipeline import fusion_steps
from nemocompile.rank_weights import RankSink
from nemocompile.runtime.reference import comm

CONFIG: dict[str, Any] = {
    "model_type": "nemotron_h", "hybrid_override_pattern": "M*E-", "vocab_size": 48, "hidden_size": 16,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4, "intermediate_size": 24,
    "mamba_num_heads": 4, "mamba_head_dim": 4, "n_groups": 2, "ssm_state_size": 8, "conv_kernel": 4,
    "chunk_size": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
    "moe_shared_expert_intermediate_size": 12, "routed_scaling_factor": 2.5, "mlp_bias": True,
}


@pytest.fixture(scope="module")
def fused() -> Graph:
    graph = Decompose().apply(build_block_graph(config_from_dict(CONFIG), F32)).graph
    return PassManager([step.pipeline_pass for step in fusion_steps()]).run(graph)[0]


@pytest.mark.parametrize("sharding", [Sharding("tp", 8, 1, pieces=2), Sharding("tp", 2, 0, blocks=(4, 4, 2)),
                                      Sharding("tp", 4, 0, pieces=2, blocks=(8, 4))])
def test_pieces_and_blocks_round_trip(sharding: Sharding) -> None:
    text = f"tensor<f32, [{sum(sharding.blocks) or 8}, 8], {sharding}>"
    graph = parse_graph(f"graph g {{\n  input %x : {text}\n  output %x\n}}\n")
    assert graph.inputs[0].type.sharding == sharding
    assert print_graph(parse_graph(print_graph(graph))) == print_graph(graph)


def test_pieces_and_blocks_pick_each_ranks_rows() -> None:
    kv = Sharding("tp", 8, 1, pieces=2)  # 2 KV heads on 8 ranks: ranks 0-3 hold head 0, 4-7 head 1
    assert [kv.ranges(2, r) for r in (0, 3, 4, 7)] == [[(0, 1)], [(0, 1)], [(1, 2)], [(1, 2)]]
    mamba = Sharding("tp", 2, 0, blocks=(4, 4, 2))
    assert mamba.ranges(10, 1) == [(2, 4), (6, 8), (9, 10)]
    assert TensorType(F32, (10, 3), mamba).local_shape() == (5, 3)
    with pytest.raises(IRError, match="do not each split into 4"):
        Sharding("tp", 4, 0, blocks=(4, 6))
    with pytest.raises(IRError, match="pieces must divide the ranks"):
        Sharding("tp", 8, 0, pieces=3)


def test_shard_pass_splits_each_kind(fused: Graph) -> None:
    output = Shard(2, 2, 2).apply(fused)
    graph = verify(output.graph)
    # embedding, Mamba out_proj, attention o_proj, MoE (experts + shared expert in one), MLP down
    assert output.counts == {"all_reduce": 5, "all_gather": 1, "local_experts": 1, "vocab_embedding": 1,
                             "weights_split": 24}
    types = {w.name: w.type for w in graph.weights}
    assert str(types["layers.0.mixer.in_proj"].sharding) == "shard<tp=2, dim=0, blocks=[16, 16, 16, 16, 4]>"
    assert str(types["layers.2.mixer.experts_up"].sharding) == "shard<ep=2, dim=0>"
    assert str(types["layers.3.mixer.down_proj_bias"].sharding) == "shard<tp=2, partial>"
    assert str(types["layers.3.mixer.up_proj_bias"].sharding) == "shard<tp=2, dim=0>"
    assert types["layers.2.mixer.router"].sharding is None
    (scan,) = graph.ops_named("ssd_chunk_scan")
    (attention,) = graph.ops_named("attention_gqa")
    assert (scan.attrs.int("num_heads"), scan.attrs.int("n_groups")) == (2, 1)
    assert (attention.attrs.int("num_heads"), attention.attrs.int("num_kv_heads")) == (2, 1)
    (gather,) = graph.ops_named("all_gather")
    assert gather.result.type.shape == ("batch", "seq", 48)
    view = rank_view(graph)
    assert {s.name: s.type.shape for s in view.states}["layers.1.k"] == ("batch", 1, "ctx", 4)
    assert print_graph(parse_graph(print_graph(graph))) == print_graph(graph)


def test_kv_heads_fewer_than_ranks_are_shared(fused: Graph) -> None:
    raw = {**CONFIG, "num_attention_heads": 8, "mamba_num_heads": 8, "n_groups": 4, "intermediate_size": 32,
           "moe_shared_expert_intermediate_size": 16, "vocab_size": 64}
    graph = Decompose().apply(build_block_graph(config_from_dict(raw), F32)).graph
    sharded = Shard(4, 4, 1).apply(graph).graph
    k_proj = sharded.weight_map()["layers.1.mixer.k_proj"].type
    assert str(k_proj.sharding) == "shard<tp=4, dim=0, pieces=2>" and k_proj.local_shape() == (4, 16)
    (attention,) = sharded.ops_named("attention_gqa")
    assert (attention.attrs.int("num_heads"), attention.attrs.int("num_kv_heads")) == (2, 1)


def test_world_size_the_model_does_not_divide_lists_valid_sizes(fused: Graph) -> None:
    with pytest.raises(UsageError, match=r"n_groups\), which 4 tensor-parallel ranks do not divide; valid world "
                                         r"sizes: 1, 2$"):
        check_layout(fused, Layout.of(4))
    with pytest.raises(UsageError, match="--tp must be 1 or the world size 4"):
        Layout.of(4, tp=2)
    # expert parallel alone: the 4 experts split 4 ways, nothing else is split
    assert Shard(4, 1, 4).apply(fused).counts["weights_split"] == 2


def test_nvfp4_row_parallel_needs_whole_blocks(fused: Graph) -> None:
    weights = tuple(dataclasses.replace(w, type=w.type.with_(dtype=NVFP4)) if w.name == "layers.3.mixer.down_proj"
                    else w for w in fused.weights)
    graph = dataclasses.replace(fused, weights=weights)
    with pytest.raises(UsageError, match="each rank's 12 input columns are not whole blocks of 16"):
        check_layout(graph, Layout.of(2))


def test_communication_is_the_identity_on_one_rank() -> None:
    x = torch.randn(2, 3, 8)
    for result in (comm.all_reduce(x, "tp", 1), comm.all_gather(x, "tp", 1, 2), comm.reduce_scatter(x, "tp", 1, 2),
                   comm.all_to_all(x, "tp", 1, 0)):
        assert torch.equal(result, x)
    table, ids = torch.randn(10, 4), torch.tensor([[0, 9, 3]])
    assert torch.equal(comm.vocab_embedding(ids, table, "tp", 1), table[ids])
    offsets, order = torch.tensor([0, 2, 2, 5]), torch.arange(5)
    local_offsets, local_order = comm.local_experts(offsets, order, "ep", 1, 3)
    assert torch.equal(local_offsets, offsets) and torch.equal(local_order, order)
    with pytest.raises(Exception, match="start the engine with --world-size 2"):
        comm.all_reduce(x, "tp", 2)


def test_rank_files_put_back_together_are_the_whole(tmp_path: Path, fused: Graph) -> None:
    graph = Shard(2, 2, 2).apply(fused).graph
    whole: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(0)
    for weight in graph.weights:
        whole[weight.name] = torch.randn([int(d) for d in weight.type.shape], generator=generator)
    (tmp_path / "weights").mkdir()
    # streamed as the weight stream writes: each tensor in parts of 3 rows (a rank's range may span parts)
    with RankSink(graph, [tmp_path / "weights" / f"rank{r}.safetensors" for r in range(2)]) as sink:
        for weight in graph.weights:
            tensor = whole[weight.name]
            sink.write_parts(weight.name, tensor.split(3) if tensor.dim() else [tensor])
    ranks = [load_file(tmp_path / "weights" / f"rank{r}.safetensors") for r in range(2)]
    for weight in graph.weights:
        sharding = weight.type.sharding
        pieces = [rank[weight.name] for rank in ranks]
        assert tuple(pieces[0].shape) == weight.type.local_shape()
        if sharding is None:
            assert all(torch.equal(p, whole[weight.name]) for p in pieces)
        elif sharding.partial:
            assert torch.equal(pieces[0], whole[weight.name]) and not pieces[1].any()
        else:
            rows = [torch.cat([whole[weight.name].narrow(sharding.dim or 0, a, b - a)
                               for a, b in sharding.ranges(int(weight.type.shape[sharding.dim or 0]), r)],
                              dim=sharding.dim or 0) for r in range(2)]
            assert all(torch.equal(p, row) for p, row in zip(pieces, rows, strict=True)), weight.name


def test_dynamic_activation_scales_are_refused_with_tensor_parallel_ranks(tmp_path: Path) -> None:
    import nemocompile

    out = tmp_path / "engine"
    with pytest.raises(UsageError, match=r"dynamic activation scales .* --tp 2\)"):
        nemocompile.build(None, out, target="b200", world_size=2, act_scales="dynamic")
    assert not out.exists()
