"""The byte-level tokenizer of the embedded demo model: token = byte + offset, with pad/bos/eos
below the offset. Saved in the engine as tokenizer.json so `--prompt` works."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from nemocompile.base.errors import EngineError


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
        return json.dumps({"type": "bytes", **asdict(self)}, indent=2, sort_keys=True) + "\n"

    @staticmethod
    def load(path: Path) -> ByteTokenizer:
        try:
            data = json.loads(path.read_text())
            if data.pop("type") != "bytes":
                raise ValueError("not a byte tokenizer")
            return ByteTokenizer(**{k: int(v) for k, v in data.items()})
        except (ValueError, KeyError, TypeError) as error:
            raise EngineError(f"{path} is not a tokenizer nemocompile can read ({error})") from None
