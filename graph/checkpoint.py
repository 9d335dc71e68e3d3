"""Lazy reading of Hugging Face safetensors checkpoint directories.

Opening a checkpoint reads and validates only the JSON headers of its files, so a graph for a
550B-parameter model can be built without touching a byte of weights; `Checkpoint.read` maps
one tensor's bytes when a pass actually needs them. Every problem a user can meet (a truncated
download, a missing shard, a corrupt header) is one `CheckpointError` sentence naming the file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from nemocompile.base.errors import CheckpointError
from nemocompile.base.formats import FORMATS
from nemocompile.base.inputs import MIB, open_regular_file, read_regular_bytes

if TYPE_CHECKING:
    import torch

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"

# Bits per element of every safetensors dtype string (sub-byte formats are packed), from the
# format registry.
SAFETENSORS_DTYPE_BITS: Mapping[str, int] = MappingProxyType(
    {fmt.safetensors: fmt.bits for fmt in FORMATS.values() if fmt.safetensors})


# safetensors dtype string -> the name of the torch dtype reading it yields (packed sub-byte
# formats have none). Tensors are read through safetensors' torch framework; this module itself
# never imports torch, so the IR and `plan` load without it.
TORCH_DTYPE_NAMES: Mapping[str, str] = MappingProxyType(
    {fmt.safetensors: fmt.torch_name for fmt in FORMATS.values() if fmt.safetensors and fmt.torch_name})


# The Rust safetensors library refuses headers above 100 MB; a larger one is corruption.
_MAX_HEADER_BYTES = 100_000_000
# The index maps each tensor name to its shard: a few megabytes for the largest models.
INDEX_MAX_BYTES = 256 * MIB


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: its file (relative to the checkpoint directory), name, dtype, shape."""

    file: str
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _FileHeader:
    """One safetensors file's validated header, kept for `refs` and the fingerprint."""

    file: str
    size: int
    header_bytes: bytes
    tensors: Mapping[str, TensorRef]
    spans: Mapping[str, tuple[int, int]]  # each tensor's [begin, end) in the data region

    @property
    def data_start(self) -> int:
        """Where the data region starts in the file (after the length field and the header)."""
        return 8 + len(self.header_bytes)


def _element_count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int | None:
    """Bytes a tensor of this dtype and shape occupies, or None when the bits do not fill whole bytes."""
    bits = SAFETENSORS_DTYPE_BITS[dtype] * _element_count(shape)
    return bits // 8 if bits % 8 == 0 else None


def _parse_shape(value: object) -> tuple[int, ...] | None:
    if not isinstance(value, list) or not all(type(dim) is int and dim >= 0 for dim in value):
        return None
    return tuple(value)


def _parse_offsets(value: object) -> tuple[int, int] | None:
    if not isinstance(value, list) or len(value) != 2 or not all(type(x) is int for x in value):
        return None
    begin, end = value
    return (begin, end) if 0 <= begin <= end else None


def _parse_entry(
    path: Path, file: str, name: str, entry: object, data_size: int
) -> tuple[TensorRef, int, int]:
    """Validate one header entry against the data region; return its reference and byte span."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path} is corrupt: the header entry for tensor {name} is not an object.")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
        raise CheckpointError(f"{path} is corrupt: tensor {name} has unknown dtype {dtype!r}.")
    shape = _parse_shape(entry.get("shape"))
    offsets = _parse_offsets(entry.get("data_offsets"))
    if shape is None or offsets is None:
        raise CheckpointError(f"{path} is corrupt: tensor {name} has an invalid shape or data_offsets.")
    begin, end = offsets
    if end - begin != tensor_nbytes(dtype, shape):
        raise CheckpointError(
            f"{path} is corrupt: tensor {name} spans {end - begin} bytes, which does not match "
            f"dtype {dtype} and shape {list(shape)}."
        )
    if end > data_size:
        raise CheckpointError(
            f"{path} is truncated: tensor {name} ends at data byte {end} but the file holds only "
            f"{data_size} bytes of data."
        )
    return TensorRef(file=file, name=name, dtype=dtype, shape=shape), begin, end


def _check_no_overlap(path: Path, spans: list[tuple[int, int, str]]) -> None:
    """Refuse two tensors sharing bytes: a well-formed file never has them, a corrupt one may."""
    spans = sorted(spans)
    for (_, previous_end, previous), (begin, _, name) in itertools.pairwise(spans):
        if begin < previous_end:
            raise CheckpointError(f"{path} is corrupt: tensors {previous} and {name} overlap.")


def _read_header_bytes(path: Path) -> tuple[int, bytes]:
    """The file's size and raw JSON header, after checking the length field is sane."""
    with open_regular_file(path, "checkpoint file", CheckpointError) as handle:
        try:
            size = os.fstat(handle.fileno()).st_size
            length_field = handle.read(8)
            if len(length_field) < 8:
                raise CheckpointError(f"{path} is truncated: it is shorter than the 8-byte header length.")
            length = int.from_bytes(length_field, "little")
            if length == 0 or length > _MAX_HEADER_BYTES:
                raise CheckpointError(f"{path} is corrupt: its header length {length} is implausible.")
            if 8 + length > size:
                raise CheckpointError(
                    f"{path} is truncated: its header claims {length} bytes but only {size - 8} follow."
                )
            return size, handle.read(length)
        except OSError as error:
            raise CheckpointError(f"cannot read checkpoint file {path}: {error.strerror or error}.") from error


