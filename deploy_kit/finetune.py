"""The finetune stage: train the student's weights with its LUTs in place, distilled from the
frozen INT8 teacher.

    outcome = finetune(FinetuneConfig(result_path=Path("runs/x/result.json"), epochs=8))

The search picks codes for weights that were trained for a ReLU; the staircase then throws away
what those weights put between its steps. Fine-tuning is the QAT of the approximation:

  - the student starts from the teacher's QAT weights with the LUT at each tap, straight-through
    in the backward pass (`LUTActivation.straight_through`);
  - every activation grid (scale, zero point) is frozen at the teacher's, so each code of
    result.json keeps its meaning; weight scales follow the weights (max|w|/127 per channel,
    re-derived every step and once more at the end, exactly as `train`'s `quant.freeze` does);
  - loss = kd·KL_T(teacher ‖ student)·T² + ce·CE(labels) + at·AT (attention transfer at the taps,
    the search's reward terms), against the teacher on the same augmented batch;
  - after every epoch the frozen student is evaluated in the runtime arithmetic on the
    validation split. What is kept (`select`): by default the last epoch — with `ema`, the
    weight average — unless validation shows it worse than the untouched student (epoch 0) by
    more than chance (a one-sided exact McNemar test on the images where they differ,
    p < 0.05), so fine-tuning never makes a result measurably worse. `select="best"` keeps the
    best epoch on validation instead; on a small split (digits: 179 images) the epochs tie
    within an image or two and the maximum picks noise: on digits seeds 0–2 the last averaged
    epoch was within 0.28 pt of the teacher on test, the best-on-validation one 0.56
    (benchmarks/cifar10.md). The test split is measured once, for the kept epoch.
  - for the kept student, each layer's *exact gain*: the validation points won back by giving
    that one layer its exact activation again (`layer_exact_gain`). The layers the staircase
    still costs most are the ones to leave out first (`search --layers`); on CIFAR-10 VGG16-0.25
    they were the first blocks (benchmarks/cifar10.md, session 9).

Writes student.safetensors + student.json next to result.json and records the student (path,
sha256, metrics) in result.json's `student` entry; export, verify and report then use it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from deploy_kit import quant
from deploy_kit.data import Dataset, Split, load_dataset
from deploy_kit.device import check_device_name, resolve_device
from deploy_kit.errors import ConfigError
from deploy_kit.fsutil import check_writable, read_json, write_json
from deploy_kit.lut import LayerLUT
from deploy_kit.models import ZooModel
from deploy_kit.result import SearchResult, check_against_teacher, load_result, notes_for
from deploy_kit.search.reward import attention_map, attention_transfer
from deploy_kit.student import SIDECAR_NAME, WEIGHTS_NAME, load_base, relative, save_student
from deploy_kit.teacher import Teacher, install_luts
from deploy_kit.train import accuracy, augment, batches, predict, seed_everything, torch_threads, versions


@dataclass(frozen=True)
class FinetuneConfig:
    result_path: Path
    teacher_path: Path | None = None  # default: result.json's `teacher.path`
    # Measured on LeNet5 / CIFAR-10 (benchmarks/cifar10.md): 8 epochs at 5e-4 left a 1.11-pt drop,
    # 15 at 1e-3 0.51–1.20 (two teachers), 30 with the weight average 0.83, 60 with it −0.09 (the
    # last epoch; two rounds of 30 with a re-search between: 0.05). ~17 s an epoch there.
    epochs: int = 60
    lr: float | None = None  # peak Adam learning rate (cosine decay to 0); None: default_lr(model)
    batch_size: int = 64
    temperature: float = 2.0
    kd_weight: float = 1.0
    ce_weight: float = 0.5
    at_weight: float = 100.0  # the search reward's λ (AT values are ~1e-4..1e-2)
    # Exponential moving average of the weights (per step; 0 = off): what each epoch evaluates
    # and what is kept. It smooths the last steps' noise (LeNet5 / CIFAR-10: drop 1.20 → 0.92 at
    # 15 epochs, 1.06 → 0.83 at 30; benchmarks/cifar10.md). The warm-up ramp (1+t)/(10+t) makes
    # 0.999 act like ~0.99 on a small set (digits: 20 steps an epoch).
    ema: float = 0.999
    select: str = "final"  # SELECTIONS: what is kept, decided on the validation split
    seed: int = 0
    device: str = "auto"
    threads: int = 1
    max_train: int | None = None  # cap on training images, for quick runs
    out: Path | None = None  # folder of student.*; default: result.json's folder
    force: bool = False

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if (self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr))) or self.batch_size < 1 \
                or self.threads < 1:
            raise ConfigError(f"need --lr > 0, --batch-size >= 1 and --threads >= 1, got {self.lr}, "
                              f"{self.batch_size}, {self.threads}")
        weights = (self.kd_weight, self.ce_weight, self.at_weight)
        if not self.temperature > 0 or not all(w >= 0 and math.isfinite(w) for w in weights) or not any(weights):
            raise ConfigError(f"need --temperature > 0 and --kd-weight/--ce-weight/--at-weight >= 0 (not all 0), got "
                              f"{self.temperature}, {self.kd_weight}, {self.ce_weight}, {self.at_weight}")
        if self.max_train is not None and self.max_train < 1:
            raise ConfigError(f"--max-train must be >= 1, got {self.max_train}")
        if self.select not in SELECTIONS:
            raise ConfigError(f"unknown --select {self.select!r}; choose one of: {', '.join(SELECTIONS)}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"--ema must be in [0, 1) (0 = off; e.g. 0.999), got {self.ema}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be in 0..2^63-1, got {self.seed}")
        check_device_name(self.device)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.result_path).parent

    def recipe(self, model: str) -> dict:
        keys = ("epochs", "batch_size", "temperature", "kd_weight", "ce_weight", "at_weight", "ema", "seed",
                "max_train")
        d = {k: v for k, v in asdict(self).items() if k in keys}
        return {**d, "lr": self.peak_lr(model), "lr_rule": "given" if self.lr is not None else f"default for {model}",
                "optimizer": "adam", "schedule": "cosine", "selection": SELECTIONS[self.select]}

    def peak_lr(self, model: str) -> float:
        return self.lr if self.lr is not None else default_lr(model)


# Peak Adam learning rate when --lr is not given. Measured on CIFAR-10 (benchmarks/cifar10.md):
# LeNet5 trains well at 1e-3 (60 epochs: drop −0.09); VGG16, whose BatchNorm is folded into the
# convolutions, got worse after one epoch at 1e-3 and reached drops of 0.14–0.57 at 3e-4. The
# other deep zoo models (BN-folded as well) take VGG's value until measured.
DEFAULT_LR = {"lenet5": 1e-3}
DEFAULT_LR_DEEP = 3e-4


def default_lr(model: str) -> float:
    return DEFAULT_LR.get(model, DEFAULT_LR_DEEP)


SELECTIONS = {
    "final": "the last epoch, unless worse than epoch 0 on val (one-sided exact McNemar, p < 0.05)",
    "best": "best val accuracy, then val top-1 agreement with the teacher, then lowest val KL; epoch 0 included",
}
SIGNIFICANCE = 0.05


def mcnemar_worse(before_right: np.ndarray, after_right: np.ndarray) -> float:
    """One-sided exact McNemar p-value that `after` is less accurate than `before` on the same
    images: of the n images where exactly one is right, the chance that `before` wins at least
    as many as it did if each side were equally likely to win each."""
    b = int((before_right & ~after_right).sum())
    n = b + int((~before_right & after_right).sum())
    return sum(math.comb(n, k) for k in range(b, n + 1)) / 2 ** n if n else 1.0


def selection_key(r: "EpochRecord") -> tuple[float, float, float]:
    """How epochs compare on validation. Accuracy first; on a small validation split (digits: 179
    images) many epochs tie there, and agreement with the teacher then says which stayed closest
    to it — what every later check measures."""
    return (r.val_acc, r.val_agreement, -r.val_kl)


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    loss: float | None  # mean training loss; None for epoch 0 (no training)
    val_acc: float
    val_agreement: float  # top-1 agreement with the teacher on validation, percent
    val_kl: float
    seconds: float


@dataclass
class FinetuneOutcome:
    sidecar: Path
    result_path: Path
    meta: dict
    seconds: float

    def summary(self) -> dict:
        a = self.meta["accuracy"]
        return {"student": str(self.sidecar), "result": str(self.result_path), "epoch": self.meta["chosen_epoch"],
                "acc_teacher": a["teacher"]["test"], "acc_student_before": a["before"]["test"],
                "acc_student": a["after"]["test"], "acc_drop": round(a["teacher"]["test"] - a["after"]["test"], 2),
                "images_per_s": self.meta["images_per_s"], "seconds": round(self.seconds, 2),
                "layer_exact_gain": self.meta["layer_exact_gain"]}


# ----------------------------------------------------------------------------- the training pieces

class TapRecorder:
    """Collects each tap's output of one forward pass (the attention-transfer features)."""

    def __init__(self, model: ZooModel, layers: list[str]):
        self.seen: dict[str, torch.Tensor] = {}
        taps = model.taps()
        self.hooks = [taps[n].register_forward_hook(lambda m, i, o, n=n: self.seen.__setitem__(n, o)) for n in layers]

    def pop(self) -> dict[str, torch.Tensor]:
        seen, self.seen = self.seen, {}
        return seen

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def distillation_loss(s_logits, t_logits, labels, s_feats: dict, t_feats: dict, cfg: FinetuneConfig) -> torch.Tensor:
    t = cfg.temperature
    kd = F.kl_div(F.log_softmax(s_logits / t, 1), F.log_softmax(t_logits / t, 1), reduction="batchmean", log_target=True)
    loss = cfg.kd_weight * kd * t * t + cfg.ce_weight * F.cross_entropy(s_logits, labels)
    if cfg.at_weight and t_feats:
        loss = loss + cfg.at_weight * attention_transfer(s_feats, t_feats)
    return loss


