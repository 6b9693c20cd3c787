"""Restore the pruned float model from the unpruned teacher, then QAT as `train` does.

    loss = α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − α)·CE(student, y) + λ·AT

The first two terms are Hinton KD; AT is attention transfer (Zagoruyko & Komodakis) at every conv
block, the same term `finetune` and the search reward use: a pruned VGG keeps the teacher's layers
and their spatial sizes, so each of its feature maps has a counterpart whatever its channel count.
The teacher is the unpruned INT8 teacher itself (frozen, in the runtime arithmetic), fed the same
augmented batch as the student. QAT then runs the train stage's recipe (fold BN, fake quant,
freeze) with the same distillation loss by default, so the QAT epochs keep the objective the
float epochs had; the result is a teacher like any other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from deploy_kit.data import Dataset
from deploy_kit.errors import ConfigError
from deploy_kit.finetune import TapRecorder
from deploy_kit.models import ZooModel
from deploy_kit.search.reward import attention_transfer
from deploy_kit.train import TrainConfig, fit_and_quantize


# The default distillation length (DistilConfig.epochs). CIFAR-10 VGG16-0.25 at ~0.35× MACs: 80 KD epochs after a
# 40-epoch teacher lost 0.88 and 0.89 pt (two seeds, two teachers), 60 lost 1.10 and 1.18: benchmarks/prune.md.
KD_EPOCHS_PER_TEACHER_EPOCH = 2.0


@dataclass(frozen=True)
class DistilConfig:
    # None: KD_EPOCHS_PER_TEACHER_EPOCH × the unpruned teacher's own float epochs. Distillation re-trains
    # every kept weight, and on CIFAR-10 VGG16-0.25 (a 40-epoch teacher, 0.5× latency, same configuration
    # and seed) longer kept paying: 20 → 40 → 60 KD epochs gave 83.54 → 83.72 % INT8 test (sessions 8–9, logits
    # only), and 84.17 → 84.48 % with attention transfer (session 12; float val 83.78 → 84.38); on a second
    # configuration 40 → 60 raised the float model too (val 84.02 → 84.36) but not INT8 (84.49 → 84.39 % test).
    epochs: int | None = None
    qat_epochs: int = 4
    lr: float | None = None  # peak of the one-cycle schedule; None: default_lr(the teacher's optimizer)
    qat_lr: float = 2e-4
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the KD term; 1 − alpha on the cross-entropy with the labels
    # λ of the attention-transfer term (0: off), finetune's default; on CIFAR-10 VGG16-0.25 (40 KD epochs)
    # 100 gave 84.33 % INT8 test, 1000 83.75 %, logits only 83.72 % (benchmarks/prune.md, session 10)
    at_weight: float = 100.0
    qat_kd: bool = True  # the QAT epochs distil too (False: cross-entropy, as `train`)

    def __post_init__(self):
        negative_epochs = self.epochs is not None and self.epochs < 0
        if negative_epochs or self.qat_epochs < 1 or (self.lr is not None and self.lr <= 0) or self.qat_lr <= 0:
            raise ConfigError(f"need --kd-epochs >= 0, --qat-epochs >= 1 and positive learning rates, got {asdict(self)}")
        if self.temperature <= 0 or not 0 <= self.alpha <= 1:
            raise ConfigError(f"need --kd-temperature > 0 and --kd-alpha in [0, 1], got {self.temperature}, {self.alpha}")
        if not 0 <= self.at_weight < float("inf"):
            raise ConfigError(f"need --kd-at-weight >= 0, got {self.at_weight}")

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved(self, optimizer: str, teacher_epochs: int) -> DistilConfig:
        """This config with the epochs and learning rate it will run at (the default rules applied)."""
        epochs = math.ceil(KD_EPOCHS_PER_TEACHER_EPOCH * teacher_epochs) if self.epochs is None else self.epochs
        return replace(self, lr=default_lr(optimizer) if self.lr is None else self.lr, epochs=epochs)


# Distillation re-trains a pruned copy of trained weights with the teacher's own optimizer. Adam: 1e-3
# (measured on digits, benchmarks/prune.md). SGD: 0.01, a fifth of the 0.05 the CIFAR-10 teachers were
# trained with, and the rate Torch-Pruning's CIFAR-10 benchmarks fine-tune pruned models at; the
# teacher's own 0.05 would throw away much of what the kept channels know in the first epochs.
DEFAULT_LR = {"adam": 1e-3, "sgd": 1e-2}


def default_lr(optimizer: str) -> float:
    return DEFAULT_LR.get(optimizer, DEFAULT_LR["adam"])


class Distillation:
    """The loss `(logits, y, x) → loss` for train's epochs. Forward hooks on both models' conv taps
    feed the attention-transfer term (none without it); `close()` removes them."""

    def __init__(self, teacher: ZooModel, student: ZooModel, cfg: DistilConfig):
        self.teacher, self.cfg = teacher.eval(), cfg
        layers = [n for n, b in student.blocks().items() if isinstance(b.op, torch.nn.Conv2d)] if cfg.at_weight else []
        self.rec_t, self.rec_s = TapRecorder(teacher, layers), TapRecorder(student, layers)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        cfg, t = self.cfg, self.cfg.temperature
        s_feats = self.rec_s.pop()
        with torch.no_grad():
            t_logits = self.teacher(x.cpu())
        t_feats = {n: f.to(logits.device) for n, f in self.rec_t.pop().items()}
        soft = F.softmax(t_logits.to(logits.device) / t, dim=1)
        kd = F.kl_div(F.log_softmax(logits / t, dim=1), soft, reduction="batchmean") * t * t
        loss = cfg.alpha * kd + (1 - cfg.alpha) * F.cross_entropy(logits, y)
        if t_feats:
            loss = loss + cfg.at_weight * attention_transfer(s_feats, t_feats)
        return loss

    def close(self) -> None:
        self.rec_t.close()
        self.rec_s.close()


def distil_and_qat(student: ZooModel, teacher: ZooModel, train, ds: Dataset, train_cfg: TrainConfig,
                   cfg: DistilConfig, gen: torch.Generator, device: torch.device) -> tuple[ZooModel, dict, TrainConfig]:
    """Distil the pruned float `student` in place, then QAT; returns the frozen QAT model and the
    accuracies (float after KD, fake-quant, int8) on val and test, as `train` records them, and
    the train config the epochs ran with."""
    cfg = cfg.resolved(train_cfg.optimizer, train_cfg.epochs)
    run_cfg = replace(train_cfg, epochs=cfg.epochs, qat_epochs=cfg.qat_epochs, lr=cfg.lr, qat_lr=cfg.qat_lr)
    loss = Distillation(teacher, student, cfg)
    try:
        accuracy = fit_and_quantize(student, train, ds, run_cfg, gen, device, "distil", loss,
                                    qat_loss_fn=loss if cfg.qat_kd else None)
    finally:
        loss.close()
    return student, accuracy, run_cfg
