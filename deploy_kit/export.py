"""The convert stage as a plain Python API: result.json + teacher → exports folder.

    summary = export(ExportConfig(result_path=Path("runs/x/result.json"), targets=("all",)))

Both variants are exported: the LUT graph (what the search chose) at the top of the folder,
and the plain-ReLU teacher under `relu/` (bench compares the two). For each variant the
rewritten `model.onnx` is written first — it is the source every other target converts — then
each target in registry order. Everything is built in a temp folder and swapped in at the end
(`fsutil.atomic_dir`), so a failed export leaves the previous one untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np

from deploy_kit.errors import ConfigError, ExportError
from deploy_kit.fsutil import atomic_dir, write_json
from deploy_kit.lut import LayerLUT
from deploy_kit.native_log import native_stderr_silenced
from deploy_kit.result import SearchResult, check_against_teacher, load_result, notes_for
from deploy_kit.student import load_student
from deploy_kit.teacher import Teacher, load_teacher
from exporters.onnx_to_tf import DEFAULT_LUT_FORM, LUT_FORMS

IO_CHOICES = ("int8", "float")
EXPORTS_DIRNAME = "exports"


@dataclass(frozen=True)
class ExportConfig:
    result_path: Path
    teacher_path: Path | None = None  # default: the result's `teacher.path`
    targets: tuple[str, ...] = ("all",)
    io: str = "int8"  # TFLite input/output type; ONNX/ORT I/O is always float
    out: Path | None = None  # default: <folder of result.json>/exports
    force: bool = False
    calibration_images: int = 256  # train-split images the TFLite converter calibrates on
    calibration_seed: int | None = None  # default: the teacher's seed
    # How the TFLite target lowers each LUT (exporters/onnx_to_tf.py: LUT_FORMS). `saturate`: the
    # fastest form proven exact at export, with `select` for any layer where it cannot be proven.
    lut_form: str = DEFAULT_LUT_FORM

    def __post_init__(self):
        if self.io not in IO_CHOICES:
            raise ConfigError(f"--io must be one of {', '.join(IO_CHOICES)}, got {self.io!r}")
        if self.calibration_images < 1:
            raise ConfigError(f"calibration_images must be >= 1, got {self.calibration_images}")
        from exporters.registry import TARGETS, check_options, resolve

        if self.lut_form not in LUT_FORMS:
            raise ConfigError(f"--lut-form must be one of {', '.join(LUT_FORMS)}, got {self.lut_form!r}")
        # Unknown target names fail here, before any work, and so does a target option none of the
        # chosen targets takes (`--io float --target ort`), which would otherwise be ignored.
        defaults = {f.name: f.default for f in fields(self)}
        options = {o for t in TARGETS.values() for o in t.options}
        check_options(resolve(self.targets), {o: getattr(self, o) for o in sorted(options) if getattr(self, o) != defaults[o]})

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.result_path).parent / EXPORTS_DIRNAME


def resolve_teacher(result: SearchResult, teacher_path: Path | None) -> Teacher:
    """--teacher wins; else result.json's `teacher.path`, relative to the result file."""
    if teacher_path is None:
        recorded = result.teacher.get("path")
        if not recorded:
            raise ConfigError(f"{result.path.name}: names no teacher checkpoint; pass --teacher RUN_FOLDER")
        teacher_path = Path(recorded) if Path(recorded).is_absolute() else result.path.parent / recorded
    return load_teacher(Path(teacher_path))


def calibration_set(teacher: Teacher, count: int, seed: int) -> tuple[np.ndarray, dict]:
    """A seeded sample of normalized train-split images (NCHW float32), and its record."""
    from deploy_kit.data import load_dataset, normalize

    train = load_dataset(teacher.meta["data"], teacher.meta["seed"]).split("train")
    pick = np.sort(np.random.default_rng(seed).choice(len(train), size=min(count, len(train)), replace=False))
    record = {"split": "train", "images": int(len(pick)), "seed": seed}
    return normalize(train.images[pick], teacher.norm), record


def _check_not_inputs(out: Path, result: SearchResult, teacher: Teacher) -> None:
    """The exports folder is replaced as a whole: it must not hold the files it is made from."""
    inputs = [result.path, teacher.weights_path]
    for path in inputs:
        if Path(path).resolve().is_relative_to(out.resolve()):
            raise ConfigError(f"--out {out} holds {path}, an input of this export; exporting there would replace it — "
                              f"choose a folder of its own (default: {Path(result.path).parent / EXPORTS_DIRNAME})")


