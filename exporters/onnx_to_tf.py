"""A small ONNX → TensorFlow translator for the ops the zoo's QDQ/LUT graphs hold.

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

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from deploy_kit.errors import ExportError
from deploy_kit.lut import ActivationQuant, LayerLUT

FAKE_QUANT = "FakeQuant"  # our fused activation Q→DQ pair (not an ONNX op)
LUT_NODE = "LUT"  # one layer's whole Less/Where chain, in a branch-free form (not an ONNX op)
# How a LUT becomes TFLite ops. `select`: LESS + SELECT_V2 ×3, the ONNX graph op for op (DESIGN
# §2). `minmax`: s·[q > t] = min(max(x, a), a + s) − a with a = s·(t − z), weighted and summed —
# MAXIMUM/MINIMUM/SUB/MUL/ADD. `saturate`: a few terms whose clamps int8 saturation does for free
# (`saturate_plan`), SUB/MUL/ADD/LEAKY_RELU: every op XNNPACK takes in int8.
LUT_FORMS = ("select", "minmax", "saturate")
# The default is the fastest form that is proven exact on all 256 codes at export (DESIGN §4b):
# `saturate` runs whole in XNNPACK. A layer where it cannot be proven falls back to FALLBACK's form.
DEFAULT_LUT_FORM = "saturate"
FALLBACK = {"saturate": "select"}  # form → the form its unprovable layers get (select always holds)
FOLDABLE = {"DequantizeLinear", "Identity"}
QRANGE = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}


@dataclass(frozen=True)
class Node:
    """One node of the translated graph: an ONNX node, or a fused activation Q/DQ pair."""

    op: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class Graph:
    """The ONNX graph reduced to what TF needs: folded constants and nodes in topological order."""

    nodes: list[Node]
    constants: dict[str, np.ndarray]
    input_name: str
    input_shape: tuple  # NCHW as in ONNX, batch dim may be None
    output_names: list[str]
    luts: dict[str, tuple[LayerLUT, ActivationQuant]] = field(default_factory=dict)  # layer → codes, grid
    lut_forms: dict[str, str] = field(default_factory=dict)  # layer → the form it is lowered with
    fallbacks: dict[str, str] = field(default_factory=dict)  # layer → why it did not get the asked form

    def nhwc_input_shape(self) -> tuple:
        s = self.input_shape
        return (s[0], s[2], s[3], s[1]) if len(s) == 4 else tuple(s)


# ----------------------------------------------------------------------------- reading ONNX

def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int = 1) -> np.ndarray:
    """DequantizeLinear on constants (per tensor, or per channel along `axis`)."""
    scale, zero = np.asarray(scale, np.float32), np.asarray(zero)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * codes.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (scale * (codes.astype(np.float32) - zero.astype(np.float32))).astype(np.float32)


def _fold(op: str, values: list[np.ndarray], attrs: dict) -> np.ndarray:
    if op == "Identity":
        return values[0]
    zero = values[2] if len(values) > 2 else np.zeros((), values[0].dtype)
    return _dequantize(values[0], values[1], zero, attrs.get("axis", 1))


def _symmetric_int8(node: onnx.NodeProto, constants: dict) -> bool:
    """A DequantizeLinear of int8 codes with zero point 0: weights whose scales a fake quant can
    pin for the converter (narrow −127..127 for deploykit's, full −128..127 for an imported
    fbgemm checkpoint's: `_weight`)."""
    if node.op_type != "DequantizeLinear" or constants[node.input[0]].dtype != np.int8:
        return False
    zero = constants[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros(1)
    return not np.any(zero)


def _static_shape(value_info) -> tuple:
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim)


def read_graph(proto: onnx.ModelProto, lut_form: str = DEFAULT_LUT_FORM,
               select_layers: frozenset[str] = frozenset()) -> Graph:
    """Fold constants, fuse activation Q/DQ pairs, recognise the LUTs (lowered per `lut_form`,
    except `select_layers` and layers without a plan in that form: see `layer_forms`); keep the
    other nodes in graph order."""
    if lut_form not in LUT_FORMS:
        raise ExportError(f"lut_form must be one of {', '.join(LUT_FORMS)}, got {lut_form!r}")
    g = proto.graph
    constants = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    weight_scales: dict[str, np.ndarray] = {}
    nodes: list[Node] = []
    for n in g.node:
        attrs = _attrs(n)
        if n.op_type == "Constant":
            constants[n.output[0]] = numpy_helper.to_array(attrs["value"])
        elif n.op_type in FOLDABLE and n.input and all(i in constants for i in n.input if i):
            constants[n.output[0]] = _fold(n.op_type, [constants[i] for i in n.input if i], attrs)
            if _symmetric_int8(n, constants):
                narrow = int(constants[n.input[0]].min(initial=0)) >= -127
                weight_scales[n.output[0]] = (np.atleast_1d(constants[n.input[1]]).astype(np.float32), narrow)
        else:
            if n.op_type in ("Conv", "Gemm") and len(n.input) > 1 and n.input[1] in weight_scales:
                attrs["weight_scale"], attrs["weight_narrow"] = weight_scales[n.input[1]]
            nodes.append(Node(n.op_type, n.name or n.output[0], tuple(n.input), tuple(n.output), attrs))
    inputs = [v for v in g.input if v.name not in constants]
    if len(inputs) != 1:
        raise ExportError(f"expected one graph input, found {[v.name for v in inputs]}")
    nodes = _fuse_fake_quant(_absorb_code_clips(nodes, constants), constants, {o.name for o in g.output})
    luts = find_luts(nodes, constants)
    forms, fallbacks = layer_forms(luts, lut_form, select_layers)
    nodes = _pool_before_lut(_lower_luts(nodes, luts, forms))
    return Graph(nodes, constants, inputs[0].name, _static_shape(inputs[0]), [o.name for o in g.output],
                 {layer: (spec.lut, spec.quant) for layer, spec in luts.items()}, forms, fallbacks)


def _qparams(node: Node, constants: dict) -> tuple[float, int, np.dtype]:
    missing = [i for i in node.inputs[1:3] if i not in constants]
    if len(node.inputs) < 3 or missing:
        raise ExportError(f"node {node.name} ({node.op}): expected constant scale and zero point, "
                          f"found inputs {list(node.inputs)}")
    scale, zero = constants[node.inputs[1]], constants[node.inputs[2]]
    if scale.size != 1:
        raise ExportError(f"node {node.name} ({node.op}): an activation needs a per-tensor scale, found {scale.size} scales")
    return float(scale.reshape(())), int(zero.reshape(())), zero.dtype


def _absorb_code_clips(nodes: list[Node], constants: dict) -> list[Node]:
    """Q → Clip(codes) → DQ, torch's form of a reduced range (fbgemm: codes 0..127), becomes
    Q → DQ with the range recorded on the Q (`code_range`), so it fuses into one FakeQuant."""
    producer = {o: n for n in nodes for o in n.outputs}
    renamed, kept = {}, []
    for n in nodes:
        src = producer.get(n.inputs[0]) if n.op == "Clip" and n.inputs else None
        if src is None or src.op != "QuantizeLinear" or not all(i in constants for i in n.inputs[1:3] if i):
            kept.append(n)
            continue
        bound = [int(constants[i].reshape(())) if i else None for i in (list(n.inputs[1:3]) + ["", ""])[:2]]
        src.attrs["code_range"] = tuple(bound)
        renamed[n.outputs[0]] = n.inputs[0]
    return [Node(n.op, n.name, tuple(renamed.get(i, i) for i in n.inputs), n.outputs, n.attrs) for n in kept]


def _fuse_fake_quant(nodes: list[Node], constants: dict, graph_outputs: set[str]) -> list[Node]:
    """Each activation Q(s,z) → DQ(s,z) becomes one FakeQuant node named after the Q."""
    consumers: dict[str, list[Node]] = {}
    for n in nodes:
        for i in n.inputs:
            consumers.setdefault(i, []).append(n)
    fused, dropped = [], set()
    for n in nodes:
        if n.op == "DequantizeLinear" and n.name in dropped:
            continue
        if n.op != "QuantizeLinear":
            fused.append(n)
            continue
        s, z, dtype = _qparams(n, constants)
        users = consumers.get(n.outputs[0], [])
        if n.outputs[0] in graph_outputs or not users or any(u.op != "DequantizeLinear" for u in users):
            raise ExportError(f"node {n.name} (QuantizeLinear): expected every consumer to be a DequantizeLinear, "
                              f"found {[u.op for u in users] or 'a graph output'}; quantized codes cannot leave the graph")
        for u in users:
            if _qparams(u, constants)[:2] != (s, z):
                raise ExportError(f"node {u.name} (DequantizeLinear): expected the scale/zero point of {n.name} "
                                  f"({s}, {z}), found {_qparams(u, constants)[:2]}")
        if dtype not in QRANGE:
            raise ExportError(f"node {n.name} (QuantizeLinear): expected uint8 or int8 codes, found {dtype}")
        qmin, qmax = QRANGE[dtype]
        lo, hi = n.attrs.get("code_range", (None, None))
        qmin, qmax = max(qmin, lo if lo is not None else qmin), min(qmax, hi if hi is not None else qmax)
        for u in users:
            dropped.add(u.name)
            fused.append(Node(FAKE_QUANT, n.name, (n.inputs[0],), u.outputs,
                              {"scale": s, "zero_point": z, "qmin": qmin, "qmax": qmax}))
    return fused


# ----------------------------------------------------------------------------- the LUTs

LUT_SCOPE = "/lut/"  # onnx_graph names every LUT node `<layer>/lut/...`


@dataclass(frozen=True)
class LutChain:
    """One layer's Less/Where chain as read from the graph: its nodes, its input x and output
    y, and the codes it implements on the grid of the FakeQuant that produces x."""

    layer: str
    nodes: tuple[Node, ...]
    x: str
    y: str
    lut: LayerLUT
    quant: ActivationQuant


def find_luts(nodes: list[Node], constants: dict) -> dict[str, LutChain]:
    """Every `<layer>/lut/` Less/Where chain, with its codes read back from the constants."""
    by_layer: dict[str, list[Node]] = {}
    for n in nodes:
        if n.op in ("Less", "Where") and LUT_SCOPE in n.name:
            by_layer.setdefault(n.name.split(LUT_SCOPE)[0], []).append(n)
    producers = {o: n for n in nodes for o in n.outputs}
    return {layer: _read_chain(layer, group, producers, constants) for layer, group in by_layer.items()}


def _read_chain(layer: str, group: list[Node], producers: dict, constants: dict) -> LutChain:
    """Where(x<t1, v0, Where(x<t2, v1, Where(x<tmax, v2, x))): walk it from x outwards."""
    less = {n.outputs[0]: n for n in group if n.op == "Less"}
    where = [n for n in group if n.op == "Where"]
    xs = {n.inputs[0] for n in less.values()}
    src = producers.get(next(iter(xs))) if len(xs) == 1 else None
    if len(less) != 3 or len(where) != 3 or src is None or src.op != FAKE_QUANT:
        raise ExportError(f"layer {layer}: expected a LUT of 3 Less + 3 Where on one quantized input, found "
                          f"{len(less)} Less, {len(where)} Where on {sorted(xs)}")
    s, z = src.attrs["scale"], src.attrs["zero_point"]
    x, y, steps = next(iter(xs)), next(iter(xs)), []
    for _ in range(3):  # innermost (tmax) first
        node = next((n for n in where if n.inputs[2] == y and n.inputs[0] in less), None)
        if node is None or less[node.inputs[0]].inputs[1] not in constants or node.inputs[1] not in constants:
            raise ExportError(f"layer {layer}: the LUT's Where nodes do not form one chain from {x}")
        threshold = float(constants[less[node.inputs[0]].inputs[1]].reshape(()))
        level = float(constants[node.inputs[1]].reshape(()))
        steps.append((round(threshold / s + z - 0.5), round(level / s + z)))
        y = node.outputs[0]
    (tmax, v2), (t2, v1), (t1, v0) = steps
    if v0 != z:
        raise ExportError(f"layer {layer}: the LUT maps codes <= t1 to code {v0}, expected the zero point {z}")
    return LutChain(layer, tuple(group), x, y, LayerLUT(t1, v1, t2, v2, tmax),
                    ActivationQuant(s, z, src.attrs["qmin"], src.attrs["qmax"]))


def layer_forms(luts: dict[str, LutChain], form: str, select_layers: frozenset[str]) -> tuple[dict, dict]:
    """({layer: form}, {layer: why it fell back}). Where `form` has a FALLBACK, a layer in
    `select_layers` or one whose plan cannot be built (saturate_plan raises) gets the fallback
    form instead of failing the export; a form without one raises at translation as before."""
    forms, why = {}, {}
    for layer, chain in luts.items():
        forms[layer] = form
        if form not in FALLBACK:
            continue
        if layer in select_layers:
            forms[layer], why[layer] = FALLBACK[form], "its plan failed the 256-code check"
            continue
        try:
            saturate_plan(chain.lut, chain.quant)
        except ExportError as exc:
            forms[layer], why[layer] = FALLBACK[form], f"no {form} plan: {exc}"
    return forms, why


def _lower_luts(nodes: list[Node], luts: dict[str, LutChain], forms: dict[str, str]) -> list[Node]:
    """Each chain → one LUT node (where its first node was: it reads only x and constants),
    lowered in its layer's form."""
    first = {chain.nodes[0].name: chain for chain in luts.values()}
    dropped = {n.name for chain in luts.values() for n in chain.nodes}
    out = []
    for n in nodes:
        if n.name in first:
            c = first[n.name]
            form = forms[c.layer]
            out.append(Node(LUT_NODE, f"{c.layer}{LUT_SCOPE}{form}", (c.x,), (c.y,),
                            {"form": form, "lut": c.lut, "quant": c.quant}))
        elif n.name not in dropped:
            out.append(n)
    return out


POOLED = "/pooled"  # suffix of the tensors a pooled-first LUT adds (not in the ONNX graph)
POOL_KEYS = ("kernel_shape", "strides", "pads")


def pool_window(attrs: dict) -> dict:
    """A MaxPool's window as the manifest records it (`lut_pools`) and verify.max_pool_codes
    reads it, ONNX defaults filled in."""
    return {k: list(attrs.get(k, [1, 1] if k == "strides" else [0] * 4)) for k in POOL_KEYS}


def _grid(n: Node) -> tuple:
    return tuple(n.attrs[k] for k in ("scale", "zero_point", "qmin", "qmax"))


def _pool_before_lut(nodes: list[Node]) -> list[Node]:
    """LUT → FakeQuant → MaxPool → FakeQuant becomes MaxPool → FakeQuant → LUT → FakeQuant.

    Why: the LUT is monotone non-decreasing, so LUT(max(a, b)) = max(LUT(a), LUT(b)) — pooling
    first gives the same codes (DESIGN §2) and runs the LUT's elementwise ops on a quarter of
    the values after a 2×2 pool, where most of its cost is. Only where the three fake quants share
    one grid and each tensor in between has one consumer; the last fake quant keeps its ONNX
    output name, so the float check still compares the pair's result with onnxruntime.
    deploykit's own model.onnx already has its LUTs after their pools (onnx_graph's rewrite):
    this is for graphs that do not."""
    consumers: dict[str, list[Node]] = {}
    for n in nodes:
        for i in n.inputs:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in nodes for o in n.outputs}

    def sole(name: str, op: str) -> Node | None:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op == op else None

    moved: dict[int, list[Node]] = {}  # id(node) → what replaces it (FakeQuant names repeat)
    for lut in (n for n in nodes if n.op == LUT_NODE):
        src = producer.get(lut.inputs[0])
        post = sole(lut.outputs[0], FAKE_QUANT)
        pool = post and sole(post.outputs[0], "MaxPool")
        requant = pool and sole(pool.outputs[0], FAKE_QUANT)
        if not (requant and src is not None and src.op == FAKE_QUANT and _grid(src) == _grid(post) == _grid(requant)
                and lut.attrs["lut"].commutes_with_max(lut.attrs["quant"].zero_point)):
            continue
        pooled, on_grid, out = (t + POOLED for t in (pool.outputs[0], requant.outputs[0], lut.outputs[0]))
        moved[id(lut)] = [
            Node("MaxPool", pool.name, (lut.inputs[0],), (pooled,), pool.attrs),
            Node(FAKE_QUANT, requant.name + POOLED, (pooled,), (on_grid,), requant.attrs),
            Node(LUT_NODE, lut.name, (on_grid,), (out,), lut.attrs),
            Node(FAKE_QUANT, post.name, (out,), requant.outputs, post.attrs),
        ]
        moved.update({id(n): [] for n in (post, pool, requant)})
    return [m for n in nodes for m in moved.get(id(n), [n])]