def follow_weight_scales(model: ZooModel) -> None:
    """Weight observers forget their running range, so this step's scale is max|w|/127 of the
    current weights — the scale `quant.freeze` derives at the end."""
    for m in model.modules():
        if hasattr(m, "weight_fake_quant"):
            m.weight_fake_quant.activation_post_process.reset_min_max_vals()


class WeightAverage:
    """An exponential moving average of a model's parameters (buffers — the frozen activation
    grids — are the model's own). The decay ramps up as (1+t)/(10+t) so early steps count."""

    def __init__(self, model: ZooModel, decay: float):
        self.decay, self.steps = decay, 0
        self.model = copy.deepcopy(model)
        for tap in self.model.taps().values():
            tap._forward_hooks.clear()
        self.params = [p.detach() for p in self.model.parameters()]

    @torch.no_grad()
    def update(self, model: ZooModel) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.params, [p.detach() for p in model.parameters()], 1 - decay)


def trainable_student(teacher: Teacher, luts: dict[str, LayerLUT], device: torch.device) -> ZooModel:
    """The teacher's QAT model with straight-through LUTs, activation observers off (grids frozen),
    weight observers on, in training mode, on `device`."""
    model = copy.deepcopy(teacher.model)
    quant.use_runtime_arithmetic(model, on=False)
    install_luts(model, luts, teacher.layer_quant, straight_through=True)
    for m in model.modules():
        if hasattr(m, "weight_fake_quant"):
            m.weight_fake_quant.enable_observer()
    return model.to(device).train()


