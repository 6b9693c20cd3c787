"""`manifest.json` (docs/ARTIFACTS.md, schema deploykit-manifest/1) and the same metadata inside
the ONNX graph (`metadata_props`), so a file copied away from its folder still says what it is.

Paths in the manifest are relative to the manifest's folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata as pkg_metadata
from pathlib import Path

import onnx

from deploy_kit.fsutil import sha256_file
from deploy_kit.lut import ActivationQuant, LayerLUT

SCHEMA = "deploykit-manifest/1"
MANIFEST_NAME = "manifest.json"
METADATA_PREFIX = "deploykit."
TOOLS = {"torch": "torch", "onnx": "onnx", "onnxruntime": "onnxruntime", "onnx_graphsurgeon": "onnx-graphsurgeon",
         "tensorflow": "tensorflow-cpu", "ai_edge_litert": "ai-edge-litert", "numpy": "numpy", "deploykit": "deploykit"}


def tool_versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata (importing TensorFlow just for this is slow)."""
    out = {}
    for name, dist in TOOLS.items():
        try:
            out[name] = pkg_metadata.version(dist)
        except pkg_metadata.PackageNotFoundError:
            out[name] = None
    return out


def preprocessing(teacher) -> dict:
    c, h, w = teacher.meta["input_shape"]
    norm = teacher.meta["normalization"]
    # How the training images were made, so an app can do the same: resized bilinearly (PIL for
    # image folders, torch for digits), and PIL mode "L" (ITU-R 601-2 luma) or "RGB".
    return {"height": h, "width": w, "channels": c, "color": "L" if c == 1 else "RGB", "resize": "bilinear",
            "scale": norm["scale"], "mean": norm["mean"], "std": norm["std"]}


def _relative(path: Path, folder: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(folder).resolve())).as_posix()


def layers_entry(luts: dict[str, LayerLUT], layer_quant: dict[str, ActivationQuant]) -> dict:
    return {n: {**lut.to_json(), **layer_quant[n].to_dict()} for n, lut in luts.items()}


def base_manifest(teacher, result, luts: dict[str, LayerLUT], layer_quant: dict[str, ActivationQuant],
                  out_dir: Path, io: str, calibration: dict | None, lut_form: str = "saturate", student=None) -> dict:
    """Everything but the artifacts: what the exports were made from and how to feed them.
    `lut_form` is the form asked for the TFLite files' LUTs; each tflite entry's `lut_forms`
    says what each layer got (`select` where a saturate plan could not be proven).
    `student` (a fine-tuned student, `deploy_kit.student.load_student`) is recorded when the
    LUT variant carries its weights; the relu/ variant is always the teacher's."""
    sidecar = teacher.weights_path.with_name("teacher.json")
    base = {
        "schema": SCHEMA, "model": teacher.arch, "width": teacher.meta.get("width"), "data": teacher.meta["data"],
        "seed": teacher.meta["seed"], "classes": list(teacher.meta["classes"]), "preprocessing": preprocessing(teacher),
        "input_quant": teacher.meta.get("input_quant"), "output_quant": teacher.meta.get("output_quant"),
        "teacher": {"path": _relative(sidecar, out_dir), "sha256": teacher.sha256,
                    "sidecar_sha256": sha256_file(sidecar)},
        "result": {"path": _relative(result.path, out_dir), "sha256": sha256_file(result.path)},
        "layers": layers_entry(luts, layer_quant), "io": io, "lut_form": lut_form, "calibration": calibration, "tools": tool_versions(),
        "artifacts": [],
    }
    if student is not None:
        s_sidecar = student.weights_path.with_name("student.json")
        base["student"] = {"path": _relative(s_sidecar, out_dir), "sha256": sha256_file(s_sidecar),
                           "weights_sha256": student.sha256}
    return base


def content_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own `content_sha256`: any edit to a
    code, a grid, a hash or a path changes it, and `verify` checks it before anything runs."""
    body = {k: v for k, v in manifest.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# Written next to the manifest after export and replaced on each run (docs/ARTIFACTS.md): not sealed.
MEASUREMENTS = ("verify.json", "bench.json", "bench.md")


def file_entries(folder: Path) -> list[dict]:
    """Every file under the exports folder but the manifest and the measurements: path, bytes, sha256."""
    skip = {MANIFEST_NAME, *MEASUREMENTS}
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in skip)
    return [{"path": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in files]


def seal(manifest: dict, folder: Path) -> dict:
    """The finished manifest: `files` lists every file written into `folder` (the operator
    configs included) and `content_sha256` is its own digest (`content_digest`)."""
    sealed = {**manifest, "files": file_entries(folder)}
    return {**sealed, "content_sha256": content_digest(sealed)}


def artifact_entry(target, variant: str, rel_path: str, file: Path, details: dict) -> dict:
    return {"target": target.name, "variant": variant, "path": rel_path, "bytes": file.stat().st_size,
            "sha256": sha256_file(file), "runtime": target.runtime, **details}


def onnx_metadata(base: dict, variant: str) -> dict[str, str]:
    """The manifest's metadata as `metadata_props` (string values; JSON for structures)."""
    keys = ("schema", "model", "width", "data", "seed", "classes", "preprocessing", "input_quant", "output_quant",
            "layers", "tools")
    props = {f"{METADATA_PREFIX}{k}": v if isinstance(v, str) else json.dumps(base[k]) for k, v in
             ((k, base[k]) for k in keys)}
    props[f"{METADATA_PREFIX}teacher_sha256"] = base["teacher"]["sha256"]
    props[f"{METADATA_PREFIX}result_sha256"] = base["result"]["sha256"]
    props[f"{METADATA_PREFIX}variant"] = variant
    if variant == "lut" and "student" in base:  # the weights are the fine-tuned student's
        props[f"{METADATA_PREFIX}student_weights_sha256"] = base["student"]["weights_sha256"]
    if variant == "relu":  # the plain teacher: no layer is approximated in this file
        props[f"{METADATA_PREFIX}layers"] = "{}"
    return props


def read_onnx_metadata(onnx_path: Path) -> dict:
    """The metadata of an exported ONNX file, decoded (what other targets embed too)."""
    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    out = {}
    for key, value in props.items():
        if key.startswith(METADATA_PREFIX):
            try:
                out[key[len(METADATA_PREFIX):]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len(METADATA_PREFIX):]] = value
    return out
