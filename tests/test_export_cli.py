"""`deploykit export`: artifacts, manifest, --json, and one-line exit-2 errors for bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from deploy_kit.cli import main
from deploy_kit.export import ExportConfig
from deploy_kit.errors import ConfigError
from deploy_kit.fsutil import sha256_file
from exporters.registry import TARGETS

CODES = {"t1_code": 2, "v1_code": 4, "t2_code": 8, "v2_code": 12, "tmax_code": 20}
FAST = ["--target", "onnx", "--target", "ort"]


@pytest.fixture
def run(lenet_teacher, tmp_path):
    """A copy of the session teacher plus a valid result.json naming it."""
    folder = tmp_path / "run"
    shutil.copytree(lenet_teacher, folder)
    meta = json.loads((folder / "teacher.json").read_text())
    write_result(folder, {n: {**CODES, **q} for n, q in meta["layers"].items()}, teacher={"path": ".", "sha256": meta["weights_sha256"]})
    return folder


def write_result(folder, layers, model="lenet5", **extra):
    (folder / "result.json").write_text(json.dumps({"model": model, "layers": layers, **extra}))
    return folder / "result.json"


def invoke(*args):
    result = CliRunner().invoke(main, ["export", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_export_writes_artifacts_and_manifest(run):
    code, out, err = invoke("--config", run / "result.json", *FAST, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert set(summary) == {"artifacts", "seconds"}
    exports = run / "exports"
    for a in summary["artifacts"]:
        assert set(a) == {"target", "path", "bytes", "sha256"}
        assert sha256_file(a["path"]) == a["sha256"]
    assert {(a["target"], a["path"]) for a in summary["artifacts"]} == {
        (t, str(exports / TARGETS[t].path(v))) for t in ("onnx", "ort") for v in ("lut", "relu")}
    assert (exports / "required_operators.config").is_file() and (exports / "relu" / "required_operators.config").is_file()
    manifest = json.loads((exports / "manifest.json").read_text())
    assert manifest["schema"] == "deploykit-manifest/1" and manifest["model"] == "lenet5"
    assert (exports / manifest["teacher"]["path"]).resolve() == (run / "teacher.json").resolve()
    assert manifest["result"]["sha256"] == sha256_file(run / "result.json")
    assert manifest["preprocessing"]["height"] == 32 and manifest["classes"][:2] == ["0", "1"]
    assert manifest["preprocessing"]["color"] == "L" and manifest["preprocessing"]["resize"] == "bilinear"
    assert manifest["layers"]["conv1"]["t1_code"] == 2 and "scale" in manifest["layers"]["conv1"]
    for a in manifest["artifacts"]:
        assert sha256_file(exports / a["path"]) == a["sha256"] and a["runtime"] == "onnxruntime"
        assert a["inputs"][0]["name"] == "input" and a["inputs"][0]["layout"] == "NCHW"
        assert a["inputs"][0]["shape"] == ["batch", 1, 32, 32] and a["outputs"][0]["dtype"] == "float32"


def test_onnx_carries_the_manifest_metadata(run):
    from exporters.manifest import read_onnx_metadata

    assert invoke("--config", run / "result.json", "--target", "onnx")[0] == 0
    meta = read_onnx_metadata(run / "exports" / "model.onnx")
    manifest = json.loads((run / "exports" / "manifest.json").read_text())
    for key in ("model", "classes", "preprocessing", "layers"):
        assert meta[key] == manifest[key]
    assert meta["teacher_sha256"] == manifest["teacher"]["sha256"] and meta["variant"] == "lut"


def test_no_overwrite_without_force(run):
    assert invoke("--config", run / "result.json", "--target", "onnx")[0] == 0
    before = sha256_file(run / "exports" / "manifest.json")
    code, _, err = invoke("--config", run / "result.json", "--target", "onnx")
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    assert sha256_file(run / "exports" / "manifest.json") == before
    assert invoke("--config", run / "result.json", "--target", "onnx", "--force")[0] == 0


def test_teacher_from_option_when_result_names_none(run, tmp_path):
    meta = json.loads((run / "teacher.json").read_text())
    result = write_result(tmp_path, {"conv1": CODES})
    code, _, err = invoke("--config", result, "--target", "onnx")
    assert code == 2 and "--teacher" in err
    assert invoke("--config", result, "--teacher", run, "--target", "onnx", "--out", tmp_path / "x")[0] == 0
    assert meta["model"] == "lenet5"


@pytest.mark.parametrize("layers, model, needle", [
    ({"conv7": CODES}, "lenet5", "conv7"),                                                       # unknown layer
    ({"conv1": {**CODES, "t1_code": 5, "v1_code": 4}}, "lenet5", "t1=5 v1=4"),                 # out of order
    ({"conv1": {**CODES, "v2_code": 290, "tmax_code": 300}}, "lenet5", "qmax"),                 # out of range
    ({"conv1": {**CODES, "t1_code": -1}}, "lenet5", "t1=-1"),                                    # negative code
    ({"conv1": CODES}, "vgg16", "vgg16"),                                                        # model mismatch
    ({"conv1": {**CODES, "t2_code": "8"}}, "lenet5", "t2_code"),                                 # wrong type
])
def test_inconsistent_result_is_one_line_exit_2(run, layers, model, needle):
    write_result(run, layers, model=model, teacher={"path": "."})
    code, out, err = invoke("--config", run / "result.json", "--target", "onnx")
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (run / "exports").exists()


def test_malformed_json_is_exit_2(run):
    (run / "result.json").write_text("{ not json")
    code, _, err = invoke("--config", run / "result.json", "--target", "onnx")
    assert code == 2 and "result.json" in err and len(err.strip().splitlines()) == 1


def test_scale_differing_from_teacher_is_exit_2(run):
    meta = json.loads((run / "teacher.json").read_text())
    q = {**meta["layers"]["conv1"], "scale": meta["layers"]["conv1"]["scale"] * 2}
    write_result(run, {"conv1": {**CODES, **q}}, teacher={"path": "."})
    code, _, err = invoke("--config", run / "result.json", "--target", "onnx")
    assert code == 2 and "conv1" in err and "scale" in err


def test_unwritable_output_is_exit_2(run, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = invoke("--config", run / "result.json", "--target", "onnx", "--out", blocker / "exports")
    assert code == 2 and "a-file" in err and len(err.strip().splitlines()) == 1


def test_cli_targets_come_from_the_registry():
    from deploy_kit.cli.export import command

    choice = next(p for p in command.params if p.name == "targets").type
    assert list(choice.choices) == [*TARGETS, "all"]
    assert len({t.filename for t in TARGETS.values()}) == len(TARGETS)


def test_config_rejects_bad_options(tmp_path):
    with pytest.raises(ConfigError, match="--io"):
        ExportConfig(result_path=tmp_path / "r.json", io="int4")
    with pytest.raises(ConfigError, match="tfjs"):
        ExportConfig(result_path=tmp_path / "r.json", targets=("tfjs",))


@pytest.mark.parametrize("option", [("--io", "float"), ("--lut-form", "select")])
def test_a_tflite_option_without_the_tflite_target_is_refused(run, option):
    """ONNX and ORT take and return float and keep Less/Where: the option would be ignored."""
    code, _, err = invoke("--config", run / "result.json", "--target", "ort", "--target", "onnx", *option)
    assert code == 2 and f"{option[0]} {option[1]} applies to the tflite target only" in err
    assert "add --target tflite" in err and not (run / "exports").exists()


def test_target_options_apply_when_a_chosen_target_takes_them(tmp_path):
    ExportConfig(result_path=tmp_path / "r.json", targets=("onnx", "tflite"), io="float", lut_form="select")
    ExportConfig(result_path=tmp_path / "r.json", targets=("all",), io="float")
    ExportConfig(result_path=tmp_path / "r.json", targets=("ort",), io="int8")  # the default: nothing asked


def test_failed_export_leaves_the_previous_one_untouched(run, monkeypatch):
    """Everything is built in a temp folder: a target failing half-way changes nothing on disk."""
    from exporters.registry import Target

    assert invoke("--config", run / "result.json", "--target", "onnx")[0] == 0
    before = {p.relative_to(run): sha256_file(p) for p in (run / "exports").rglob("*") if p.is_file()}
    # a real function with the wrong signature: the ort step raises after model.onnx was written
    broken = Target("ort", "model.ort", "onnxruntime", "exporters.registry:target_names", "broken on purpose")
    monkeypatch.setitem(TARGETS, "ort", broken)
    code, _, _ = invoke("--config", run / "result.json", "--target", "ort", "--force")
    assert code != 0
    after = {p.relative_to(run): sha256_file(p) for p in (run / "exports").rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in run.iterdir() if p.name.startswith(".exports")] == []
