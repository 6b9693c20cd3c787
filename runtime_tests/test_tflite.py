"""The full-integer TFLite export in the real LiteRT interpreter, on the digits test split,
against the PyTorch student (LUT variant) and teacher (ReLU variant)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

from deploy_kit.data import load_dataset, normalize  # noqa: E402
from deploy_kit.export import ExportConfig, export  # noqa: E402
from deploy_kit.lut import LayerLUT  # noqa: E402
from deploy_kit.runners import LiteRTRunner  # noqa: E402
from deploy_kit.teacher import load_teacher  # noqa: E402
from deploy_kit.train import TrainConfig, train_teacher  # noqa: E402
from exporters import tflite  # noqa: E402
from exporters.registry import TARGETS  # noqa: E402

MIN_AGREEMENT = 0.995
LUT = LayerLUT(t1=2, v1=5, t2=9, v2=14, tmax=24)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small LeNet-5 teacher, a result.json approximating every layer, and its TFLite exports
    with int8 I/O (default) and float I/O."""
    root = tmp_path_factory.mktemp("tflite_run")
    train_teacher(TrainConfig(model="lenet5", epochs=3, qat_epochs=1, max_train=512), root)
    teacher = load_teacher(root)
    layers = {n: {**LUT.to_json(), **q.to_dict()} for n, q in teacher.layer_quant.items()}
    (root / "result.json").write_text(json.dumps({"model": "lenet5", "layers": layers,
                                                  "teacher": {"path": ".", "sha256": teacher.sha256}}))
    summary = export(ExportConfig(result_path=root / "result.json", targets=("tflite",), calibration_images=128))
    float_summary = export(ExportConfig(result_path=root / "result.json", targets=("tflite",), io="float",
                                        out=root / "exports_float", calibration_images=128))
    test = load_dataset(teacher.meta["data"], teacher.meta["seed"]).split("test")
    return {"teacher": teacher, "luts": {n: LUT for n in layers}, "x": normalize(test.images, teacher.norm),
            "exports": root / "exports", "float_exports": root / "exports_float",
            "summary": summary, "float_summary": float_summary}


def _entry(summary: dict, variant: str) -> dict:
    return next(a for a in summary["artifacts"] if a["target"] == "tflite" and a["variant"] == variant)


def _torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


@pytest.mark.parametrize("exports_key", ["exports", "float_exports"])
def test_lut_tflite_agrees_with_the_student(run, exports_key):
    path = run[exports_key] / TARGETS["tflite"].path("lut")
    got = LiteRTRunner(path).predict(run["x"])
    want = _torch_logits(run["teacher"].student(run["luts"]), run["x"])
    agreement = _agreement(got, want)
    print(f"\nTFLite INT8 ({exports_key}) vs student: top-1 agreement {agreement:.4f} on {len(want)} test images, "
          f"max |logit diff| {np.abs(got - want).max():.3f}")
    assert agreement >= MIN_AGREEMENT


def test_relu_tflite_agrees_with_the_teacher(run):
    got = LiteRTRunner(run["exports"] / TARGETS["tflite"].path("relu")).predict(run["x"])
    assert _agreement(got, _torch_logits(run["teacher"].model, run["x"])) >= MIN_AGREEMENT


def test_lut_codes_in_litert_are_the_code_table(run):
    """Every LUT layer inside the real model: codes out = LayerLUT.apply_codes(codes in)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(run["exports"] / TARGETS["tflite"].path("lut")),
                              experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    scale, zero = detail["quantization"]
    layer_quant = run["teacher"].layer_quant
    codes = {n: ([], []) for n in run["luts"]}
    for image in run["x"][:64]:
        q = np.clip(np.rint(image.transpose(1, 2, 0)[None] / scale) + zero, -128, 127).astype(np.int8)
        interpreter.set_tensor(detail["index"], q)
        interpreter.invoke()
        for name in run["luts"]:
            for seen, index in zip(codes[name], tflite.lut_tensors(interpreter, name)):
                details = next(t for t in interpreter.get_tensor_details() if t["index"] == index)
                # int8 code + 128 = the teacher's uint8 code, when the tensor is on the teacher's grid
                assert details["quantization"][0] == pytest.approx(layer_quant[name].scale, rel=1e-6)
                assert details["quantization"][1] == layer_quant[name].zero_point - 128
                seen.append(interpreter.get_tensor(index).astype(np.int32) + 128)
    for name, (before, after) in codes.items():
        before, after = np.concatenate(before), np.concatenate(after)
        np.testing.assert_array_equal(after, run["luts"][name].apply_codes(before, layer_quant[name].zero_point))
        assert len(np.unique(before)) > 3, f"{name}: the test images hit too few codes to mean anything"


def test_files_are_full_integer_with_the_lut_ops_of_each_layers_form(run):
    """The default export: saturate at every layer (no LESS/SELECT_V2 anywhere), none in relu/."""
    forms = _entry(run["summary"], "lut")["lut_forms"]
    assert forms == {n: "saturate" for n in run["luts"]}
    for variant, lut_forms in (("lut", forms), ("relu", {})):
        info = tflite.check_full_integer(run["exports"] / TARGETS["tflite"].path(variant), lut_forms)
        assert info["float_tensors"] == [] and info["custom_ops"] == []
    info = tflite.check_full_integer(run["float_exports"] / TARGETS["tflite"].path("lut"), forms, io="float")
    assert set(info["float_tensors"]) == {"input", "logits"}


def test_manifest_io_is_nhwc_int8_on_the_teachers_input_grid(run):
    entry = _entry(run["summary"], "lut")
    (inp,), (out,) = entry["inputs"], entry["outputs"]
    c, h, w = run["teacher"].meta["input_shape"]
    assert inp["name"] == "input" and out["name"] == "logits"
    assert inp["shape"] == ["batch", h, w, c] and inp["layout"] == "NHWC" and inp["dtype"] == "int8"
    iq = run["teacher"].meta["input_quant"]
    assert inp["quantization"] == {"scale": pytest.approx(iq["scale"], rel=1e-6), "zero_point": iq["zero_point"] - 128}
    assert entry["float_check"]["max_abs_diff"] <= 1e-4
    # every weight tensor keeps the teacher's per-channel scale and int8 codes (quant.freeze makes
    # max|code| = 127 per channel, so even the converter's own max|w|/127 lands on our scale)
    blocks = len(run["teacher"].model.blocks())
    assert entry["weights"]["layers"] == entry["weights"]["scales_equal"] == entry["weights"]["codes_equal"] == blocks
    float_entry = _entry(run["float_summary"], "lut")
    assert float_entry["inputs"][0]["dtype"] == "float32" and float_entry["inputs"][0]["quantization"] is None


def test_metadata_is_embedded(run):
    meta = tflite.read_metadata(run["exports"] / TARGETS["tflite"].path("lut"))
    assert meta["model"] == "lenet5" and meta["variant"] == "lut"
    assert meta["teacher_sha256"] == run["teacher"].sha256
    assert set(meta["layers"]) == set(run["luts"])