def training_teacher(teacher: Teacher, device: torch.device) -> ZooModel:
    """The teacher as the training target: its fake-quant forward, which runs on any device
    (the runtime arithmetic is a CPU evaluation path). Same weights and grids."""
    return quant.use_runtime_arithmetic(copy.deepcopy(teacher.model), on=False).to(device).eval()


def frozen_student(model: ZooModel, teacher: Teacher, luts: dict[str, LayerLUT]) -> ZooModel:
    """A CPU copy frozen like `train` freezes (weight scales re-derived, observers off, runtime
    arithmetic), with the plain LUTs: the model export and verify use."""
    frozen = copy.deepcopy(model).cpu().eval()
    for tap in frozen.taps().values():
        # A deep copy keeps the training loop's TapRecorder hooks. Only the taps' own: QAT's
        # observer hooks (the input QuantStub quantizes through one) must stay.
        tap._forward_hooks.clear()
    quant.freeze(frozen)
    install_luts(frozen, luts, teacher.layer_quant)
    return frozen.eval()


def _kl(t_logits: np.ndarray, s_logits: np.ndarray, temperature: float) -> float:
    t, s = torch.from_numpy(t_logits) / temperature, torch.from_numpy(s_logits) / temperature
    return float(F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="batchmean", log_target=True)) * temperature ** 2


