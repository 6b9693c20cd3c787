"""examples/web in a real headless Chromium: the page loads an export through onnxruntime-web
or LiteRT.js (both wasm), classifies real digits PNG files via its `?batch=` test hook and must
agree with the Python runtimes on the same images (onnxruntime-python; for the .tflite, the
LiteRT runner `verify` uses, over the whole test split verify scores); a tampered model must be
refused. The page driver is runtime_tests/web_page.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from deploy_kit.runners import make_runner
from exporters.manifest import load_manifest
from deploy_kit.teacher import load_teacher

from web_page import missing_packages, run_page

pytestmark = pytest.mark.skipif(missing_packages() is not None, reason=str(missing_packages()))


@pytest.fixture(scope="module")
def exports(export_lenet_run) -> Path:
    return export_lenet_run("web_example", ("onnx", "ort"))


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_page_agrees_with_onnxruntime_python(exports, digit_pngs, chromium, tmp_path, target):
    paths, pixels = digit_pngs
    page = run_page(chromium, exports, paths, tmp_path / "profile", target)
    assert "error" not in page, page.get("error")

    manifest = load_manifest(exports)
    entry = next(a for a in manifest["artifacts"] if a["target"] == target and a["variant"] == "lut")
    assert page["model"] == entry["path"] and page["backend"] == "wasm"
    from deploy_kit.data import normalize

    logits = make_runner(entry, exports).predict(normalize(pixels, load_teacher(exports.parent).norm))
    web = np.asarray([r["logits"] for r in page["results"]], np.float32)
    assert [r["image"] for r in page["results"]] == [f"images/{p.name}" for p in paths]
    assert [r["top"][0]["index"] for r in page["results"]] == logits.argmax(1).tolist()
    assert [r["top"][0]["label"] for r in page["results"]] == [manifest["classes"][i] for i in logits.argmax(1)]
    # the same int8 graph in wasm: logits are the same grid values up to float rounding
    np.testing.assert_allclose(web, logits, atol=1e-4)


def test_page_refuses_a_tampered_model(exports, digit_pngs, chromium, tmp_path):
    copy = shutil.copytree(exports, tmp_path / "exports")
    model = copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    page = run_page(chromium, copy, digit_pngs[0][:1], tmp_path / "profile")
    assert "sha256 mismatch" in page["error"] and "model.onnx" in page["error"]


# ----------------------------------------------------------------------------- LiteRT.js

@pytest.fixture(scope="module")
def float_io_tflite(export_lenet_run) -> Path:
    """A .tflite with float I/O: LiteRT.js 2.5 has no int8 tensors (examples/web/README.md)."""
    return export_lenet_run("web_example_tflite", ("tflite",), io="float")


@pytest.fixture(scope="module")
def verify_split_pngs(float_io_tflite, tmp_path_factory):
    """The split `verify` scores (its own loader): grayscale PNG files, and the `Split` they hold."""
    from PIL import Image

    from exporters.manifest import load_manifest_teacher
    from deploy_kit.verify import VerifyConfig, load_split

    manifest = load_manifest(float_io_tflite)
    _, split = load_split(VerifyConfig(float_io_tflite), manifest, load_manifest_teacher(manifest, float_io_tflite))
    folder = tmp_path_factory.mktemp("verify_split_pngs")
    paths = [folder / f"test_{i:04d}.png" for i in range(len(split))]
    for path, image in zip(paths, split.images):
        Image.fromarray(image[..., 0], mode="L").save(path)
    return paths, split


def test_litert_page_agrees_with_verify(float_io_tflite, verify_split_pngs, chromium, tmp_path):
    from deploy_kit.data import normalize
    from deploy_kit.verify import VerifyConfig, percent, verify_exports

    paths, split = verify_split_pngs
    assert len(paths) >= 100
    requested: list[str] = []
    page = run_page(chromium, float_io_tflite, paths, tmp_path / "profile", "tflite", requested)
    assert "error" not in page, page.get("error")
    manifest = load_manifest(float_io_tflite)
    entry = next(a for a in manifest["artifacts"] if a["target"] == "tflite" and a["variant"] == "lut")
    assert page["model"] == entry["path"] and page["runtime"] == "litert.js"
    assert [r["image"] for r in page["results"]] == [f"images/{p.name}" for p in paths]
    web_top1 = np.asarray([r["top"][0]["index"] for r in page["results"]])
    web = np.asarray([r["logits"] for r in page["results"]], np.float32)

    # verify's own LiteRT row on this split (its thresholds judge the LUT, not the page: relaxed)
    report = verify_exports(VerifyConfig(float_io_tflite, max_drop=100.0, min_agreement=0.0), progress=False)
    row = next(r for r in report.rows if r.runtime == "litert" and r.artifact == entry["path"])
    assert report.images == len(paths) and percent(web_top1 == split.labels) == row.accuracy
    # and image by image: the runner verify ran, on the same normalized split
    logits = make_runner(entry, float_io_tflite).predict(normalize(split.images, load_teacher(float_io_tflite.parent).norm))
    assert web_top1.tolist() == logits.argmax(1).tolist()
    # The same int8 kernels (XNNPACK) on the same float input: the page normalizes in float32
    # steps as numpy does, the graph's own QUANTIZE makes the same input codes, and the logits
    # are the same dequantized output codes — equal, not merely within one output step.
    np.testing.assert_array_equal(web, logits)
    # LiteRT.js and its wasm came from node_modules through this server, not from a CDN
    assert any(p.startswith("/node_modules/@litertjs/core/wasm/") and p.endswith(".wasm") for p in requested)
    ms = sorted(r["ms"] for r in page["results"])
    print(f"\nLiteRT.js/wasm, {len(ms)} images: ready {page['timing']['ready_ms']:.0f} ms, first prediction "
          f"{page['timing']['first_prediction_ms']:.0f} ms after navigation, median {ms[len(ms) // 2]:.3f} ms/image")


def test_litert_page_refuses_a_tampered_model(float_io_tflite, digit_pngs, chromium, tmp_path):
    copy = shutil.copytree(float_io_tflite, tmp_path / "exports")
    model = copy / next(a["path"] for a in load_manifest(copy)["artifacts"] if a["target"] == "tflite")
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    page = run_page(chromium, copy, digit_pngs[0][:1], tmp_path / "profile", "tflite")
    assert "sha256 mismatch" in page["error"] and model.name in page["error"]


def test_litert_page_refuses_int8_io_and_names_the_fix(export_lenet_run, digit_pngs, chromium, tmp_path):
    """LiteRT.js 2.5 has no int8 tensors (loading fails with "Element type INT8 is not
    supported"): the page says which export it needs instead."""
    exports = export_lenet_run("web_example_tflite_int8", ("tflite",))  # the default, int8 I/O
    page = run_page(chromium, exports, digit_pngs[0][:1], tmp_path / "profile", "tflite")
    assert "int8" in page["error"] and "--io float" in page["error"]