def _onnx_variants(teacher: Teacher, student: Teacher | None, luts: dict[str, LayerLUT], layer_quant) -> dict:
    """{"lut": rewritten graph, "relu": plain teacher graph}, both checked. The LUT graph carries
    the fine-tuned student's weights when result.json names one, else the teacher's."""
    from exporters import onnx_graph

    relu = onnx_graph.teacher_graph(teacher)
    lut = onnx_graph.rewrite_activations(onnx_graph.teacher_graph(student) if student else relu, luts, layer_quant)
    return {"lut": onnx_graph.check(lut), "relu": onnx_graph.check(relu)}


def _run_target(target, onnx_path: Path, out_path: Path, options: dict) -> dict:
    try:
        export_fn = target.exporter()
    except ImportError as exc:
        raise ExportError(f"target {target.name} is not available here ({exc}); choose another --target") from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with native_stderr_silenced():
        return export_fn(onnx_path, out_path, **options)


def _export_variant(folder: Path, variant: str, proto, steps: list, options: dict, progress) -> list[dict]:
    """Write one variant's model.onnx, then convert it with each target; returns manifest entries."""
    from exporters import manifest as mf
    from exporters import onnx_graph

    onnx_path = folder / steps[0].path(variant)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    onnx_graph.save(proto, onnx_path)
    entries = []
    for target in steps:
        t0 = time.perf_counter()
        rel = target.path(variant)
        details = _run_target(target, onnx_path, folder / rel, options)
        entry = {**mf.artifact_entry(target, variant, rel, folder / rel, details),
                 "export_seconds": round(time.perf_counter() - t0, 3)}
        entries.append(entry)
        parts = details.get("xnnpack_partitions")
        progress(f"  {target.name:<7}{variant:<5} {rel:<24} {entry['bytes']:>12,} B  {entry['export_seconds']:6.1f}s"
                 + (f"  XNNPACK: {parts} partition{'s' if parts != 1 else ''}" if parts else ""))
        for layer, why in details.get("lut_fallbacks", {}).items():  # a slower LUT should not go unnoticed
            progress(f"    {layer}: LUT lowered with {details['lut_forms'][layer]} instead of {details['lut_form']} ({why})")
    return entries


def _export_into(tmp: Path, cfg: ExportConfig, targets, result: SearchResult, teacher: Teacher, lut_quant,
                 student: Teacher | None, out: Path, progress) -> dict:
    """Every variant and target into the claimed temp folder `tmp`, then the sealed manifest
    listing every file written (exporters/manifest.py: seal)."""
    from exporters import manifest as mf
    from exporters import onnx_graph
    from exporters.registry import TARGETS

    seed = teacher.meta["seed"] if cfg.calibration_seed is None else cfg.calibration_seed
    calibration, calib_record = (calibration_set(teacher, cfg.calibration_images, seed)
                                 if any(t.calibrated for t in targets) else (None, None))
    manifest = mf.base_manifest(teacher, result, result.layers, lut_quant, out, cfg.io, calib_record, cfg.lut_form,
                                student)
    manifest["reference"] = {"float_onnx_bytes": onnx_graph.float_graph(teacher).ByteSize()}
    options = {"io": cfg.io, "calibration": calibration, "layer_quant": teacher.layer_quant, "lut_form": cfg.lut_form}
    # The ONNX graph is the source of every target, so it is always written and listed.
    steps = [TARGETS["onnx"]] + [t for t in targets if t.name != "onnx"]
    for variant, proto in _onnx_variants(teacher, student, result.layers, lut_quant).items():
        onnx_graph.set_metadata(proto, mf.onnx_metadata(manifest, variant))
        manifest["artifacts"] += _export_variant(tmp, variant, proto, steps, options, progress)
    manifest = mf.seal(manifest, tmp)
    write_json(tmp / mf.MANIFEST_NAME, manifest)
    return manifest


def export(cfg: ExportConfig, progress: Callable[[str], None] = lambda _msg: None) -> dict:
    """Run the convert stage; returns {"out", "artifacts": [...manifest entries], "seconds"}."""
    from exporters.registry import resolve

    start = time.perf_counter()
    targets = resolve(cfg.targets)
    result = load_result(cfg.result_path)
    teacher = resolve_teacher(result, cfg.teacher_path)
    lut_quant = check_against_teacher(result, teacher)
    for note in notes_for(result, teacher):
        progress(note)
    student = load_student(result, teacher)
    out = cfg.out_dir
    _check_not_inputs(out, result, teacher)
    try:
        with atomic_dir(out, cfg.force) as tmp:  # claimed now: a second export into `out` fails at once
            manifest = _export_into(tmp, cfg, targets, result, teacher, lut_quant, student, out, progress)
    except PermissionError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror}; choose another --out") from None
    return {"out": str(out), "artifacts": manifest["artifacts"], "seconds": round(time.perf_counter() - start, 2)}