def layer_distances(model: ZooModel, teacher: Teacher, split: Split, ds: Dataset, layers: list[str]) -> dict[str, float]:
    """Attention-transfer distance to the teacher per spatial tap, on `split` (runtime arithmetic)."""
    out = {n: 0.0 for n in layers}
    rec_s, rec_t = TapRecorder(model, layers), TapRecorder(teacher.model, layers)
    try:
        with torch.no_grad():
            for x, _ in batches(split, ds, 256):
                model(x), teacher.model(x)
                s, t = rec_s.pop(), rec_t.pop()
                for n in layers:
                    out[n] += float((attention_map(s[n]) - attention_map(t[n])).pow(2).mean(1).sum())
    finally:
        rec_s.close(), rec_t.close()
    return {n: v / len(split) for n, v in out.items()}


def exact_gains(model: ZooModel, teacher: Teacher, luts: dict[str, LayerLUT], split: Split, ds: Dataset,
                base: float) -> dict[str, float]:
    """Per approximated layer, the accuracy points (on `split`) the frozen student — `base` % with
    every LUT — wins back when that one layer keeps its exact activation and every other LUT stays:
    where the staircase still costs most after fine-tuning, so the first layer `search --layers`
    could leave exact."""
    trial = copy.deepcopy(model)
    gains = {}
    for name in luts:
        install_luts(trial, {n: lut for n, lut in luts.items() if n != name}, teacher.layer_quant)
        gains[name] = round(accuracy(predict(trial, split, ds), split.labels) - base, 2)
    return gains


# ----------------------------------------------------------------------------- the stage

@dataclass(frozen=True)
class _Inputs:
    result: SearchResult
    raw: dict
    teacher: Teacher
    luts: dict[str, LayerLUT]
    init: Teacher  # the weights training starts from: the teacher's, or a re-searched student's


def prepare(cfg: FinetuneConfig) -> _Inputs:
    """Read and check every input, and claim every output, before any work."""
    from deploy_kit.export import resolve_teacher

    result = load_result(cfg.result_path)
    teacher = resolve_teacher(result, cfg.teacher_path)
    check_against_teacher(result, teacher)
    out = cfg.out_dir
    for path in (out / SIDECAR_NAME, out / WEIGHTS_NAME):
        check_writable(path, cfg.force)
    if result.student and not cfg.force:
        raise ConfigError(f"{result.path}: already names a fine-tuned student ({result.student['path']}); "
                          "pass --force to fine-tune again and replace it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; finetune writes a folder")
    raw = read_json(result.path, ConfigError, label=result.path.name)
    init = load_base(result, teacher) or teacher
    return _Inputs(result, raw, teacher, dict(result.layers), init)


def finetune(cfg: FinetuneConfig, progress: Callable[[str], None] = lambda _m: None) -> FinetuneOutcome:
    inputs = prepare(cfg)
    device = resolve_device(cfg.device)  # --device cuda without a GPU: one line, before anything else
    for note in notes_for(inputs.result, inputs.teacher):
        progress(note)
    with torch_threads(cfg.threads):
        return _finetune(cfg, inputs, device, progress)


