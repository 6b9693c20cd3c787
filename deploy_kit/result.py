"""`result.json`: the chosen LUT codes per layer (DESIGN.md §3).

Reads the research system's format unchanged; deploykit adds `schema`, `teacher`, per-layer
`scale`/`zero_point`/`qmin`/`qmax`, `search` and `candidates`. Validation happens once, here,
and every error names the file, the layer and the broken rule.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from deploy_kit.errors import ConfigError
from deploy_kit.fsutil import read_json
from deploy_kit.lut import CODE_FIELDS, ActivationQuant, LayerLUT
from deploy_kit.models import canonical_model

SCHEMA = "deploykit-result/1"
QUANT_FIELDS = ("scale", "zero_point", "qmin", "qmax")
# The research system names the torch quantized engine it searched on; the engine fixes the
# activation codes: fbgemm/x86 QAT uses reduce_range (codes 0..127), qnnpack the full 0..255.
BACKEND_QMAX = {"fbgemm": 127, "x86": 127, "qnnpack": 255}


@dataclass(frozen=True)
class SearchResult:
    model: str | None  # None: the research system's supervised format, which names no model
    layers: dict[str, LayerLUT]
    quant: dict[str, ActivationQuant] = field(default_factory=dict)  # empty for research-format files
    backend: str | None = None
    selection: str = ""
    metrics: dict = field(default_factory=dict)
    teacher: dict = field(default_factory=dict)  # {"path": ..., "sha256": ...}
    search: dict = field(default_factory=dict)  # method, budget, seed, reward weights, ...
    candidates: list = field(default_factory=list)
    student: dict = field(default_factory=dict)  # {"path", "sha256", "metrics"} once `deploykit finetune` ran
    digest: str = ""  # content_digest of the file as read
    path: Path | None = None

    def to_json(self) -> dict:
        layers = {}
        for name, lut in self.layers.items():
            layers[name] = lut.to_json()
            if name in self.quant:
                layers[name].update(self.quant[name].to_dict())
        out = {"schema": SCHEMA, "model": self.model, "backend": self.backend, "selection": self.selection,
               "metrics": self.metrics, "layers": layers}
        out = {k: v for k, v in out.items() if v is not None}
        if self.teacher:
            out["teacher"] = self.teacher
        if self.search:
            out["search"] = self.search
        if self.candidates:
            out["candidates"] = self.candidates
        if self.student:
            out["student"] = self.student
        return out


def content_digest(obj: dict) -> str:
    """sha256 of result.json's content without its `student` entry (canonical JSON). A fine-tuned
    student records it: `finetune` adds the `student` entry to the same file afterwards, so a
    hash of the whole file could not be in both. Any edit to the codes, grids or search record
    changes it."""
    body = {k: v for k, v in obj.items() if k != "student"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def _int_field(where: str, layer: str, d: dict, key: str) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise _fail(where, f"layer {layer}: {key} must be an integer code, got {v!r}")
    return int(v)


def _parse_layer(where: str, name: str, d) -> tuple[LayerLUT, ActivationQuant | None]:
    if not isinstance(d, dict):
        raise _fail(where, f"layer {name}: expected an object with {', '.join(f + '_code' for f in CODE_FIELDS)}")
    codes = {f: _int_field(where, name, d, f"{f}_code") for f in CODE_FIELDS}
    try:
        lut = LayerLUT(**codes)
    except ConfigError as exc:
        raise _fail(where, f"layer {name}: {exc}") from None
    aq = None
    if all(k in d for k in QUANT_FIELDS):
        s = d["scale"]
        if not isinstance(s, (int, float)) or not s > 0:
            raise _fail(where, f"layer {name}: scale must be a positive number, got {s!r}")
        aq = ActivationQuant(float(s), *(_int_field(where, name, d, k) for k in QUANT_FIELDS[1:]))
        if not aq.qmin <= aq.zero_point <= aq.qmax:
            raise _fail(where, f"layer {name}: need qmin <= zero_point <= qmax, got {aq.qmin}, {aq.zero_point}, {aq.qmax}")
        try:
            lut.check_range(aq)
        except ConfigError as exc:
            raise _fail(where, f"layer {name}: {exc}") from None
    return lut, aq


def parse_result(obj, where: str = "result.json") -> SearchResult:
    """Types and ranges first (deploy_kit/schema.py: ResultFile), then the LUT rules per layer."""
    from deploy_kit.schema import ResultFile, parse

    if not isinstance(obj, dict):
        raise _fail(where, "expected a JSON object with keys model, layers")
    schema = obj.get("schema")
    if schema is not None and schema != SCHEMA:
        raise _fail(where, f"unsupported schema {schema!r}; this deploykit reads {SCHEMA} and the research format")
    parse(obj, ResultFile, where, ConfigError)
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise _fail(where, f"\"model\" must be the architecture name (e.g. \"lenet5\"), got {model!r}")
    backend = obj.get("backend")  # absent: nothing to check it against
    if backend is not None and backend not in BACKEND_QMAX:
        raise _fail(where, f"unknown backend {backend!r}; expected one of {', '.join(BACKEND_QMAX)} "
                           "(the quantized engine the codes were searched on)")
    layers_in = obj.get("layers")
    if not isinstance(layers_in, dict) or not layers_in:
        raise _fail(where, "\"layers\" must be a non-empty object of layer name → codes")
    layers, quant = {}, {}
    for name, d in layers_in.items():
        layers[name], aq = _parse_layer(where, name, d)
        if aq is not None:
            quant[name] = aq
    return SearchResult(model=canonical_model(model) if model else None, layers=layers, quant=quant, backend=backend,
                        selection=obj.get("selection", ""), metrics=obj.get("metrics") or {},
                        teacher=obj.get("teacher") or {}, search=obj.get("search") or {},
                        candidates=obj.get("candidates") or [], student=_student_entry(where, obj.get("student")),
                        digest=content_digest(obj))


def _student_entry(where: str, entry) -> dict:
    if entry is None:
        return {}
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("sha256"), str):
        raise _fail(where, "\"student\" must be an object with \"path\" and \"sha256\" strings (written by "
                           "`deploykit finetune`); remove it to use the teacher's weights")
    return entry


def load_result(path: Path) -> SearchResult:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; pass the result.json written by `deploykit search`")
    obj = read_json(path, ConfigError, label=path.name)
    r = parse_result(obj, path.name)
    return SearchResult(**{**r.__dict__, "path": path})


def check_against_teacher(result: SearchResult, teacher) -> dict[str, ActivationQuant]:
    """The result must name the teacher's model (or none: the supervised format) and only its
    layers; its backend must mean the teacher's activation codes; quantization in the file (if
    any) must equal the teacher's. Returns the quantization to use per layer."""
    where = result.path.name if result.path else "result.json"
    if result.model is not None and result.model != teacher.arch:
        raise _fail(where, f"model is {result.model!r} but the teacher is a {teacher.arch!r}; pass the matching --teacher")
    sha = result.teacher.get("sha256")
    if sha and sha != teacher.sha256:
        raise _fail(where, f"was searched on teacher sha256 {sha[:12]}…, but {teacher.weights_path} is {teacher.sha256[:12]}…")
    tq = teacher.layer_quant
    for name, lut in result.layers.items():
        if name not in tq:
            raise _fail(where, f"unknown layer {name!r}; {teacher.arch} has: {', '.join(tq)}")
        try:
            lut.check_range(tq[name])
        except ConfigError as exc:
            raise _fail(where, f"layer {name}: {exc}") from None
        _check_layer_grid(where, name, result.quant.get(name), tq[name])
    if not result.quant:
        _check_backend(where, result, tq)
    return {n: tq[n] for n in result.layers}