def lut_pools(graph: Graph) -> dict[str, dict]:
    """{layer: its MaxPool window} for every LUT that runs on a pooled tensor, FakeQuant →
    MaxPool → FakeQuant (one grid) → LUT: moved there by onnx_graph's rewrite or by
    _pool_before_lut. A LUT's input is otherwise its block's own Conv/Gemm output, so this
    shape means the student's tap sits before the pool (verify pools the student's codes)."""
    producer = {o: n for n in graph.nodes for o in n.outputs}
    out = {}
    for lut in (n for n in graph.nodes if n.op == LUT_NODE):
        requant = producer.get(lut.inputs[0])
        pool = requant and requant.op == FAKE_QUANT and producer.get(requant.inputs[0])
        src = pool and pool.op == "MaxPool" and producer.get(pool.inputs[0])
        if src and src.op == FAKE_QUANT and _grid(src) == _grid(requant):
            out[lut.name.split(LUT_SCOPE)[0]] = pool_window(pool.attrs)
    return out


def lut_steps(lut: LayerLUT, quant: ActivationQuant) -> list[tuple[int, int]]:
    """The staircase as (threshold code t, height w in codes): LUT(q) = z + Σ w·[q > t] for
    q <= tmax, and q above. Zero heights (v2 = tmax) are dropped."""
    steps = [(lut.t1, lut.v1 - quant.zero_point), (lut.t2, lut.v2 - lut.v1), (lut.tmax, lut.tmax - lut.v2)]
    if steps[0][1] < 0:
        raise ExportError(f"v1={lut.v1} is below the zero point {quant.zero_point}: the staircase is not monotone, "
                          "so it has no branch-free form; export with --lut-form select")
    return [(t, w) for t, w in steps if w]