def _read_header(directory: Path, file: str) -> _FileHeader:
    """Read and validate one safetensors file's header; no tensor data is read."""
    path = directory / file
    size, header_bytes = _read_header_bytes(path)
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is corrupt: its header is not valid JSON.") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its header is not a JSON object.")
    data_size = size - 8 - len(header_bytes)
    tensors: dict[str, TensorRef] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ref, begin, end = _parse_entry(path, file, name, entry, data_size)
        tensors[name] = ref
        spans.append((begin, end, name))
    _check_no_overlap(path, spans)
    return _FileHeader(file=file, size=size, header_bytes=header_bytes, tensors=MappingProxyType(tensors),
                       spans=MappingProxyType({name: (begin, end) for begin, end, name in spans}))


def _check_relative(index_path: Path, shard: str) -> None:
    """Shards must stay inside the checkpoint; symlinks are allowed (the Hugging Face cache uses them)."""
    parts = PurePosixPath(shard).parts
    if not shard or PurePosixPath(shard).is_absolute() or Path(shard).is_absolute() or ".." in parts:
        raise CheckpointError(
            f"{index_path} names shard {shard!r}, which is outside the checkpoint directory."
        )


def _load_weight_map(index_path: Path) -> dict[str, str]:
    """The index's tensor name -> shard file map, validated."""
    try:
        index = json.loads(read_regular_bytes(index_path, "shard index", CheckpointError, INDEX_MAX_BYTES))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{index_path} is not valid JSON.") from error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(name, str) and isinstance(shard, str) for name, shard in weight_map.items()
    ):
        raise CheckpointError(f"{index_path} has no weight_map from tensor names to shard files.")
    return weight_map


def _open_sharded(directory: Path, index_path: Path) -> tuple[dict[str, _FileHeader], dict[str, TensorRef]]:
    weight_map = _load_weight_map(index_path)
    headers: dict[str, _FileHeader] = {}
    for shard in sorted(set(weight_map.values())):
        _check_relative(index_path, shard)
        if not (directory / shard).exists():
            raise CheckpointError(f"{index_path} names shard {shard}, which is missing.")
        headers[shard] = _read_header(directory, shard)
    refs: dict[str, TensorRef] = {}
    for name, shard in weight_map.items():
        ref = headers[shard].tensors.get(name)
        if ref is None:
            raise CheckpointError(f"{index_path} maps tensor {name} to {shard}, which lacks it.")
        refs[name] = ref
    return headers, refs


def _open_files(directory: Path, files: Iterable[str]) -> tuple[dict[str, _FileHeader], dict[str, TensorRef]]:
    headers = {file: _read_header(directory, file) for file in files}
    refs: dict[str, TensorRef] = {}
    for header in headers.values():
        for name, ref in header.tensors.items():
            if name in refs:
                raise CheckpointError(
                    f"tensor {name} appears in both {refs[name].file} and {ref.file} in {directory}."
                )
            refs[name] = ref
    return headers, refs