def _check_layer_grid(where: str, name: str, q: ActivationQuant | None, t: ActivationQuant) -> None:
    if q is None:
        return
    if q.zero_point != t.zero_point or abs(q.scale - t.scale) > 1e-6 * t.scale:
        raise _fail(where, f"layer {name}: scale/zero_point {q.scale:g}/{q.zero_point} differ from the teacher's "
                           f"{t.scale:g}/{t.zero_point}")
    if (q.qmin, q.qmax) != (t.qmin, t.qmax):
        raise _fail(where, f"layer {name}: codes {q.qmin}..{q.qmax} differ from the teacher's {t.qmin}..{t.qmax}")


def _check_backend(where: str, result: SearchResult, teacher_quant: dict[str, ActivationQuant]) -> None:
    """A research-format file carries no grids: its `backend` is what says which codes it means."""
    if result.backend is None:
        return
    want = BACKEND_QMAX[result.backend]
    have = sorted({teacher_quant[n].qmax for n in result.layers})
    if have != [want]:
        codes = "/".join(f"0..{h}" for h in have)
        raise _fail(where, f"was searched on backend {result.backend} (activation codes 0..{want}), but the teacher's "
                           f"activations use codes {codes}; the same codes would mean other values — pass the teacher "
                           "it was searched on (`deploykit import --research` keeps a research checkpoint's codes)")


def notes_for(result: SearchResult, teacher) -> list[str]:
    """One-line remarks about what the file leaves to the teacher (printed by export/finetune)."""
    where = result.path.name if result.path else "result.json"
    notes = []
    if result.model is None:
        notes.append(f"note: {where} names no model (research supervised format); using the teacher's: {teacher.arch}")
    if not result.quant:
        notes.append(f"warning: {where} has no per-layer scales, so its codes cannot be checked against the grid "
                     f"it was searched on; they are applied to the teacher's grids")
    return notes