# ----------------------------------------------------------------------------- the op registry

def _tf():
    import tensorflow as tf

    return tf


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


def _fq(x, lo: float, hi: float):
    return _tf().quantization.fake_quant_with_min_max_vars(x, np.float32(lo), np.float32(hi), num_bits=8)


# TFLite's int8 LESS rescales each input by its own scale with only 8 fractional bits
# (kernels/comparisons.cc: left_shift = 8), i.e. it compares values rounded to 1/256 in real
# units. Rounding is monotone, so a half-code margin s/2 wider than one unit (s > 1/128) keeps
# every comparison exact; a LUT input finer than that is compared at scale s·k (k a power of
# two: exact in float and in int8, one MUL) against thresholds ×k. Measured on all 256 codes:
# s = 0.0031 and 0.006 missed codes at t1/t2/tmax; 0.0079..0.009 never did. 25% headroom.
LESS_MIN_SCALE = 1.25 / 128


def _select(x, lut: LayerLUT, quant: ActivationQuant):
    """The ONNX graph's chain, op for op: Where(x < t1', 0, Where(x < t2', v1, Where(x < tmax', v2,
    x))) with its half-code thresholds and on-grid values (DESIGN §2) — 3 LESS + 3 SELECT_V2."""
    tf, s, z = _tf(), quant.scale, quant.zero_point
    k = 2.0 ** max(0, int(np.ceil(np.log2(LESS_MIN_SCALE / s))))
    probe = x if k == 1 else _fq(x * np.float32(k), k * s * (quant.qmin - z), k * s * (quant.qmax - z))
    (t1, t2, tmax), (v0, v1, v2) = lut.thresholds(quant) * np.float32(k), lut.levels(quant).astype(np.float32)
    y = tf.where(tf.math.less(probe, tmax), v2, x)
    y = tf.where(tf.math.less(probe, t2), v1, y)
    return tf.where(tf.math.less(probe, t1), v0, y)


