"""examples/web in headless Chromium: page load to first prediction and per-image latency, per runtime.

    python benchmarks/web_latency.py --exports runs/<name>/exports [--images 359] [--loads 5]
    python benchmarks/web_latency.py          # a tiny LeNet5/digits teacher, trained and exported here

The exports folder needs model.onnx, model.ort and a `--io float` .tflite (LiteRT.js has no int8
tensors): `deploykit export --target onnx,ort,tflite --io float`. Each runtime's page is opened
--loads times, each in a fresh Chromium profile (a cold start: no cached wasm), classifying the
same --images test images (the split `verify` scores). Per load the page reports, in ms since
navigation start, `ready` (model fetched, sha256 checked, compiled) and `first prediction` (the
first image fetched, decoded and classified); per image, the inference alone (tensor in → logits
out, as `Classifier.classify` times it). The figures are medians over loads, and the per-image
median / p90 over all images of all loads. Prints a markdown table and writes --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "runtime_tests")]  # conftest (Chromium flags) and the page driver

from web_page import missing_packages, run_page  # noqa: E402

RUNTIMES = {"onnx": "onnxruntime-web 1.30.0 (model.onnx)", "ort": "onnxruntime-web 1.30.0 (model.ort)",
            "tflite": "LiteRT.js 2.5.3 (model_int8.tflite)"}


def tiny_exports(folder: Path) -> Path:
    """The test suite's LeNet5/digits teacher and LUT codes, exported for all three targets."""
    from conftest import LENET_TEACHER_CONFIG, LUT_CODES
    from deploy_kit.export import ExportConfig, export
    from deploy_kit.fsutil import write_json
    from deploy_kit.teacher import load_teacher
    from deploy_kit.train import TrainConfig, train_teacher

    train_teacher(TrainConfig(**LENET_TEACHER_CONFIG), folder)
    teacher = load_teacher(folder)
    write_json(folder / "result.json", {"model": teacher.arch, "layers": {n: dict(LUT_CODES) for n in teacher.layer_quant},
                                        "teacher": {"path": ".", "sha256": teacher.sha256}})
    export(ExportConfig(result_path=folder / "result.json", targets=("onnx", "ort", "tflite"), io="float"))
    return folder / "exports"


def test_images(exports: Path, count: int, folder: Path) -> list[Path]:
    """The first `count` images of the split `verify` scores, as PNG files."""
    from PIL import Image

    from exporters.manifest import load_manifest, load_manifest_teacher
    from deploy_kit.verify import VerifyConfig, load_split

    manifest = load_manifest(exports)
    _, split = load_split(VerifyConfig(exports), manifest, load_manifest_teacher(manifest, exports))
    paths = []
    for i, image in enumerate(split.images[:count]):
        paths.append(folder / f"test_{i:04d}.png")
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(paths[-1])  # L or RGB
    return paths


def measure(chromium: str, exports: Path, images: list[Path], target: str, loads: int, scratch: Path) -> dict:
    ready, first, per_image = [], [], []
    for load in range(loads):
        page = run_page(chromium, exports, images, scratch / f"profile-{target}-{load}", target, timeout=600)
        if "error" in page:
            raise SystemExit(f"{target}: the page failed: {page['error']}")
        ready.append(page["timing"]["ready_ms"])
        first.append(page["timing"]["first_prediction_ms"])
        per_image += [r["ms"] for r in page["results"]]
    ms = np.asarray(per_image)
    return {"runtime": RUNTIMES[target], "target": target, "loads": loads, "images": len(images),
            "ready_ms": float(np.median(ready)), "first_prediction_ms": float(np.median(first)),
            "first_prediction_ms_all": [round(v, 1) for v in first],
            "per_image_ms_median": float(np.median(ms)), "per_image_ms_p90": float(np.percentile(ms, 90))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exports", type=Path, help="a folder from `deploykit export --target onnx,ort,tflite --io float`")
    parser.add_argument("--images", type=int, default=359)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--targets", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    parser.add_argument("--out", type=Path, default=Path("web_latency.json"))
    args = parser.parse_args()
    if why := missing_packages():
        raise SystemExit(why)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed (apt-get install -y chromium)")

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        exports = args.exports or tiny_exports(scratch / "run")
        (scratch / "images").mkdir()
        images = test_images(exports, args.images, scratch / "images")
        rows = [measure(chromium, exports, images, t, args.loads, scratch) for t in args.targets]

    record = {"chromium": chromium, "load_average": os.getloadavg(), "rows": rows}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{len(images)} images × {args.loads} cold page loads per runtime; load average "
          f"{', '.join(f'{v:.1f}' for v in record['load_average'])}\n")
    print("| runtime | ready (ms) | first prediction (ms) | per image, median (ms) | per image, p90 (ms) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['runtime']} | {r['ready_ms']:.0f} | {r['first_prediction_ms']:.0f} | "
              f"{r['per_image_ms_median']:.2f} | {r['per_image_ms_p90']:.2f} |")


if __name__ == "__main__":
    main()
