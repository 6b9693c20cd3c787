"""`verify`: prove every export reproduces the student on real data.

Order matters: the manifest's own digest, then every file of the exports folder and the
result.json and teacher.json it was exported from, are checked against their sha256 *before*
anything runs, so a changed file is an error (exit 2) rather than a silently different
measurement. Then the whole
test split goes through every runtime of every artifact, and each is scored against

  - the teacher (accuracy, and the drop vs the teacher's accuracy),
  - its reference: the student for LUT artifacts, the teacher for the plain-ReLU ones (top-1
    agreement, mean KL, max |Δlogit|) — the exports must reproduce it, not just score well.

`--localize` compares activation codes layer by layer for an export that disagrees.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from deploy_kit import runners as rn
from deploy_kit.data import Split, load_dataset, normalize
from deploy_kit.errors import ConfigError, DataError, VerificationError
from deploy_kit.fsutil import write_json
from deploy_kit.lut import ActivationQuant, LayerLUT
from exporters import manifest as mf

VERIFY_NAME = "verify.json"
SCHEMA = "deploykit-verify/1"
LOCALIZE_IMAGES = 64  # codes of every layer for this many images; disagreeing images first


@dataclass(frozen=True)
class VerifyConfig:
    exports: Path
    data: str | None = None  # default: the spec the teacher was trained on (manifest `data`)
    split: str = "test"
    max_drop: float = 1.0  # percentage points of accuracy below the teacher
    min_agreement: float = 99.0  # percent top-1 agreement with the reference
    localize: bool = False
    threads: int | None = None

    def __post_init__(self):
        if not 0 <= self.min_agreement <= 100:
            raise ConfigError(f"--min-agreement is a percentage in [0, 100], got {self.min_agreement}")
        if self.max_drop < 0:
            raise ConfigError(f"--max-drop is percentage points >= 0, got {self.max_drop}")


@dataclass
class Row:
    runtime: str
    artifact: str
    variant: str
    reference: str  # what agreement/KL/logit error are measured against
    bytes: int
    accuracy: float
    drop_vs_teacher: float
    agreement_student: float
    agreement_teacher: float
    mean_kl: float
    max_abs_logit_diff: float
    images_per_s: float
    checked: bool  # reference rows (PyTorch) are reported, not judged
    failures: list[str] = field(default_factory=list)
    localize: dict | None = None

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class VerifyReport:
    exports: Path
    data: str
    split: str
    images: int
    thresholds: dict
    rows: list[Row]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def failures(self) -> list[str]:
        return [f"{r.runtime} [{r.artifact}]: {f}" for r in self.rows for f in r.failures]

    def raise_for_failures(self) -> None:
        if not self.passed:
            raise VerificationError("verification failed — " + "; ".join(self.failures()))

    def summary(self) -> dict:
        """The --json summary (issue #5's keys; percentages)."""
        keys = ("runtime", "artifact", "accuracy", "drop_vs_teacher", "agreement_student", "agreement_teacher",
                "max_abs_logit_diff", "images_per_s")
        return {"passed": self.passed, "rows": [{k: getattr(r, k) for k in keys} for r in self.rows if r.checked]}

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "passed": self.passed, "data": self.data, "split": self.split,
                "images": self.images, "thresholds": self.thresholds, "seconds": round(self.seconds, 3),
                "failures": self.failures(),
                "rows": [{**asdict(r), "passed": r.passed} for r in self.rows]}


# ----------------------------------------------------------------------------- metrics

def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def mean_kl(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean KL(reference ‖ other) of the softmax distributions, in nats."""
    p, q = softmax(reference), softmax(other)
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))


def percent(mask: np.ndarray) -> float:
    return round(100.0 * float(np.mean(mask)), 4)


# ----------------------------------------------------------------------------- data

def load_split(cfg: VerifyConfig, manifest: dict, teacher) -> tuple[str, Split]:
    """The split to verify on: `--data`, else the teacher's data spec and seed (so `test` is the
    same held-out split the teacher was scored on)."""
    spec = cfg.data or manifest.get("data") or teacher.meta["data"]
    seed = int(manifest.get("seed", teacher.meta.get("seed", 0)))
    split = load_dataset(spec, seed=seed).split(cfg.split)
    c, h, w = teacher.meta["input_shape"]
    if split.images.shape[1:] != (h, w, c):
        raise DataError(f"{spec} {cfg.split}: images are {split.images.shape[1:]} (H, W, C) but the exports take "
                        f"{(h, w, c)}; pass data of the shape the teacher was trained on")
    if int(split.labels.max(initial=0)) >= len(teacher.meta["classes"]):
        raise DataError(f"{spec} {cfg.split}: labels reach {int(split.labels.max())} but the model has "
                        f"{len(teacher.meta['classes'])} classes")
    return spec, split


# ----------------------------------------------------------------------------- rows

@dataclass(frozen=True)
class References:
    labels: np.ndarray
    teacher: np.ndarray
    student: np.ndarray
    teacher_accuracy: float


def timed_predict(runner, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Logits and images/s; a runner in another process reports its own predict time."""
    start = time.perf_counter()
    logits = runner.predict(x)
    seconds = getattr(runner, "predict_seconds", None) or time.perf_counter() - start
    return logits, len(x) / max(seconds, 1e-9)


