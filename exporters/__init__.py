"""Export targets for deploykit: one module per target behind one registry (`exporters.registry`).

`onnx_graph` builds the teacher's QDQ ONNX graph and rewrites its activations into LUTs; that
`model.onnx` is the source every other target (`ort`, `tflite`) converts.
"""

from exporters.registry import TARGETS, Target

__all__ = ["TARGETS", "Target"]
