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
from exporters import manifest as mf
from exporters.registry import BENCH, RUNTIMES, TARGETS, VERIFY, Runtime, runtimes_loading



@pytest.fixture(scope="module")
def setup(export_lenet_run):
    exports = export_lenet_run("runners_run", ("onnx",))
    teacher = load_teacher(exports.parent)
    manifest = mf.load_manifest(exports)
    luts, _ = mf.manifest_luts(manifest)
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
    quant = setup["teacher"].layer_quant
    codes = rn.StudentRunner(setup["teacher"], setup["luts"]).tap_codes(setup["x"][:8], list(setup["luts"]), quant)
    assert list(codes) == list(setup["luts"])
    for name, c in codes.items():
        np.testing.assert_array_equal(c.after, setup["luts"][name].apply_codes(c.before, quant[name].zero_point))
        assert c.after.min() >= quant[name].qmin and c.after.max() <= quant[name].qmax


def test_ort_codes_are_found_for_every_layer_and_match_the_table(setup):
    from deploy_kit.verify import max_pool_codes

    layers, quant = list(setup["luts"]), setup["teacher"].layer_quant
    codes = onnx_runner(setup).tap_codes(setup["x"][:8], layers, quant)
    student = rn.StudentRunner(setup["teacher"], setup["luts"]).tap_codes(setup["x"][:8], layers, quant)
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
    items = mf.artifacts(setup["manifest"], setup["exports"])
    mf.check_hashes(items)  # the clean export passes
    entry = dict(next(a for a in setup["manifest"]["artifacts"] if a["path"] == "model.onnx"), runtime="coreml")
    with pytest.raises(ConfigError, match="unknown runtime 'coreml'"):
        rn.make_runner(entry, setup["exports"])
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": "other/1"}))
    with pytest.raises(ConfigError, match="expected schema deploykit-manifest/1"):
        mf.load_manifest(tmp_path)


def test_isolated_runner_gives_the_in_process_results_and_one_line_errors(setup, tmp_path):
    """IsolatedRunner (how tflite_runtime always runs: its TFLite symbols clash with TensorFlow's
    in one process) drives the same runner in a fresh process; here on the ONNX artifact, so the
    mechanism is exercised wherever tflite_runtime is not installed."""
    import shutil

    art = mf.artifacts(setup["manifest"], setup["exports"])[0]
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
    bad = rn.IsolatedRunner(mf.artifacts(setup["manifest"], broken)[0], broken, "onnxruntime", "onnxruntime", None, 64)
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
    usable, why = RUNTIMES["tflite_runtime"].status()
    assert not usable and "built for numpy 1.x" in why and "pip install -e '.[tflite-runtime]'" in why
    monkeypatch.setattr(np, "__version__", "1.26.4")
    assert rn.tflite_runtime_status() == (True, None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tflite_runtime" else real_spec(name, *a))
    assert rn.tflite_runtime_status() == (False, None)


# ----------------------------------------------------------------------------- the runtime table

@pytest.mark.parametrize("name", RUNTIMES)
def test_every_runtime_entry_names_a_runner_that_follows_the_protocol(name):
    """One entry per runtime: its runner class implements `runners.Runner` (one `tap_codes`
    signature) and opens an artifact; it loads known targets; its extra exists in pyproject."""
    import inspect
    import tomllib
    from pathlib import Path

    spec = RUNTIMES[name]
    cls = spec.runner_class()
    for method in ("predict", "tap_codes", "for_artifact"):
        assert callable(getattr(cls, method, None)), f"{cls.__name__} lacks {method}"
    assert list(inspect.signature(cls.tap_codes).parameters) == ["self", "x", "layers", "layer_quant"]
    assert set(spec.loads) <= set(TARGETS) and spec.uses and set(spec.uses) <= {VERIFY, BENCH}
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert spec.extra is None or spec.extra in extras
    usable, why = spec.status()
    assert isinstance(usable, bool) and (why is None or "pip install" in why)


def test_every_target_is_run_by_the_runtime_it_records():
    for target in TARGETS.values():
        assert target.name in RUNTIMES[target.runtime].loads
        assert target.runtime in [r.name for r in runtimes_loading(target.name, VERIFY, usable_only=False)]


def test_torch_runners_follow_the_protocol_too():
    import inspect

    for cls in (rn.TeacherRunner, rn.StudentRunner, rn.Int8TeacherRunner, rn.IsolatedRunner):
        assert list(inspect.signature(cls.tap_codes).parameters) == ["self", "x", "layers", "layer_quant"]


def test_a_new_runtime_is_one_table_entry(setup, monkeypatch):
    """A runtime added as one row (here onnxruntime with its threads never spinning, through the
    existing runner class) is picked up by verify's and bench's runtime lists and runs; a row
    marked isolated runs in the worker process, with the same logits."""
    entry = next(a for a in setup["manifest"]["artifacts"] if a["path"] == "model.onnx")
    art = mf.artifacts({"artifacts": [entry]}, setup["exports"])[0]
    row = Runtime("onnxruntime-nospin", "deploy_kit.runners:OrtRunner", "onnxruntime", ("onnx",),
                  options=(("session.intra_op.allow_spinning", "0"),))
    monkeypatch.setitem(RUNTIMES, row.name, row)
    assert rn.runtimes_for(art) == ["onnxruntime", "onnxruntime-nospin"]
    assert rn.runtimes_for(art, BENCH) == ["onnxruntime", "onnxruntime-nospin"]
    here = rn.make_runner(entry, setup["exports"], runtime=row.name)
    assert here.name == "onnxruntime-nospin" and here.settings["session.intra_op.allow_spinning"] == "0"
    reference = onnx_runner(setup).predict(setup["x"])
    np.testing.assert_array_equal(here.predict(setup["x"]), reference)
    # (the worker process reads the table as shipped, so the isolated case uses a shipped row)
    monkeypatch.setitem(RUNTIMES, "onnxruntime", Runtime(**{**RUNTIMES["onnxruntime"].__dict__, "isolated": True}))
    away = rn.make_runner(entry, setup["exports"])
    assert isinstance(away, rn.IsolatedRunner) and away.name == "onnxruntime"
    np.testing.assert_array_equal(away.predict(setup["x"]), reference)


def test_a_runtime_that_does_not_load_the_target_is_refused(setup):
    entry = next(a for a in setup["manifest"]["artifacts"] if a["path"] == "model.onnx")
    with pytest.raises(ConfigError, match="runtime litert does not load onnx artifacts; it loads tflite"):
        rn.make_runner(entry, setup["exports"], runtime="litert")
