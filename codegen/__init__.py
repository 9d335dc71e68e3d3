"""Code generators: Triton and CUTLASS kernel sources and the ONNX/TensorRT export, filled in from
templates. Codegen reads the IR, the format registry and the targets; it never imports the runtime,
which loads what codegen wrote through the engine manifest."""
