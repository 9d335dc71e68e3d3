"""Calibration data as users have it: text and JSONL tokenized with the checkpoint's own
tokenizer.json by the `tokenizers` library (a word-level tokenizer made here with that library),
cut into --calibrate samples of --calibration-length tokens; token-id files keep working; a
malformed, empty or too short file gets one sentence naming it, and exit code 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_resume import tiny_moe_model

import nemocompile
from nemocompile.base.errors import UsageError
from nemocompile.base.settings import override
from nemocompile.calibration_data import read_calibration_data
from nemocompile.cli import main

tokenizers = pytest.importorskip("tokenizers", reason="text calibration data is tokenized by the tokenizers library")
transformers = pytest.importorskip("transformers", reason="the checkpoint is saved by NemotronHForCausalLM")

WORDS = ("the a model of some words and small text for calibration runs through every block once more "
         "tokens reach experts layer by layer").split()
TEXT = " ".join(WORDS[(7 * i) % len(WORDS)] for i in range(400))


def word_tokenizer() -> tokenizers.Tokenizer:
    vocab = {"[UNK]": 0, **{word: index + 1 for index, word in enumerate(dict.fromkeys(WORDS))}}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_moe_model()
    directory = tmp_path_factory.mktemp("text") / "tiny"
    model.save_pretrained(directory)
    word_tokenizer().save(str(directory / "tokenizer.json"))
    return directory


def encoded(text: str) -> list[int]:
    ids: list[int] = word_tokenizer().encode(text, add_special_tokens=False).ids
    return ids


def read(checkpoint: Path, path: Path, samples: int = 3, length: int = 16, kind: str = "auto") -> list[list[int]]:
    return read_calibration_data(path, kind, checkpoint / "tokenizer.json", 64, samples, length).sequences


def test_text_is_tokenized_and_cut_into_samples(checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "calibration.txt"
    path.write_text(TEXT)
    data = read_calibration_data(path, "auto", checkpoint / "tokenizer.json", 64, 3, 16)
    ids = encoded(TEXT)
    assert data.kind == "text" and data.file_tokens == len(ids) == 400
    assert data.sequences == [ids[0:16], ids[16:32], ids[32:48]]
    assert data.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_jsonl_documents_are_joined_in_file_order(checkpoint: Path, tmp_path: Path) -> None:
    documents = [TEXT[:300], TEXT[300:900], TEXT[900:]]
    path = tmp_path / "calibration.jsonl"
    path.write_text("\n".join(json.dumps({"text": d, "id": n}) for n, d in enumerate(documents)) + "\n\n")
    ids = [i for d in documents for i in encoded(d)]
    assert read(checkpoint, path, 4, 20) == [ids[n * 20:(n + 1) * 20] for n in range(4)]


def test_token_id_files_keep_working(checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "ids.txt"
    path.write_text("1 2 3 4\n5,6,7\n\n8 9\n")
    assert read(checkpoint, path, samples=2, length=3) == [[1, 2, 3], [5, 6, 7]]  # up to N lines, cut to L


@pytest.mark.parametrize(("content", "kind", "message"), [
    ("", "auto", "calibration data {path} is empty"),
    ("  \n\n", "auto", "calibration data {path} is empty"),
    ('{"text": "the a"}\n{"text": \n', "jsonl", r"calibration data {path}, line 2: not valid JSON"),
    ('{"text": "the a"}\n["the"]\n', "jsonl", "calibration data {path}, line 2: expected a JSON object with a "
                                               "string 'text' field"),
    ('{"content": "the a"}\n', "jsonl", "line 1: expected a JSON object with a string 'text' field"),
    ("the model of some words", "auto", "calibration data {path} gives 5 tokens, fewer than the 48 asked for "
                                        r"\(3 samples of 16 tokens\)"),
    ("1 2 x\n", "tokens", "calibration data {path}, line 1: not a list of token ids"),
    ("1 2 99\n", "auto", r"calibration data {path}, line 1: token ids must lie in \[0, 64\)"),
])
def test_bad_files_get_one_sentence(checkpoint: Path, tmp_path: Path, content: str, kind: str, message: str) -> None:
    path = tmp_path / ("data.jsonl" if kind == "jsonl" else "data.txt")
    path.write_text(content)
    with pytest.raises(UsageError, match=message.format(path=path)):
        read(checkpoint, path, kind=kind)


def test_text_needs_the_checkpoints_tokenizer(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text(TEXT)
    with pytest.raises(UsageError, match=f"calibration data {path} is text, which is tokenized with the "
                                         f"checkpoint's tokenizer.json, and {tmp_path} has none"):
        read_calibration_data(path, "auto", tmp_path / "tokenizer.json", 64, 1, 4)
    (tmp_path / "tokenizer.json").write_text('{"model": "nonsense"}')
    with pytest.raises(UsageError, match="cannot be read by the tokenizers library"):
        read_calibration_data(path, "auto", tmp_path / "tokenizer.json", 64, 1, 4)
    (tmp_path / "bytes.txt").write_bytes(b"\xff\xfe text")
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        read_calibration_data(tmp_path / "bytes.txt", "auto", tmp_path / "tokenizer.json", 64, 1, 4)


def test_text_build_equals_a_build_from_the_same_token_ids(checkpoint: Path, tmp_path: Path) -> None:
    """The tokenizer's ids, not anything else about the file, decide the scales."""
    text = tmp_path / "calibration.txt"
    text.write_text(TEXT)
    ids = encoded(TEXT)
    tokens = tmp_path / "ids.txt"
    tokens.write_text("".join(" ".join(map(str, ids[n * 24:(n + 1) * 24])) + "\n" for n in range(5)))
    from_text = nemocompile.build(checkpoint, tmp_path / "text", target="b200", calibration_data=text, calibrate=5,
                                  calibration_length=24)
    from_ids = nemocompile.build(checkpoint, tmp_path / "ids", target="b200", calibration_data=tokens, calibrate=5,
                                 calibration_length=24)
    assert from_text.calibration is not None and from_ids.calibration is not None
    assert from_text.calibration.tokens == from_ids.calibration.tokens == 120
    weights = "weights/rank0.safetensors"
    assert (tmp_path / "text" / weights).read_bytes() == (tmp_path / "ids" / weights).read_bytes()
    report = (tmp_path / "text" / "report.md").read_text()
    assert f"- source: file {text}, sha256 {hashlib.sha256(TEXT.encode()).hexdigest()}" in report
    assert "- file format: text (tokenized with the checkpoint's tokenizer.json), 400 tokens in the file" in report
    assert "- samples: 5 token sequences (one per batch), 120 tokens" in report


def test_cli_refuses_a_short_file_in_one_line(checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("the model of some words")
    with override():
        result = CliRunner().invoke(main, ["build", str(checkpoint), "--target", "b200", "-o", str(tmp_path / "e"),
                                           "--calibration-data", str(path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"calibration data {path} gives 5 tokens, fewer than the 512 asked for" in lines[0]
    assert not (tmp_path / "e").exists()