def _minmax(x, lut: LayerLUT, quant: ActivationQuant):
    """Every tensor on the layer's grid (scale s): MAXIMUM/MINIMUM keep their input's scale."""
    tf, s, z = _tf(), quant.scale, quant.zero_point
    lo, hi = s * (0 - z), s * (255 - z)

    def on_grid(v):
        return _fq(v, lo, hi)

    def above(t: int):  # s·[q > t] = min(max(x, a), a + s) − a
        a = np.float32(s * (t - z))
        return on_grid(on_grid(tf.minimum(on_grid(tf.maximum(x, a)), a + np.float32(s))) - a)

    a_max = np.float32(s * (lut.tmax - z))
    y = on_grid(on_grid(tf.maximum(x, a_max)) - a_max)  # the identity part, above tmax
    for t, w in lut_steps(lut, quant):
        y = on_grid(y + on_grid(above(t) * np.float32(w)))
    return y


# `saturate`: the staircase as a sum of a few terms, each one or two int8 ops XNNPACK takes, and
# each exact because it ends in a clamp that int8 saturation does for free. On codes q (grid s, z):
#   step(t, h)       h·[q > t]: SUB x − s·(t−z) into a tensor spanning [0, s], then MUL by h
#                    (one code of x already fills the tensor, so the step is sharp).
#   pair(a, b, M, T) M·[a < q <= b] + T·[q > b], for T <= 2M: SUB x − c into a tensor of scale
#                    (b−a)·s whose bottom code is 0 — codes count the thresholds passed, one per
#                    b−a codes of x, starting at a — then MUL by M saturating at T (two thresholds
#                    crossed, 2M, clamps to T). Two jumps for the price of one.
#   ramp(t)          max(q − t − 1, 0): SUB x − s·(t+1−z) into [0, 255·s]; the identity above tmax.
#   jump_ramp(t, h)  −h for q <= t, q − t − 1 above: SUB into a tensor whose bottom code is
#                    x = s·(t−z), then LEAKY_RELU with alpha h (h <= 128, XNNPACK's ratio limit).
#                    Its −h below t is added back to the first jump; what that leaves below t1
#                    is negative, and the final sum's own clamp at code 0 takes it to 0 — so
#                    only where the zero point is 0.
# Every op's input/output scale ratio stays within XNNPACK's int8 limits (ADD/SUB below 256).
SATURATE_OPS = {"step": 2, "pair": 2, "ramp": 1, "jump_ramp": 2}
LEAKY_RELU_MAX_ALPHA = 128


