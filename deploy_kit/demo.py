"""The whole pipeline in one call: train → search → finetune → export all → verify → bench → report.

    outcome = run_demo(DemoConfig(out=Path("runs/demo")), progress=print)

Each stage is the same plain API its own command uses, writing into one run folder laid out as
docs/ARTIFACTS.md describes, so every stage's output can be inspected or re-run by hand with
its own command afterwards. A verification failure does not stop the run: bench and the report
still get written (the report is where a failure is easiest to read), then `raise_for_failures`
turns it into exit code 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from deploy_kit.errors import ConfigError, OutputExistsError
from deploy_kit.fsutil import check_creatable

STAGES = ("train", "search", "finetune", "export", "verify", "bench", "report")
UNPRUNED_DIR = "unpruned"  # with --prune: where the demo trains the teacher that prune narrows


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    model: str = "lenet5"
    data: str = "digits"
    width: float = 1.0
    epochs: int = 30
    qat_epochs: int = 8
    # Twice `deploykit search`'s default budget: on digits the LUT costs ~0.3–1.4 test points and
    # verify allows 1.0, so the demo buys a lower-KL configuration for ~10 s more (test drop at
    # 300 → 600 evaluations: seed 0 0.84 → 0.56 pt, seed 2 1.39 → 0.83 pt).
    episodes: int = 600
    # Fine-tuning epochs with the LUTs in place (`deploykit finetune`); 0 skips the stage and
    # exports the searched student with the teacher's weights. Digits, seeds 0/1/2, the last
    # averaged epoch kept: test drop 0.28/0.56/0.56 pt after 30 epochs, 0.28/0.28/0.00 after 40
    # (benchmarks/cifar10.md, "Session 6"); ~1 s an epoch on the idle machine.
    finetune_epochs: int = 40
    finetune_ema: float = 0.999  # `finetune --ema`
    lut_form: str = "saturate"  # how the TFLite export lowers each LUT (`export --lut-form`)
    bench_repeats: int = 100  # timed batch-1 runs per artifact (bench's own default is 200)
    seed: int = 0  # train split/init/order, search agent and sampling, bench inputs
    force: bool = False
    # `deploykit prune` between train and search (e.g. "latency=0.5"); None (the default) skips it.
    # The unpruned teacher then lives in OUT/unpruned/ and OUT holds the pruned one.
    prune: str | None = None
    prune_episodes: int = 32

    def __post_init__(self):
        if self.bench_repeats < 1:
            raise ConfigError(f"--bench-repeats must be >= 1, got {self.bench_repeats}")
        if self.finetune_epochs < 0:
            raise ConfigError(f"--finetune-epochs must be >= 0 (0 skips fine-tuning), got {self.finetune_epochs}")
        # The other options are checked by the stage configs built below, before any work.


@dataclass
class StageRecord:
    name: str
    seconds: float
    note: str


@dataclass
class DemoOutcome:
    out: Path
    stages: list[StageRecord] = field(default_factory=list)
    train: dict | None = None
    search: object | None = None  # SearchOutcome
    finetune: object | None = None  # FinetuneOutcome, None when skipped
    export: dict | None = None
    verify: object | None = None  # VerifyReport
    bench: dict | None = None
    report: dict | None = None

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def summary(self) -> dict:
        return {"out": str(self.out), "passed": bool(self.verify and self.verify.passed),
                "seconds": round(self.seconds, 2),
                "stages": [{"stage": s.name, "seconds": round(s.seconds, 2), "note": s.note} for s in self.stages],
                "finetune": self.finetune.summary() if self.finetune else None,
                "verify": self.verify.summary() if self.verify else None,
                "bench": self.bench["rows"] if self.bench else None,
                "report": self.report["report"] if self.report else None}


def check_run_folder(out: Path, force: bool) -> None:
    """A demo writes a whole run folder, so an existing non-empty one is refused as a whole
    (not at stage four, after minutes of training)."""
    check_creatable(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; the demo needs a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out} already holds a run; pass --force to replace its outputs or choose another --out")


def _stage_configs(cfg: DemoConfig):
    """Build (and so validate) every stage's config before the first one runs."""
    from deploy_kit.bench import BenchConfig
    from deploy_kit.export import ExportConfig
    from deploy_kit.finetune import FinetuneConfig
    from deploy_kit.search import SearchConfig
    from deploy_kit.train import TrainConfig
    from deploy_kit.verify import VerifyConfig

    out = Path(cfg.out)
    prune_cfg = None
    if cfg.prune:
        from deploy_kit.prune import PruneConfig

        prune_cfg = PruneConfig(teacher=out / UNPRUNED_DIR, budget=cfg.prune, episodes=cfg.prune_episodes, seed=cfg.seed)
    return prune_cfg, (TrainConfig(model=cfg.model, data=cfg.data, width=cfg.width, epochs=cfg.epochs,
                        qat_epochs=cfg.qat_epochs, seed=cfg.seed),
            SearchConfig(episodes=cfg.episodes, seed=cfg.seed),
            (FinetuneConfig(result_path=out / "result.json", epochs=cfg.finetune_epochs, ema=cfg.finetune_ema, seed=cfg.seed,
                            force=cfg.force)
             if cfg.finetune_epochs else None),
            ExportConfig(result_path=out / "result.json", targets=("all",), lut_form=cfg.lut_form,
                         force=cfg.force),
            VerifyConfig(exports=out / "exports"),
            BenchConfig(exports=out / "exports", repeats=cfg.bench_repeats, seed=cfg.seed))


