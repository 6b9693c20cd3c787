"""The op table of the ONNX → TensorFlow translator: each ONNX op (and our fused `FakeQuant` and
`LUT` nodes) is one plain function in `OPS`, `fn(node, inputs) -> outputs` (tinygrad `nn/onnx.py`
style), inputs being TF tensors or numpy constants; then running a `Graph` as a tf.Module.
Layout conventions: exporters/onnx_to_tf.py.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

from deploy_kit.errors import ExportError
from exporters.tf_graph import FAKE_QUANT, LUT_NODE, Graph, Node
from exporters.tf_lut import LOWERINGS, _tf


def _is_const(v) -> bool:
    return isinstance(v, (np.ndarray, np.generic))


def _rank(v) -> int:
    return np.ndim(v) if _is_const(v) else v.shape.rank


def _to_nchw(x):
    return _tf().transpose(x, [0, 3, 1, 2]) if _rank(x) == 4 else x


def _to_nhwc(x):
    return _tf().transpose(x, [0, 2, 3, 1]) if _rank(x) == 4 else x


def _align(c: np.ndarray, other_rank: int) -> np.ndarray:
    """A constant broadcast against an NHWC activation: right-align to rank 4 (ONNX
    broadcasting), then move its channel axis last."""
    if other_rank != 4 or c.size == 1:
        return c
    c = c.reshape((1,) * (4 - c.ndim) + c.shape)
    return np.ascontiguousarray(c.transpose(0, 2, 3, 1))


def _binary(fn: Callable) -> Callable:
    def op(node: Node, inputs: list):
        a, b = inputs[:2]
        rank = max(_rank(a), _rank(b))
        a = _align(a, rank) if _is_const(a) else a
        b = _align(b, rank) if _is_const(b) else b
        return [fn(a, b)]
    return op


def _pads(node: Node, x, kernel: tuple[int, int], strides: tuple[int, int]):
    """ONNX explicit pads → TF padding: VALID, SAME when it places the pads identically,
    else an explicit [[0,0],[t,b],[l,r],[0,0]] list."""
    auto = node.attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", "VALID"):
        raise ExportError(f"node {node.name} ({node.op}): auto_pad={auto} is not supported; export with explicit pads")
    top, left, bottom, right = node.attrs.get("pads", [0, 0, 0, 0])
    if (top, left, bottom, right) == (0, 0, 0, 0):
        return "VALID"
    size = x.shape[1:3]
    same = []
    for n, k, s in zip(size, kernel, strides):
        total = max((-(-n // s) - 1) * s + k - n, 0) if n is not None else -1
        same.append((total // 2, total - total // 2))
    if same == [(top, bottom), (left, right)]:
        return "SAME"
    return [[0, 0], [top, bottom], [left, right], [0, 0]]


def _window(node: Node) -> tuple[tuple[int, int], tuple[int, int]]:
    if any(d != 1 for d in node.attrs.get("dilations", [1, 1])):
        raise ExportError(f"node {node.name} ({node.op}): dilations {node.attrs['dilations']} are not supported")
    kernel = tuple(node.attrs["kernel_shape"]) if "kernel_shape" in node.attrs else None
    return kernel, tuple(node.attrs.get("strides", [1, 1]))


def _weight(node: Node, w: np.ndarray, depthwise: bool = False):
    """Int8 weights (channel axis last) behind a per-channel fake quant with our scales, so the
    converter keeps our per-channel scale instead of re-deriving max|w|/127 (which differs
    wherever a channel's largest code is below 127)."""
    tf = _tf()
    scale = node.attrs.get("weight_scale")
    if scale is None:
        return w
    # narrow: −127..127 (deploykit's codes); else the full −128..127 (an imported fbgemm checkpoint)
    narrow = node.attrs.get("weight_narrow", True)
    lo = (-127 if narrow else -128) * scale

    def pin(v):
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(v, lo, 127 * scale, num_bits=8,
                                                                        narrow_range=narrow)
    if depthwise:  # [kh, kw, C, m]: channels are C·m, fake-quant them on the last axis
        kh, kw, c, m = w.shape
        return tf.reshape(pin(w.reshape(kh, kw, 1, c * m)), w.shape)
    return pin(w)


def conv(node: Node, inputs: list):
    tf = _tf()
    x, w = inputs[0], inputs[1]
    if not _is_const(w):
        raise ExportError(f"node {node.name} (Conv): expected constant weights, found a computed tensor")
    _, strides = _window(node)
    kernel = w.shape[2:]
    padding = _pads(node, x, kernel, strides)
    group, cin = node.attrs.get("group", 1), x.shape[-1]
    if group == 1:
        y = tf.nn.conv2d(x, _weight(node, w.transpose(2, 3, 1, 0)), [1, *strides, 1], padding)
    elif group == cin and w.shape[1] == 1:
        # depthwise: ONNX [C·m, 1, kh, kw] → TF [kh, kw, C, m]
        dw = w.reshape(cin, w.shape[0] // cin, *kernel).transpose(2, 3, 0, 1)
        if isinstance(padding, list):  # depthwise_conv2d takes no explicit pads
            x, padding = tf.pad(x, padding), "VALID"
        y = tf.nn.depthwise_conv2d(x, _weight(node, dw, depthwise=True), [1, *strides, 1], padding)
    else:
        raise ExportError(f"node {node.name} (Conv): group={group} with {cin} input channels is not supported "
                          "(only group=1 and depthwise)")
    return [tf.nn.bias_add(y, inputs[2]) if len(inputs) > 2 and inputs[2] is not None else y]


def gemm(node: Node, inputs: list):
    tf = _tf()
    a, b = inputs[0], inputs[1]
    if node.attrs.get("transA", 0):
        raise ExportError(f"node {node.name} (Gemm): transA=1 is not supported")
    b = b.T if node.attrs.get("transB", 0) and _is_const(b) else b
    alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)
    if not _is_const(b):
        raise ExportError(f"node {node.name} (Gemm): expected constant weights, found a computed tensor")
    # Weights stay plain here: TFLite stores FULLY_CONNECTED weights as [out, in], and a
    # per-channel fake quant on TF's [in, out] makes the converter fail on the transpose's axis.
    y = tf.matmul(a, (alpha * b).astype(np.float32))
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + (beta * inputs[2]).astype(np.float32)
    return [y]


def matmul(node: Node, inputs: list):
    return [_tf().matmul(inputs[0], inputs[1])]


def max_pool(node: Node, inputs: list):
    return [_pool(node, inputs[0], _tf().nn.max_pool2d)]


def average_pool(node: Node, inputs: list):
    if node.attrs.get("pads", [0] * 4) != [0] * 4 and not node.attrs.get("count_include_pad", 0):
        raise ExportError(f"node {node.name} (AveragePool): padded average pooling is not supported")
    return [_pool(node, inputs[0], _tf().nn.avg_pool2d)]


def _pool(node: Node, x, fn):
    if node.attrs.get("ceil_mode", 0):
        raise ExportError(f"node {node.name} ({node.op}): ceil_mode=1 is not supported")
    kernel, strides = _window(node)
    padding = _pads(node, x, kernel, strides)
    if isinstance(padding, list) and node.op == "MaxPool":
        # Every zoo max pool reads a ReLU'd or LUT'd tensor (values >= 0), so zero padding (the
        # zero point, in int8) never wins a max: the same as ONNX's -inf padding (NiN: 3×3/2, pad 1).
        x, padding = _tf().pad(x, padding), "VALID"
    if isinstance(padding, list):
        raise ExportError(f"node {node.name} ({node.op}): pads {node.attrs['pads']} are not supported")
    return fn(x, kernel, strides, padding)


def global_average_pool(node: Node, inputs: list):
    return [_tf().reduce_mean(inputs[0], axis=[1, 2], keepdims=True)]


def flatten(node: Node, inputs: list):
    tf = _tf()
    axis = node.attrs.get("axis", 1)
    if axis != 1:
        raise ExportError(f"node {node.name} (Flatten): axis={axis} is not supported (only 1)")
    x = _to_nchw(inputs[0])  # flatten in ONNX's (C, H, W) order
    return [tf.reshape(x, [-1, int(np.prod(x.shape[1:]))])]


def reshape(node: Node, inputs: list):
    tf = _tf()
    x, shape = _to_nchw(inputs[0]), inputs[1]
    if not _is_const(shape):
        raise ExportError(f"node {node.name} (Reshape): expected a constant shape, found a computed one")
    shape = [int(d) if d != 0 else (-1 if i == 0 else int(x.shape[i])) for i, d in enumerate(shape)]
    return [_to_nhwc(tf.reshape(x, shape))]


def relu(node: Node, inputs: list):
    return [_tf().nn.relu(inputs[0])]


def clip(node: Node, inputs: list):
    lo = inputs[1] if len(inputs) > 1 and inputs[1] is not None else node.attrs.get("min", -np.inf)
    hi = inputs[2] if len(inputs) > 2 and inputs[2] is not None else node.attrs.get("max", np.inf)
    tf, x = _tf(), inputs[0]
    if np.isfinite(lo):
        x = tf.maximum(x, np.float32(lo))
    if np.isfinite(hi):
        x = tf.minimum(x, np.float32(hi))
    return [x]


def where(node: Node, inputs: list):
    tf = _tf()
    cond, a, b = inputs
    rank = max(_rank(v) for v in inputs)
    a, b = (_align(v, rank).astype(np.float32) if _is_const(v) else v for v in (a, b))
    return [tf.where(cond, a, b)]


def fake_quant(node: Node, inputs: list):
    """min/max span all 256 levels of the code type, so the converter's scale is exactly s and
    its zero point z (shifted to int8). A reduced range (qmin/qmax inside the type's, fbgemm's
    0..127) is a separate clamp on the grid after it, never a narrower min/max: that would
    spread 256 levels over it and change the scale (DESIGN.md §5)."""
    a, tf = node.attrs, _tf()
    s, z = a["scale"], a["zero_point"]
    full_lo, full_hi = (0, 255) if a["qmin"] >= 0 else (-128, 127)
    y = tf.quantization.fake_quant_with_min_max_vars(inputs[0], np.float32(s * (full_lo - z)),
                                                     np.float32(s * (full_hi - z)), num_bits=8)
    if a["qmax"] < full_hi:
        y = tf.minimum(y, np.float32(s * (a["qmax"] - z)))
    if a["qmin"] > full_lo:
        y = tf.maximum(y, np.float32(s * (a["qmin"] - z)))
    return [y]


def lut(node: Node, inputs: list):
    a = node.attrs
    return [LOWERINGS[a["form"]](inputs[0], a["lut"], a["quant"])]


def identity(node: Node, inputs: list):
    return [inputs[0]]


def _tf_binary(name: str) -> Callable:
    return _binary(lambda a, b: getattr(_tf().math, name)(a, b))


OPS: dict[str, Callable] = {
    "Conv": conv, "Gemm": gemm, "MatMul": matmul, "Add": _tf_binary("add"), "Sub": _tf_binary("subtract"),
    "Mul": _tf_binary("multiply"), "Div": _tf_binary("divide"), "Relu": relu, "Clip": clip,
    "MaxPool": max_pool, "AveragePool": average_pool, "GlobalAveragePool": global_average_pool,
    "Flatten": flatten, "Reshape": reshape, "Less": _tf_binary("less"), "Where": where,
    "Identity": identity, "Dropout": identity, FAKE_QUANT: fake_quant, LUT_NODE: lut,
}


def check_supported(graph: Graph) -> None:
    for node in graph.nodes:
        if node.op not in OPS:
            raise ExportError(f"ONNX op {node.op} (node {node.name!r}) is not supported by the TFLite translator; "
                              f"supported: {', '.join(sorted(o for o in OPS if o not in (FAKE_QUANT, LUT_NODE)))}")


# ----------------------------------------------------------------------------- running

_TF_NAME = re.compile(r"[^A-Za-z0-9_.\-/]")


def tf_scope(onnx_name: str) -> str:
    """A TF name scope from an ONNX node name (`conv1/lut/Less_t1` stays readable in the
    .tflite tensor names, which is how runners find each layer's LUT)."""
    name = _TF_NAME.sub("_", onnx_name.strip("/")) or "node"
    return name if name[0].isalnum() else f"n{name}"


def run_node(node: Node, inputs: list) -> list:
    tf = _tf()
    try:
        with tf.name_scope(tf_scope(node.name)):
            return OPS[node.op](node, inputs)
    except ExportError:
        raise
    except (ValueError, TypeError, tf.errors.OpError) as exc:
        raise ExportError(f"node {node.name} ({node.op}) failed to translate: {str(exc).splitlines()[0][:200]}") from None


def run(graph: Graph, x_nhwc, keep: bool = False) -> dict:
    """Evaluate the graph on an NHWC input (eagerly or while tracing); returns the outputs, or
    every value when `keep`."""
    check_supported(graph)
    values: dict = {graph.input_name: x_nhwc, "": None}
    for node in graph.nodes:
        inputs = [values[i] if i in values else graph.constants[i] for i in node.inputs]
        values.update(zip(node.outputs, run_node(node, inputs)))
    return values if keep else {n: values[n] for n in graph.output_names}


def tf_module(graph: Graph, batch: int | None = None):
    """A tf.Module whose `serve` is the traced graph: NHWC float input → {output name: tensor}.
    The batch dimension stays dynamic (shape_signature −1): LiteRT resizes it, and the
    manifest says "batch", as for ONNX.
    The module is the converter's `trackable_obj` (it owns the function)."""
    tf = _tf()
    shape = (batch, *graph.nhwc_input_shape()[1:])
    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name=tf_scope(graph.input_name))], autograph=False)
    def serve(x):
        out = run(graph, x)
        return {tf_scope(name): out[name] for name in graph.output_names}

    module.serve = serve
    return module