def _jumps(lut: LayerLUT, quant: ActivationQuant) -> tuple[list[tuple[int, int]], bool]:
    """The staircase as jumps (t, h): LUT(q) = z + Σ h·[q > t], plus the identity above tmax
    (the jump at tmax lands on tmax+1). Returns (jumps, whether an identity part exists)."""
    identity = lut.tmax < 255
    jumps = [(t, w) for t, w in lut_steps(lut, quant) if t != lut.tmax]
    if identity:
        jumps.append((lut.tmax, lut.tmax + 1 - lut.v2))
    return jumps, identity


def _pairings(jumps: list[tuple[int, int]]) -> list[list[tuple]]:
    """Every way to cover consecutive jumps with single steps and pairs. A pair needs T <= 2M, and
    M != b−a: a MUL by exactly 1 is folded away by the converter, and the clamp at T with it (a
    gain nudged off 1 rounded the middle level one code high in LiteRT's builtin kernels)."""
    if not jumps:
        return [[]]
    (t, h), rest = jumps[0], jumps[1:]
    ways = [[("step", t, h), *tail] for tail in _pairings(rest)]
    if rest and rest[0][1] <= h and h != rest[0][0] - t:
        ways += [[("pair", t, rest[0][0], h, h + rest[0][1]), *tail] for tail in _pairings(rest[1:])]
    return ways


