"""The embedded demo speaks: its shipped weights were trained (tools/train_demo.py) on the project's
own text, and the engines built from it continue a sentence of that text with the same words,
greedily, in fp32 and as the README builds it (h100, NVFP4/FP8 quantized)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

import nemocompile
from nemocompile.base.settings import override
from nemocompile.cli import main
from nemocompile.demo import DEMO_TEXT, DEMO_WEIGHTS, demo_config, write_demo_checkpoint
from nemocompile.runtime.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "A compiler is"
NEW_TOKENS = 81
# the demo text's first sentences, as the trained demo continues PROMPT (greedy)
CONTINUATION = " a patient translator. It reads a program written for people and writes a program"
README_COMMAND = f'nemocompile run demo-engine --prompt "{PROMPT}" --max-new-tokens {NEW_TOKENS}'


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo")
    nemocompile.build(None, root / "fp32", target="h100", precision="fp32")
    nemocompile.build(None, root / "h100", target="h100")  # as the README builds it
    return {"fp32": root / "fp32", "h100": root / "h100"}


@pytest.mark.parametrize("engine", ["fp32", "h100"])
def test_greedy_continuation_of_the_prompt_is_the_trained_text(engines: dict[str, Path], engine: str) -> None:
    tokenizer = ByteTokenizer()
    prompt = tokenizer.encode(PROMPT)
    ids = nemocompile.load(engines[engine]).generate([prompt], NEW_TOKENS, eos_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(ids[0, len(prompt):].tolist())
    print(f"{engine}: {PROMPT!r} -> {text!r}")
    assert text == CONTINUATION
    assert PROMPT + CONTINUATION in DEMO_TEXT.read_text().replace("\n", " ")


def test_the_readme_command_prints_the_continuation(engines: dict[str, Path]) -> None:
    readme = (ROOT / "README.md").read_text()
    assert README_COMMAND in readme, "README's main command and this test name different prompts"
    with override():
        result = CliRunner().invoke(main, ["run", str(engines["h100"]), "--prompt", PROMPT,
                                           "--max-new-tokens", str(NEW_TOKENS)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout == CONTINUATION + "\n"


def test_the_demo_has_all_four_block_kinds_and_small_trained_weights(tmp_path: Path) -> None:
    config = demo_config()
    assert set(config["hybrid_override_pattern"]) == {"M", "*", "E", "-"}  # Mamba2, attention, MoE, MLP
    assert DEMO_WEIGHTS.stat().st_size < 2_000_000
    with safe_open(str(DEMO_WEIGHTS), "pt") as weights:
        assert weights.metadata()["trained_by"] == "tools/train_demo.py"
        # trained, not the transformers initialisation: the router and the Mamba D moved away from it
        assert float(weights.get_tensor("backbone.layers.2.mixer.gate.weight").float().abs().max()) > 0.05
        assert not bool((weights.get_tensor("backbone.layers.0.mixer.D").float() == 1).all())
    checkpoint = write_demo_checkpoint(tmp_path / "demo")
    assert json.loads((checkpoint / "config.json").read_text()) == config
    assert (checkpoint / "model.safetensors").read_bytes() == DEMO_WEIGHTS.read_bytes()


def test_the_demo_data_is_package_data() -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = package_data["nemocompile"]
    for path in (DEMO_WEIGHTS, DEMO_TEXT):
        assert any(path.match(f"nemocompile/{pattern}") for pattern in shipped), f"{path.name} is not package data"


@pytest.mark.slow
def test_training_reproduces_the_shipped_weights(tmp_path: Path) -> None:
    """tools/train_demo.py, run again (a few minutes on two cores), writes the shipped bytes."""
    out = tmp_path / "model.safetensors"
    completed = subprocess.run([sys.executable, str(ROOT / "tools" / "train_demo.py"), "--out", str(out)],
                               capture_output=True, text=True, timeout=1800, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert out.read_bytes() == DEMO_WEIGHTS.read_bytes()
