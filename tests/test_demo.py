"""`deploykit demo`: the README's main command, end to end with its defaults, and its refusals."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from deploy_kit.cli import main
from deploy_kit.demo import STAGES

RUN_FILES = ("teacher.safetensors", "teacher.json", "result.json", "search_log.jsonl", "report.html",
             "student.safetensors", "student.json",
             "exports/manifest.json", "exports/verify.json", "exports/bench.json", "exports/bench.md",
             "exports/model.onnx", "exports/model.ort", "exports/model_int8.tflite",
             "exports/relu/model.onnx", "exports/relu/model.ort", "exports/relu/model_int8.tflite")


def _demo(*args):
    return CliRunner().invoke(main, ["demo", *args], catch_exceptions=False)


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.slow
def test_demo_defaults_meet_every_verify_threshold(tmp_path):
    """The exact command the README tells a newcomer to run (2 minutes here), with only the
    output folder changed: every stage's output exists and every verify threshold passes."""
    out = tmp_path / "demo"
    result = _demo("--out", str(out), "--json")
    assert result.exit_code == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["passed"] is True
    assert [s["stage"] for s in summary["stages"]] == list(STAGES)
    for name in RUN_FILES:
        assert (out / name).is_file(), name

    verify = json.loads((out / "exports" / "verify.json").read_text())
    assert verify["passed"] and verify["images"] == 359
    lut_rows = [r for r in verify["rows"] if r["checked"] and not r["artifact"].startswith("relu/")]
    assert {r["runtime"] for r in lut_rows} >= {"onnxruntime", "onnxruntime (ort)", "litert"}
    assert all(r["agreement_student"] >= 99.0 and r["drop_vs_teacher"] <= 1.0 for r in lut_rows)
    # the LUT exports carry the fine-tuned student, and verify measured it
    result_json = json.loads((out / "result.json").read_text())
    assert result_json["student"]["path"] == "student.json"
    assert json.loads((out / "exports" / "manifest.json").read_text())["student"]["path"] == "../student.json"
    assert any(r["runtime"] == "pytorch-student (fine-tuned)" for r in verify["rows"])
    assert summary["finetune"]["acc_student"] == result_json["student"]["metrics"]["acc_student"]

    bench = json.loads((out / "exports" / "bench.json").read_text())
    assert {(r["runtime"], r["variant"]) for r in bench["rows"]} >= {("litert", "lut"), ("litert", "relu")}
    assert summary["report"] == str(out / "report.html")
    # The human output ends with the tables and the report's path.
    assert "report → " in result.stderr and "PASSED" in result.stderr and "| runtime |" in result.stderr


def test_demo_refuses_an_existing_run_without_force(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "teacher.json").write_text("{}")
    before = _snapshot(out)
    result = _demo("--out", str(out))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {out} already holds a run; pass --force to replace "
                                                  f"its outputs or choose another --out"]
    assert _snapshot(out) == before


@pytest.mark.parametrize("args, expected", [
    (("--bench-repeats", "0"), "--bench-repeats must be >= 1"),
    (("--episodes", "0"), "need --episodes >= 1"),
    (("--qat-epochs", "0"), "need epochs >= 0 and qat_epochs >= 1"),
    (("--data", "mnist"), "mnist"),
    (("--lut-form", "gather"), "Invalid value for '--lut-form'"),
    (("--finetune-epochs", "-1"), "Invalid value for '--finetune-epochs'"),
    (("--seed", "-1"), "Invalid value for '--seed'"),
])
def test_bad_options_fail_before_any_work(tmp_path, args, expected):
    out = tmp_path / "demo"
    result = _demo("--out", str(out), *args)
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() or not any(out.rglob("*"))
