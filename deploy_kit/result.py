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

SCHEMA = "deploykit-result/1"
QUANT_FIELDS = ("scale", "zero_point", "qmin", "qmax")


@dataclass(frozen=True)
class SearchResult:
    model: str
    layers: dict[str, LayerLUT]
    quant: dict[str, ActivationQuant] = field(default_factory=dict)  # empty for research-format files
    backend: str = "fbgemm"
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
    if not isinstance(obj.get("model"), str):
        raise _fail(where, "missing \"model\" (the architecture name, e.g. \"lenet5\")")
    layers_in = obj.get("layers")
    if not isinstance(layers_in, dict) or not layers_in:
        raise _fail(where, "\"layers\" must be a non-empty object of layer name → codes")
    layers, quant = {}, {}
    for name, d in layers_in.items():
        layers[name], aq = _parse_layer(where, name, d)
        if aq is not None:
            quant[name] = aq
    return SearchResult(model=obj["model"], layers=layers, quant=quant, backend=obj.get("backend", "fbgemm"),
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
    """The result must name the teacher's model and only its layers; quantization in the file
    (if any) must equal the teacher's. Returns the quantization to use per layer."""
    where = result.path.name if result.path else "result.json"
    if result.model != teacher.arch:
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
        q = result.quant.get(name)
        if q is not None and (q.zero_point != tq[name].zero_point or abs(q.scale - tq[name].scale) > 1e-6 * tq[name].scale):
            raise _fail(where, f"layer {name}: scale/zero_point {q.scale:g}/{q.zero_point} differ from the teacher's "
                               f"{tq[name].scale:g}/{tq[name].zero_point}")
    return {n: tq[n] for n in result.layers}
