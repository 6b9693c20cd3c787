"""The compress stage: search per-layer LUT codes that keep the student close to the teacher.

    outcome = run_search("runs/x", SearchConfig(method="ppo", episodes=300, seed=0))

Pipeline: teacher code histograms on the train split → per-layer state, tmax and initial codes
(state.py) → a fixed reward set with cached teacher outputs (reward.py) → PPO / random / greedy
proposals under one evaluation budget (ppo.py, baselines.py, trace.py) → re-score the top
candidates on the validation split (select.py) → test metrics of the chosen one → result.json
and search_log.jsonl.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from deploy_kit.data import Dataset, Split, load_dataset, normalize
from deploy_kit.device import check_device_name, resolve_device
from deploy_kit.errors import ConfigError
from deploy_kit.fsutil import atomic_path, check_writable, write_json
from deploy_kit.lut import CODE_FIELDS, LayerLUT
from deploy_kit.result import SearchResult, load_result
from deploy_kit.search.baselines import greedy_search, random_search
from deploy_kit.search.ppo import PPOConfig, ppo_search
from deploy_kit.search.reward import RewardConfig, RewardModel
from deploy_kit.search.select import Selection, select, split_accuracy
from deploy_kit.search.space import CodeSpace, project
from deploy_kit.search.state import TmaxRule, layer_states
from deploy_kit.search.trace import Evaluation, Trace
from deploy_kit.teacher import SIDECAR_NAME, Teacher, load_teacher

METHODS = ("ppo", "random", "greedy")
LOG_NAME = "search_log.jsonl"


def log_path_for(result_path: Path) -> Path:
    """result.json → search_log.jsonl beside it; any other name X.json → search_log.X.jsonl, so a
    second search into the same folder (a baseline, a re-search) never replaces the first's log."""
    result_path = Path(result_path)
    name = LOG_NAME if result_path.name == "result.json" else f"search_log.{result_path.stem}.jsonl"
    return result_path.with_name(name)

__all__ = ["METHODS", "SearchConfig", "SearchOutcome", "run_search", "search_layers", "RewardConfig", "PPOConfig",
           "TmaxRule", "CodeSpace"]


@dataclass(frozen=True)
class SearchConfig:
    method: str = "ppo"
    episodes: int = 300  # the budget: number of reward evaluations, the same for every method
    seed: int = 0
    layers: tuple[str, ...] | None = None  # None: every tap of the model
    tmax: TmaxRule = field(default_factory=TmaxRule)
    space: CodeSpace = field(default_factory=CodeSpace)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    top_n: int = 5
    max_acc_drop: float = 1.0
    state_images: int = 2048  # train images for the histograms
    device: str = "auto"  # where the reward passes run (deploy_kit/device.py); selection is on the CPU

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown --method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.episodes < 1 or self.top_n < 1 or self.max_acc_drop < 0:
            raise ConfigError(f"need --episodes >= 1, --top-n >= 1 and --max-acc-drop >= 0, got "
                              f"{self.episodes}, {self.top_n}, {self.max_acc_drop}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be in 0..2^63-1, got {self.seed}")
        check_device_name(self.device)

    def to_json(self, evaluations: int, layers: list[str]) -> dict:
        d = {"method": self.method, "budget": self.episodes, "evaluations": evaluations, "seed": self.seed,
             "layers": layers, "reward": self.reward.to_dict(), "tmax": self.tmax.to_dict(),
             "code_space": self.space.to_dict(), "top_n": self.top_n, "max_acc_drop": self.max_acc_drop,
             "state_images": self.state_images, "reward_split": "train", "selection_split": "val"}
        if self.method == "ppo":
            d["ppo"] = self.ppo.to_dict()
        return d