def run_demo(cfg: DemoConfig, progress: Callable[[str], None] = lambda _msg: None,
             on_evaluation: Callable | None = None) -> DemoOutcome:
    """Run every stage into cfg.out; returns what each stage returned. Raises the first stage's
    error for bad input; a failed verification is recorded, not raised (see module doc)."""
    from deploy_kit.bench import bench_exports
    from deploy_kit.export import export
    from deploy_kit.finetune import finetune
    from deploy_kit.report import write_report
    from deploy_kit.search import run_search
    from deploy_kit.train import train_teacher
    from deploy_kit.verify import verify_exports

    out = Path(cfg.out)
    prune_cfg, (train_cfg, search_cfg, finetune_cfg, export_cfg, verify_cfg, bench_cfg) = _stage_configs(cfg)
    check_run_folder(out, cfg.force)
    outcome = DemoOutcome(out)
    stages = STAGES if prune_cfg is None else (STAGES[0], "prune", *STAGES[1:])

    def stage(name: str, start_note: str, work: Callable, describe: Callable[[object], str]):
        progress(f"[{stages.index(name) + 1}/{len(stages)}] {name:<8} {start_note}")
        start = time.perf_counter()
        value = work()
        record = StageRecord(name, time.perf_counter() - start, describe(value))
        outcome.stages.append(record)
        progress(f"      {name:<8} done in {record.seconds:.1f}s: {record.note}")
        return value

    outcome.train = stage(
        "train", f"{cfg.model} on {cfg.data}: {cfg.epochs} float + {cfg.qat_epochs} QAT epochs, seed {cfg.seed}",
        lambda: train_teacher(train_cfg, out / UNPRUNED_DIR if prune_cfg else out, force=cfg.force),
        lambda m: f"INT8 teacher test accuracy {m['accuracy']['int8']['test']:.2f}%")
    if prune_cfg is not None:
        from deploy_kit.prune import run_prune

        stage("prune", f"{prune_cfg.budget} in {prune_cfg.runtime}, {prune_cfg.episodes} episodes, then KD + QAT",
              lambda: run_prune(prune_cfg, out, force=cfg.force, say=lambda msg: progress(f"        {msg}")),
              lambda p: (f"MACs ×{p.meta['pruning']['macs']['ratio']}, measured latency "
                         f"×{p.meta['pruning']['latency_ms']['measured_ratio']}, INT8 test accuracy "
                         f"{p.meta['accuracy']['int8']['test']:.2f}%"))
    outcome.search = stage(
        "search", f"PPO, {cfg.episodes} reward evaluations",
        lambda: run_search(out, search_cfg, force=cfg.force, on_evaluation=on_evaluation),
        lambda s: (f"{len(s.result.layers)} layers approximated, student test accuracy "
                   f"{s.result.metrics['acc_student']:.2f}% (drop {s.result.metrics['acc_drop']:.2f} pt)"))
    if finetune_cfg is not None:
        outcome.finetune = stage(
            "finetune", f"{cfg.finetune_epochs} epochs with the LUTs in place, distilled from the teacher",
            lambda: finetune(finetune_cfg),
            lambda f: (f"kept epoch {f.meta['chosen_epoch']} ({f.meta['selection']['rule']}, on validation), student test accuracy "
                       f"{f.summary()['acc_student_before']:.2f}% → {f.summary()['acc_student']:.2f}% "
                       f"(drop {f.summary()['acc_drop']:.2f} pt)"))
    outcome.export = stage(
        "export", f"ONNX, ORT Mobile and TFLite INT8 (LUT form {cfg.lut_form}), LUT and ReLU variants",
        lambda: export(export_cfg, progress=lambda msg: progress(f"        {msg}")),
        lambda e: f"{len(e['artifacts'])} artifacts in {out / 'exports'}")
    outcome.verify = stage(
        "verify", "every export on the whole test split, against the student and the teacher",
        lambda: verify_exports(verify_cfg),
        lambda r: f"{'PASSED' if r.passed else 'FAILED'} on {r.images} images")
    outcome.bench = stage(
        "bench", f"batch-1 latency ({cfg.bench_repeats} runs), batch-32 throughput, memory, size",
        lambda: bench_exports(bench_cfg),
        lambda b: f"{len(b['rows'])} runtime/artifact pairs timed")
    outcome.report = stage(
        "report", "report.html",
        lambda: write_report(out, force=True),  # the report describes this run; it is always current
        lambda r: f"{len(r['layers'])} layer figure(s), {r['bytes'] / 1024:.0f} KiB")
    return outcome
