"""A streaming safetensors writer, so an engine's weights never need to be in memory all at once.

The header is written first from the declared (name, dtype, shape) list, then each tensor's
bytes are streamed in that order. The output is byte-identical across runs for the same
inputs (sorted JSON keys, fixed separators, space padding) and loads with
`safetensors.torch.load_file`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

from nemocompile.graph.checkpoint import SAFETENSORS_DTYPE_BITS, tensor_nbytes
from nemocompile.runtime.dtypes import SAFETENSORS_TORCH_DTYPES as TORCH_DTYPES

# The safetensors format requires the data region to start on an 8-byte boundary.
_HEADER_ALIGNMENT = 8
_REHASH_CHUNK = 16 << 20

DeclaredTensor = tuple[str, str, tuple[int, ...]]


def _validate_specs(tensors: Sequence[DeclaredTensor]) -> None:
    """Refuse duplicate names, unknown or packed dtypes and malformed shapes before writing a byte."""
    seen: set[str] = set()
    for name, dtype, shape in tensors:
        if name in seen or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} is duplicated or reserved")
        seen.add(name)
        if dtype not in SAFETENSORS_DTYPE_BITS or dtype not in TORCH_DTYPES:
            raise ValueError(f"tensor {name} has dtype {dtype!r}, which this writer cannot write")
        if not all(type(dim) is int and dim >= 0 for dim in shape):
            raise ValueError(f"tensor {name} has invalid shape {list(shape)}")


def _header_bytes(tensors: Sequence[DeclaredTensor], metadata: dict[str, str] | None) -> bytes:
    """The length-prefixed, space-padded JSON header with contiguous data offsets in declared order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = tensor_nbytes(dtype, shape)
        assert nbytes is not None  # only whole-byte dtypes pass _validate_specs
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-len(text) % _HEADER_ALIGNMENT)
    return len(text).to_bytes(8, "little") + text


def data_start(tensors: Sequence[DeclaredTensor], metadata: dict[str, str] | None = None) -> int:
    """Where the data region of a file of these tensors starts (the header's length)."""
    return len(_header_bytes([(name, dtype, tuple(shape)) for name, dtype, shape in tensors], metadata))


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order, without a copy when it is already contiguous on the CPU."""
    flat = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor, in the order declared up front."""

    def __init__(
        self,
        path: Path,
        tensors: Sequence[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
        resume_at: tuple[int, int] | None = None,
    ) -> None:
        """Validate the declared tensors and write the header; `write` then streams each tensor.
        With `resume_at` (tensors already written, where their bytes end in the data region), the
        existing file is continued instead: its header must be the one these specs give, and what
        follows those bytes is cut off."""
        if metadata is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise ValueError("safetensors metadata must map strings to strings")
        self._specs: list[DeclaredTensor] = [(name, dtype, tuple(shape)) for name, dtype, shape in tensors]
        _validate_specs(self._specs)
        self._path = Path(path)
        self._next = 0
        self._rows: int | None = None  # rows of the tensor begun (None: none is)
        self._hash = hashlib.sha256()  # of the file from its first byte: hashed as it is written
        header = _header_bytes(self._specs, metadata)
        self._data_start = len(header)
        if resume_at is None:
            self._file: BinaryIO | None = self._path.open("wb")
            self._file.write(header)
            self._hash.update(header)
            self._offset = 0
            return
        self._next, self._offset = resume_at
        self._file = self._path.open("r+b")
        if self._file.read(len(header)) != header:
            self._file.close()
            raise ValueError(f"{self._path} does not start with the header of the tensors being written")
        self._hash.update(header)
        remaining = self._offset  # the kept bytes are hashed again, so the hash goes on from them
        while remaining:
            chunk = self._file.read(min(_REHASH_CHUNK, remaining))
            if not chunk:
                self._file.close()
                raise ValueError(f"{self._path} ends before the {self._offset} bytes of data it should keep")
            self._hash.update(chunk)
            remaining -= len(chunk)
        self._file.seek(self._data_start + self._offset)
        self._file.truncate()

    @property
    def path(self) -> Path:
        """The file being written."""
        return self._path

    @property
    def data_start(self) -> int:
        """Where the data region starts (the header's length)."""
        return self._data_start

    @property
    def position(self) -> tuple[int, int]:
        """(tensors written, where their bytes end in the data region): what `resume_at` takes."""
        return self._next, self._offset

    def sha256(self) -> str:
        """The sha256 of the file from its first byte through the last tensor written, after flushing
        them to the file: once every tensor is written, the whole file's."""
        if self._file is not None:
            self._file.flush()
        return self._hash.copy().hexdigest()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Stream the next declared tensor; its name, dtype and shape must match the declaration."""
        self.write_parts(name, [tensor])

    def write_parts(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        """Stream the next declared tensor as consecutive slices along its first dim (e.g. one
        expert at a time), so the whole tensor is never in memory at once."""
        self.begin(name)
        for part in parts:
            self.append(part)
        self.end()

    def begin(self, name: str) -> None:
        """Start the next declared tensor, `name`; `append` its slices along the first dim, then `end`
        it (write_parts, pushed: so several files can take their pieces of one stream of parts)."""
        if self._file is None:
            raise ValueError(f"{self._path} is already closed")
        if self._next >= len(self._specs):
            raise ValueError(
                f"tensor {name} was not declared for {self._path} (all declared tensors are written)"
            )
        expected_name = self._specs[self._next][0]
        if name != expected_name:
            raise ValueError(f"expected tensor {expected_name} next in {self._path}, got {name}")
        self._rows = 0

    def append(self, part: torch.Tensor) -> None:
        """The next slice of the tensor begun."""
        assert self._file is not None and self._rows is not None, "append before begin"
        name, dtype, shape = self._specs[self._next]
        if part.dtype != TORCH_DTYPES[dtype]:
            raise ValueError(f"tensor {name} has torch dtype {part.dtype}, declared {dtype}")
        whole = tuple(part.shape) == shape and self._rows == 0
        if not whole and (not shape or tuple(part.shape[1:]) != shape[1:]):
            raise ValueError(f"tensor {name} has shape {list(part.shape)}, declared {list(shape)}")
        self._rows = shape[0] if whole and shape else self._rows + (part.shape[0] if part.dim() else 1)
        data = _raw_bytes(part)
        self._file.write(data)
        self._hash.update(data)
        self._offset += data.nbytes

    def end(self) -> None:
        """Finish the tensor begun: all its rows must have been appended."""
        assert self._rows is not None, "end before begin"
        name, _, shape = self._specs[self._next]
        if (shape[0] if shape else 1) != self._rows:
            raise ValueError(f"tensor {name} was written with {self._rows} rows, declared {list(shape)}")
        self._rows = None
        self._next += 1

    def close(self) -> None:
        """Finish the file; raises ValueError (and removes the incomplete file) if tensors are missing."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self._next < len(self._specs):
            self._path.unlink(missing_ok=True)
            missing = self._specs[self._next][0]
            raise ValueError(
                f"{self._path} closed with {len(self._specs) - self._next} declared tensors unwritten, "
                f"starting with {missing}"
            )

    def abort(self) -> None:
        """Close and delete the incomplete file, so no file claiming unwritten data is left behind."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._path.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()