@dataclass(frozen=True)
class SearchOutcome:
    path: Path
    log_path: Path
    result: SearchResult
    evaluations: list[Evaluation]
    seconds: float

    @property
    def best_reward(self) -> float:
        return max(e.score.reward for e in self.evaluations)

    def summary(self) -> dict:
        m = self.result.metrics
        return {"result": str(self.path), "method": self.result.search["method"], "evaluations": len(self.evaluations),
                "best_reward": round(self.best_reward, 6), "acc_teacher": m["acc_teacher"],
                "acc_student": m["acc_student"], "acc_drop": m["acc_drop"], "seconds": round(self.seconds, 2)}


def search_layers(teacher: Teacher, names: tuple[str, ...] | None) -> list[str]:
    """The layers to search, in forward order; unknown names are a ConfigError naming the valid ones."""
    valid = list(teacher.layer_quant)
    if names is None:
        return valid
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ConfigError(f"--layers: unknown layer(s) {', '.join(unknown) or '(none given)'}; "
                          f"{teacher.arch} has: {', '.join(valid)}")
    return [n for n in valid if n in names]


@functools.lru_cache(maxsize=2)
def _dataset(spec: str, seed: int) -> Dataset:
    """Decoding and splitting is the slowest part of a short search; repeated searches on one
    teacher (benchmarks, notebooks, tests) share it. Datasets are never mutated."""
    return load_dataset(spec, seed)


