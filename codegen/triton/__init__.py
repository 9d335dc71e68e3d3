"""Triton code generation: kernel templates, their typed specs, emission into an engine and AOT compile."""
