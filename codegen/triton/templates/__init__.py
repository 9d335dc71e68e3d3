"""Kernel templates: Triton functions specialised by constexpr parameters (docs/triton-codegen.md).

Each file here imports only `triton` and sibling templates (relatively), because it is copied
verbatim into an engine's kernels/ folder and imported from there by the runtime."""
