"""The ONNX → TF translator and the TFLite checks: unknown ops, the float check against
onnxruntime for every zoo architecture, and a single LUT layer whose TFLite INT8 codes must be
the code table for every input code (real converter, real LiteRT)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from deploy_kit import quant
from deploy_kit.errors import ExportError
from deploy_kit.lut import ActivationQuant, LayerLUT
from deploy_kit.models import ARCHITECTURES, build_model
from deploy_kit.teacher import Teacher
from exporters import onnx_graph, onnx_to_tf, tflite

pytest.importorskip("tensorflow")
LUT = LayerLUT(t1=3, v1=6, t2=10, v2=14, tmax=20)


# ----------------------------------------------------------------------------- helpers

def _const(name: str, value) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(value), name)


def _qdq(prefix: str, x: str, s: float, z: int) -> tuple[list, list, str]:
    inits = [_const(f"{prefix}/s", np.float32(s)), _const(f"{prefix}/z", np.uint8(z))]
    nodes = [helper.make_node("QuantizeLinear", [x, f"{prefix}/s", f"{prefix}/z"], [f"{prefix}/q"], name=f"{prefix}/Q"),
             helper.make_node("DequantizeLinear", [f"{prefix}/q", f"{prefix}/s", f"{prefix}/z"], [f"{prefix}/dq"],
                              name=f"{prefix}/DQ")]
    return nodes, inits, f"{prefix}/dq"


def lut_layer_model(lut: LayerLUT, aq: ActivationQuant, hw: int = 16) -> onnx.ModelProto:
    """input → Q/DQ(s,z) → Less/Where ×3 (the rewrite's form) → Q/DQ(s,z) → output."""
    nodes, inits, x = _qdq("layer/in", "input", aq.scale, aq.zero_point)
    th, lv = lut.thresholds(aq), lut.levels(aq)
    inits += [_const(f"layer/lut/{k}", np.float32(v)) for k, v in zip(("t1", "t2", "tmax", "v0", "v1", "v2"), (*th, *lv))]
    y = x
    for t, v in (("tmax", "v2"), ("t2", "v1"), ("t1", "v0")):
        nodes.append(helper.make_node("Less", [x, f"layer/lut/{t}"], [f"layer/lut/below_{t}"], name=f"layer/lut/Less_{t}"))
        nodes.append(helper.make_node("Where", [f"layer/lut/below_{t}", f"layer/lut/{v}", y], [f"layer/lut/out_{t}"],
                                      name=f"layer/lut/Where_{t}"))
        y = f"layer/lut/out_{t}"
    out_nodes, out_inits, y = _qdq("layer/out", y, aq.scale, aq.zero_point)
    nodes += out_nodes
    nodes.append(helper.make_node("Identity", [y], ["output"], name="output/Identity"))
    graph = helper.make_graph(nodes, "lut_layer", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, hw, hw])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, hw, hw])], inits + out_inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def fresh_teacher(arch: str, width: float = 0.25, seed: int = 0) -> Teacher:
    """A QAT-prepared zoo model with observers run on random data, then frozen: real scales,
    real int8 weights, no training (the translator only cares about structure and ranges)."""
    torch.manual_seed(seed)
    model = quant.qat_model(build_model(arch, (3, 32, 32), 10, width))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    quant.freeze(model).eval()
    return Teacher(model, {"model": arch, "input_shape": [3, 32, 32]}, weights_path=None)


def lut_graph(teacher: Teacher) -> onnx.ModelProto:
    layer_quant = dict(quant.activation_quant(teacher.model))
    luts = {name: LUT for name in layer_quant}
    return onnx_graph.check(onnx_graph.rewrite_activations(onnx_graph.teacher_graph(teacher), luts, layer_quant))


# ----------------------------------------------------------------------------- translator

def test_unknown_op_is_an_error_naming_op_and_node(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["r"], name="act"),
                               helper.make_node("Sin", ["r"], ["output"], name="weird/sine")], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "sin.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    with pytest.raises(ExportError, match=r"ONNX op Sin \(node 'weird/sine'\)"):
        tflite.export_tflite(path, tmp_path / "out.tflite", calibration=np.zeros((1, 4), np.float32))
    assert not (tmp_path / "out.tflite").exists()