class Checkpoint:
    """A checkpoint directory whose headers are parsed and whose tensors are read on demand."""

    def __init__(
        self,
        directory: Path,
        headers: Mapping[str, _FileHeader],
        refs: Mapping[str, TensorRef],
        index_bytes: bytes | None = None,
    ) -> None:
        """Use `Checkpoint.open`; this only stores what it found."""
        self._directory = directory
        self._headers = dict(headers)
        self._refs: Mapping[str, TensorRef] = MappingProxyType(dict(refs))
        self._index_bytes = index_bytes
        self._handles: dict[str, Any] = {}

    @classmethod
    def open(cls, directory: Path) -> Checkpoint:
        """Find the checkpoint's safetensors files and validate their headers (reads no tensor data).

        Order as in Hugging Face transformers: `model.safetensors`, else the sharded
        `model.safetensors.index.json`, else every `*.safetensors` file in the directory.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"checkpoint directory {directory} does not exist or is not a directory.")
        index_path = directory / INDEX_FILE_NAME
        # exists(), not is_file(): a FIFO or device under these names is refused, not skipped
        if (directory / SINGLE_FILE_NAME).exists():
            return cls(directory, *_open_files(directory, [SINGLE_FILE_NAME]))
        if index_path.exists():
            headers, refs = _open_sharded(directory, index_path)
            return cls(directory, headers, refs, index_bytes=index_path.read_bytes())
        files = sorted(path.name for path in directory.glob("*.safetensors") if not path.is_dir())
        if not files:
            raise CheckpointError(
                f"{directory} holds no {SINGLE_FILE_NAME}, {INDEX_FILE_NAME} or other *.safetensors file."
            )
        return cls(directory, *_open_files(directory, files))

    @property
    def directory(self) -> Path:
        """The checkpoint directory."""
        return self._directory

    @property
    def refs(self) -> Mapping[str, TensorRef]:
        """Every tensor of the checkpoint by name (read-only)."""
        return self._refs

    def ref(self, name: str) -> TensorRef | None:
        """The tensor's reference, or None when the checkpoint lacks it."""
        return self._refs.get(name)

    def fingerprint(self) -> str:
        """sha256 over each file's name, size and header bytes, and the shard index if any.

        Cheap (no tensor data is read) and changes whenever a tensor is added, removed, renamed,
        reshaped or retyped, or a file changes size. An in-place edit of tensor bytes that keeps
        the header is not detected; that is the price of not hashing hundreds of gigabytes.
        """
        digest = hashlib.sha256()
        for file in sorted(self._headers):
            header = self._headers[file]
            digest.update(f"{file}\0{header.size}\0{len(header.header_bytes)}\0".encode())
            digest.update(header.header_bytes)
        if self._index_bytes is not None:
            digest.update(f"{INDEX_FILE_NAME}\0{len(self._index_bytes)}\0".encode())
            digest.update(self._index_bytes)
        return digest.hexdigest()

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor through a memory map of its file, with its stored dtype and shape."""
        ref = self._refs.get(name)
        if ref is None:
            raise CheckpointError(f"checkpoint {self._directory} has no tensor {name}.")
        path = self._directory / ref.file
        try:
            tensor: torch.Tensor = self._handle(ref.file).get_tensor(name)
        except (OSError, SafetensorError) as error:
            raise CheckpointError(f"cannot read tensor {name} from {path}: {error}.") from error
        expected_dtype = TORCH_DTYPE_NAMES.get(ref.dtype)
        if tuple(tensor.shape) != ref.shape or (
            expected_dtype is not None and str(tensor.dtype) != f"torch.{expected_dtype}"
        ):
            raise CheckpointError(f"{path} changed after the checkpoint was opened (tensor {name}).")
        return tensor

    def location(self, name: str) -> tuple[Path, int, int]:
        """(file, offset of the tensor's first byte in it, its byte count): where `read_into`-style
        readers (plain reads into reused buffers, no memory map) find the tensor."""
        ref = self._refs.get(name)
        if ref is None:
            raise CheckpointError(f"checkpoint {self._directory} has no tensor {name}.")
        header = self._headers[ref.file]
        begin, end = header.spans[name]
        return self._directory / ref.file, header.data_start + begin, end - begin

    def _handle(self, file: str) -> Any:
        """The open (memory-mapped) safetensors handle of one file, opened on first use."""
        handle = self._handles.get(file)
        if handle is None:
            handle = safe_open(str(self._directory / file), framework="pt")
            self._handles[file] = handle
        return handle

    def close(self) -> None:
        """Drop the open file handles (and their memory maps)."""
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _format_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(dim) for dim in shape) + "]"


def _dtype_problem(ref: TensorRef, allowed: frozenset[str]) -> str | None:
    if not allowed or ref.dtype in allowed:
        return None
    choices = sorted(allowed)
    wanted = choices[0] if len(choices) == 1 else "one of " + ", ".join(choices)
    return f"{ref.name} has dtype {ref.dtype}, expected {wanted}"


def check_tensors(
    ckpt: Checkpoint, expected: Mapping[str, tuple[tuple[int, ...], frozenset[str]]]
) -> list[str]:
    """Every way the checkpoint differs from the expected tensors, as short phrases in `expected` order.

    `expected` maps a tensor name to its shape and the dtypes accepted (an empty set accepts any).
    All problems are returned together so the user can fix them in one go.
    """
    problems: list[str] = []
    for name, (shape, dtypes) in expected.items():
        ref = ckpt.ref(name)
        if ref is None:
            problems.append(f"{name} is missing")
            continue
        if ref.shape != tuple(shape):
            problems.append(
                f"{name} has shape {_format_shape(ref.shape)}, expected {_format_shape(tuple(shape))}"
            )
        dtype_problem = _dtype_problem(ref, dtypes)
        if dtype_problem is not None:
            problems.append(dtype_problem)
    return problems


def read_tensor_table(directory: Path, file: str) -> Mapping[str, TensorRef]:
    """The validated header of the safetensors file `directory / file`: each tensor's dtype and
    shape, checked against the file's size; no tensor data is read."""
    return _read_header(directory, file).tensors
