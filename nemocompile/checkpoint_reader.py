"""Plain positional reads of checkpoint tensors for the quantize-and-write stage.

A memory-mapped tensor costs a page fault per 4 KiB page the first time it is touched (about as
long as quantizing it, measured on a 2-core machine), and every page touched stays resident in
the process until the map is dropped: a stacked weight of many experts read through one map
holds all of them. Here each tensor (or run of rows) is read with `os.preadv` straight into a
buffer: a copy from the page cache at memory speed, no map, nothing of the checkpoint resident
beyond the buffers in use. Each thread may keep one buffer it reuses (`scratch=True`), so the
anonymous pages are faulted in once, not for every expert. Reads release the GIL, so worker
threads read while others compute."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from nemocompile.base.errors import CheckpointError
from nemocompile.graph.checkpoint import Checkpoint
from nemocompile.runtime.dtypes import SAFETENSORS_TORCH_DTYPES

_SCRATCH_GRANULE = 1 << 20  # scratch buffers grow in whole MiB, so near sizes share one


class CheckpointReader:
    """Reads a checkpoint's tensors into buffers; one file descriptor per file, shared by threads."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self._files: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def read(self, name: str, rows: slice | None = None, scratch: bool = False) -> torch.Tensor:
        """Tensor `name` with its stored dtype and shape, or only `rows` (a run along its first dim).
        `scratch`: into this thread's reusable buffer, valid until the thread's next scratch read
        (for a tensor converted and let go); else into a buffer of its own."""
        ref = self.checkpoint.ref(name)
        dtype = SAFETENSORS_TORCH_DTYPES.get(ref.dtype) if ref is not None else None
        if ref is None or dtype is None:  # unknown here: the checkpoint's own reader names the fault
            tensor = self.checkpoint.read(name)
            return tensor if rows is None else tensor[rows]
        path, offset, nbytes = self.checkpoint.location(name)
        shape = ref.shape
        if rows is not None:
            row_bytes = nbytes // shape[0] if shape[0] else 0
            start, stop, _ = rows.indices(shape[0])
            offset, nbytes, shape = offset + start * row_bytes, (stop - start) * row_bytes, (stop - start, *shape[1:])
        buffer = self._scratch(nbytes) if scratch else torch.empty(nbytes, dtype=torch.uint8)
        view = buffer.numpy().data.cast("B")[:nbytes]  # the buffer's bytes, writable, no copy
        done = 0
        descriptor = self._descriptor(path)
        while done < nbytes:
            try:
                count = os.preadv(descriptor, [view[done:]], offset + done)
            except OSError as error:
                raise CheckpointError(f"cannot read tensor {name} from {path}: {error.strerror or error}.") from error
            if count == 0:
                raise CheckpointError(f"{path} ended inside tensor {name}: it changed after the checkpoint was "
                                      "opened.")
            done += count
        return buffer[:nbytes].view(dtype).view(shape)

    def close(self) -> None:
        """Close the files (the scratch buffers go with their threads)."""
        with self._lock:
            for descriptor in self._files.values():
                os.close(descriptor)
            self._files.clear()

    def _descriptor(self, path: Path) -> int:
        with self._lock:
            descriptor = self._files.get(path)
            if descriptor is None:
                try:
                    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as error:
                    raise CheckpointError(f"cannot open checkpoint file {path}: {error.strerror or error}.") from error
                self._files[path] = descriptor
            return descriptor

    def _scratch(self, nbytes: int) -> torch.Tensor:
        buffer: torch.Tensor | None = getattr(self._local, "buffer", None)
        if buffer is None or buffer.numel() < nbytes:
            size = -(-max(nbytes, 1) // _SCRATCH_GRANULE) * _SCRATCH_GRANULE
            buffer = torch.empty(size, dtype=torch.uint8)
            self._local.buffer = buffer
        return buffer