def _finetune(cfg: FinetuneConfig, inp: _Inputs, device: torch.device, progress) -> FinetuneOutcome:
    start = time.perf_counter()
    seed_everything(cfg.seed)
    teacher, luts = inp.teacher, inp.luts
    ds = dataclasses.replace(load_dataset(teacher.meta["data"], teacher.meta["seed"]), norm=teacher.norm)
    train = ds.split("train")
    if cfg.max_train:
        train = Split(train.images[:cfg.max_train], train.labels[:cfg.max_train])
    val = ds.split("val")
    at_layers = _spatial_taps(teacher, list(luts))
    t_val = predict(teacher.model, val, ds)

    right: dict[int, np.ndarray] = {}  # per-image correctness on val, for the McNemar test

    def evaluate(model: ZooModel, epoch: int) -> tuple[float, float, float]:
        logits = predict(model, val, ds)
        right[epoch] = logits.argmax(1) == val.labels
        agreement = round(100.0 * float((logits.argmax(1) == t_val.argmax(1)).mean()), 2)
        return accuracy(logits, val.labels), agreement, round(_kl(t_val, logits, cfg.temperature), 6)

    init = inp.init
    before = frozen_student(trainable_student(init, luts, torch.device("cpu")), teacher, luts)
    acc0, agree0, kl0 = evaluate(before, 0)
    history = [EpochRecord(0, None, acc0, agree0, kl0, 0.0)]
    best = (selection_key(history[0]), 0, before)
    last = before
    start_from = "teacher weights" if init is teacher else f"weights of {init.weights_path.name}"
    progress(f"epoch 0 (the searched student, {start_from}): val accuracy {acc0:.2f}%, agreement {agree0:.2f}%, "
             f"val KL {kl0:.4f}")

    student, target = trainable_student(init, luts, device), training_teacher(teacher, device)
    average = WeightAverage(student, cfg.ema) if cfg.ema else None
    rec_s, rec_t = TapRecorder(student, at_layers), TapRecorder(target, at_layers)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.peak_lr(teacher.meta["model"]))
    steps_per_epoch = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    aug = teacher.meta.get("config", {})
    trained = 0
    try:
        for epoch in tqdm(range(1, cfg.epochs + 1), desc="finetune", unit="epoch", leave=False, dynamic_ncols=True):
            t0 = time.perf_counter()
            loss_sum = _train_epoch(student, target, rec_s, rec_t, train, ds, opt, sched, gen, cfg, aug, device,
                                    average)
            trained += len(train)
            frozen = frozen_student(average.model if average else student, teacher, luts)
            acc, agree, kl = evaluate(frozen, epoch)
            history.append(EpochRecord(epoch, round(loss_sum / len(train), 6), acc, agree, kl,
                                       round(time.perf_counter() - t0, 2)))
            if selection_key(history[-1]) > best[0]:
                best = (selection_key(history[-1]), epoch, frozen)
            last = frozen
            progress(f"epoch {epoch}/{cfg.epochs}: loss {loss_sum / len(train):.4f}, val accuracy {acc:.2f}%, "
                     f"agreement {agree:.2f}%, val KL {kl:.4f} ({time.perf_counter() - t0:.1f}s)")
    finally:
        rec_s.close(), rec_t.close()
    train_seconds = sum(r.seconds for r in history)
    p_worse = mcnemar_worse(right[0], right[cfg.epochs])
    if cfg.select == "best":
        chosen_epoch, chosen = best[1], best[2]
    else:
        chosen_epoch, chosen = (0, before) if p_worse < SIGNIFICANCE else (cfg.epochs, last)
    progress(f"kept epoch {chosen_epoch} ({cfg.select}; last epoch vs epoch 0 on val: McNemar p = {p_worse:.3g})")
    meta = _sidecar_meta(cfg, inp, ds, before, chosen, chosen_epoch, history, at_layers, device)
    meta["selection"] = {"rule": cfg.select, "mcnemar_p_last_worse_than_epoch0": round(p_worse, 6)}
    meta.update(train_images=len(train), seconds=round(time.perf_counter() - start, 2),
                images_per_s=round(trained / train_seconds, 1) if train_seconds else None)
    sidecar, sha, meta = save_student(chosen, meta, cfg.out_dir)
    result_path = _record_in_result(inp, sidecar, sha, meta)
    return FinetuneOutcome(sidecar, result_path, meta, time.perf_counter() - start)


