"""Reading an ONNX QDQ/LUT graph for the TensorFlow translator, and fusing it: constants folded
to numpy, each activation Q→DQ pair one `FakeQuant` node, each layer's Less/Where chain one `LUT`
node in its lowering form, and a LUT that feeds a MaxPool moved after the pool. The result is a
`Graph` of `Node`s that exporters/tf_ops.py runs (conventions: exporters/onnx_to_tf.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from deploy_kit.errors import ExportError
from deploy_kit.lut import ActivationQuant, LayerLUT
from exporters.tf_lut import DEFAULT_LUT_FORM, FALLBACK, LUT_FORMS, saturate_plan

FAKE_QUANT = "FakeQuant"  # our fused activation Q→DQ pair (not an ONNX op)
LUT_NODE = "LUT"  # one layer's whole Less/Where chain, in a lowering form (not an ONNX op)
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