def score(runner, artifact: str, variant: str, logits: np.ndarray, ips: float, refs: References, checked: bool) -> Row:
    ref_name, ref = ("teacher", refs.teacher) if variant == "relu" else ("student", refs.student)
    top1 = logits.argmax(1)
    accuracy = percent(top1 == refs.labels)
    return Row(runtime=runner.name, artifact=artifact, variant=variant, reference=ref_name, bytes=runner.bytes,
               accuracy=accuracy, drop_vs_teacher=round(refs.teacher_accuracy - accuracy, 4),
               agreement_student=percent(top1 == refs.student.argmax(1)),
               agreement_teacher=percent(top1 == refs.teacher.argmax(1)),
               mean_kl=round(mean_kl(ref, logits), 8), max_abs_logit_diff=round(float(np.abs(ref - logits).max()), 6),
               images_per_s=round(ips, 1), checked=checked)


def judge(row: Row, cfg: VerifyConfig) -> None:
    """Name the runtime's numbers next to the threshold they break."""
    if row.drop_vs_teacher > cfg.max_drop:
        row.failures.append(f"accuracy {row.accuracy:.2f}% is {row.drop_vs_teacher:.2f} points below the teacher "
                            f"(--max-drop {cfg.max_drop})")
    agreement = row.agreement_teacher if row.reference == "teacher" else row.agreement_student
    if agreement < cfg.min_agreement:
        row.failures.append(f"top-1 agreement with the {row.reference} {agreement:.2f}% < --min-agreement "
                            f"{cfg.min_agreement} (max |Δlogit| {row.max_abs_logit_diff:.4g})")


# ----------------------------------------------------------------------------- localize

def max_pool_codes(codes: np.ndarray, window: dict) -> np.ndarray:
    """An NCHW code tensor through a MaxPool window ({kernel_shape, strides, pads}; pads never win)."""
    (kh, kw), (sh, sw) = window["kernel_shape"], window["strides"]
    top, left, bottom, right = window["pads"]
    padded = np.pad(codes, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=np.iinfo(np.int64).min)
    views = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3))
    return views[:, :, ::sh, ::sw].max(axis=(-2, -1))


def localize(student, runner, x: np.ndarray, disagree: np.ndarray, luts: dict[str, LayerLUT],
             layer_quant: dict[str, ActivationQuant], pools: dict[str, dict] | None = None) -> dict:
    """Compare codes at every approximated layer between the student and `runner`.

    Two measures per layer: how the runtime's codes differ from the student's (drift builds up
    through rounding in int8 kernels, so a small share is normal), and whether the runtime's
    LUT maps *its own* input codes by the table (exact for a correct export, whatever came
    before). The first layer that breaks its table — or, when the table cannot be read, the
    first whose codes differ from the student's in more than 1% of places — is named.
    `pools`: layers whose LUT the export runs after its MaxPool (exact: the LUT is monotone);
    the student's codes go through the same window before they are compared.
    """
    pick = np.concatenate([np.flatnonzero(disagree), np.flatnonzero(~disagree)])[:LOCALIZE_IMAGES]
    layers = list(luts)
    mine = student.tap_codes(x[pick], layers, layer_quant)
    try:
        theirs = runner.tap_codes(x[pick], layers, layer_quant)
    except ConfigError as exc:
        return {"first_diverging_layer": None, "note": str(exc), "layers": {}}
    report, first = {}, None
    for name in layers:
        if name not in theirs:
            report[name] = {"found": False}
            continue
        a, b = mine[name].after, theirs[name].after
        if name in (pools or {}):
            a = max_pool_codes(a, pools[name])
        if a.shape != b.shape:
            report[name] = {"found": True, "note": f"shape {b.shape} differs from the student's {a.shape}"}
            continue
        diff = a != b
        entry = {"found": True, "share_differing": round(float(diff.mean()), 6),
                 "mean_code_error": round(float(np.abs(a - b).mean()), 6)}
        if theirs[name].before is not None:
            expected = luts[name].apply_codes(theirs[name].before, layer_quant[name].zero_point)
            entry["table_mismatch"] = round(float((expected != b).mean()), 6)
        report[name] = entry
        broken = entry.get("table_mismatch", 0) > 0 or ("table_mismatch" not in entry and entry["share_differing"] > 0.01)
        if first is None and broken:
            first = name
    return {"first_diverging_layer": first, "images": int(len(pick)), "layers": report}


