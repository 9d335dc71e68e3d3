"""Calibration data as users have it: token ids (one sequence per line, as before), plain text,
or JSONL records with a "text" field. Text is tokenized with the checkpoint's own tokenizer.json
(a Hugging Face tokenizer through the `tokenizers` library, or the demo's byte tokenizer), the
documents' tokens joined in file order and cut into `samples` sequences of `length` tokens."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemocompile.base.errors import UsageError
from nemocompile.base.inputs import MIB, read_regular_bytes, read_regular_text
from nemocompile.runtime.tokenizer import ByteTokenizer

# Far more text than calibration runs; past this a file is not calibration data.
CALIBRATION_DATA_MAX_BYTES = 64 * MIB
TOKENIZER_MAX_BYTES = 64 * MIB
DATA_FORMATS = ("auto", "tokens", "text", "jsonl")


@dataclass(frozen=True)
class CalibrationData:
    """The samples a file gave, how it was read, and the hash of its bytes."""

    sequences: list[list[int]]
    kind: str  # "tokens", "text" or "jsonl"
    sha256: str
    file_tokens: int  # tokens in the whole file (text: after tokenization)


def _starts_with_an_integer(text: str) -> bool:
    """Whether the first word of the file is an integer (a token-id file, perhaps with a typo later)."""
    words = text.replace(",", " ").split(maxsplit=1)
    return bool(words) and words[0].lstrip("+-").isdigit()


def _kind(path: Path, text: str, requested: str) -> str:
    if requested != "auto":
        return requested
    if path.suffix.lower() == ".jsonl":
        return "jsonl"
    return "tokens" if _starts_with_an_integer(text) else "text"


def read_token_ids(path: Path, text: str, vocab_size: int) -> list[list[int]]:
    """One sequence per line, token ids separated by commas or spaces."""
    sequences = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ids = [int(t) for t in line.replace(",", " ").split()]
        except ValueError:
            raise UsageError(f"calibration data {path}, line {number}: not a list of token ids (a text file that "
                             "starts with a number needs --calibration-format text)") from None
        if any(not 0 <= i < vocab_size for i in ids):
            raise UsageError(f"calibration data {path}, line {number}: token ids must lie in [0, {vocab_size})")
        sequences.append(ids)
    if not sequences:
        raise UsageError(f"calibration data {path} holds no token ids")
    return sequences


def _documents(path: Path, text: str, kind: str) -> list[str]:
    if kind == "text":
        return [text]
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"calibration data {path}, line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UsageError(f"calibration data {path}, line {number}: expected a JSON object with a string "
                             "'text' field")
        documents.append(record["text"])
    return documents


class _Encoder:
    """The checkpoint's tokenizer.json: the demo's byte tokenizer, else a Hugging Face one."""

    def __init__(self, tokenizer_path: Path, vocab_size: int) -> None:
        text = read_regular_text(tokenizer_path, "tokenizer", UsageError, TOKENIZER_MAX_BYTES)
        self.byte: ByteTokenizer | None = None
        self.hf: Any = None
        if ByteTokenizer.claims(text):
            self.byte = ByteTokenizer.parse(text, str(tokenizer_path), vocab_size, error=UsageError)
            return
        try:
            import tokenizers
        except ImportError:
            raise UsageError("text calibration data is tokenized with the tokenizers library, which is not "
                             "installed; pip install 'nemocompile[text]', or give token ids") from None
        try:
            self.hf = tokenizers.Tokenizer.from_str(text)
        except Exception as error:  # the library raises its own exception types
            raise UsageError(f"tokenizer {tokenizer_path} cannot be read by the tokenizers library "
                             f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None

    def encode(self, document: str) -> list[int]:
        if self.byte is not None:
            return self.byte.encode(document, add_bos=False)
        ids: list[int] = self.hf.encode(document, add_special_tokens=False).ids
        return ids


def read_calibration_data(path: Path, requested: str, tokenizer_path: Path, vocab_size: int, samples: int,
                          length: int) -> CalibrationData:
    """The calibration samples of `path`: token-id lines (each cut to `length` tokens, at most
    `samples` of them), or text cut into exactly `samples` sequences of `length` tokens."""
    if requested not in DATA_FORMATS:
        raise UsageError(f"--calibration-format must be one of {', '.join(DATA_FORMATS)}, got {requested!r}")
    data = read_regular_bytes(path, "calibration data", UsageError, CALIBRATION_DATA_MAX_BYTES)
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as failure:
        raise UsageError(f"calibration data {path} is not UTF-8 text (byte {failure.start})") from None
    if not text.strip():
        raise UsageError(f"calibration data {path} is empty")
    kind = _kind(path, text, requested)
    if kind == "tokens":
        lines = read_token_ids(path, text, vocab_size)
        return CalibrationData([ids[:length] for ids in lines[:samples]], kind, digest, sum(map(len, lines)))
    documents = _documents(path, text, kind)
    if not tokenizer_path.is_file():
        raise UsageError(f"calibration data {path} is {kind}, which is tokenized with the checkpoint's "
                         f"tokenizer.json, and {tokenizer_path.parent} has none; give token ids instead")
    encoder = _Encoder(tokenizer_path, vocab_size)
    stream: list[int] = []
    for document in documents:
        stream += encoder.encode(document)
    wanted = samples * length
    if len(stream) < wanted:
        raise UsageError(f"calibration data {path} gives {len(stream):,} tokens, fewer than the {wanted:,} asked "
                         f"for ({samples} samples of {length} tokens); give more text, or lower --calibrate or "
                         "--calibration-length")
    bad = next((i for i in stream if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise UsageError(f"tokenizer {tokenizer_path} gives token id {bad}, outside the model's vocabulary "
                         f"[0, {vocab_size})")
    return CalibrationData([stream[i * length:(i + 1) * length] for i in range(samples)], kind, digest, len(stream))
