"""`manifest.json` (docs/ARTIFACTS.md, schema deploykit-manifest/1): written here after export,
and read back here by verify, bench and the examples' tests — sealed, typed and hash-checked
before any runner sees a file. The same metadata goes inside the ONNX graph (`metadata_props`),
so a file copied away from its folder still says what it is.

Paths in the manifest are relative to the manifest's folder. Nothing here imports torch, onnx or
a runtime at module level: a runner's fresh process (deploy_kit/worker.py) reads entries too.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import TYPE_CHECKING

from deploy_kit.errors import ConfigError, ExportError
from deploy_kit.fsutil import read_json, sha256_file

if TYPE_CHECKING:  # deploy_kit.lut imports torch
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
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    out = {}
    for key, value in props.items():
        if key.startswith(METADATA_PREFIX):
            try:
                out[key[len(METADATA_PREFIX):]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len(METADATA_PREFIX):]] = value
    return out


# ----------------------------------------------------------------------------- reading it back

@dataclass(frozen=True)
class Artifact:
    """One manifest entry, resolved against the exports folder."""

    target: str
    variant: str
    path: Path
    runtime: str
    sha256: str
    bytes: int
    entry: dict

    @property
    def relpath(self) -> str:
        return self.entry["path"]


def load_manifest(exports_dir: Path) -> dict:
    """manifest.json, sealed and typed: its own digest (`content_sha256`) is checked first, so an
    edited code, hash or path is refused before any value is used; then deploy_kit/schema.py's
    `Manifest` types every key (paths relative and inside the exports folder)."""
    from deploy_kit.schema import Manifest, parse

    path = Path(exports_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ConfigError(f"{path}: no manifest; pass the folder written by `deploykit export` (it holds {MANIFEST_NAME})")
    fix = "; re-run `deploykit export --force`"
    manifest = read_json(path, ConfigError, fix=fix)
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise ConfigError(f"{path}: expected schema {SCHEMA}, found {found!r}")
    recorded = manifest.get("content_sha256")
    if not isinstance(recorded, str):
        raise ConfigError(f"{path}: no content_sha256 (exported before manifests were sealed, or removed){fix}")
    if content_digest(manifest) != recorded:
        raise ExportError(f"{path}: its content does not match its content_sha256 {recorded[:12]}…; the manifest was "
                          f"edited after export{fix}")
    parse(manifest, Manifest, str(path), ConfigError, fix)
    return manifest


def _confined(exports_dir: Path, rel: str, what: str) -> Path:
    """`rel` resolved inside the exports folder; a symlink or path leading out of it is refused."""
    folder = Path(exports_dir).resolve()
    path = (folder / rel).resolve()
    if not path.is_relative_to(folder):
        raise ConfigError(f"{MANIFEST_NAME}: {what} {rel!r} leads outside {exports_dir}; every exported file "
                          "lives in the exports folder — re-run `deploykit export --force`")
    return Path(exports_dir) / rel


def artifacts(manifest: dict, exports_dir: Path) -> list[Artifact]:
    from deploy_kit.schema import Artifact as ArtifactSchema, parse

    out = []
    for i, e in enumerate(manifest["artifacts"]):
        a = parse(e, ArtifactSchema, f"{MANIFEST_NAME}: artifact #{i}", ConfigError)
        path = _confined(exports_dir, a.path, f"artifact #{i} path")
        out.append(Artifact(a.target, a.variant, path, a.runtime, a.sha256, a.bytes, e))
    return out


def _check_file(path: Path, sha256: str, what: str) -> None:
    if not path.is_file():
        raise ExportError(f"{path}: missing; the manifest lists it ({what}) — re-run `deploykit export`")
    digest = sha256_file(path)
    if digest != sha256:
        raise ExportError(f"{path}: sha256 {digest[:12]}… does not match the manifest's {sha256[:12]}…; "
                          "the file changed after export — re-run `deploykit export --force`")


def check_hashes(items: list[Artifact]) -> None:
    """Every artifact must be the file the exporter wrote: a changed file is an error."""
    for a in items:
        _check_file(a.path, a.sha256, f"{a.target}/{a.variant}")


def check_exports(manifest: dict, exports_dir: Path) -> list[Artifact]:
    """Everything the manifest vouches for, before anything runs: every file of the exports folder
    (the operator configs too), each artifact, and the result.json and teacher.json it was
    exported from (their sha256). Returns the artifacts."""
    for i, f in enumerate(manifest["files"]):
        _check_file(_confined(exports_dir, f["path"], f"files #{i} path"), f["sha256"], "files")
    items = artifacts(manifest, exports_dir)
    check_hashes(items)
    for key in ("result", "teacher"):
        ref = manifest[key]
        sha = ref["sha256"] if key == "result" else ref["sidecar_sha256"]
        _check_source(Path(exports_dir) / ref["path"], sha, key)
    _check_layers(manifest, exports_dir)
    return items


def _check_layers(manifest: dict, exports_dir: Path) -> None:
    """The codes the manifest records (what verify's student uses) must be the result.json's."""
    from deploy_kit.result import load_result

    result = load_result(Path(exports_dir) / manifest["result"]["path"])
    recorded = {n: lut.to_json() for n, lut in result.layers.items()}
    exported = {n: {k: e[k] for k in next(iter(recorded.values()))} for n, e in manifest["layers"].items()}
    if recorded != exported:
        raise ExportError(f"{MANIFEST_NAME}: its LUT codes differ from {manifest['result']['path']}'s; the exports "
                          "were not made from this result.json — re-run `deploykit export --force`")


def _check_source(path: Path, sha256: str, key: str) -> None:
    name = {"result": "result.json", "teacher": "teacher.json"}[key]
    if path.name != name and not (key == "result" and path.suffix == ".json"):
        raise ConfigError(f"{MANIFEST_NAME}: {key}.path {path.name!r} is not a {name}; re-run `deploykit export --force`")
    if not path.is_file() or sha256_file(path) != sha256:
        raise ExportError(f"{path}: missing or changed since export (its sha256 is not the manifest's "
                          f"{key}.sha256); the exports no longer match their {name} — re-run `deploykit export --force`")


def manifest_luts(manifest: dict) -> tuple[dict[str, LayerLUT], dict[str, ActivationQuant]]:
    """The LUT codes and quantization recorded in the manifest (validated like result.json)."""
    from deploy_kit.result import parse_result

    parsed = parse_result({"model": manifest.get("model", "?"), "layers": manifest.get("layers")}, MANIFEST_NAME)
    return parsed.layers, parsed.quant


def load_manifest_teacher(manifest: dict, exports_dir: Path):
    """The teacher the manifest was exported from, checked against its recorded sha256."""
    from deploy_kit.teacher import load_teacher

    ref = manifest["teacher"]
    teacher = load_teacher(Path(exports_dir) / ref["path"], expect_model=manifest.get("model"))
    if ref.get("sha256") and ref["sha256"] != teacher.sha256:
        raise ConfigError(f"{MANIFEST_NAME}: exported from teacher sha256 {ref['sha256'][:12]}…, but "
                          f"{teacher.weights_path} is {teacher.sha256[:12]}…; pass the matching teacher or re-export")
    return teacher


def load_manifest_student(manifest: dict, exports_dir: Path, teacher):
    """The weights the LUT artifacts were exported with: the fine-tuned student the manifest
    records (checked against its sha256s and its teacher), else the teacher itself."""
    from deploy_kit.errors import CheckpointError
    from deploy_kit.result import load_result
    from deploy_kit.student import load_student

    ref = manifest.get("student")
    if ref is None:
        return teacher
    if not isinstance(ref, dict) or not isinstance(ref.get("path"), str):
        raise ConfigError(f"{MANIFEST_NAME}: \"student\" must be an object with a \"path\"; re-run `deploykit export`")
    result_ref = manifest.get("result") or {}
    if not isinstance(result_ref.get("path"), str):
        raise ConfigError(f"{MANIFEST_NAME}: a fine-tuned student needs its result.json recorded; re-run `deploykit export`")
    result_path = Path(exports_dir) / result_ref["path"]
    if result_ref.get("sha256") and (not result_path.is_file() or sha256_file(result_path) != result_ref["sha256"]):
        raise ConfigError(f"{MANIFEST_NAME}: {result_path} is missing or changed since export (sha256); "
                          "re-run `deploykit export --force`")
    student = load_student(load_result(result_path), teacher)
    if student is None or student.sha256 != ref.get("weights_sha256"):
        raise CheckpointError(f"{MANIFEST_NAME}: the student weights differ from those exported; re-run `deploykit export --force`")
    return student