def test_activation_qdq_pairs_become_fake_quant_and_weights_fold():
    proto = lut_graph(fresh_teacher("lenet5", width=0.5))
    graph = onnx_to_tf.read_graph(proto)
    ops = [n.op for n in graph.nodes]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops  # all folded or fused
    pairs = [n for n in graph.nodes if n.op == onnx_to_tf.FAKE_QUANT]
    assert len(pairs) == sum(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    conv1 = next(n for n in graph.nodes if n.op == "Conv")
    assert graph.constants[conv1.inputs[1]].dtype == np.float32 and "weight_scale" in conv1.attrs


def test_float_check_names_the_node_that_differs():
    proto = lut_graph(fresh_teacher("lenet5", width=0.5))
    graph = onnx_to_tf.read_graph(proto)
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    assert onnx_to_tf.check_against_onnxruntime(proto, graph, x)["max_abs_diff"] <= onnx_to_tf.FLOAT_ATOL
    # a translation bug (Gemm bias doubled) must be caught at that node
    gemm = next(n for n in graph.nodes if n.op == "Gemm")
    graph.constants[gemm.inputs[2]] = graph.constants[gemm.inputs[2]] * 2 + 1
    with pytest.raises(ExportError, match=rf"node {gemm.name} \(Gemm\) differs from onnxruntime"):
        onnx_to_tf.check_against_onnxruntime(proto, graph, x)


@pytest.mark.parametrize("arch", [pytest.param(a, marks=[pytest.mark.slow] if a != "lenet5" else [])
                                  for a in ARCHITECTURES])
def test_every_zoo_architecture_translates_and_matches_onnxruntime(arch):
    proto = lut_graph(fresh_teacher(arch))
    graph = onnx_to_tf.read_graph(proto)
    x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    report = onnx_to_tf.check_against_onnxruntime(proto, graph, x)
    assert report["max_abs_diff"] <= onnx_to_tf.FLOAT_ATOL and report["nodes"] == len(graph.nodes)


@pytest.mark.slow
@pytest.mark.parametrize("lut_form", ["select", "saturate"])
@pytest.mark.parametrize("arch", ["mobilenet_v1", "nin", "alexnet", "vgg19"])
def test_zoo_architecture_converts_to_full_integer(arch, lut_form, tmp_path):
    """Depthwise convs, padded strided convs, global average pooling: full int8, 3+3 ops per LUT
    (select) or a 5-op saturate plan at every layer — LUT (3, 6, 10, 14, 20) puts its counter's
    offset at exactly 0 (the converter once dropped that SUB) — run after each MaxPool it feeds.
    export_tflite raises unless every LUT maps all 256 codes by the table."""
    teacher = fresh_teacher(arch)
    path = tmp_path / "model.onnx"
    onnx.save(lut_graph(teacher), str(path))
    calibration = np.random.default_rng(2).normal(size=(8, 3, 32, 32)).astype(np.float32)
    details = tflite.export_tflite(path, tmp_path / "model.tflite", calibration=calibration, lut_form=lut_form)
    layers = len(teacher.model.taps())
    assert details["lut_forms"] == {n: lut_form for n in teacher.model.taps()}  # no layer fell back
    info = tflite.check_full_integer(tmp_path / "model.tflite", details["lut_forms"])
    if lut_form == "select":
        assert info["ops"]["LESS"] == 3 * layers and info["ops"]["SELECT_V2"] == 3 * layers
    else:
        assert [sum(ops.values()) for ops in details["lut_ops"].values()] == [5] * layers
        pooled = {"mobilenet_v1": set(), "nin": {"cccp2", "cccp4"}, "alexnet": {"conv1", "conv2", "conv5"},
                  "vgg19": {"conv1_2", "conv2_2", "conv3_4", "conv4_4", "conv5_4"}}[arch]
        assert set(details["lut_pools"]) == pooled
    assert details["inputs"][0]["dtype"] == "int8" and details["inputs"][0]["shape"] == ["batch", 32, 32, 3]
    assert details["weights"]["layers"] == len(teacher.model.blocks())


# ----------------------------------------------------------------------------- one LUT layer, all codes

@pytest.mark.parametrize("aq, lut", [(ActivationQuant(0.0125, 0), LUT),
                                     (ActivationQuant(0.043, 7), LayerLUT(t1=9, v1=12, t2=40, v2=90, tmax=200)),
                                     # finer than LESS's 1/256 resolution: compared at a rescaled input
                                     (ActivationQuant(0.0031, 0), LayerLUT(t1=0, v1=1, t2=2, v2=3, tmax=255)),
                                     (ActivationQuant(0.0007, 3), LayerLUT(t1=4, v1=5, t2=6, v2=8, tmax=9))])
@pytest.mark.parametrize("io", ["int8", "float"])
def test_lut_layer_int8_codes_equal_the_code_table_for_every_code(tmp_path, aq, lut, io):
    from ai_edge_litert.interpreter import Interpreter

    path = tmp_path / "lut.onnx"
    onnx.save(lut_layer_model(lut, aq), str(path))
    codes = np.arange(256).reshape(1, 1, 16, 16)
    x = aq.value(codes).astype(np.float32)
    details = tflite.export_tflite(path, tmp_path / "lut.tflite", io=io, calibration=x, layer_quant={"layer": aq},
                                   lut_form="select")
    info = tflite.check_full_integer(tmp_path / "lut.tflite", {"layer": "select"}, io=io)
    assert info["ops"]["LESS"] == 3 and info["ops"]["SELECT_V2"] == 3

    interpreter = Interpreter(model_path=str(tmp_path / "lut.tflite"))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    if io == "int8":
        # the fake quant fixed the input tensor to the layer's own (s, z−128): codes in = codes out
        assert details["inputs"][0]["quantization"] == {"scale": pytest.approx(aq.scale, rel=1e-6),
                                                        "zero_point": aq.zero_point - 128}
        assert details["outputs"][0]["quantization"] == details["inputs"][0]["quantization"]
        interpreter.set_tensor(inp["index"], (codes.transpose(0, 2, 3, 1) - 128).astype(np.int8))
        interpreter.invoke()
        got = interpreter.get_tensor(out["index"]).astype(np.int32) + 128
    else:
        interpreter.set_tensor(inp["index"], x.transpose(0, 2, 3, 1))
        interpreter.invoke()
        got = np.rint(interpreter.get_tensor(out["index"]) / aq.scale).astype(np.int32) + aq.zero_point
    np.testing.assert_array_equal(got.transpose(0, 3, 1, 2), lut.apply_codes(codes, aq.zero_point))


def test_checker_rejects_float_tensors_and_wrong_lut_op_counts(tmp_path):
    aq = ActivationQuant(0.0125, 0)
    path = tmp_path / "lut.onnx"
    onnx.save(lut_layer_model(LUT, aq), str(path))
    x = aq.value(np.arange(256).reshape(1, 1, 16, 16)).astype(np.float32)
    tflite.export_tflite(path, tmp_path / "lut.tflite", io="float", calibration=x, lut_form="select")
    with pytest.raises(ExportError, match="not full-integer"):  # float I/O is only allowed when asked
        tflite.check_full_integer(tmp_path / "lut.tflite", {"layer": "select"}, io="int8")
    with pytest.raises(ExportError, match=r"3 LESS ops, expected 3 per select-lowered LUT layer × 2 \(layer, other;"):
        tflite.check_full_integer(tmp_path / "lut.tflite", {"layer": "select", "other": "select"}, io="float")
    with pytest.raises(ExportError, match="layer layer: TFLite LUT tensor .* expected the teacher's 0.025"):
        tflite.check_lut_grid((tmp_path / "lut.tflite").read_bytes(), {"layer": ActivationQuant(0.025, 0)})
