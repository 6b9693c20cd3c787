"""`deploykit train`: the --json summary, and every bad input exits 2 with one readable line,
no traceback and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from deploy_kit.cli import main
from deploy_kit.fsutil import sha256_file
from deploy_kit.models import ARCHITECTURES
from deploy_kit.teacher import SIDECAR_NAME, WEIGHTS_NAME

from test_data import write_cifar, write_imagefolder


def _train(*args):
    return CliRunner().invoke(main, ["train", *args], catch_exceptions=False)


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


def _one_error_line(result) -> str:
    """The single error line on stderr."""
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [l for l in result.stderr.splitlines() if l.lower().startswith("error")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_json_summary_shape(tmp_path):
    out = tmp_path / "run"
    result = _train("--model", "lenet5", "--out", str(out), "--epochs", "1", "--qat-epochs", "1",
                    "--max-train", "200", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)  # stdout holds the JSON object and nothing else
    assert set(summary) == {"checkpoint", "model", "seconds", "accuracy"}
    assert summary["model"] == "lenet5" and summary["checkpoint"] == str(out / WEIGHTS_NAME)
    assert isinstance(summary["seconds"], float) and summary["seconds"] > 0
    assert set(summary["accuracy"]) == {"float", "int8"}
    for kind in ("float", "int8"):
        assert set(summary["accuracy"][kind]) == {"val", "test"}
        assert all(0 <= v <= 100 for v in summary["accuracy"][kind].values())
    # percent, not a fraction: even a one-epoch model is right on more than 1% of the digits
    assert summary["accuracy"]["float"]["test"] > 1 and summary["accuracy"]["int8"]["test"] > 1
    assert "teacher →" in result.stderr  # human output moved to stderr
    meta = json.loads((out / SIDECAR_NAME).read_text())
    assert meta["accuracy"]["int8"] == summary["accuracy"]["int8"]
    assert meta["seed"] == 0 and meta["config"]["max_train"] == 200


def test_sgd_with_weight_decay_is_recorded_and_trains(tmp_path):
    out = tmp_path / "run"
    result = _train("--model", "lenet5", "--out", str(out), "--epochs", "2", "--qat-epochs", "1", "--max-train", "400",
                    "--optimizer", "sgd", "--lr", "0.05", "--weight-decay", "5e-4", "--json")
    assert result.exit_code == 0, result.stderr
    meta = json.loads((out / SIDECAR_NAME).read_text())
    assert meta["config"]["optimizer"] == "sgd" and meta["config"]["weight_decay"] == 5e-4
    assert meta["accuracy"]["float"]["val"] > 30  # two SGD epochs on 400 digits learn something (chance: 10)


def test_make_optimizer_builds_what_the_config_names():
    from deploy_kit.train import make_optimizer
    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd = make_optimizer(params, "sgd", 0.1, 5e-4)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 5e-4
    assert isinstance(make_optimizer(params, "adam", 1e-3), torch.optim.Adam)


@pytest.mark.parametrize("args, expected", [(["--optimizer", "lbfgs"], "--optimizer"),
                                            (["--weight-decay", "-1"], "--weight-decay"),
                                            (["--weight-decay", "nan"], "--weight-decay")])
def test_bad_optimizer_options_are_one_line(tmp_path, args, expected):
    result = _train("--out", str(tmp_path / "run"), *args)
    assert result.exit_code == 2 and expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_human_output_without_json(lenet_teacher, tmp_path):
    out = tmp_path / "run"
    result = _train("--out", str(out), "--epochs", "0", "--qat-epochs", "1", "--max-train", "64")
    assert result.exit_code == 0, result.stderr
    assert "int8" in result.stdout and "test" in result.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)


def test_unknown_model_lists_the_valid_ones(tmp_path):
    out = tmp_path / "run"
    result = _train("--model", "resnet50", "--out", str(out))
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert "resnet50" in line and all(name in line for name in ARCHITECTURES)
    assert not out.exists()


def test_unknown_dataset_lists_the_valid_ones(tmp_path):
    out = tmp_path / "run"
    result = _train("--data", "mnist", "--out", str(out))
    assert result.exit_code == 2
    assert _one_error_line(result) == ("error: unknown dataset 'mnist'; expected one of: digits, cifar10:PATH, "
                                       "imagefolder:PATH")
    assert not out.exists()


@pytest.mark.parametrize("kind", ["cifar10", "imagefolder"])
def test_missing_data_folder(tmp_path, kind):
    out, missing = tmp_path / "run", tmp_path / "no-such-folder"
    result = _train("--data", f"{kind}:{missing}", "--out", str(out))
    assert result.exit_code == 2
    assert _one_error_line(result) == (f"error: {kind}:{missing}: folder {missing} does not exist; "
                                       "pass the folder that holds the dataset")
    assert not out.exists()


def test_empty_data_folder(tmp_path):
    (tmp_path / "data").mkdir()
    result = _train("--data", f"imagefolder:{tmp_path / 'data'}", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert "has no train/ folder" in _one_error_line(result)
    assert not (tmp_path / "run").exists()


def test_corrupt_cifar_folder(tmp_path):
    folder, _ = write_cifar(tmp_path / "data")
    (folder / "test_batch").write_bytes(b"\x80\x02garbage")
    result = _train("--data", f"cifar10:{folder}", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert "test_batch is not a CIFAR-10 python batch" in _one_error_line(result)
    assert not (tmp_path / "run").exists()


def test_splits_with_different_classes(tmp_path):
    root = tmp_path / "data"
    write_imagefolder(root, splits=("train",))
    write_imagefolder(root, splits=("test",), classes={"cat": (1, 1, 1)})
    result = _train("--data", f"imagefolder:{root}", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert "differ from train/ classes" in _one_error_line(result)
    assert not (tmp_path / "run").exists()


def test_existing_output_needs_force(lenet_teacher):
    before = {name: sha256_file(lenet_teacher / name) for name in (SIDECAR_NAME, WEIGHTS_NAME)}
    listing = _files(lenet_teacher)
    result = _train("--out", str(lenet_teacher))
    assert result.exit_code == 2
    assert _one_error_line(result) == (f"error: {lenet_teacher / SIDECAR_NAME} already exists; pass --force to "
                                       "overwrite it or choose another --out")
    assert {name: sha256_file(lenet_teacher / name) for name in before} == before
    assert _files(lenet_teacher) == listing


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    """The installed entry point, not the test runner: exit code 2, one line, nothing written."""
    env = {**os.environ, "DEPLOYKIT_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "run"
    deploykit = os.path.join(os.path.dirname(sys.executable), "deploykit")
    proc = subprocess.run([deploykit, "train", "--data", "imagefolder:/nonexistent/x",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: imagefolder:/nonexistent/x: folder /nonexistent/x does not exist; pass the folder that holds the dataset"]
    assert not out.exists()


def test_a_run_shorter_than_the_lr_warmup_trains(tmp_path):
    """One epoch of 64 images is a single batch: too short for one-cycle's warm-up phase, which
    used to divide by zero inside torch's scheduler."""
    result = _train("--model", "lenet5", "--out", str(tmp_path / "run"), "--epochs", "1", "--qat-epochs", "1",
                    "--max-train", "64")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "run" / WEIGHTS_NAME).is_file()


def test_random_crops_are_windows_of_the_zero_padded_images():
    from deploy_kit.train import augment, random_crops

    x = torch.arange(4 * 2 * 5 * 5, dtype=torch.float32).reshape(4, 2, 5, 5) + 1
    crops = random_crops(x, torch.Generator().manual_seed(3), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(4):
        windows = [padded[i, :, dy:dy + 5, dx:dx + 5] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(crops[i], w) for w in windows)
    offsets = {tuple(torch.nonzero(c[0]).min(0).values.tolist()) for c in crops}
    assert len(offsets) > 1  # one window per image, not one per batch
    same = augment(x, torch.Generator().manual_seed(3), crop=2)
    assert torch.equal(same, crops)


@pytest.mark.parametrize("crop", ["-1", "17"])
def test_crop_out_of_range_is_one_line(tmp_path, crop):
    res = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "r"), "--crop", crop])
    assert res.exit_code == 2 and "--crop" in res.output and not (tmp_path / "r").exists()
