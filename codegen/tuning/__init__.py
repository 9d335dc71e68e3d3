"""Kernel tuning below the driver: config spaces per template and their pruning by target limits
(`space`), a tile-aware roofline cost model (`cost_model`), and the versioned SQLite tuning
database (`db`). Timing kernels needs the runtime, so the `tune` command itself lives in the driver
(nemocompile/tune.py)."""
