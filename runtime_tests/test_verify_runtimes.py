"""`verify` across every target of the registry, in the real runtimes (onnxruntime, LiteRT, and
tflite_runtime when it is importable), on the digits test split of a small LeNet-5."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from deploy_kit import runners as rn
from deploy_kit.data import load_dataset, normalize
from deploy_kit.errors import ConfigError
from deploy_kit.export import ExportConfig, calibration_set, export
from deploy_kit.fsutil import sha256_file, write_json
from deploy_kit.lut import ActivationQuant
from deploy_kit.teacher import load_teacher
from deploy_kit.train import TrainConfig, train_teacher
from deploy_kit.verify import VerifyConfig, max_pool_codes, verify_exports
from exporters import manifest as mf
from exporters.manifest import seal
from exporters.registry import BENCH, RUNTIMES, TARGETS, VERIFY, runtimes_loading

AVAILABLE = [name for name, t in TARGETS.items() if t.available()]
CODES = {"t1_code": 2, "v1_code": 5, "t2_code": 9, "v2_code": 14, "tmax_code": 24}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small LeNet-5 teacher, a result.json approximating every layer, and every available export."""
    root = tmp_path_factory.mktemp("verify_runtimes")
    train_teacher(TrainConfig(model="lenet5", epochs=3, qat_epochs=1, max_train=512), root)
    teacher = load_teacher(root)
    write_json(root / "result.json", {"model": teacher.arch, "layers": {n: dict(CODES) for n in teacher.layer_quant},
                                      "teacher": {"path": ".", "sha256": teacher.sha256}})
    export(ExportConfig(result_path=root / "result.json", targets=tuple(AVAILABLE)))
    report = verify_exports(VerifyConfig(exports=root / "exports"), progress=False)
    return {"root": root, "exports": root / "exports", "teacher": teacher, "report": report}


@pytest.mark.parametrize("target", AVAILABLE)
def test_every_runtime_of_the_target_passes(run, target):
    rows = [r for r in run["report"].rows if r.checked and r.artifact.endswith(TARGETS[target].filename)]
    runtimes = {r.name for r in runtimes_loading(target, VERIFY)}  # the table decides which
    assert TARGETS[target].runtime in runtimes
    assert {r.variant for r in rows} == {"lut", "relu"}
    assert len(rows) == 2 * len(runtimes)
    for r in rows:
        assert r.passed, r.failures
        assert (r.agreement_student if r.variant == "lut" else r.agreement_teacher) >= 99.0
        assert r.images_per_s > 0 and r.bytes > 0


@pytest.mark.parametrize("name", RUNTIMES)
def test_every_runtime_of_the_table_runs_what_it_loads(run, name):
    """Each row of the runtime table — bench-only and isolated ones included — built by
    make_runner from the table alone, on every exported target it loads: both variants
    reproduce their reference (the LUT file the student, the ReLU file the teacher)."""
    spec = RUNTIMES[name]
    usable, why = spec.status()
    if not usable:
        pytest.skip(why or f"{name} is not installed ({spec.install_hint()})")
    manifest = mf.load_manifest(run["exports"])
    luts, _ = mf.manifest_luts(manifest)
    x = normalize(load_dataset("digits").split("test").images[:64], run["teacher"].norm)
    refs = {"lut": rn.StudentRunner(run["teacher"], luts).predict(x), "relu": rn.TeacherRunner(run["teacher"]).predict(x)}
    entries = [a for a in manifest["artifacts"] if a["target"] in spec.loads]
    assert entries or not set(spec.loads) & set(AVAILABLE)
    for entry in entries:
        runner = rn.make_runner(entry, run["exports"], runtime=name)
        assert isinstance(runner, rn.IsolatedRunner) == spec.isolated
        assert runner.name.startswith(spec.label or spec.name)
        logits = runner.predict(x)
        assert (logits.argmax(1) == refs[entry["variant"]].argmax(1)).mean() >= 0.98, (name, entry["path"])
        art = mf.artifacts({"artifacts": [entry]}, run["exports"])[0]
        for use in spec.uses:
            assert name in rn.runtimes_for(art, use)


