"""GPU targets: one data file per GPU (`data/<name>.json`) and the typed `Target` it loads into."""

from __future__ import annotations

from .loader import known_targets, load_target, load_target_file
from .model import Target

__all__ = ["Target", "known_targets", "load_target", "load_target_file"]