def localize_message(loc: dict) -> str:
    name = loc.get("first_diverging_layer")
    if not name:
        return loc.get("note") or "no approximated layer diverges; the difference comes after the last LUT"
    e = loc["layers"][name]
    return (f"first diverging layer {name}: {100 * e['share_differing']:.2f}% of codes differ from the student, "
            f"mean code error {e['mean_code_error']:.3f}" +
            (f", {100 * e['table_mismatch']:.2f}% break the LUT table" if "table_mismatch" in e else ""))


# ----------------------------------------------------------------------------- the command

def ordered(items: list[mf.Artifact]) -> list[mf.Artifact]:
    """LUT artifacts first, each variant in the registry's target order (exporters/registry.py)."""
    from exporters.registry import TARGETS

    order = list(TARGETS)
    for a in items:
        if a.target not in TARGETS:
            raise ConfigError(f"manifest artifact {a.relpath}: unknown target {a.target!r}; this deploykit knows "
                              f"{', '.join(TARGETS)}")
    return sorted(items, key=lambda a: (a.variant != "lut", order.index(a.target)))


def reference_rows(teacher, student, x: np.ndarray, labels: np.ndarray) -> tuple[References, list[Row]]:
    """The PyTorch models every export is scored against, and their own (unjudged) rows."""
    teacher_runner, int8 = rn.TeacherRunner(teacher), rn.Int8TeacherRunner(teacher)
    t_logits, t_ips = timed_predict(teacher_runner, x)
    s_logits, s_ips = timed_predict(student, x)
    refs = References(labels, t_logits, s_logits, percent(t_logits.argmax(1) == labels))
    rows = [score(teacher_runner, teacher_runner.artifact, "relu", t_logits, t_ips, refs, checked=False),
            score(student, student.artifact, "lut", s_logits, s_ips, refs, checked=False),
            score(int8, int8.artifact, "relu", *timed_predict(int8, x), refs, checked=False)]
    return refs, rows


def export_row(art: mf.Artifact, runtime: str, cfg: VerifyConfig, x: np.ndarray, refs: References, student,
               luts: dict[str, LayerLUT], layer_quant: dict[str, ActivationQuant]) -> Row:
    """One runtime on one artifact: scored, judged, and (--localize) its LUT codes checked."""
    runner = rn.make_runner(art, cfg.exports, runtime=runtime, threads=cfg.threads)
    logits, ips = timed_predict(runner, x)
    row = score(runner, art.relpath, art.variant, logits, ips, refs, checked=True)
    judge(row, cfg)
    if cfg.localize and art.variant == "lut":
        disagree = logits.argmax(1) != refs.student.argmax(1)
        row.localize = localize(student, runner, x, disagree, luts, layer_quant, art.entry.get("lut_pools"))
        # A LUT that misreads its own input codes is a broken export even when too few images
        # flip for the thresholds to notice: with the codes at hand, that is a failure too.
        table_broken = any(e.get("table_mismatch", 0) > 0 for e in row.localize["layers"].values())
        if row.failures or table_broken:
            row.failures.append(localize_message(row.localize))
    return row


def verify_exports(cfg: VerifyConfig, progress: bool = True) -> VerifyReport:
    """Hash check, then every runtime on the whole split; writes verify.json next to the
    manifest (replaced on each run: it is the record of the latest verification)."""
    from tqdm import tqdm

    start = time.perf_counter()
    exports = Path(cfg.exports)
    manifest = mf.load_manifest(exports)
    items = mf.check_exports(manifest, exports)
    teacher = mf.load_manifest_teacher(manifest, exports)
    luts, _ = mf.manifest_luts(manifest)
    spec, split = load_split(cfg, manifest, teacher)
    x = normalize(split.images, teacher.norm)
    student = rn.StudentRunner(mf.load_manifest_student(manifest, exports, teacher), luts)
    refs, rows = reference_rows(teacher, student, x, split.labels)

    jobs = [(a, runtime) for a in ordered(items) for runtime in rn.runtimes_for(a)]
    bar = tqdm(jobs, desc="verify", unit="runtime", disable=None if progress else True, leave=False)
    for art, runtime in bar:
        bar.set_postfix_str(f"{runtime} {art.relpath}")
        rows.append(export_row(art, runtime, cfg, x, refs, student, luts, teacher.layer_quant))
    report = VerifyReport(exports, spec, cfg.split, len(split), {"max_drop": cfg.max_drop,
                          "min_agreement": cfg.min_agreement}, rows, time.perf_counter() - start)
    write_json(exports / VERIFY_NAME, report.to_json())
    return report