def _train_images(ds: Dataset, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n train images of a seeded permutation: a fixed, reproducible subset."""
    train = ds.split("train")
    order = np.random.default_rng(seed).permutation(len(train))[:n]
    sub = Split(train.images[order], train.labels[order])
    return torch.from_numpy(normalize(sub.images, ds.norm)), torch.from_numpy(sub.labels)


def run_search(teacher_path: Path, cfg: SearchConfig, out: Path | None = None, force: bool = False,
               on_evaluation: Callable[[Evaluation], None] | None = None,
               from_student: Path | None = None) -> SearchOutcome:
    """Search codes for the teacher's weights, or — `from_student`, a result.json that names a
    fine-tuned student — re-search them for that student's weights (still rewarded against the
    teacher); `deploykit finetune` on the new result.json then starts from those weights."""
    start = time.perf_counter()
    teacher = load_teacher(teacher_path)
    out = Path(out) if out else teacher.weights_path.parent / "result.json"
    check_writable(out, force)
    check_writable(log_path_for(out), force)
    device = resolve_device(cfg.device)  # --device cuda without a GPU fails here, before any work
    base, base_record, previous = _base_student(from_student, teacher, out)
    layers = search_layers(teacher, cfg.layers)
    ds = dataclasses.replace(_dataset(teacher.meta["data"], teacher.meta["seed"]), norm=teacher.norm)
    torch.manual_seed(cfg.seed)
    quant = {n: teacher.layer_quant[n] for n in layers}
    x, _ = _train_images(ds, cfg.state_images, cfg.seed)
    # A re-search keeps each layer's tmax: the ceiling decides which codes the staircase covers, and
    # re-deriving it from the fine-tuned activations (wider: LeNet5 conv1 67 → 96, fc2 112 → 217)
    # made the staircase cover more and the re-searched student worse (benchmarks/cifar10.md).
    keep_tmax = {n: lut.tmax for n, lut in previous.items()} if previous and cfg.tmax.fixed is None else None
    states = list(layer_states((base or teacher).model, layers, quant, x, cfg.tmax, cfg.space, keep_tmax).values())
    # ... and starts from the codes the fine-tuned weights were trained with: the agent's prior and
    # the greedy walk centre on them, and they are the first candidate scored, so the codes the
    # round began with compete in the selection (VGG16-0.25: a re-search without them ended
    # 0.7 pt below those codes on validation, benchmarks/cifar10.md).
    start_codes = {s.name: project(cfg.space, *(getattr(previous[s.name], f) for f in CODE_FIELDS))
                   for s in states if s.name in previous}
    states = [dataclasses.replace(s, init=start_codes.get(s.name, s.init)) for s in states]
    if base_record is not None:
        base_record = {**base_record, "tmax": "kept from the base result" if keep_tmax else "--tmax-fixed",
                       "start": "the base result's codes"}
    xr, yr = _train_images(ds, cfg.reward.images, cfg.seed)
    reward = RewardModel(teacher.model, quant, layers, xr, yr, cfg.reward, device,
                         base_model=base.model if base else None)
    trace = Trace(reward, cfg.episodes, on_evaluation)
    if len(start_codes) == len(states):
        trace.evaluate([{s.name: s.init for s in states}])
    if cfg.method == "ppo":
        ppo_search(trace, states, cfg.space, cfg.ppo, cfg.seed)
    elif cfg.method == "random":
        random_search(trace, states, cfg.space, cfg.seed)
    else:
        greedy_search(trace, states, cfg.space, cfg.seed)
    chosen = select(teacher, ds, trace.top(cfg.top_n), cfg.max_acc_drop, base)
    result = _result(teacher, out, cfg, layers, trace, chosen, ds, base, base_record)
    seconds = time.perf_counter() - start
    write_json(out, result.to_json())
    log_path = log_path_for(out)
    _write_log(log_path, trace.evaluations, seconds)
    return SearchOutcome(out, log_path, result, trace.evaluations, seconds)


def _base_student(from_student: Path | None, teacher: Teacher,
                  out: Path) -> tuple[Teacher | None, dict | None, dict[str, LayerLUT]]:
    """The fine-tuned student a re-search starts from, its record for result.json, and the codes
    it was trained with."""
    if from_student is None:
        return None, None, {}
    from deploy_kit.student import SIDECAR_NAME as STUDENT_SIDECAR, load_student, relative

    previous = load_result(Path(from_student))
    base = load_student(previous, teacher)
    if base is None:
        raise ConfigError(f"--from-student {from_student}: names no fine-tuned student; run `deploykit finetune "
                          f"--config {from_student}` first")
    sidecar = base.weights_path.with_name(STUDENT_SIDECAR)
    return base, {"path": relative(sidecar, out.resolve().parent), "sha256": previous.student["sha256"],
                  "weights_sha256": base.sha256}, dict(previous.layers)


def _result(teacher: Teacher, out: Path, cfg: SearchConfig, layers: list[str], trace: Trace, sel: Selection,
            ds: Dataset, base: Teacher | None = None, base_record: dict | None = None) -> SearchResult:
    cand = sel.chosen.evaluation.candidate
    acc_t, acc_s = split_accuracy(teacher, ds, "test"), split_accuracy(base or teacher, ds, "test", cand)
    score = sel.chosen.evaluation.score
    metrics = {"acc_teacher": acc_t, "acc_student": acc_s, "acc_drop": round(acc_t - acc_s, 2),
               "split": "test", "acc_teacher_int8": teacher.meta.get("accuracy", {}).get("int8", {}).get("test"),
               "val": {"acc_teacher": sel.val_acc_teacher, "acc_student": sel.chosen.val_acc,
                       "acc_drop": sel.chosen.val_drop},
               "reward": round(score.reward, 6), "kl": round(score.kl, 6), "at": round(score.at, 8)}
    sidecar = teacher.weights_path.with_name(SIDECAR_NAME)
    return SearchResult(model=teacher.arch, layers=dict(cand), quant={n: teacher.layer_quant[n] for n in cand},
                        backend=teacher.meta.get("backend", "qnnpack"), selection=sel.note, metrics=metrics,
                        teacher={"path": os.path.relpath(sidecar.resolve(), out.resolve().parent),
                                 "sha256": teacher.sha256},
                        search={**cfg.to_json(len(trace.evaluations), layers),
                                **({"base_student": base_record} if base_record else {})},
                        candidates=[r.to_json(i + 1) for i, r in enumerate(sel.ranked)])


def _write_log(path: Path, evaluations: list[Evaluation], seconds: float) -> None:
    """One JSON line per evaluation, then a summary line with the wall-clock time."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            for ev in evaluations:
                f.write(json.dumps(ev.log_entry()) + "\n")
            f.write(json.dumps({"done": True, "evaluations": len(evaluations), "seconds": round(seconds, 2)}) + "\n")
