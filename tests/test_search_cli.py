"""`deploykit search` on the command line: --json keys, and bad input → one line, exit 2."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from deploy_kit.cli import main
from deploy_kit.result import load_result

FAST = ["--episodes", "4", "--reward-images", "32"]


def invoke(*args):
    return CliRunner().invoke(main, ["search", *map(str, args)])


def test_json_summary_has_exactly_the_documented_keys(lenet_teacher, tmp_path):
    out = tmp_path / "r.json"
    r = invoke("--teacher", lenet_teacher, "--method", "random", "--out", out, "--json", *FAST)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(summary) == {"result", "method", "evaluations", "best_reward", "acc_teacher", "acc_student",
                            "acc_drop", "seconds"}
    assert summary["result"] == str(out) and summary["evaluations"] == 4 and summary["method"] == "random"
    assert load_result(out).metrics["acc_drop"] == summary["acc_drop"]


def _corrupt(src, dst):
    shutil.copytree(src, dst)
    w = dst / "teacher.safetensors"
    w.write_bytes(w.read_bytes()[:-16] + b"\0" * 16)
    return dst


@pytest.mark.parametrize("case, expected", [
    ("missing", "no teacher at"),
    ("corrupt", "does not match the sha256"),
    ("layers", "unknown layer(s) conv7; lenet5 has: conv1, conv2, fc1, fc2"),
    ("tmax", "tmax=6 leaves no legal codes"),
    ("exists", "already exists; pass --force"),
])
def test_bad_input_exits_2_with_one_line(lenet_teacher, tmp_path, case, expected):
    teacher, extra = lenet_teacher, []
    if case == "missing":
        teacher = tmp_path / "nothing"
    elif case == "corrupt":
        teacher = _corrupt(lenet_teacher, tmp_path / "run")
    elif case == "layers":
        extra = ["--layers", "conv1,conv7"]
    elif case == "tmax":
        extra = ["--tmax-fixed", "6"]
    else:
        (tmp_path / "r.json").write_text("{}")
    r = invoke("--teacher", teacher, "--out", tmp_path / "r.json", *FAST, *extra)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1]
    assert "Traceback" not in r.output
