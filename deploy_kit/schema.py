"""The validation layer at the edge: every JSON file deploykit reads (teacher.json, result.json,
student.json, manifest.json, verify.json, bench.json, search logs) is parsed here into typed,
range-checked values before anything else looks at it.

    meta = parse_file(sidecar, TeacherSidecar, CheckpointError, fix="; re-run `deploykit train`")

Reading is strict (fsutil.parse_json_text: no NaN/Infinity/1e400, no RecursionError on deep
nesting); the shapes are pydantic models, so a wrong type, a missing key or a value out of range
becomes one line naming the file, the key, what was expected and what was found:

    teacher.json: key "width": expected a number greater than 0, found 'abc'

Rules of the domain that need more than a type (t1 < v1 < t2 < v2 ≤ tmax, a layer the teacher
has) stay with the code that owns them (lut.py, result.py); this module makes sure that code
only ever sees the types it expects. Models keep unknown keys (`extra="allow"`): the files carry
records (metrics, recipes, versions) that only reports read.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Annotated, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from pydantic import model_validator

from deploy_kit.fsutil import parse_json_text, read_json

M = TypeVar("M", bound=BaseModel)

SHA256 = Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]
Seed = Annotated[StrictInt, Field(ge=0, lt=2**63)]
Count = Annotated[StrictInt, Field(ge=0)]
Code = Annotated[StrictInt, Field(ge=-128, le=255)]
# LUT codes: any machine integer here; lut.py's rules (0 <= t1 < v1 < … <= qmax) name the layer
LUTCode = Annotated[StrictInt, Field(ge=-(2**31), lt=2**31)]
# strict: a JSON `true` or "0.5" is a wrong type, not 1.0 or 0.5 (ints are numbers and pass)
Finite = Annotated[float, Field(allow_inf_nan=False, strict=True)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
Name = Annotated[StrictStr, Field(min_length=1, max_length=200)]


def _relative_inside(value: str) -> str:
    """A path recorded in a file must be relative and may not climb out of the file's folder."""
    p = PurePosixPath(value)
    if not value or p.is_absolute() or value.startswith("\\") or ".." in p.parts or "\\" in value or "\x00" in value:
        raise ValueError("a relative path inside the file's own folder (no leading /, no ..)")
    return value


def _relative(value: str) -> str:
    """A relative path (it may lead to a neighbouring folder; the file it names is hash-checked)."""
    if not value or PurePosixPath(value).is_absolute() or value.startswith("\\") or "\x00" in value:
        raise ValueError("a relative path (no leading /)")
    return value


InsidePath = Annotated[StrictStr, AfterValidator(_relative_inside)]
RelativePath = Annotated[StrictStr, AfterValidator(_relative)]


class Record(BaseModel):
    """A JSON object whose listed keys are typed; other keys are kept as they are."""

    model_config = ConfigDict(extra="allow", frozen=True)


class Quant(Record):
    scale: Positive
    zero_point: Code
    qmin: Code = 0
    qmax: Code = 255

    @model_validator(mode="after")
    def _ordered(self):
        if not self.qmin <= self.zero_point <= self.qmax:
            raise ValueError(f"qmin <= zero_point <= qmax, got {self.qmin}, {self.zero_point}, {self.qmax}")
        return self


class Normalization(Record):
    scale: Positive
    mean: list[Finite] = Field(min_length=1, max_length=4)
    std: list[Positive] = Field(min_length=1, max_length=4)


class TeacherSidecar(Record):
    """teacher.json (`deploykit train`)."""

    format: Literal["deploykit-teacher/1"]
    model: Name
    width: Annotated[float, Field(gt=0, le=4, allow_inf_nan=False, strict=True)]
    backend: Name = "qnnpack"
    data: Name
    seed: Seed
    classes: list[Name] = Field(min_length=1, max_length=100_000)
    input_shape: tuple[Annotated[StrictInt, Field(ge=1, le=4)], Annotated[StrictInt, Field(ge=1, le=4096)],
                       Annotated[StrictInt, Field(ge=1, le=4096)]]
    normalization: Normalization
    input_quant: Record | None = None
    output_quant: Record | None = None
    layers: dict[Name, Quant] = Field(min_length=1)
    accuracy: dict[str, dict[str, Finite | None]] = Field(default_factory=dict)
    weights: InsidePath = "teacher.safetensors"
    weights_sha256: SHA256
    zoo: Annotated[StrictInt, Field(ge=1, le=1000)] | None = None  # the zoo's architecture version
    quantization: Record | None = None  # code ranges (quant.CodeRanges), e.g. an imported fbgemm teacher's 0..127
    # a pruned teacher (`deploykit prune`): output channels per block
    channels: dict[Name, Annotated[StrictInt, Field(ge=1, le=65536)]] | None = None

    @model_validator(mode="after")
    def _channels(self):
        c = self.input_shape[0]
        if len(self.normalization.mean) != c or len(self.normalization.std) != c:
            raise ValueError(f"normalization mean/std with {c} value(s), one per input channel of input_shape")
        return self


class Ref(Record):
    """A file another file depends on: where it is and its sha256."""

    path: RelativePath
    sha256: SHA256


class TeacherPath(Record):
    """result.json's teacher: where (relative to result.json) and, when known, its weights' sha256."""

    path: RelativePath
    sha256: SHA256 | None = None


class StudentRef(Ref):
    path: InsidePath
    metrics: dict = Field(default_factory=dict)


class ResultLayer(Record):
    t1_code: LUTCode
    v1_code: LUTCode
    t2_code: LUTCode
    v2_code: LUTCode
    tmax_code: LUTCode
    scale: Positive | None = None
    zero_point: Code | None = None
    qmin: Code | None = None
    qmax: Code | None = None


