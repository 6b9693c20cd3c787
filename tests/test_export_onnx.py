"""Teacher → QDQ ONNX and the LUT rewrite: structure, names, validity, errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from deploy_kit.errors import ExportError
from deploy_kit.lut import LayerLUT
from deploy_kit.teacher import load_teacher
from exporters import onnx_graph

LUT = LayerLUT(t1=2, v1=4, t2=8, v2=12, tmax=20)


@pytest.fixture(scope="module")
def teacher(lenet_teacher):
    return load_teacher(lenet_teacher)


@pytest.fixture(scope="module")
def relu_graph(teacher):
    return onnx_graph.check(onnx_graph.teacher_graph(teacher))


def _ops(proto):
    return [n.op_type for n in proto.graph.node]


def test_teacher_graph_is_qdq_with_int8_weights(teacher, relu_graph):
    assert relu_graph.ir_version == onnx_graph.IR_VERSION
    assert [o.version for o in relu_graph.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert _ops(relu_graph).count("Relu") == len(teacher.layer_quant)
    inits = {i.name: i for i in relu_graph.graph.initializer}
    weights = [i for n, i in inits.items() if n.endswith("/weight_quantized")]
    biases = [i for n, i in inits.items() if n.endswith("/bias_quantized")]
    assert len(weights) == len(teacher.model.blocks())
    assert all(w.data_type == onnx.TensorProto.INT8 for w in weights)
    assert all(b.data_type == onnx.TensorProto.INT32 for b in biases) and biases
    # no float weight tensor survives: every float initializer is a scale, a bias scale or a LUT constant
    float_inits = [i for i in inits.values() if i.data_type == onnx.TensorProto.FLOAT]
    assert all(i.name.endswith(("scale", "/scale")) for i in float_inits), [i.name for i in float_inits]
    assert [i.name for i in relu_graph.graph.input] == ["input"]
    assert [o.name for o in relu_graph.graph.output] == ["logits"]
    assert relu_graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_int8_weights_are_the_qat_codes(teacher, relu_graph):
    from deploy_kit import quant
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in relu_graph.graph.initializer}
    codes, scale = quant.weight_quant(teacher.model.blocks()["conv2"])
    np.testing.assert_array_equal(inits["/features/conv2/op/Conv/weight_quantized"], codes.numpy())
    np.testing.assert_allclose(inits["/features/conv2/op/Conv/weight_scale"], scale.numpy(), rtol=1e-7)


def test_rewrite_listed_layers_only(teacher, relu_graph):
    listed = ["conv1", "fc1"]
    lut_graph = onnx_graph.check(onnx_graph.rewrite_activations(relu_graph, {n: LUT for n in listed}, teacher.layer_quant))
    ops = _ops(lut_graph)
    assert ops.count("Less") == 3 * len(listed) and ops.count("Where") == 3 * len(listed)
    assert ops.count("Relu") == len(teacher.layer_quant) - len(listed)
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in lut_graph.graph.initializer}
    for name in listed:
        aq = teacher.layer_quant[name]
        got = [float(consts[f"{name}/lut/{k}"]) for k in ("t1", "t2", "tmax", "v0", "v1", "v2")]
        np.testing.assert_array_equal(got, [*LUT.thresholds(aq), *LUT.levels(aq)])
    # Relu nodes still in the graph are exactly the unlisted blocks'
    relus = {n.name.split("/")[2] for n in lut_graph.graph.node if n.op_type == "Relu"}
    assert relus == set(teacher.layer_quant) - set(listed)


def test_lut_sits_between_dq_and_q(teacher, relu_graph):
    lut_graph = onnx_graph.rewrite_activations(relu_graph, {"conv2": LUT}, teacher.layer_quant)
    by_output = {o: n for n in lut_graph.graph.node for o in n.output}
    users = {}
    for n in lut_graph.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    less = [n for n in lut_graph.graph.node if n.op_type == "Less"]
    assert {by_output[n.input[0]].op_type for n in less} == {"DequantizeLinear"}
    last_where = next(n for n in lut_graph.graph.node if n.name == "conv2/lut/Where_t1")
    assert [u.op_type for u in users[last_where.output[0]]] == ["QuantizeLinear"]


WINDOW = {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 0, 0]}


def _path_up(producer: dict, tensor: str, steps: int) -> list[str]:
    """The op types of the `steps` nodes above `tensor`, nearest first."""
    ops = []
    for _ in range(steps):
        node = producer[tensor]
        ops.append(node.op_type)
        tensor = node.input[0]
    return ops


def test_a_lut_that_feeds_a_max_pool_runs_after_it(teacher, relu_graph):
    """conv1 and conv2 feed a 2×2 MaxPool alone: their LUT reads the pooled, requantized tensor
    (Conv → Q → DQ → MaxPool → Q → DQ → Less/Where → Q → DQ → next), so every Conv/Gemm and the
    pool keep their Q/DQ; fc1/fc2 have no pool and read their Gemm's Q → DQ. lut_pools reads
    the moved layers back from the graph."""
    lut_graph = onnx_graph.check(onnx_graph.rewrite_activations(relu_graph, {n: LUT for n in teacher.layer_quant},
                                                                teacher.layer_quant))
    producer = {o: n for n in lut_graph.graph.node for o in n.output}
    users = {}
    for n in lut_graph.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n.op_type)
    for layer, above, below in (("conv1", "MaxPool", "Conv"), ("conv2", "MaxPool", "Flatten"),
                                ("fc1", "Gemm", "Gemm"), ("fc2", "Gemm", "Gemm")):
        x = next(n.input[0] for n in lut_graph.graph.node if n.name == f"{layer}/lut/Less_t1")
        want = ["DequantizeLinear", "QuantizeLinear", "MaxPool", "DequantizeLinear", "QuantizeLinear", "Conv"] \
            if above == "MaxPool" else ["DequantizeLinear", "QuantizeLinear", "Gemm"]
        assert _path_up(producer, x, len(want)) == want, layer
        y = next(n.output[0] for n in lut_graph.graph.node if n.name == f"{layer}/lut/Where_t1")
        (q,) = [n for n in lut_graph.graph.node if y in n.input]
        assert q.op_type == "QuantizeLinear" and users[q.output[0]] == ["DequantizeLinear"]
        (dq,) = [n for n in lut_graph.graph.node if q.output[0] in n.input]
        assert users[dq.output[0]] == [below], layer
    assert onnx_graph.lut_pools(lut_graph) == {"conv1": WINDOW, "conv2": WINDOW}
    assert onnx_graph.lut_pools(relu_graph) == {}
    # listed alone, conv2 moves by itself; its neighbours keep their ReLU
    only = onnx_graph.rewrite_activations(relu_graph, {"conv2": LUT}, teacher.layer_quant)
    assert onnx_graph.lut_pools(only) == {"conv2": WINDOW}


def test_only_a_monotone_lut_commutes_with_max():
    """v1 below the zero point maps codes <= t1 above the (t1, t2] segment: such a LUT must stay
    before its pool (the rewrite and the TFLite translator ask this before moving it)."""
    assert LUT.commutes_with_max(0) and LUT.commutes_with_max(LUT.v1)
    assert not LUT.commutes_with_max(LUT.v1 + 1)


def test_unknown_layer_is_an_error_naming_it(teacher, relu_graph):
    quant = {**teacher.layer_quant, "conv9": teacher.layer_quant["conv1"]}
    with pytest.raises(ExportError, match="conv9"):
        onnx_graph.rewrite_activations(relu_graph, {"conv9": LUT}, quant)


def test_metadata_props_round_trip(relu_graph):
    proto = onnx.ModelProto()
    proto.CopyFrom(relu_graph)
    onnx_graph.set_metadata(proto, {"deploykit.model": "lenet5", "deploykit.classes": '["0"]'})
    assert {p.key: p.value for p in proto.metadata_props}["deploykit.model"] == "lenet5"


def test_unexpected_activation_pattern_is_an_error(teacher, relu_graph):
    """A Relu that does not feed a QuantizeLinear (not a QAT graph) cannot be rewritten."""
    import onnx_graphsurgeon as gs
    graph = gs.import_onnx(relu_graph)
    q = next(n for n in graph.nodes if n.name == "/features/conv2/activation_post_process/QuantizeLinear")
    relu = q.inputs[0].inputs[0]
    q.inputs[0] = relu.inputs[0]  # Conv → Q directly; the Relu now feeds nothing
    with pytest.raises(ExportError, match="conv2"):
        onnx_graph.rewrite_activations(gs.export_onnx(graph), {"conv2": LUT}, teacher.layer_quant)


def test_every_conv_and_gemm_reads_a_dequantized_tensor(relu_graph):
    """The Q/DQ form onnxruntime fuses into QLinearConv/QGemm: DQ feeds every data input."""
    producer = {o: n for n in relu_graph.graph.node for o in n.output}
    for node in relu_graph.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert [producer[i].op_type for i in node.input] == ["DequantizeLinear"] * len(node.input), node.name
