"""IR types and attribute containers: immutable, self-checking, equal when they print equally."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from nemocompile.base.errors import IRError
from nemocompile.graph.ir import STATE_KINDS, Attrs, StateSlot, TensorSource, Weight
from nemocompile.graph.types import (
    BF16,
    DTYPES,
    F32,
    FP8_E4M3,
    I64,
    U8,
    Sharding,
    TensorType,
    dtype_named,
    tensor,
)

# ---------------------------------------------------------------- TensorType validation


@pytest.mark.parametrize("bad_dim", [-1, 1.5, True, None, "Batch", "1seq", "seq-len", "", b"seq", (2,)])
def test_bad_dims_are_refused_with_irerror(bad_dim: Any) -> None:
    with pytest.raises(IRError) as info:
        TensorType(F32, (4, bad_dim))
    message = str(info.value)
    assert repr(bad_dim) in message or (isinstance(bad_dim, int) and str(bad_dim) in message), message


@pytest.mark.parametrize("good_dim", [0, 1, 7, 1 << 40, "batch", "seq", "ctx", "routed", "_x1"])
def test_good_dims_are_accepted(good_dim: int | str) -> None:
    assert TensorType(BF16, (good_dim, 3)).shape == (good_dim, 3)


def test_shape_given_as_a_list_is_stored_as_a_tuple_and_hashable() -> None:
    t = TensorType(F32, [2, "seq"])  # type: ignore[arg-type]
    assert t.shape == (2, "seq")
    assert isinstance(t.shape, tuple)
    assert hash(t) == hash(TensorType(F32, (2, "seq")))
    assert t == tensor(F32, 2, "seq")


def test_types_are_frozen() -> None:
    t = tensor(F32, 2, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.dtype = BF16  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.shape = (4,)  # type: ignore[misc]


def test_rank_and_is_static() -> None:
    assert tensor(F32).rank == 0
    assert tensor(F32, 2, 3).is_static
    assert not tensor(F32, "batch", 3).is_static
    assert tensor(F32, "batch", "seq", 3).rank == 3


# ---------------------------------------------------------------- with_


def test_with_returns_the_same_object_when_nothing_changes() -> None:
    t = tensor(BF16, "batch", 8)
    assert t.with_() is t
    assert t.with_(dtype=BF16) is t
    assert t.with_(shape=("batch", 8)) is t
    assert t.with_(dtype=BF16, shape=("batch", 8), sharding=None) is t


def test_with_returns_a_changed_copy_and_leaves_the_original() -> None:
    t = tensor(BF16, "batch", 8)
    changed = t.with_(dtype=F32)
    assert changed is not t
    assert changed == tensor(F32, "batch", 8)
    assert t.dtype == BF16
    assert t.with_(sharding=Sharding("tp", 2, 1)).sharding == Sharding("tp", 2, 1)
    assert t.with_(shape=("batch", 16)).shape == ("batch", 16)


def test_with_validates_the_new_shape() -> None:
    with pytest.raises(IRError):
        tensor(F32, 2, 3).with_(shape=(2, -3))


# ---------------------------------------------------------------- numel / nbytes


@pytest.mark.parametrize(
    ("type_", "numel", "nbytes"),
    [
        (tensor(F32, 2, 3, 4), 24, 96),
        (tensor(BF16, 2, 3, 4), 24, 48),
        (tensor(FP8_E4M3, 16, 16), 256, 256),
        (tensor(I64, 5), 5, 40),
        (tensor(U8, 3, 0), 0, 0),
        (tensor(F32), 1, 4),  # a scalar
    ],
)
def test_numel_and_nbytes(type_: TensorType, numel: int, nbytes: int) -> None:
    assert type_.numel() == numel
    assert type_.nbytes() == nbytes


def test_numel_of_a_symbolic_shape_is_refused() -> None:
    with pytest.raises(IRError, match="symbolic"):
        tensor(F32, "batch", 4).numel()
    with pytest.raises(IRError):
        tensor(F32, 4, "seq").nbytes()


# ---------------------------------------------------------------- str form


@pytest.mark.parametrize(
    ("type_", "text"),
    [
        (tensor(BF16, "batch", "seq", 32), "tensor<bf16, [batch, seq, 32]>"),
        (tensor(F32), "tensor<f32, []>"),
        (TensorType(F32, (4, 8), Sharding("tp", 2, 0)), "tensor<f32, [4, 8], shard<tp=2, dim=0>>"),
        (tensor(I64, 1), "tensor<i64, [1]>"),
    ],
)
def test_str_form(type_: TensorType, text: str) -> None:
    assert str(type_) == text


def test_dtype_names_resolve_and_unknown_names_are_refused() -> None:
    for name, dtype in DTYPES.items():
        assert dtype_named(name) is dtype
        assert str(dtype) == name
    with pytest.raises(IRError, match="unknown dtype 'f8'"):
        dtype_named("f8")


# ---------------------------------------------------------------- Attrs


def test_attrs_are_sorted_by_key_whatever_the_insertion_order() -> None:
    first = Attrs.of({"b": 1, "a": 2.0, "c": "x"})
    second = Attrs.of({"c": "x", "a": 2.0, "b": 1})
    assert first.keys() == ["a", "b", "c"]
    assert first == second
    assert hash(first) == hash(second)


def test_attrs_freeze_nested_lists_into_tuples() -> None:
    attrs = Attrs.of({"sizes": [1, [2, 3], []]})
    assert attrs["sizes"] == (1, (2, 3), ())
    assert hash(attrs)  # hashable all the way down


def test_attrs_are_immutable() -> None:
    attrs = Attrs.of({"a": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        attrs.items = ()  # type: ignore[misc]
    assert isinstance(attrs.items, tuple)


def test_attrs_lookups() -> None:
    attrs = Attrs.of({"n": 3, "eps": 1e-5, "kind": "silu", "flag": False, "sizes": [1, 2], "none": None})
    assert attrs.int("n") == 3
    assert attrs.float("eps") == 1e-5
    assert attrs.float("n") == 3.0
    assert attrs.str("kind") == "silu"
    assert attrs.bool("flag") is False
    assert attrs.ints("sizes") == (1, 2)
    assert attrs.get("missing", 7) == 7
    assert attrs.get("none", 7) is None
    assert "none" in attrs
    assert "missing" not in attrs
    with pytest.raises(KeyError):
        attrs["missing"]


def test_attrs_with_different_values_differ() -> None:
    assert Attrs.of({"a": 1}) != Attrs.of({"a": 2})
    assert Attrs.of({"a": 1}) != Attrs.of({"b": 1})
    assert Attrs() == Attrs.of({})


# ---------------------------------------------------------------- StateSlot / Weight


@pytest.mark.parametrize("kind", STATE_KINDS)
def test_state_slot_kinds_are_accepted(kind: str) -> None:
    assert StateSlot("layers.0.s", kind, tensor(F32, "batch", 4)).kind == kind


@pytest.mark.parametrize("kind", ["KV", "cache", "", "mamba"])
def test_state_slot_of_an_unknown_kind_is_refused(kind: str) -> None:
    with pytest.raises(IRError) as info:
        StateSlot("layers.3.kv", kind, tensor(BF16, "batch", 2, "ctx", 8))
    assert "layers.3.kv" in str(info.value)
    assert f"'{kind}'" in str(info.value)


def test_weight_is_stacked_only_with_several_sources() -> None:
    type_ = tensor(BF16, 2, 4, 4)
    assert not Weight("w", type_, "routed_experts").stacked
    assert not Weight("w", type_, "routed_experts", (TensorSource("a", "t0"),)).stacked
    assert Weight("w", type_, "routed_experts", (TensorSource("a", "t0"), TensorSource("b", "t1"))).stacked