@pytest.mark.parametrize("target", AVAILABLE)
def test_layer_codes_are_readable_and_follow_the_table(run, target):
    """--localize needs every runtime's codes at each LUT; a correct export maps them by the table."""
    manifest = mf.load_manifest(run["exports"])
    luts, _ = mf.manifest_luts(manifest)
    entry = next(a for a in manifest["artifacts"] if a["target"] == target and a["variant"] == "lut")
    runner = rn.make_runner(entry, run["exports"])
    x = normalize(load_dataset("digits").split("test").images[:16], run["teacher"].norm)
    quant = run["teacher"].layer_quant
    if target == "ort":
        with pytest.raises(ConfigError, match="only be read from a .onnx"):
            runner.tap_codes(x, list(luts), quant)
        return
    codes = runner.tap_codes(x, list(luts), quant)
    student = rn.StudentRunner(run["teacher"], luts).tap_codes(x, list(luts), quant)
    assert list(codes) == list(luts)
    pools = entry.get("lut_pools", {})  # every target runs a LUT that feeds a MaxPool after it
    for name, lut in luts.items():
        mine = max_pool_codes(student[name].after, pools[name]) if name in pools else student[name].after
        assert codes[name].after.shape == mine.shape  # NHWC already turned to NCHW
        np.testing.assert_array_equal(codes[name].after, lut.apply_codes(codes[name].before, quant[name].zero_point))
    assert set(pools) == {"conv1", "conv2"}


@pytest.mark.skipif("tflite" not in AVAILABLE, reason="the tflite target needs TensorFlow")
@pytest.mark.parametrize("lut_form", ["select", "saturate"])
def test_broken_tflite_fails_and_localize_names_the_layer(run, tmp_path, lut_form):
    """Shift conv2's tmax threshold in model.onnx and convert that graph to TFLite: the INT8
    file carries the broken LUT (after conv2's MaxPool), verify must fail it and --localize must
    name conv2, whatever the TFLite LUT form."""
    root = tmp_path / "run"
    shutil.copytree(run["root"], root)
    exports, layer = root / "exports", "conv2"
    manifest = json.loads((exports / "manifest.json").read_text())
    quant = ActivationQuant.from_dict(manifest["layers"][layer])
    proto = onnx.load(str(exports / "model.onnx"))
    init = next(i for i in proto.graph.initializer if i.name == f"{layer}/lut/tmax")
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) + np.float32(120 * quant.scale), init.name))
    broken_onnx = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken_onnx))
    teacher = run["teacher"]
    calibration, _ = calibration_set(teacher, 32, teacher.meta["seed"])
    details = TARGETS["tflite"].exporter()(broken_onnx, exports / "model_int8.tflite", io="int8",
                                           calibration=calibration, layer_quant=teacher.layer_quant, lut_form=lut_form)
    assert layer in details["lut_pools"]  # conv2 feeds a MaxPool: its LUT runs after it, in both forms
    for a in manifest["artifacts"]:
        if a["path"] == "model_int8.tflite":
            a.update(sha256=sha256_file(exports / a["path"]), lut_form=lut_form, lut_pools=details["lut_pools"])
    write_json(exports / "manifest.json", seal(manifest, exports))  # as a (buggy) exporter would

    report = verify_exports(VerifyConfig(exports=exports, localize=True), progress=False)
    failed = {r.artifact for r in report.rows if not r.passed}
    assert failed == {"model_int8.tflite"}
    row = next(r for r in report.rows if r.artifact == "model_int8.tflite" and r.runtime == "litert")
    assert row.localize["first_diverging_layer"] == layer
    assert any(f.startswith(f"first diverging layer {layer}") for f in row.failures)
