"""A small ONNX → TensorFlow translator for the ops the zoo's QDQ/LUT graphs hold, in four parts:

    tf_graph   reading the ONNX graph and fusing it (constants, FakeQuant, LUT nodes, pools)
    tf_ops     the op table (`OPS`) and running a graph in TensorFlow
    tf_lut     the LUT lowerings (`LOWERINGS`: select, minmax, saturate) and their plans
    tf_check   the float check against onnxruntime

This module is their one front door: exporters/tflite.py, the tests and
benchmarks/tflite_lut_forms.py import the names below from here.

Why our own: onnx2tf miscompiles a broadcast `Where` LUT to INT8 without an error (DESIGN.md §5),
and the graphs here use a dozen ops. Each ONNX op is one plain function in `OPS`
(tinygrad `nn/onnx.py` style): `fn(node, inputs) -> outputs`, inputs being TF tensors or numpy
constants. An op not in `OPS` is an `ExportError` naming the op and the node.

Conventions, fixed once:
- Layout. Every rank-4 activation is NHWC (TFLite's layout); the model input is NHWC. Ops with
  spatial semantics (Conv, pools) work on NHWC; Flatten/Reshape of a rank-4 tensor go back to
  NCHW first, so flattened features come in ONNX's order and Gemm weights stay as they are.
- Constants. Initializers, `Constant` nodes, and every node whose inputs are all constants and
  whose op is in `FOLDABLE` (the DequantizeLinear of int8 weights / int32 biases) are folded to
  numpy once. TF then sees float weights on our grid, which the TFLite converter requantizes
  per channel as max|w|/127 — our scale, because our codes are symmetric −127..127.
- Activation Q/DQ. A QuantizeLinear(s, z) whose every consumer is a DequantizeLinear(s, z)
  becomes one `FakeQuant` node: `fake_quant_with_min_max_vars(x, s·(qmin−z), s·(qmax−z))`. That
  fixes the range in the graph, so the converter gives the tensor exactly scale s and zero point
  z−128 and TFLite's int8 codes are the teacher's codes (DESIGN.md §5).
- LUTs. Each layer's Less/Where chain is recognised once (`Graph.luts`: its codes and grid) and
  replaced by one `LUT` node, lowered per `lut_form` (`LOWERINGS`): `select` is the chain's own
  ops (LESS + SELECT_V2), the branch-free forms clamps (docs/RUNTIMES.md has the measurements).
  The form is chosen per layer (`Graph.lut_forms`): a `saturate` layer without a plan, or one
  the exporter names in `select_layers` (its plan failed the code check), is lowered with `select`.
  A LUT followed by a MaxPool runs after the pool instead (exact, since the LUT is monotone):
  deploykit's model.onnx already places it there (onnx_graph's rewrite), `_pool_before_lut`
  moves it in graphs that do not; `lut_pools` says which layers run on a pooled tensor.
"""

from exporters.tf_check import FLOAT_ATOL, TIE_WINDOW, check_against_onnxruntime, onnxruntime_values
from exporters.tf_graph import (FAKE_QUANT, LUT_NODE, LUT_SCOPE, POOLED, Graph, LutChain, Node, find_luts,
                                layer_forms, lut_pools, pool_window, read_graph)
from exporters.tf_lut import (DEFAULT_LUT_FORM, FALLBACK, LESS_MIN_SCALE, LOWERINGS, LUT_FORMS, lut_steps,
                              saturate_ops, saturate_plan)
from exporters.tf_ops import OPS, check_supported, run, run_node, tf_module, tf_scope

__all__ = ["DEFAULT_LUT_FORM", "FAKE_QUANT", "FALLBACK", "FLOAT_ATOL", "LESS_MIN_SCALE", "LOWERINGS", "LUT_FORMS",
           "LUT_NODE", "LUT_SCOPE", "OPS", "POOLED", "TIE_WINDOW", "Graph", "LutChain", "Node",
           "check_against_onnxruntime", "check_supported", "find_luts", "layer_forms", "lut_pools", "lut_steps",
           "onnxruntime_values", "pool_window", "read_graph", "run", "run_node", "saturate_ops", "saturate_plan",
           "tf_module", "tf_scope"]
