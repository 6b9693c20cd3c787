"""A fine-tuned student through export and verify in the real runtimes: the LUT artifacts carry
the student's weights (the relu/ ones the teacher's), and every export reproduces the student
exactly — the same bar as for the searched student."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from deploy_kit.errors import CheckpointError, ConfigError
from deploy_kit.export import ExportConfig, export
from deploy_kit.finetune import FinetuneConfig, finetune
from deploy_kit.fsutil import write_json
from deploy_kit.teacher import load_teacher
from deploy_kit.verify import VerifyConfig, verify_exports

CODES = {"t1_code": 10, "v1_code": 40, "t2_code": 70, "v2_code": 110, "tmax_code": 150}


@pytest.fixture(scope="module")
def tuned_exports(lenet_teacher, tmp_path_factory):
    run = tmp_path_factory.mktemp("tuned_exports")
    for f in lenet_teacher.iterdir():
        shutil.copy(f, run / f.name)
    teacher = load_teacher(run)
    write_json(run / "result.json", {"model": "lenet5", "layers": {n: dict(CODES) for n in teacher.layer_quant},
                                     "teacher": {"path": "teacher.json", "sha256": teacher.sha256}})
    outcome = finetune(FinetuneConfig(result_path=run / "result.json", epochs=2, max_train=400, ce_weight=0.0,
                                      device="cpu"))
    assert outcome.meta["chosen_epoch"] > 0, "the test needs weights that differ from the teacher's"
    export(ExportConfig(result_path=run / "result.json", targets=("onnx", "ort", "tflite"), lut_form="saturate"))
    return run, run / "exports"


def _weights(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer
            if i.data_type == onnx.TensorProto.INT8}


def test_lut_artifacts_carry_the_students_weights(tuned_exports):
    run, exports = tuned_exports
    manifest = json.loads((exports / "manifest.json").read_text())
    assert manifest["student"]["path"] == "../student.json"
    lut, relu = _weights(exports / "model.onnx"), _weights(exports / "relu" / "model.onnx")
    assert lut.keys() == relu.keys() and any(not np.array_equal(lut[k], relu[k]) for k in lut)
    meta = {p.key: p.value for p in onnx.load(str(exports / "model.onnx")).metadata_props}
    assert meta["deploykit.student_weights_sha256"] == manifest["student"]["weights_sha256"]


def test_every_export_reproduces_the_finetuned_student(tuned_exports):
    _, exports = tuned_exports
    report = verify_exports(VerifyConfig(exports=exports, max_drop=100.0), progress=False)
    assert report.passed, report.failures()
    student = next(r for r in report.rows if r.runtime.startswith("pytorch-student"))
    assert student.runtime == "pytorch-student (fine-tuned)"
    checked = [r for r in report.rows if r.checked]
    assert {r.variant for r in checked} == {"lut", "relu"} and len(checked) >= 6
    for row in checked:
        assert row.agreement_student == 100.0 if row.variant == "lut" else row.agreement_teacher == 100.0
        assert row.max_abs_logit_diff == 0.0, row.artifact


def test_verify_refuses_a_student_changed_after_export(tuned_exports, tmp_path):
    run, _ = tuned_exports
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = copy / "student.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises((CheckpointError, ConfigError), match="student.safetensors"):
        verify_exports(VerifyConfig(exports=copy / "exports"), progress=False)
