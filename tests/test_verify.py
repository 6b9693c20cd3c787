"""`deploykit verify` on real exports of a small LeNet-5 (digits), in the real onnxruntime.

The TFLite target is covered by runtime_tests/test_verify_runtimes.py (it needs TensorFlow
to export, which is slow); here the ONNX and ORT targets carry the contract: the hash check,
the thresholds, the table and verify.json, and `--localize` on deliberately broken graphs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from deploy_kit.cli import main
from deploy_kit.errors import ConfigError, ExportError, VerificationError
from deploy_kit.fsutil import sha256_file, write_json
from deploy_kit.lut import ActivationQuant
from deploy_kit.verify import VerifyConfig, mean_kl, verify_exports
from exporters.manifest import seal

ORT_TARGETS = ("onnx", "ort")


@pytest.fixture(scope="module")
def clean_exports(export_lenet_run) -> Path:
    """A run folder (copy of the session teacher) with result.json and its ONNX + ORT exports."""
    return export_lenet_run("verify_run", ORT_TARGETS)


@pytest.fixture
def exports(clean_exports, tmp_path) -> Path:
    """A private copy of the whole run folder (tests may break files in it)."""
    run = tmp_path / "run"
    shutil.copytree(clean_exports.parent, run)
    return run / "exports"


def rehash(exports: Path, rel: str) -> None:
    """Record an edited artifact's new sha256 in the manifest and seal it again, as a (buggy)
    exporter would."""
    manifest = json.loads((exports / "manifest.json").read_text())
    for a in manifest["artifacts"]:
        if a["path"] == rel:
            a["sha256"], a["bytes"] = sha256_file(exports / rel), (exports / rel).stat().st_size
    write_json(exports / "manifest.json", seal(manifest, exports))


def break_lut_constant(exports: Path, layer: str, constant: str, shift_codes: int) -> None:
    """Move the ONNX constant `<layer>/lut/<constant>` (a threshold or a level) by whole codes."""
    manifest = json.loads((exports / "manifest.json").read_text())
    quant = ActivationQuant.from_dict(manifest["layers"][layer])
    proto = onnx.load(str(exports / "model.onnx"))
    init = next(i for i in proto.graph.initializer if i.name == f"{layer}/lut/{constant}")
    value = onnx.numpy_helper.to_array(init) + np.float32(shift_codes * quant.scale)
    init.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), init.name))
    onnx.save(proto, str(exports / "model.onnx"))
    rehash(exports, "model.onnx")


def verify_cli(*args):
    return CliRunner().invoke(main, ["verify", *map(str, args)])


def test_clean_exports_pass_and_write_verify_json(exports):
    report = verify_exports(VerifyConfig(exports=exports, localize=True), progress=False)
    assert report.passed, report.failures()
    checked = [r for r in report.rows if r.checked]
    onnx_codes = next(r for r in checked if r.artifact == "model.onnx").localize["layers"]
    assert onnx_codes and all(e["table_mismatch"] == 0 for e in onnx_codes.values())  # no false alarm
    # conv1/conv2 run their LUT after the MaxPool (manifest lut_pools): the student's codes, pooled
    # through the same window, are the export's — shapes agree and no code differs
    entry = next(a for a in json.loads((exports / "manifest.json").read_text())["artifacts"] if a["path"] == "model.onnx")
    assert set(entry["lut_pools"]) == {"conv1", "conv2"}
    assert all(e.get("share_differing") == 0 for e in onnx_codes.values()), onnx_codes
    assert {(r.artifact, r.variant) for r in checked} == {("model.onnx", "lut"), ("model.ort", "lut"),
                                                          ("relu/model.onnx", "relu"), ("relu/model.ort", "relu")}
    for row in checked:
        assert row.agreement_student >= 99.0 if row.variant == "lut" else row.agreement_teacher >= 99.0
        assert row.bytes == (exports / row.artifact).stat().st_size
    saved = json.loads((exports / "verify.json").read_text())
    assert saved["passed"] is True and saved["images"] == report.images == 359  # the digits test split


def test_json_summary_has_the_issue_keys(exports):
    result = verify_cli("--exports", exports, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["passed"] is True
    assert set(summary["rows"][0]) == {"runtime", "artifact", "accuracy", "drop_vs_teacher", "agreement_student",
                                       "agreement_teacher", "max_abs_logit_diff", "images_per_s"}
    assert all(0 <= r["accuracy"] <= 100 and r["agreement_student"] > 1 for r in summary["rows"])  # percent, not 0..1


@pytest.mark.parametrize("layer, constant, shift", [("conv2", "tmax", 120),   # a shifted threshold
                                                    ("fc1", "v1", 150)])      # one wrong LUT level
def test_broken_lut_fails_and_localize_names_the_layer(exports, layer, constant, shift):
    break_lut_constant(exports, layer, constant, shift)
    result = verify_cli("--exports", exports, "--localize")
    assert result.exit_code == 1, result.output
    assert "onnxruntime [model.onnx]" in result.stderr and "agreement with the student" in result.stderr
    assert f"first diverging layer {layer}:" in result.stderr
    assert "model.ort" not in result.stderr.split("error:")[1]  # the untouched artifacts still pass
    row = next(r for r in json.loads((exports / "verify.json").read_text())["rows"] if r["artifact"] == "model.onnx")
    assert row["localize"]["first_diverging_layer"] == layer
    assert row["localize"]["layers"][layer]["table_mismatch"] > 0
    # everything before the broken layer still maps its own codes by the table
    layers = list(row["localize"]["layers"])
    assert all(row["localize"]["layers"][n]["table_mismatch"] == 0 for n in layers[:layers.index(layer)])


def test_localize_fails_a_lut_that_breaks_its_table_even_when_top1_holds(exports):
    """One code of shift in conv1's t2 changes a sliver of activations: maybe no top-1 flips,
    but the LUT no longer maps its input codes by the table, and --localize says where."""
    break_lut_constant(exports, "conv1", "t2", 1)
    assert verify_cli("--exports", exports, "--max-drop", 100, "--min-agreement", 0).exit_code == 0
    result = verify_cli("--exports", exports, "--max-drop", 100, "--min-agreement", 0, "--localize")
    assert result.exit_code == 1, result.output
    assert "onnxruntime [model.onnx]: first diverging layer conv1:" in result.stderr
    assert "break the LUT table" in result.stderr


def test_thresholds_are_applied(exports):
    break_lut_constant(exports, "conv2", "tmax", 120)
    with pytest.raises(VerificationError, match=r"onnxruntime \[model.onnx\]: top-1 agreement with the student"):
        verify_exports(VerifyConfig(exports=exports), progress=False).raise_for_failures()
    lenient = verify_exports(VerifyConfig(exports=exports, max_drop=100, min_agreement=0), progress=False)
    assert lenient.passed


def test_changed_byte_fails_the_hash_check(exports):
    path = exports / "relu" / "model.ort"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = verify_cli("--exports", exports)
    assert result.exit_code == 2, result.output
    assert "relu/model.ort: sha256" in result.stderr and "does not match the manifest" in result.stderr
    assert "Traceback" not in result.output
    assert not (exports / "verify.json").exists()  # nothing ran
    with pytest.raises(ExportError, match="sha256"):
        verify_exports(VerifyConfig(exports=exports), progress=False)


def test_missing_manifest_and_bad_options_are_config_errors(tmp_path):
    result = verify_cli("--exports", tmp_path)
    assert result.exit_code == 2 and "no manifest" in result.stderr
    with pytest.raises(ConfigError, match="min-agreement"):
        VerifyConfig(exports=tmp_path, min_agreement=150)


def test_mean_kl_is_zero_for_equal_and_positive_for_different_logits():
    a = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], np.float32)
    assert mean_kl(a, a) == pytest.approx(0.0, abs=1e-12)
    assert mean_kl(a, a[:, ::-1].copy()) > 0.1
