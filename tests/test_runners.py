"""Runners on a real ONNX export of a small LeNet-5, and the TFLite I/O conversions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deploy_kit import runners as rn
from deploy_kit.data import load_dataset, normalize
from deploy_kit.errors import ConfigError, ExportError
from deploy_kit.lut import ActivationQuant
from deploy_kit.teacher import load_teacher



@pytest.fixture(scope="module")
def setup(export_lenet_run):
    exports = export_lenet_run("runners_run", ("onnx",))
    teacher = load_teacher(exports.parent)
    manifest = rn.load_manifest(exports)
    luts, _ = rn.manifest_luts(manifest)
    test = load_dataset(teacher.meta["data"], teacher.meta["seed"]).split("test")
    return {"teacher": teacher, "exports": exports, "manifest": manifest, "luts": luts,
            "x": normalize(test.images[:100], teacher.norm)}


def onnx_runner(setup, **kwargs):
    entry = next(a for a in setup["manifest"]["artifacts"] if a["path"] == "model.onnx")
    return rn.make_runner(entry, setup["exports"], **kwargs)


def test_ort_runner_agrees_with_student_and_batching_does_not_matter(setup):
    student = rn.StudentRunner(setup["teacher"], setup["luts"])
    whole, small = onnx_runner(setup).predict(setup["x"]), onnx_runner(setup, batch_size=7).predict(setup["x"])
    assert whole.shape == (100, 10) and whole.dtype == np.float32
    np.testing.assert_array_equal(whole, small)
    assert (whole.argmax(1) == student.predict(setup["x"]).argmax(1)).mean() >= 0.99


def test_student_codes_follow_the_lut_table(setup):
    codes = rn.StudentRunner(setup["teacher"], setup["luts"]).tap_codes(setup["x"][:8], list(setup["luts"]))
    quant = setup["teacher"].layer_quant
    assert list(codes) == list(setup["luts"])
    for name, c in codes.items():
        np.testing.assert_array_equal(c.after, setup["luts"][name].apply_codes(c.before, quant[name].zero_point))
        assert c.after.min() >= quant[name].qmin and c.after.max() <= quant[name].qmax


def test_ort_codes_are_found_for_every_layer_and_match_the_table(setup):
    from deploy_kit.verify import max_pool_codes

    layers, quant = list(setup["luts"]), setup["teacher"].layer_quant
    codes = onnx_runner(setup).tap_codes(setup["x"][:8], layers, quant)
    student = rn.StudentRunner(setup["teacher"], setup["luts"]).tap_codes(setup["x"][:8], layers)
    pools = next(a for a in setup["manifest"]["artifacts"] if a["path"] == "model.onnx")["lut_pools"]
    assert list(codes) == layers
    for name in layers:
        # a LUT after its MaxPool sees the pooled tensor: the student's codes through that window
        mine = max_pool_codes(student[name].after, pools[name]) if name in pools else student[name].after
        assert codes[name].after.shape == mine.shape
        expected = setup["luts"][name].apply_codes(codes[name].before, quant[name].zero_point)
        np.testing.assert_array_equal(codes[name].after, expected)
    # the first layer sees the same input in both: its codes agree almost everywhere
    first = max_pool_codes(student[layers[0]].after, pools[layers[0]])
    assert (codes[layers[0]].after != first).mean() < 0.01


def test_int8_teacher_runner_matches_the_teacher(setup):
    t = rn.TeacherRunner(setup["teacher"]).predict(setup["x"])
    q = rn.Int8TeacherRunner(setup["teacher"]).predict(setup["x"])
    assert (t.argmax(1) == q.argmax(1)).mean() >= 0.99


def test_tflite_int8_io_uses_the_tensor_details():
    detail = {"name": "in", "dtype": np.int8, "quantization": (0.05, -10)}
    x = np.array([-7.0, -0.05, 0.0, 0.26, 100.0], np.float32)
    q = rn._quantize(x, detail)
    np.testing.assert_array_equal(q, np.array([-128, -11, -10, -5, 127], np.int8))  # saturates at the int8 range
    np.testing.assert_allclose(rn._dequantize(q, detail), [-5.9, -0.05, 0.0, 0.25, 6.85], atol=1e-6)
    float_detail = {"name": "in", "dtype": np.float32, "quantization": (0.0, 0)}
    np.testing.assert_array_equal(rn._quantize(x, float_detail), x)
    with pytest.raises(ExportError, match="no quantization scale"):
        rn._quantize(x, {"name": "in", "dtype": np.int8, "quantization": (0.0, 0)})


def test_to_codes_rounds_to_the_grid():
    quant = ActivationQuant(0.1, 3)
    np.testing.assert_array_equal(rn.to_codes(np.array([-0.3, 0.0, 0.1000001, 0.449]), quant), [0, 3, 4, 7])


def test_hash_check_and_unknown_runtime(setup, tmp_path):
    items = rn.artifacts(setup["manifest"], setup["exports"])
    rn.check_hashes(items)  # the clean export passes
    entry = dict(next(a for a in setup["manifest"]["artifacts"] if a["path"] == "model.onnx"), runtime="coreml")
    with pytest.raises(ConfigError, match="unknown runtime 'coreml'"):
        rn.make_runner(entry, setup["exports"])
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": "other/1"}))
    with pytest.raises(ConfigError, match="expected schema deploykit-manifest/1"):
        rn.load_manifest(tmp_path)


def test_isolated_runner_gives_the_in_process_results_and_one_line_errors(setup, tmp_path):
    """IsolatedRunner (how tflite_runtime always runs: its TFLite symbols clash with TensorFlow's
    in one process) drives the same runner in a fresh process; here on the ONNX artifact, so the
    mechanism is exercised wherever tflite_runtime is not installed."""
    import shutil

    art = rn.artifacts(setup["manifest"], setup["exports"])[0]
    assert art.relpath == "model.onnx"
    here = onnx_runner(setup)
    away = rn.IsolatedRunner(art, setup["exports"], "onnxruntime", "onnxruntime", None, rn.DEFAULT_BATCH)
    np.testing.assert_array_equal(away.predict(setup["x"]), here.predict(setup["x"]))
    assert away.predict_seconds and away.predict_seconds > 0
    layers, quant = list(setup["luts"]), setup["teacher"].layer_quant
    mine, theirs = here.tap_codes(setup["x"][:8], layers, quant), away.tap_codes(setup["x"][:8], layers, quant)
    assert list(theirs) == layers
    for name in layers:
        np.testing.assert_array_equal(theirs[name].before, mine[name].before)
        np.testing.assert_array_equal(theirs[name].after, mine[name].after)

    broken = tmp_path / "exports"
    shutil.copytree(setup["exports"], broken)
    (broken / "model.onnx").write_bytes(b"not a model")
    bad = rn.IsolatedRunner(rn.artifacts(setup["manifest"], broken)[0], broken, "onnxruntime", "onnxruntime", None, 64)
    with pytest.raises(ExportError, match=r"^onnxruntime failed on model.onnx: .+") as err:
        bad.predict(setup["x"][:2])
    assert "\n" not in str(err.value)


def test_tflite_runtime_is_skipped_with_a_reason_when_its_numpy_abi_does_not_match(monkeypatch):
    import importlib.util
    from importlib import metadata

    real_spec, real_version = importlib.util.find_spec, metadata.version
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "tflite_runtime" else real_spec(name, *a))
    monkeypatch.setattr(metadata, "version", lambda name: "2.14.0" if name == "tflite-runtime" else real_version(name))
    monkeypatch.setattr(np, "__version__", "2.4.6")
    usable, why = rn.tflite_runtime_status()
    assert not usable and "built for numpy 1.x" in why and "pip install -e '.[tflite-runtime]'" in why
    monkeypatch.setattr(np, "__version__", "1.26.4")
    assert rn.tflite_runtime_status() == (True, None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tflite_runtime" else real_spec(name, *a))
    assert rn.tflite_runtime_status() == (False, None)
