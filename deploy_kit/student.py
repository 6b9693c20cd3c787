"""The fine-tuned student checkpoint: `student.safetensors` + its sidecar `student.json`.

The student is the teacher's architecture with the LUTs of one result.json at its taps and
weights trained with them in place (`deploykit finetune`). Its activation grids are the
teacher's, unchanged, so every code in result.json keeps its meaning. The sidecar ties the
weights to exactly one teacher (its sha256) and one result.json (`result.content_digest`);
result.json names the sidecar back in its `student` entry (path + sha256). A mismatch anywhere
in that chain is refused, never used quietly.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file

from deploy_kit.errors import CheckpointError
from deploy_kit.fsutil import atomic_path, read_json, sha256_file, write_json
from deploy_kit.result import SearchResult
from deploy_kit.schema import StudentSidecar, parse
from deploy_kit.teacher import Teacher, load_qat_weights, state_dict_for_save

FORMAT = "deploykit-student/1"
WEIGHTS_NAME, SIDECAR_NAME = "student.safetensors", "student.json"


def relative(path: Path, folder: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(folder).resolve())).as_posix()


def save_student(model, meta: dict, out_dir: Path) -> tuple[Path, str, dict]:
    """Write weights then sidecar, each atomically; returns the sidecar's path, its sha256 and
    the content written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_NAME
    with atomic_path(weights) as tmp:
        save_file(state_dict_for_save(model), str(tmp))
    sidecar = out_dir / SIDECAR_NAME
    meta = {"format": FORMAT, **meta, "weights": WEIGHTS_NAME, "weights_sha256": sha256_file(weights)}
    write_json(sidecar, meta)
    return sidecar, sha256_file(sidecar), meta


def _inside(path: Path, folder: Path, what: str) -> Path:
    """A recorded path must be relative and stay inside its folder (nothing read from elsewhere)."""
    if Path(path).is_absolute() or ".." in Path(path).parts:
        raise CheckpointError(f"{what}: path {path} must be relative to {folder} and stay inside it; re-run `deploykit finetune`")
    return folder / path


def load_student(result: SearchResult, teacher: Teacher) -> Teacher | None:
    """The fine-tuned student result.json names, as a `Teacher` (same architecture, grids and
    sidecar metadata, fine-tuned weights) whose `.student(luts)` is the model every LUT export
    must reproduce; None when result.json names no student. Checks the whole hash chain."""
    entry = result.student
    if not entry:
        return None
    where = result.path.name if result.path else "result.json"
    folder = result.path.parent if result.path else Path(".")
    sidecar = _inside(Path(entry["path"]), folder, f"{where}: student")
    if not sidecar.is_file():
        raise CheckpointError(f"{where}: names the student {sidecar}, which is missing; re-run `deploykit finetune` "
                              "or remove the \"student\" entry to export the teacher's weights")
    student = load_sidecar(sidecar, entry["sha256"], teacher, where)
    r = (student.meta["student"].get("result") or {}).get("digest")
    if r != result.digest:
        raise CheckpointError(f"{sidecar}: fine-tuned for another result.json (content digest {str(r)[:12]}…, this one is "
                              f"{result.digest[:12]}…): its codes or grids changed — re-run `deploykit finetune --force`")
    return student


def load_sidecar(sidecar: Path, sha256: str, teacher: Teacher, recorded_in: str) -> Teacher:
    """A student checkpoint whose sidecar must have `sha256` (as `recorded_in` says) and whose
    teacher and weights must match; as a `Teacher` carrying the student's weights."""
    if sha256_file(sidecar) != sha256:
        raise CheckpointError(f"{sidecar}: its sha256 differs from the one {recorded_in} recorded; the file changed "
                              "after `deploykit finetune` — re-run it with --force")
    meta = read_json(sidecar, CheckpointError, fix="; re-run `deploykit finetune --force`")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{sidecar}: expected a {FORMAT} sidecar; re-run `deploykit finetune --force`")
    parse(meta, StudentSidecar, str(sidecar), CheckpointError, "; re-run `deploykit finetune --force`")
    t = (meta.get("teacher") or {}).get("sha256")
    if t != teacher.sha256:
        raise CheckpointError(f"{sidecar}: fine-tuned from teacher sha256 {str(t)[:12]}…, but the teacher is "
                              f"{teacher.sha256[:12]}…; fine-tune again from this teacher")
    weights = _inside(Path(str(meta.get("weights", WEIGHTS_NAME))), sidecar.parent, str(sidecar))
    if not weights.is_file() or sha256_file(weights) != meta.get("weights_sha256"):
        raise CheckpointError(f"{weights}: missing or not the file {sidecar.name} recorded (sha256); "
                              "re-run `deploykit finetune --force`")
    model = load_qat_weights(teacher.meta, weights)
    return Teacher(model, {**teacher.meta, "weights_sha256": meta["weights_sha256"], "student": meta}, weights)


def load_base(result: SearchResult, teacher: Teacher) -> Teacher | None:
    """The fine-tuned student a re-search started from (`search.base_student`), whose weights
    `deploykit finetune` continues from; None for a search on the teacher's weights."""
    entry = result.search.get("base_student") if isinstance(result.search, dict) else None
    if entry is None:
        return None
    where = result.path.name if result.path else "result.json"
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("path", "sha256", "weights_sha256")):
        raise CheckpointError(f"{where}: search.base_student must hold path, sha256 and weights_sha256; re-run "
                              "`deploykit search --from-student`")
    folder = result.path.parent if result.path else Path(".")
    sidecar = _inside(Path(entry["path"]), folder, f"{where}: search.base_student")
    if not sidecar.is_file():
        raise CheckpointError(f"{where}: was searched on the student {sidecar}, which is missing")
    base = load_sidecar(sidecar, entry["sha256"], teacher, where)
    if base.sha256 != entry["weights_sha256"]:
        raise CheckpointError(f"{sidecar}: its weights are not the ones {where} was searched on")
    return base
