"""`deploykit report`: a self-contained page with one figure per approximated layer, rendered in
a real headless Chromium; sections whose stage has not run say so instead of failing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from deploy_kit.cli import main
from deploy_kit.errors import ConfigError, OutputExistsError
from deploy_kit.report import REPORT_NAME, write_report
from deploy_kit.search import SearchConfig, run_search
from deploy_kit.search.reward import RewardConfig
from deploy_kit.teacher import SIDECAR_NAME, WEIGHTS_NAME

def _copy_teacher(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in (SIDECAR_NAME, WEIGHTS_NAME):
        shutil.copy(src / name, dst / name)
    return dst


def _search(run: Path, method: str, out: Path, layers=None) -> None:
    cfg = SearchConfig(method=method, episodes=8, seed=0, layers=layers, top_n=1, state_images=256,
                       reward=RewardConfig(images=64))
    run_search(run, cfg, out=out)


@pytest.fixture(scope="module")
def searched_run(lenet_teacher, tmp_path_factory) -> Path:
    """A run folder with a real (tiny) search on three of LeNet5's layers, plus a random-search
    baseline log in a sub-folder; no exports."""
    run = _copy_teacher(lenet_teacher, tmp_path_factory.mktemp("report") / "run")
    _search(run, "greedy", run / "result.json", layers=("conv1", "conv2", "fc1"))
    _search(run, "random", run / "baselines" / "random" / "result.json", layers=("conv1", "conv2", "fc1"))
    return run


def _layer_figures(page: str) -> int:
    return len(re.findall(r'<figure class="layer"', page))


@pytest.fixture(scope="module")
def report(searched_run, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("report-out") / REPORT_NAME
    return write_report(searched_run, out), out


def test_report_has_one_figure_per_layer_and_notes_for_missing_stages(searched_run, report):
    summary, path = report
    page = path.read_text()
    result = json.loads((searched_run / "result.json").read_text())
    assert summary["layers"] == list(result["layers"]) == ["conv1", "conv2", "fc1"]
    assert _layer_figures(page) == 3
    # self-contained: every image is inline, nothing is fetched
    assert page.count('src="data:image/png;base64,') == 3 + 1  # layers + search curve
    assert not re.search(r'(src|href)="(?!data:)', page)
    # both search logs are drawn, the chosen one named by its method
    assert "greedy (chosen)" in page and "random" in page
    for code in ("t1", "v1", "t2", "v2", "tmax"):
        assert f"{code}={result['layers']['conv1'][code + '_code']}" in page
    # finetune, verify and bench have not run: their sections say so and name the command to run
    assert set(summary["missing"]) == {"finetune", "verify", "bench"}
    assert "deploykit verify --exports" in page and "deploykit bench --exports" in page
    assert "deploykit finetune --config" in page


def test_report_renders_in_headless_chromium(report, chromium, tmp_path):
    from PIL import Image

    from conftest import CHROMIUM_FLAGS

    url = report[1].resolve().as_uri()
    shot = tmp_path / "shot.png"
    common = CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000"]
    subprocess.run([chromium, *common, f"--screenshot={shot}", url], capture_output=True, timeout=180, check=True)
    image = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert image.shape == (2000, 1200)
    # non-blank: a real page of text and plots, not a white (or error-grey) sheet
    dark = float((image < 128).mean())
    assert image.std() > 20 and 0.005 < dark < 0.5, (image.std(), dark)
    # the DOM as the browser parsed it: one layer figure per approximated layer, every image decoded
    dom = subprocess.run([chromium, *common, "--dump-dom", url], capture_output=True, text=True, timeout=180,
                         check=True).stdout
    assert _layer_figures(dom) == 3
    assert dom.count("<img") == 4


def test_report_without_search_or_exports(lenet_teacher, tmp_path):
    run = _copy_teacher(lenet_teacher, tmp_path / "run")
    summary = write_report(run)
    page = (run / REPORT_NAME).read_text()
    assert summary["layers"] == [] and _layer_figures(page) == 0
    assert set(summary["missing"]) == {"layers", "search", "verify", "bench"}
    assert "deploykit search --teacher" in page and "lenet5" in page


def test_report_refuses_missing_folder_and_existing_output(searched_run, tmp_path):
    with pytest.raises(ConfigError, match="no such run folder"):
        write_report(tmp_path / "nowhere")
    out = tmp_path / "r.html"
    out.write_text("keep me")
    with pytest.raises(OutputExistsError, match="--force"):
        write_report(searched_run, out)
    assert out.read_text() == "keep me"


def test_report_cli(lenet_teacher, tmp_path):
    run = _copy_teacher(lenet_teacher, tmp_path / "run")
    out = tmp_path / "cli.html"
    result = CliRunner().invoke(main, ["report", str(run), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert set(summary) == {"report", "bytes", "layers", "missing"}
    assert summary["report"] == str(out) and summary["layers"] == [] and "layers" in summary["missing"]
    assert out.is_file() and "report →" in result.stderr and "deploykit search" in result.stderr
    again = CliRunner().invoke(main, ["report", str(run), "--out", str(out)])
    assert again.exit_code == 2 and "already exists; pass --force" in again.stderr
    assert "Traceback" not in again.stderr
    missing = CliRunner().invoke(main, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and missing.stderr.startswith("error: ") and "no such run folder" in missing.stderr


@pytest.mark.slow
def test_report_of_a_full_pipeline(searched_run, tmp_path):
    """finetune → export (ONNX + ORT) → verify → bench → report: the table and bars come from real files."""
    from deploy_kit.bench import BenchConfig, bench_exports
    from deploy_kit.export import ExportConfig, export
    from deploy_kit.finetune import FinetuneConfig, finetune
    from deploy_kit.verify import VerifyConfig, verify_exports

    run = tmp_path / "run"
    shutil.copytree(searched_run, run, ignore=shutil.ignore_patterns("baselines", REPORT_NAME))
    finetune(FinetuneConfig(result_path=run / "result.json", epochs=1, max_train=200, device="cpu"))
    export(ExportConfig(result_path=run / "result.json", targets=("onnx", "ort")))
    verify_exports(VerifyConfig(exports=run / "exports"), progress=False)
    bench_exports(BenchConfig(exports=run / "exports", warmup=2, repeats=5, repeats32=2), progress=False)
    summary = write_report(run)
    page = (run / REPORT_NAME).read_text()
    assert summary["missing"] == {}
    verify = json.loads((run / "exports" / "verify.json").read_text())
    table = page.split("Accuracy and agreement per runtime")[1].split("<h2>")[0]
    assert table.count("<tr>") == 1 + len(verify["rows"])
    assert '<figure class="bench">' in page and _layer_figures(page) == 3