def saturate_ops(plan: list[tuple], zero_point: int) -> int:
    """TFLite ops of a plan: each term's (a step of height 1, or at the zero point, is one op),
    plus the ADDs that sum them."""
    def ops(kind: str, *args) -> int:
        return 1 if kind == "step" and (args[1] == 1 or args[0] == zero_point) else SATURATE_OPS[kind]
    return sum(ops(*term) for term in plan) + len(plan) - 1


def saturate_plan(lut: LayerLUT, quant: ActivationQuant) -> list[tuple]:
    """The cheapest exact sum of terms for one LUT (see above), as (kind, *args) tuples."""
    jumps, identity = _jumps(lut, quant)
    plans = []
    if identity:
        plans += [[*p, ("ramp", lut.tmax)] for p in _pairings(jumps)]
        (t, h), first = jumps[-1], jumps[:-1]
        if quant.zero_point == 0 and h <= LEAKY_RELU_MAX_ALPHA and first:
            first = [(first[0][0], first[0][1] + h), *first[1:]]
            plans += [[*p, ("jump_ramp", t, h)] for p in _pairings(first)]
    else:
        plans += [[*p, ("ramp", lut.tmax)] if len(p) == 1 else p for p in _pairings(jumps)]  # (*)
    return min(plans, key=lambda plan: saturate_ops(plan, quant.zero_point))
