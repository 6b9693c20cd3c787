"""The ONNX and ORT Mobile exports, run in the real onnxruntime on the digits test split,
against the PyTorch student (LUT variant) and the teacher (ReLU variant)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from deploy_kit.data import load_dataset, normalize
from deploy_kit.export import ExportConfig, export
from deploy_kit.lut import LayerLUT
from deploy_kit.teacher import load_teacher
from deploy_kit.train import TrainConfig, train_teacher
from exporters.registry import TARGETS

ORT_TARGETS = [name for name, t in TARGETS.items() if t.runtime == "onnxruntime"]
MIN_AGREEMENT = 0.999
CODES = {"t1_code": 2, "v1_code": 5, "t2_code": 9, "v2_code": 14, "tmax_code": 24}


# Strict top-1 agreement cannot be 100% by construction: ORT (QLinearConv, MLAS) and PyTorch
# fake-quant round a few activations to neighbouring codes (int32 bias, summation order,
# x/s vs x·(1/s)), and logits are dequantized codes, so a reference top-2 that is one code
# apart can swap. We therefore count a pick as agreeing when its reference logit is within one
# output code of the reference maximum, and keep a looser strict bound to catch real breakage.
STRICT_FLOOR = 0.99


def top1_agreement(got: np.ndarray, ref: np.ndarray, logit_step: float = 0.0) -> float:
    """Share of rows whose pick is the reference's top class, up to `logit_step`."""
    picked = ref[np.arange(len(ref)), got.argmax(1)]
    return float(np.mean(picked >= ref.max(1) - logit_step * 1.001))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small LeNet-5 teacher, a result.json approximating every layer, and its exports."""
    root = tmp_path_factory.mktemp("run")
    train_teacher(TrainConfig(model="lenet5", epochs=3, qat_epochs=1, max_train=512), root)
    teacher = load_teacher(root)
    layers = {n: {**CODES, **q} for n, q in teacher.meta["layers"].items()}
    (root / "result.json").write_text(json.dumps({"model": "lenet5", "layers": layers,
                                                  "teacher": {"path": ".", "sha256": teacher.sha256}}))
    summary = export(ExportConfig(result_path=root / "result.json", targets=tuple(ORT_TARGETS)))
    ds = load_dataset(teacher.meta["data"], teacher.meta["seed"])
    test = ds.split("test")
    luts = {n: LayerLUT(CODES["t1_code"], CODES["v1_code"], CODES["t2_code"], CODES["v2_code"], CODES["tmax_code"])
            for n in layers}
    return {"teacher": teacher, "luts": luts, "x": normalize(test.images, teacher.norm), "labels": test.labels,
            "exports": root / "exports", "summary": summary}


def _torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _ort_logits(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


@pytest.mark.parametrize("target", ORT_TARGETS)
@pytest.mark.parametrize("variant", ["lut", "relu"])
def test_export_agrees_with_pytorch(run, target, variant):
    reference = run["teacher"].student(run["luts"]) if variant == "lut" else run["teacher"].model
    ref = _torch_logits(reference, run["x"])
    got = _ort_logits(run["exports"] / TARGETS[target].path(variant), run["x"])
    step = run["teacher"].meta["output_quant"]["scale"]
    strict, within_code = top1_agreement(got, ref), top1_agreement(got, ref, step)
    assert within_code >= MIN_AGREEMENT and strict >= STRICT_FLOOR, \
        f"{target}/{variant}: top-1 agreement with PyTorch {within_code:.4f} (strict {strict:.4f})"
    # logits are dequantized output codes: they may differ by a code, rarely more
    assert np.median(np.abs(got - ref)) <= step + 1e-6


def test_lut_changes_the_model(run):
    """The approximation must be visible: the LUT graph differs from the ReLU graph on real data."""
    lut = _ort_logits(run["exports"] / "model.onnx", run["x"])
    relu = _ort_logits(run["exports"] / "relu" / "model.onnx", run["x"])
    assert np.abs(lut - relu).max() > 0


def test_lut_float_form_matches_codes_for_every_code(run, tmp_path):
    """Feed every uint8 code of conv1's activation through the exported LUT subgraph."""
    exported = onnx.load(str(run["exports"] / "model.onnx"))
    layer, aq = "conv1", run["teacher"].layer_quant["conv1"]
    nodes = [n for n in exported.graph.node if n.name.startswith(f"{layer}/lut/") and n.op_type in ("Less", "Where")]
    x_name = nodes[0].input[0]
    out_name = next(n.output[0] for n in nodes if n.name == f"{layer}/lut/Where_t1")
    consts = [i for i in exported.graph.initializer if i.name.startswith(f"{layer}/lut/")]
    sub = onnx.helper.make_model(onnx.helper.make_graph(
        nodes, "lut", [onnx.helper.make_tensor_value_info(x_name, onnx.TensorProto.FLOAT, [256])],
        [onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, [256])], consts),
        opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    codes = np.arange(256)
    y = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {x_name: aq.value(codes)})[0]
    expected = aq.value(run["luts"][layer].apply_codes(codes, aq.zero_point))
    np.testing.assert_array_equal(y, expected)


def test_ort_runs_int8_conv_next_to_the_lut(run):
    manifest = json.loads((run["exports"] / "manifest.json").read_text())
    entry = next(a for a in manifest["artifacts"] if a["target"] == "ort" and a["variant"] == "lut")
    assert entry["optimized_ops"].get("QLinearConv", 0) == 2, entry["optimized_ops"]
    assert entry["optimized_ops"]["Less"] == 3 * len(run["luts"])
