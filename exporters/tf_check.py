"""The float check: the translated TensorFlow graph, node by node, against onnxruntime running
the ONNX graph itself on the same inputs, before anything is converted to INT8.
"""

from __future__ import annotations

import numpy as np
import onnx

from deploy_kit.errors import ExportError
from exporters.tf_graph import FAKE_QUANT, Graph, Node
from exporters.tf_lut import _tf
from exporters.tf_ops import run_node


FLOAT_ATOL = 1e-4
TIE_WINDOW = 1e-3  # codes: an input this close to a rounding tie may round either way


def onnxruntime_values(proto: onnx.ModelProto, x_nchw: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Every named intermediate, from onnxruntime with graph optimizations disabled (so the
    graph it runs is the ONNX graph itself, node for node)."""
    import onnxruntime as ort

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = [o.name for o in session.get_outputs()]
    return dict(zip(wanted, session.run(wanted, {session.get_inputs()[0].name: x_nchw.astype(np.float32)})))


def _as_nchw(v) -> np.ndarray:
    v = np.asarray(v)
    return v.transpose(0, 3, 1, 2) if v.ndim == 4 else v


def _fake_quant_mismatch(node: Node, x: np.ndarray, got: np.ndarray, want: np.ndarray) -> float:
    """Largest difference outside rounding ties: at an exact tie TF rounds half up and ONNX
    half to even, and TF derives its scale from (max−min)/255, one float ulp from s."""
    s = node.attrs["scale"]
    frac = np.abs(np.asarray(x, np.float64) / s - np.floor(np.asarray(x, np.float64) / s) - 0.5)
    diff = np.where(frac < TIE_WINDOW, 0.0, np.abs(got - want))
    return float(diff.max(initial=0.0))


def check_against_onnxruntime(proto: onnx.ModelProto, graph: Graph, x_nchw: np.ndarray) -> dict:
    """The float check, node by node with the *same inputs*: each TF op runs on onnxruntime's
    values of its ONNX inputs and must reproduce onnxruntime's outputs within FLOAT_ATOL.

    Why node by node rather than end to end: the graph is full of discontinuities on purpose
    (every Q/DQ rounds, every LUT `Less` jumps several codes). Conv sums in a different order in
    TF and ORT (~1e-6), so end to end, an activation sitting next to a rounding tie or a LUT
    threshold flips by a whole code in one runtime and not the other, and the flip grows through
    the layers — a VGG at 32×32 has ~10^5 activations per image. Fed identical inputs, every op is
    continuous or exact (Less/Where compare identical floats), so a 1e-4 bound is meaningful,
    and a failure names the node where TF and ORT part ways."""
    in_onnx = {o for n in proto.graph.node for o in n.output}
    names = [o for n in graph.nodes for o in n.outputs if o in in_onnx]
    ref = onnxruntime_values(proto, x_nchw, names)
    ref[graph.input_name] = x_nchw
    worst = {"node": None, "max_abs_diff": 0.0, "nodes": len(graph.nodes), "images": int(len(x_nchw))}
    for node in graph.nodes:
        inputs = [graph.constants[i] if i in graph.constants else (None if i == "" else _tf_input(ref[i]))
                  for i in node.inputs]
        outputs = run_node(node, inputs)
        for name, got in zip(node.outputs, outputs):
            if name not in ref:  # a node of ours (a rescaled LUT input): its consumers are checked
                ref[name] = _as_nchw(got)
                continue
            got, want = _as_nchw(got), ref[name]
            if got.shape != want.shape:
                raise ExportError(f"float check: node {node.name} ({node.op}) gives shape {list(got.shape)} in TF, "
                                  f"{list(want.shape)} in onnxruntime")
            if node.op == FAKE_QUANT:
                diff = _fake_quant_mismatch(node, ref[node.inputs[0]], got, want)
            else:
                diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max(initial=0.0))
            if diff > worst["max_abs_diff"]:
                worst.update(node=node.name, max_abs_diff=diff)
            if diff > FLOAT_ATOL:
                raise ExportError(f"float check: node {node.name} ({node.op}) differs from onnxruntime by {diff:.3g} "
                                  f"(max {FLOAT_ATOL}) on the same inputs; the translation of {node.op} is wrong")
    return worst


def _tf_input(v: np.ndarray):
    tf = _tf()
    return tf.constant(v.transpose(0, 2, 3, 1) if v.ndim == 4 else v)