def _spatial_taps(teacher: Teacher, layers: list[str]) -> list[str]:
    blocks = teacher.model.blocks()
    return [n for n in layers if isinstance(blocks[n].op, torch.nn.Conv2d)]


def _train_epoch(student, target, rec_s, rec_t, train: Split, ds: Dataset, opt, sched, gen, cfg: FinetuneConfig,
                 aug: dict, device, average: WeightAverage | None = None) -> float:
    student.train()
    order = torch.randperm(len(train), generator=gen).numpy()
    shuffled = Split(train.images[order], train.labels[order])
    total = 0.0
    for x, y in batches(shuffled, ds, cfg.batch_size):
        if aug.get("augment", True):
            x = augment(x, gen, bool(aug.get("hflip", False)), crop=int(aug.get("crop", 0)))
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            t_logits = target(x)
        t_feats = rec_t.pop()
        follow_weight_scales(student)
        s_logits = student(x)
        loss = distillation_loss(s_logits, t_logits, y, rec_s.pop(), t_feats, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if average:
            average.update(student)
        total += float(loss.detach()) * len(y)
    return total


def _sidecar_meta(cfg: FinetuneConfig, inp: _Inputs, ds: Dataset, before: ZooModel, after: ZooModel, epoch: int,
                  history: list[EpochRecord], at_layers: list[str], device) -> dict:
    teacher, out = inp.teacher, cfg.out_dir

    def acc(model, split):
        s = ds.split(split)
        return accuracy(predict(model, s, ds), s.labels)

    val = ds.split("val")
    dist_before = layer_distances(before, teacher, val, ds, at_layers)
    dist_after = layer_distances(after, teacher, val, ds, at_layers)
    accuracies = {"teacher": {s: acc(teacher.model, s) for s in ("val", "test")},
                  "before": {s: acc(before, s) for s in ("val", "test")},
                  "after": {s: acc(after, s) for s in ("val", "test")}}
    return {
        "model": teacher.arch, "width": teacher.meta["width"], "input_shape": teacher.meta["input_shape"],
        "classes": teacher.meta["classes"], "data": teacher.meta["data"],
        "teacher": {"path": relative(teacher.weights_path.with_name("teacher.json"), out), "sha256": teacher.sha256},
        "result": {"path": relative(inp.result.path, out), "digest": inp.result.digest},
        "layers": {n: lut.to_json() for n, lut in inp.luts.items()},
        "recipe": cfg.recipe(teacher.meta["model"]), "device": str(device), "arithmetic": quant.ARITHMETIC,
        "init": ("teacher" if inp.init is teacher else
                 {"student": relative(inp.init.weights_path.with_name(SIDECAR_NAME), out), "weights_sha256": inp.init.sha256}),
        "chosen_epoch": epoch, "epochs": [asdict(r) for r in history],
        "accuracy": accuracies,
        "layer_at_distance": {n: {"before": round(dist_before[n], 8), "after": round(dist_after[n], 8)} for n in at_layers},
        "layer_exact_gain": exact_gains(after, teacher, inp.luts, val, ds, base=accuracies["after"]["val"]),
        "versions": versions(),
    }


def _record_in_result(inp: _Inputs, sidecar: Path, sha: str, meta: dict) -> Path:
    """Add (or replace) result.json's `student` entry; the rest of the file is kept as it was."""
    a = meta["accuracy"]
    drop = lambda k, s: round(a["teacher"][s] - a[k][s], 2)  # noqa: E731
    entry = {"path": relative(sidecar, inp.result.path.parent), "sha256": sha,
             "metrics": {"acc_teacher": a["teacher"]["test"], "acc_student": a["after"]["test"],
                         "acc_drop": drop("after", "test"), "split": "test", "epoch": meta["chosen_epoch"],
                         "before": {"acc_student": a["before"]["test"], "acc_drop": drop("before", "test")},
                         "val": {"acc_teacher": a["teacher"]["val"], "acc_student": a["after"]["val"],
                                 "acc_drop": drop("after", "val")}}}
    write_json(inp.result.path, {**inp.raw, "student": entry})
    return inp.result.path
