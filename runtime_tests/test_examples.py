"""examples/python/classify.py, the standalone client a device team copies: run as a subprocess on
PNG files of real digits, with LiteRT and onnxruntime, it must predict what deploy_kit's own
runners predict on the same pixels, and refuse an artifact that is not the exported file."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deploy_kit.data import normalize
from deploy_kit.runners import make_runner
from exporters.manifest import load_manifest
from deploy_kit.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]
CLASSIFY = ROOT / "examples" / "python" / "classify.py"
# classify.py picks these manifest targets for each --runtime (the .ort file is what ORT Mobile ships)
TARGET_OF = {"litert": "tflite", "ort": "ort"}


@pytest.fixture(scope="module")
def exports(export_lenet_run) -> Path:
    # select here, the default (saturate) below: the client must handle both LUT forms
    return export_lenet_run("examples", ("onnx", "ort", "tflite"), lut_form="select")


def _classify(exports: Path, images: list[Path], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLASSIFY), str(exports), *map(str, images), *args],
                          capture_output=True, text=True, timeout=120)


def _top3(logits: np.ndarray, classes: list[str]) -> list[list[str]]:
    return [[classes[i] for i in np.argsort(-row, kind="stable")[:3]] for row in logits]


@pytest.fixture(scope="module")
def saturate_exports(export_lenet_run) -> Path:
    return export_lenet_run("examples_saturate", ("tflite",))  # the default form


def test_classify_runs_the_phone_lut_form(saturate_exports, digit_pngs):
    """The default `--lut-form saturate` (LEAKY_RELU in the LUT, LUTs after their MaxPool) is what
    a phone gets: the client needs no change and predicts what the runner predicts."""
    _check_classify(saturate_exports, digit_pngs, "litert", "lut")


@pytest.mark.parametrize("variant", ["lut", "relu"])
@pytest.mark.parametrize("runtime", sorted(TARGET_OF))
def test_classify_matches_deploykit_runner(exports, digit_pngs, runtime, variant):
    _check_classify(exports, digit_pngs, runtime, variant)


def _check_classify(exports: Path, digit_pngs, runtime: str, variant: str) -> None:
    paths, pixels = digit_pngs
    done = _classify(exports, paths, "--runtime", runtime, "--variant", variant, "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p in paths]

    manifest = load_manifest(exports)
    entry = next(a for a in manifest["artifacts"] if a["target"] == TARGET_OF[runtime] and a["variant"] == variant)
    assert {r["model"] for r in rows} == {entry["path"]}
    runner = make_runner(entry, exports)
    logits = runner.predict(normalize(pixels, load_teacher(exports.parent).norm))
    expected = _top3(logits, manifest["classes"])
    assert [[t["label"] for t in r["top"]] for r in rows] == expected
    # probabilities are a softmax of the same logits: the top-1 one is the largest and below 1
    assert all(0 < r["top"][0]["probability"] <= 1 and r["top"][0]["probability"] >= r["top"][1]["probability"]
               for r in rows)


def test_classify_prints_ranked_labels_for_humans(exports, digit_pngs):
    paths, _ = digit_pngs
    done = _classify(exports, paths[:2], "--runtime", "litert", "--top-k", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{paths[0]}: ") and "model_int8.tflite" in lines[0]
    assert lines[0].count("%)") == 2


@pytest.mark.parametrize("runtime", sorted(TARGET_OF))
def test_classify_refuses_a_tampered_artifact(exports, digit_pngs, tmp_path, runtime):
    copy = shutil.copytree(exports, tmp_path / "exports")
    manifest = load_manifest(copy)
    entry = next(a for a in manifest["artifacts"] if a["target"] == TARGET_OF[runtime] and a["variant"] == "lut")
    model = copy / entry["path"]
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights: still loads, silently wrong
    model.write_bytes(bytes(data))
    done = _classify(copy, digit_pngs[0][:1], "--runtime", runtime)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "sha256 mismatch" in done.stderr and entry["path"] in done.stderr and "Traceback" not in done.stderr


def test_classify_reports_missing_manifest_unreadable_image_and_missing_target(exports, tmp_path):
    done = _classify(tmp_path, [tmp_path / "x.png"])
    assert done.returncode == 2 and "manifest.json: not found" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "x.png").write_bytes(b"not a png")
    done = _classify(exports, [tmp_path / "x.png"], "--runtime", "ort")
    assert done.returncode == 2 and "cannot read the image" in done.stderr and "Traceback" not in done.stderr
    done = _classify(exports, [tmp_path / "x.png"], "--variant", "nope")
    assert done.returncode == 2 and "no tflite artifact of variant 'nope'" in done.stderr and "tflite/relu" in done.stderr


def test_classify_is_standalone():
    """A device team copies the one file: it may import only the stdlib, numpy, pillow and the runtimes."""
    allowed = {"numpy", "PIL", "ai_edge_litert", "onnxruntime", "__future__"}
    tree = ast.parse(CLASSIFY.read_text())
    imported = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [n])}
    third_party = imported - set(sys.stdlib_module_names)
    assert third_party <= allowed, third_party - allowed