# (*) one term alone would end on its own range: an empty ramp's ADD is what lands y on the grid


def _sat_step(x, s: float, z: int, t: int, h: int):
    if t == z:  # x − 0 is x itself, which already has its range: clamp 2h·x to [0, h·s] instead
        return _fq(x * np.float32(2 * h), 0.0, s * h)
    step = _fq(x - np.float32(s * (t - z)), 0.0, s)
    return _fq(step * np.float32(h), 0.0, s * h) if h != 1 else step


def _sat_pair(x, s: float, z: int, a: int, b: int, m: int, top: int):
    d = b - a
    # code 0 (value 0) for q <= a, 1 for a < q <= b, 2 for b < q <= b+d, …: the half codes of x
    # at a+½ and b+½ land on the half codes of the counter, so no input sits near a tie.
    # The offset c, a multiple of s/2, is pinned to that grid where it fits (|c| <= 127.5·s): the
    # converter would give the scalar the scale |c|/255, and XNNPACK refuses a SUB whose
    # input/output scale ratio is below 1/1024 — which |c|/255 only is while |c| < (b−a)·s/4.
    # An offset of 0 (a − z + ½ = d/2) would let the converter drop the SUB and feed x's grid to
    # the MUL: a quarter code (grid s/4) keeps it, still between a and a+1, off every tie.
    codes = a + 0.5 - z - 0.5 * d
    codes, grid = (codes, max(s / 2, abs(s * codes) / 255)) if codes else (0.25, s / 4)
    offset = _fq(_tf().constant(np.float32(s * codes)), *((0.0, 255 * grid) if codes > 0 else (-255 * grid, 0.0)))
    count = _fq(x - offset, 0.0, 255 * d * s)
    return _fq(count * np.float32(m / d), s * (top - 255), s * top)


def _sat_ramp(x, s: float, z: int, t: int):
    return _fq(x - np.float32(s * (t + 1 - z)), 0.0, s * 255)


def _sat_jump_ramp(x, s: float, z: int, t: int, h: int):
    shifted = _fq(x - np.float32(s * (t + 1 - z)), -s, 254 * s)  # every q <= t at the bottom code, −s
    return _fq(_tf().nn.leaky_relu(shifted, alpha=float(h)), -h * s, (255 - h) * s)


SATURATE_TERMS = {"step": _sat_step, "pair": _sat_pair, "ramp": _sat_ramp, "jump_ramp": _sat_jump_ramp}


def _saturate(x, lut: LayerLUT, quant: ActivationQuant):
    """`saturate_plan`'s terms, summed: partial sums of the non-negative terms on [0, 255·s]
    (their total is at most tmax+1−z codes), the identity term last, onto the layer's grid."""
    s, z = quant.scale, quant.zero_point
    terms = [SATURATE_TERMS[kind](x, s, z, *args) for kind, *args in saturate_plan(lut, quant)]
    y = terms[0]
    for i, term in enumerate(terms[1:], start=2):
        y = _fq(y + term, *((s * (0 - z), s * (255 - z)) if i == len(terms) else (0.0, s * 255)))
    return y


LOWERINGS = {"select": _select, "minmax": _minmax, "saturate": _saturate}


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


# ----------------------------------------------------------------------------- the float check

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
