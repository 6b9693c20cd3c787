"""`deploykit bench` on real ONNX/ORT exports of a small LeNet-5 (few repeats: the numbers are
not asserted, only that every artifact is measured and the report is complete)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from deploy_kit import amx
from deploy_kit.bench import BenchRow, lut_ratios
from deploy_kit.cli import main
from exporters.registry import BENCH, runtimes_loading



@pytest.fixture(scope="module")
def exports(export_lenet_run):
    return export_lenet_run("bench_run", ("onnx", "ort"))


@pytest.mark.slow  # one fresh process per artifact
def test_bench_measures_every_artifact_for_both_variants(exports):
    result = CliRunner().invoke(main, ["bench", "--exports", str(exports), "--warmup", "2", "--repeats", "5",
                                       "--repeats32", "2", "--rounds", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    # every runtime the table lists for bench, on both variants of each target
    expected = {(r.label or r.name) + ("" if t == r.loads[0] else f" ({t})") for t in ("onnx", "ort")
                for r in runtimes_loading(t, BENCH)}
    assert expected >= {"onnxruntime", "onnxruntime (ort)"}
    assert {(r["runtime"], r["variant"]) for r in summary["rows"]} == {
        *((name, v) for name in expected for v in ("lut", "relu")), ("onnxruntime", "float")}  # + the float baseline
    for r in summary["rows"]:
        assert set(r) == {"runtime", "variant", "latency_ms_p50", "latency_ms_p90", "throughput_ips", "bytes"}
        assert 0 < r["latency_ms_p50"] <= r["latency_ms_p90"] and r["throughput_ips"] > 0
    saved = json.loads((exports / "bench.json").read_text())
    assert {q["target"] for q in saved["lut_over_relu"]} == {"onnx", "ort"}
    assert len(saved["vs_float"]) == 4 and all(q["bytes"] < 1 for q in saved["vs_float"])  # int8 files are smaller
    assert all(r["peak_rss_mb"] is None or r["peak_rss_mb"] >= 0 for r in saved["rows"])
    table = (exports / "bench.md").read_text()
    assert "| onnxruntime (ort) | lut | model.ort |" in table and "LUT / ReLU" in table
    # timed as a phone runs INT8 kernels: Intel AMX refused unless --amx (nothing to refuse without it)
    assert saved["settings"]["amx"] is False and saved["settings"]["amx_mode"] == amx.mode(False) != "used"
    assert f"Intel AMX {amx.mode(False)}" in table


def test_lut_ratio_pairs_each_target_with_its_relu_twin():
    def row(target, variant, p50, ips, nbytes):
        return BenchRow("onnxruntime", target, variant, f"{variant}/{target}", nbytes, p50, p50, ips, None)

    rows = [row("onnx", "lut", 1.2, 800, 110), row("onnx", "relu", 1.0, 1000, 100), row("ort", "lut", 2.0, 10, 1)]
    assert lut_ratios(rows) == [{"runtime": "onnxruntime", "target": "onnx", "latency_p50": 1.2,
                                 "throughput": 0.8, "bytes": 1.1}]