class ResultFile(Record):
    """result.json (`deploykit search`, or the research system's format)."""

    schema_: Literal["deploykit-result/1"] | None = Field(default=None, alias="schema")
    model: Name | None = None  # the research system's supervised format has none: the teacher's is taken
    backend: StrictStr | None = None  # absent: nothing to check the teacher's grids against
    selection: StrictStr = ""
    metrics: dict = Field(default_factory=dict)
    layers: dict[Name, ResultLayer] = Field(min_length=1)
    teacher: TeacherPath | None = None
    search: dict = Field(default_factory=dict)
    candidates: list = Field(default_factory=list)
    student: StudentRef | None = None


class SplitAccuracy(Record):
    val: Finite
    test: Finite


class StudentAccuracy(Record):
    teacher: SplitAccuracy
    before: SplitAccuracy
    after: SplitAccuracy


class EpochRecord(Record):
    epoch: Count
    val_acc: Finite
    val_kl: Finite


class BeforeAfter(Record):
    before: Finite
    after: Finite


class StudentSidecar(Record):
    """student.json (`deploykit finetune`)."""

    format: Literal["deploykit-student/1"]
    teacher: Record
    result: Record
    weights: InsidePath = "student.safetensors"
    weights_sha256: SHA256
    accuracy: StudentAccuracy
    chosen_epoch: Count
    epochs: list[EpochRecord] = Field(min_length=1)
    recipe: dict = Field(default_factory=dict)
    layer_at_distance: dict[Name, BeforeAfter] = Field(default_factory=dict)
    layer_exact_gain: dict[Name, Finite] = Field(default_factory=dict)


class Artifact(Record):
    target: Name
    variant: Literal["lut", "relu"] = "lut"
    path: InsidePath
    bytes: Count
    sha256: SHA256
    runtime: Name
    session_options: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    lut_pools: dict[Name, Record] = Field(default_factory=dict)


class FileEntry(Record):
    path: InsidePath
    bytes: Count
    sha256: SHA256


class TeacherRef(Ref):
    sidecar_sha256: SHA256


class StudentManifestRef(Ref):
    weights_sha256: SHA256


class Manifest(Record):
    """manifest.json (`deploykit export`); docs/ARTIFACTS.md."""

    schema_: Literal["deploykit-manifest/1"] = Field(alias="schema")
    model: Name
    data: Name
    seed: Seed
    classes: list[Name] = Field(min_length=1)
    preprocessing: Record
    teacher: TeacherRef
    result: Ref
    student: StudentManifestRef | None = None
    layers: dict[Name, ResultLayer] = Field(min_length=1)
    artifacts: list[Artifact] = Field(min_length=1)
    files: list[FileEntry] = Field(min_length=1)
    content_sha256: SHA256


class VerifyRow(Record):
    runtime: StrictStr
    artifact: StrictStr
    checked: StrictBool = True
    passed: StrictBool = True


class VerifyRecord(Record):
    """verify.json (`deploykit verify`), as the report reads it."""

    passed: StrictBool
    data: StrictStr
    split: StrictStr
    images: Count
    thresholds: dict[StrictStr, Finite] = Field(default_factory=dict)
    rows: list[VerifyRow] = Field(default_factory=list)
    failures: list[StrictStr] = Field(default_factory=list)


class BenchRow(Record):
    runtime: StrictStr
    artifact: StrictStr
    variant: StrictStr = ""
    bytes: Count
    latency_ms_p50: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]
    throughput_ips: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] = 0.0


class BenchRecord(Record):
    """bench.json (`deploykit bench`), as the report reads it."""

    rows: list[BenchRow] = Field(default_factory=list)
    settings: Record = Field(default_factory=Record)


class LogLine(Record):
    """One line of search_log*.jsonl: an evaluation, or the closing summary (`done`)."""

    evaluation: Count | None = None
    best_reward: Finite | None = None
    done: StrictBool | None = None


# ----------------------------------------------------------------------------- parsing

def _key(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("function-after",)]
    return ".".join(p if not p.isdigit() else f"[{p}]" for p in parts).replace(".[", "[") or "(top level)"


def _found(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(exc: ValidationError) -> str:
    """The first problem pydantic found, as `key "a.b": expected …, found …` (or `lacks a, b`)."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    if err["type"] == "missing":  # name every missing key at once: one re-run fixes them all
        return "lacks " + ", ".join(_key(_loc(e)) for e in errors if e["type"] == "missing")
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Input should be ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"key \"{_key(_loc(err))}\": expected {msg}, found {_found(err.get('input'))}{more}"


def _loc(err: dict) -> tuple:
    return tuple("schema" if p == "schema_" else p for p in err["loc"])


def parse(obj, model: type[M], where: str, error: type[Exception], fix: str = "") -> M:
    """Validate an already decoded JSON value; `error` names `where` and the broken key."""
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a JSON object, found {type(obj).__name__}{fix}")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise error(f"{where}: {describe(exc)}{fix}") from None


def parse_file(path: Path, model: type[M], error: type[Exception], fix: str = "", label: str | None = None
               ) -> tuple[M, dict]:
    """Read and validate one JSON file; returns the typed model and the plain decoded object."""
    where = label or str(path)
    obj = read_json(path, error, where, fix)
    return parse(obj, model, where, error, fix), obj


def parse_lines(path: Path, model: type[M], error: type[Exception], fix: str = "") -> list[M]:
    """A JSON-lines file (search logs): every non-blank line validated, errors name the line."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot be read ({exc}){fix}") from None
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = parse_json_text(line)
        except ValueError as exc:
            raise error(f"{path}: line {number}: not valid JSON ({str(exc)[:120]}){fix}") from None
        out.append(parse(obj, model, f"{path}: line {number}", error, fix))
    return out
