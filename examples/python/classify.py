#!/usr/bin/env python3
"""Classify image files with a deploykit export — a standalone client to copy into a device image.

    python classify.py EXPORTS_DIR IMAGE... [--runtime litert|ort] [--variant lut] [--top-k 3] [--json]

Needs only numpy, pillow and one runtime: ai-edge-litert (`--runtime litert`, model_int8.tflite)
or onnxruntime (`--runtime ort`, model.ort, else model.onnx). It imports nothing from deploykit:
everything it knows about the model — which file, its sha256, input size, mean/std, layout,
labels — comes from EXPORTS_DIR/manifest.json, and the int8 scale/zero point from the model's
own tensor details, so a re-export with new numbers needs no code change.

Exit status: 0 on success, 2 on bad input (missing/changed file, unreadable image), with one line
on stderr saying what was expected, what was found and what to do.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = "deploykit-manifest/1"
# which manifest targets each runtime can load, in order of preference: the ORT-format file is
# what a mobile ORT build ships; the .onnx file is the fallback when only it was exported
TARGETS = {"litert": ("tflite",), "ort": ("ort", "onnx")}


class ClassifyError(Exception):
    """Bad input: reported as one line and exit status 2."""


# ----------------------------------------------------------------------------- manifest

def load_manifest(exports_dir: Path) -> dict:
    path = exports_dir / MANIFEST_NAME
    if not path.is_file():
        raise ClassifyError(f"{path}: not found; pass the folder written by `deploykit export` (it holds {MANIFEST_NAME})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ClassifyError(f"{path}: not valid JSON ({exc}); copy it again from the export") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise ClassifyError(f"{path}: expected schema {MANIFEST_SCHEMA}, found {found!r}")
    return manifest


def pick_artifact(manifest: dict, runtime: str, variant: str) -> dict:
    entries = {(a.get("target"), a.get("variant", "lut")): a for a in manifest.get("artifacts", [])}
    for target in TARGETS[runtime]:
        if (target, variant) in entries:
            return entries[(target, variant)]
    have = ", ".join(f"{t}/{v}" for t, v in entries) or "none"
    raise ClassifyError(f"{MANIFEST_NAME}: no {' or '.join(TARGETS[runtime])} artifact of variant {variant!r} "
                        f"for --runtime {runtime} (the manifest has: {have}); export it with "
                        f"`deploykit export --target {TARGETS[runtime][0]}` or pick another --runtime")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_model_path(exports_dir: Path, artifact: dict) -> Path:
    """The artifact's file, refusing one that is not byte-for-byte what the exporter wrote:
    a truncated copy or a different model would otherwise classify silently and wrongly."""
    path = exports_dir / artifact["path"]
    if not path.is_file():
        raise ClassifyError(f"{path}: missing; the manifest lists it — copy it next to {MANIFEST_NAME}")
    digest = sha256_file(path)
    if digest != artifact["sha256"]:
        raise ClassifyError(f"{path}: sha256 mismatch: manifest expects {artifact['sha256'][:16]}…, file is "
                            f"{digest[:16]}…; the model changed after export — copy the exported file again")
    return path


# ----------------------------------------------------------------------------- preprocessing

def load_pixels(image_path: Path, prep: dict) -> np.ndarray:
    """Image file → uint8 H×W×C at the manifest's size (bilinear, as deploykit's imagefolder reader)."""
    mode = prep.get("color") or {1: "L", 3: "RGB"}[prep["channels"]]  # older manifests lack "color"
    try:
        with Image.open(image_path) as im:
            im = im.convert(mode)
            if im.size != (prep["width"], prep["height"]):
                im = im.resize((prep["width"], prep["height"]), Image.BILINEAR)
            pixels = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise ClassifyError(f"{image_path}: cannot read the image ({exc}); pass a PNG/JPEG file") from None
    return pixels.reshape(prep["height"], prep["width"], prep["channels"])


def normalize(pixels: np.ndarray, prep: dict, layout: str) -> np.ndarray:
    """uint8 H×W×C → float32 1×(layout), x = (pixel·scale − mean) / std per channel."""
    x = pixels.astype(np.float32) * np.float32(prep["scale"])
    x = (x - np.asarray(prep["mean"], np.float32)) / np.asarray(prep["std"], np.float32)
    if layout == "NCHW":
        x = x.transpose(2, 0, 1)
    elif layout != "NHWC":
        raise ClassifyError(f"{MANIFEST_NAME}: input layout must be NCHW or NHWC, found {layout!r}")
    return np.ascontiguousarray(x[None], np.float32)


def quantize(x: np.ndarray, dtype: np.dtype, scale: float, zero_point: int) -> np.ndarray:
    if not np.issubdtype(dtype, np.integer):
        return x.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.rint(x / scale) + zero_point, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    if not np.issubdtype(q.dtype, np.integer):
        return q.astype(np.float32)
    return np.float32(scale) * (q.astype(np.float32) - np.float32(zero_point))


# ----------------------------------------------------------------------------- runtimes

class LiteRTModel:
    """model_int8.tflite in LiteRT: int8 in/out, scale and zero point read from the tensors."""

    def __init__(self, path: Path):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path))
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def logits(self, x: np.ndarray) -> np.ndarray:
        scale, zero = self.input["quantization"]
        self.interpreter.set_tensor(self.input["index"], quantize(x, np.dtype(self.input["dtype"]), scale, zero))
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self.output["index"])
        return dequantize(out, *self.output["quantization"])[0]


class OrtModel:
    """model.ort / model.onnx in onnxruntime: float in/out, the QDQ graph quantizes inside."""

    def __init__(self, path: Path, session_options: dict):
        import onnxruntime as ort

        options = ort.SessionOptions()
        for key, value in session_options.items():  # e.g. session.qdqisint8allowed, as exported
            options.add_session_config_entry(str(key), str(value))
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0][0].astype(np.float32)


def open_model(runtime: str, path: Path, artifact: dict):
    try:
        if runtime == "litert":
            return LiteRTModel(path)
        return OrtModel(path, artifact.get("session_options") or {})
    except ImportError as exc:
        package = {"litert": "ai-edge-litert", "ort": "onnxruntime"}[runtime]
        raise ClassifyError(f"--runtime {runtime} needs {package} ({exc}); `pip install {package}`") from None


# ----------------------------------------------------------------------------- output

def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def top_k(logits: np.ndarray, labels: list[str], k: int) -> list[tuple[str, float]]:
    probs = softmax(logits.astype(np.float64))
    order = np.argsort(-logits, kind="stable")[:k]  # stable: ties keep the lower class index, like argmax
    return [(labels[i], float(probs[i])) for i in order]


def classify(exports_dir: Path, images: list[Path], runtime: str, variant: str, k: int):
    manifest = load_manifest(exports_dir)
    artifact = pick_artifact(manifest, runtime, variant)
    model = open_model(runtime, verified_model_path(exports_dir, artifact), artifact)
    prep, labels, layout = manifest["preprocessing"], manifest["classes"], artifact["inputs"][0]["layout"]
    for image in images:
        start = time.perf_counter()
        logits = model.logits(normalize(load_pixels(image, prep), prep, layout))
        yield image, artifact["path"], top_k(logits, labels, k), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports_dir", type=Path, help="folder written by `deploykit export` (holds manifest.json)")
    parser.add_argument("images", type=Path, nargs="+", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--runtime", choices=sorted(TARGETS), default="litert")
    parser.add_argument("--variant", default="lut", help="manifest variant: lut (default) or relu")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    args = parser.parse_args(argv)
    try:
        for image, model, top, seconds in classify(args.exports_dir, args.images, args.runtime, args.variant, args.top_k):
            if args.json:
                print(json.dumps({"image": str(image), "model": model, "runtime": args.runtime, "seconds": seconds,
                                  "top": [{"label": label, "probability": p} for label, p in top]}))
            else:
                ranked = "  ".join(f"{label} ({p:.1%})" for label, p in top)
                print(f"{image}: {ranked}   [{seconds * 1e3:.2f} ms, {model}]")
    except ClassifyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
