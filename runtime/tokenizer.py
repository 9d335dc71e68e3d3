"""The byte-level tokenizer of the embedded demo model: token = byte + offset, with pad/bos/eos
below the offset. Saved in the engine as tokenizer.json so `--prompt` works. The build and the
runtime read it through the same strict `parse`, so an engine never carries one it cannot read."""

from __future__ import annotations

import codecs
import json
from dataclasses import asdict, dataclass, fields

from nemocompile.base.errors import EngineError, NemocompileError

TOKENIZER_TYPE = "bytes"
MAX_OFFSET = 1 << 20  # special ids below the byte range; far above any real use


@dataclass(frozen=True)
class ByteTokenizer:
    offset: int = 4
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def vocab_size(self) -> int:
        return self.offset + 256

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256)
        return data.decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"type": TOKENIZER_TYPE, **asdict(self)}, indent=2, sort_keys=True) + "\n"

    @staticmethod
    def claims(text: str) -> bool:
        """Whether `text` is a JSON object that says it is a nemocompile byte tokenizer (its top-level
        `type` is "bytes"); another tokenizer.json (a Hugging Face one) is not ours to carry."""
        try:
            data = json.loads(text)
        except ValueError:
            return False
        return isinstance(data, dict) and data.get("type") == TOKENIZER_TYPE

    @staticmethod
    def parse(text: str, source: str, vocab_size: int | None = None,
              error: type[NemocompileError] = EngineError) -> ByteTokenizer:
        """The tokenizer `text` (read from `source`), every field checked: exactly the fields
        `to_json` writes, integers, distinct special ids below the offset, and (given the model's
        `vocab_size`) every id it can produce inside the vocabulary. `error` is raised otherwise."""
        def refuse(why: str) -> NemocompileError:
            return error(f"{source} is not a tokenizer nemocompile can read: {why}")

        try:
            data = json.loads(text)
        except ValueError as problem:
            raise refuse(f"not valid JSON ({problem})") from None
        if not isinstance(data, dict) or data.get("type") != TOKENIZER_TYPE:
            raise refuse(f'it is not an object with "type": "{TOKENIZER_TYPE}"')
        names = [field.name for field in fields(ByteTokenizer)]
        unknown = sorted(set(data) - {"type", *names})
        if unknown:
            raise refuse(f"unknown field '{unknown[0]}'")
        values: dict[str, int] = {}
        for name in names:
            value = data.get(name)
            if type(value) is not int or not 0 <= value <= MAX_OFFSET:
                raise refuse(f"'{name}' must be an integer in [0, {MAX_OFFSET}], got {json.dumps(value)}")
            values[name] = value
        tokenizer = ByteTokenizer(**values)
        special = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]
        if len(set(special)) != 3 or max(special) >= tokenizer.offset:
            raise refuse(f"the special ids {special} must be distinct and below 'offset' ({tokenizer.offset})")
        if vocab_size is not None and tokenizer.vocab_size > vocab_size:
            raise refuse(f"its ids reach {tokenizer.vocab_size - 1}, past the model's vocab_size of {vocab_size}")
        return tokenizer


class TokenText:
    """The text of tokens given one at a time, for streaming: byte tokens go through an incremental
    UTF-8 decoder (a character split over several tokens appears once, whole); special ids print
    nothing. Without a tokenizer, the ids themselves, comma-separated."""

    def __init__(self, tokenizer: ByteTokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.count = 0

    def add(self, token: int) -> str:
        self.count += 1
        if self.tokenizer is None:
            return f"{',' if self.count > 1 else ''}{token}"
        offset = self.tokenizer.offset
        if not offset <= token < offset + 256:
            return ""
        return self.decoder.decode(bytes([token - offset]))

    def finish(self) -> str:
        """What an unfinished character left behind (as a replacement character)."""
        return "" if self.tokenizer is None else self.decoder.decode(b"", final=True)

    def all(self, tokens: list[int]) -> str:
        return "".join(self.add(token) for token in tokens) + self.finish()
