"""nemocompile: compile Nemotron-H checkpoints into engines for a named NVIDIA GPU, and run them.

    import nemocompile
    nemocompile.build("path/to/checkpoint", "engine", target="h100")
    engine = nemocompile.load("engine")
    ids = engine.generate([[1, 2, 3]], max_new_tokens=16)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import build, load

__all__ = ["__version__", "build", "load"]


def __getattr__(name: str) -> Any:
    # torch is imported only when the API is used, so `nemocompile --help` starts fast.
    if name in ("build", "load"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'nemocompile' has no attribute {name!r}")
