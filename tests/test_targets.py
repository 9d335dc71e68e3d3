"""The GPU target data files and their loader."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from nemocompile.base.errors import TargetError
from nemocompile.targets import Target, known_targets, load_target, load_target_file
from nemocompile.targets.model import POLICY_COMPONENTS, required_source_keys

HOPPER = ("h100", "h200")
BLACKWELL = ("b200", "gb200")


def _raw(name: str) -> dict[str, Any]:
    text = resources.files("nemocompile.targets").joinpath("data", f"{name}.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def test_known_targets_are_the_shipped_files_sorted() -> None:
    assert known_targets() == ["b200", "gb200", "h100", "h200"]


@pytest.mark.parametrize("name", HOPPER + BLACKWELL)
def test_every_target_loads(name: str) -> None:
    target = load_target(name)
    assert isinstance(target, Target)
    assert target.name == name
    assert target.marketing_name
    assert set(target.precision_policy) == set(POLICY_COMPONENTS)


def test_names_are_case_insensitive_and_loaded_once() -> None:
    assert load_target("H100") is load_target("h100")
    assert load_target(" GB200 ") is load_target("gb200")


@pytest.mark.parametrize("name", HOPPER + BLACKWELL)
def test_every_number_has_a_source(name: str) -> None:
    target = load_target(name)
    for key in required_source_keys(target.peak_tflops):
        assert target.sources.get(key, "").strip(), f"{name}: {key} has no source"

    # And in the file itself: every number sits under a "value" whose object has a "source".
    def numbers_without_source(node: object, path: str, sourced: bool) -> Iterator[str]:
        if isinstance(node, dict):
            has_source = "value" in node and isinstance(node.get("source"), str) and node["source"].strip()
            for key, child in node.items():
                yield from numbers_without_source(
                    child, f"{path}.{key}", sourced or (key == "value" and bool(has_source))
                )
        elif isinstance(node, list):
            for index, child in enumerate(node):
                yield from numbers_without_source(child, f"{path}[{index}]", sourced)
        elif isinstance(node, (int, float)) and not sourced:
            yield path

    assert list(numbers_without_source(_raw(name), name, False)) == []


@pytest.mark.parametrize("name", HOPPER + BLACKWELL)
def test_arch_agrees_with_compute_capability(name: str) -> None:
    target = load_target(name)
    major, minor = target.compute_capability
    assert target.arch == f"sm_{major}{minor}"
    assert target.compute_capability == ((9, 0) if name in HOPPER else (10, 0))


def test_a_target_whose_arch_contradicts_its_compute_capability_is_rejected() -> None:
    h100 = load_target("h100")
    with pytest.raises(
        TargetError, match=r"field 'arch' is 'sm_100' but compute capability 9\.0 means 'sm_90'"
    ):
        dataclasses.replace(h100, arch="sm_100")


@pytest.mark.parametrize("name", BLACKWELL)
def test_blackwell_computes_in_nvfp4(name: str) -> None:
    target = load_target(name)
    assert target.supports("nvfp4")
    assert target.supports("FP4E2M1")  # registry names, any case
    assert "fp4" in target.peak_tflops
    assert target.precision_policy["routed_experts"] == "nvfp4_w4a4"


@pytest.mark.parametrize("name", HOPPER)
def test_hopper_has_no_fp4_tensor_cores(name: str) -> None:
    target = load_target(name)
    assert not target.supports("nvfp4")
    assert not target.supports("fp4e2m1")
    assert target.supports("fp8e4m3")
    assert target.supports("fp8")
    assert "fp4" not in target.peak_tflops
    # NVFP4 weights still save memory on Hopper; they are dequantized to BF16 for the GEMM.
    assert target.precision_policy["routed_experts"] == "nvfp4_w4a16"


def test_supports_rejects_a_format_name_it_does_not_know() -> None:
    with pytest.raises(TargetError, match=r"unknown number format 'fp8_e4m3'; known formats: .*fp8e4m3"):
        load_target("h100").supports("fp8_e4m3")


def test_hopper_cannot_be_given_a_w4a4_policy() -> None:
    h100 = load_target("h100")
    policy = {**h100.precision_policy, "routed_experts": "nvfp4_w4a4"}
    with pytest.raises(
        TargetError,
        match=re.escape("'precision_policy.routed_experts' is 'nvfp4_w4a4', which needs native 'nvfp4'"),
    ):
        dataclasses.replace(h100, precision_policy=policy)


# name, SMs, memory bytes, HBM bytes/s, NVLink bytes/s, dense BF16 / FP8 / FP4 TFLOP/s
HEADLINE_FIGURES = [
    ("h100", 132, 80e9, 3.35e12, 900e9, 989.4, 1978.9, None),
    ("h200", 132, 141e9, 4.8e12, 900e9, 989.4, 1978.9, None),
    ("b200", 148, 180e9, 7.7e12, 1.8e12, 2250.0, 4500.0, 9000.0),
    ("gb200", 152, 186e9, 8.0e12, 1.8e12, 2500.0, 5000.0, 10000.0),
]


@pytest.mark.parametrize(("name", "sms", "memory", "hbm", "nvlink", "bf16", "fp8", "fp4"), HEADLINE_FIGURES)
def test_headline_figures(
    name: str, sms: int, memory: float, hbm: float, nvlink: float, bf16: float, fp8: float, fp4: float | None
) -> None:
    target = load_target(name)
    assert target.sm_count == sms
    assert target.memory_bytes == int(memory)
    assert target.hbm_bandwidth_bytes_per_s == int(hbm)
    assert target.nvlink_bandwidth_bytes_per_s == int(nvlink)
    assert target.peak_tflops["bf16"] == bf16
    assert target.peak_tflops["fp8"] == fp8
    assert target.peak_tflops.get("fp4") == fp4


@pytest.mark.parametrize("name", HOPPER + BLACKWELL)
def test_peak_rates_are_dense_and_consistent(name: str) -> None:
    peak = load_target(name).peak_tflops
    # Each halving of the operand width doubles the tensor-core rate; a with-sparsity figure
    # copied by mistake would break one of these ratios.
    assert peak["fp16"] == peak["bf16"]
    assert peak["tf32"] == pytest.approx(peak["bf16"] / 2, rel=0.03)
    assert peak["fp8"] == pytest.approx(2 * peak["bf16"], rel=1e-3)
    assert peak["int8"] == peak["fp8"]
    if "fp4" in peak:
        assert peak["fp4"] == pytest.approx(2 * peak["fp8"], rel=1e-3)
    assert peak["fp32"] < peak["tf32"] / 5


def test_unknown_target_error_lists_the_known_names() -> None:
    with pytest.raises(TargetError) as error:
        load_target("x")
    assert str(error.value) == "unknown target 'x'; known targets: b200, gb200, h100, h200"


def test_target_values_cannot_be_changed() -> None:
    h100 = load_target("h100")
    with pytest.raises(dataclasses.FrozenInstanceError):
        h100.sm_count = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        h100.peak_tflops["bf16"] = 1.0  # type: ignore[index]
    policy = dict(h100.precision_policy)
    copy = dataclasses.replace(h100, precision_policy=policy)
    policy["router"] = "bf16"
    assert copy.precision_policy["router"] == "fp32"
    assert copy == h100
    assert hash(copy) == hash(h100)


def test_target_survives_pickling() -> None:
    b200 = load_target("b200")
    assert pickle.loads(pickle.dumps(b200)) == b200


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_an_unchanged_copy_loads_through_a_path(tmp_path: Path) -> None:
    assert load_target_file(_write(tmp_path, _raw("h100"))) == load_target("h100")


def _delete_sm_count(data: dict[str, Any]) -> None:
    del data["sm_count"]


def _bf16_as_text(data: dict[str, Any]) -> None:
    data["peak_tflops"]["bf16"]["value"] = "fast"


def _memory_without_source(data: dict[str, Any]) -> None:
    del data["memory_bytes"]["source"]


def _one_part_capability(data: dict[str, Any]) -> None:
    data["compute_capability"]["value"] = [9]


def _bare_number(data: dict[str, Any]) -> None:
    data["hbm_bandwidth_bytes_per_s"] = 3.35e12


def _arch_mismatch(data: dict[str, Any]) -> None:
    data["arch"] = "sm_80"


def _fp4_rate_on_hopper(data: dict[str, Any]) -> None:
    data["peak_tflops"]["fp4"] = {"value": 3958.0, "source": "made up"}


def _unknown_field(data: dict[str, Any]) -> None:
    data["colour"] = "green"


def _missing_policy_component(data: dict[str, Any]) -> None:
    del data["precision_policy"]["value"]["ssm_state"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_delete_sm_count, "field 'sm_count' is missing"),
        (_bf16_as_text, "field 'peak_tflops.bf16' value must be a number, not a string"),
        (_memory_without_source, "field 'memory_bytes' has no source"),
        (_one_part_capability, "field 'compute_capability' value must be a list of two integers"),
        (_bare_number, "field 'hbm_bandwidth_bytes_per_s' must be an object with 'value' and 'source'"),
        (_arch_mismatch, "field 'arch' is 'sm_80' but compute capability 9.0 means 'sm_90'"),
        (_fp4_rate_on_hopper, "field 'peak_tflops.fp4' must be given exactly when"),
        (_unknown_field, "field 'colour' is not a target field"),
        (_missing_policy_component, "field 'precision_policy.ssm_state' is missing"),
    ],
)
def test_a_malformed_file_names_the_file_and_field(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    data = _raw("h100")
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(TargetError) as error:
        load_target_file(path)
    message = str(error.value)
    assert str(path) in message
    assert expected in message
    assert "\n" not in message


def test_every_problem_in_a_file_is_reported_at_once(tmp_path: Path) -> None:
    data = _raw("h100")
    _delete_sm_count(data)
    _bf16_as_text(data)
    with pytest.raises(TargetError, match=r"'sm_count' is missing; field 'peak_tflops\.bf16'"):
        load_target_file(_write(tmp_path, data))


def test_a_file_that_is_not_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "h100.json"
    path.write_text('{"name": "h100",', encoding="utf-8")
    with pytest.raises(
        TargetError, match=re.escape(f"target file {path} is not valid JSON: ") + r".* line 1"
    ):
        load_target_file(path)
