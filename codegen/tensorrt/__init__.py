"""The ONNX export for TensorRT (export.py), its plugin ops (plugins.py) and the TensorRT engine
build where TensorRT is installed (engine_build.py)."""
