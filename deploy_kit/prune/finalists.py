"""The finalists: the agent's best few configurations, each distilled briefly, ranked on val.

The search's reward (val accuracy after BatchNorm re-estimation, no training) prices a
configuration by how little removing its channels broke the trained weights — 22–34 % on
CIFAR-10 VGG16-0.25 at 0.5× latency, where every proposal is broken — not by how well it
distils, and the distillation is what the result is made of (benchmarks/prune.md: the loss is in
the distilled float model). NetAdapt short-fine-tunes each proposal for this reason; here only
the `count` best distinct configurations of the search are, each from the same L1-pruned start
with the full distillation's loss and rate, on the same seeded subset of training images in the
same order, and the best on the validation split (never the test split) is distilled in full.

Under a latency budget each finalist is first exported to INT8 and timed against the unpruned
teacher in one interleaved session (`within_measured_budget`): the table prices configurations to
a few per cent (held-out error ±3 … 6 % on CIFAR-10 VGG16-0.25), as much as the margin the search
leaves below the budget, and one search's best, predicted 0.4987×, measured 0.510× (session 12).
Finalists measured over the budget are dropped before any distillation; when all are over, the
fastest is kept and the caller is told.

The same timing recalibrates the search (NetAdapt's whole-model check, acted on): the table's
ratio is off by a few per cent either way as the host and its timing state change (+9.8 % on the
AMX host of session 15, where the default run then stopped at 0.429× for a 0.5× budget). When
the finalists' median measured/predicted ratio (`recalibration_scale`) is off by more than
`RECALIBRATE_TOLERANCE`, the search runs once more with the table scaled by it, its finalists are
timed again, and the second round's are kept unless none of them measures within the budget
(`choose_round`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from deploy_kit.data import Dataset, Split
from deploy_kit.errors import ConfigError
from deploy_kit.prune.distil import DistilConfig, Distillation
from deploy_kit.prune.latency import int8_qat_form, time_against
from deploy_kit.prune.surgery import config_key, pruned_copy, reestimate_bn
from deploy_kit.train import TrainConfig, accuracy, predict, run_epochs


@dataclass(frozen=True)
class FinalistConfig:
    count: int = 6  # 0 or 1: the search's own best is distilled, as before finalists existed
    images: int = 10_000  # training images each finalist is distilled on (a seeded subset)
    epochs: int = 1

    def __post_init__(self):
        if self.count < 0 or self.images < 64 or self.epochs < 1:
            raise ConfigError(f"need --finalists >= 0, --finalist-images >= 64 and --finalist-epochs >= 1, "
                              f"got {self.count}, {self.images}, {self.epochs}")

    def to_dict(self) -> dict:
        return asdict(self)


def shortlist(records: list[dict], count: int) -> list[dict]:
    """The `count` best distinct configurations by the search's reward (ties: the earlier episode)."""
    seen, out = set(), []
    for rec in sorted(records, key=lambda r: (-r["reward"], r["episode"])):
        key = config_key(rec["channels"])
        if key not in seen:
            seen.add(key)
            out.append(rec)
    return out[:count]


def train_subset(train: Split, n: int, seed: int) -> Split:
    pick = np.sort(np.random.default_rng(seed).permutation(len(train))[:n])
    return Split(train.images[pick], train.labels[pick])


def rank_finalists(finalists: list[dict], model, teacher, x_bn: torch.Tensor, ds: Dataset, train_cfg: TrainConfig,
                   distil: DistilConfig, cfg: FinalistConfig, seed: int, device,
                   say: Callable[[str], None] = print) -> list[dict]:
    """Each finalist's record plus `short_val_acc`, its val accuracy after the short distillation,
    best first (ties: the search's order). `distil` is resolved (its lr set)."""
    subset, val = train_subset(ds.split("train"), cfg.images, seed), ds.split("val")
    in_shape = tuple(x_bn.shape[1:])
    ranked = []
    for i, rec in enumerate(finalists):
        student = reestimate_bn(pruned_copy(model, rec["channels"], in_shape), x_bn)
        short_distil(student, teacher, subset, ds, train_cfg, distil, cfg.epochs, seed, device,
                     f"finalist {i + 1}/{len(finalists)}")
        acc = accuracy(predict(student, val, ds), val.labels)
        say(f"finalist {i + 1}/{len(finalists)} (search episode {rec['episode']}, val {rec['val_acc']}% as the search scored it): "
            f"{acc}% val after {cfg.epochs} short epoch(s) on {len(subset)} images")
        ranked.append({**rec, "short_val_acc": acc, "search_rank": i + 1})
    return sorted(ranked, key=lambda r: (-r["short_val_acc"], r["search_rank"]))


def short_distil(student, teacher, subset: Split, ds: Dataset, train_cfg: TrainConfig, distil: DistilConfig, epochs: int,
                 seed: int, device, label: str) -> None:
    """Distil `student` in place for `epochs` over `subset` with the full distillation's loss and
    rate. The generator is re-seeded on each call, so every student sees the same batches and
    augmentation: what differs between two calls is the configuration alone."""
    loss = Distillation(teacher, student, distil)
    try:
        run_epochs(student, subset, ds, train_cfg, epochs, distil.lr, label, torch.Generator().manual_seed(seed), device,
                   loss, train_cfg.optimizer, train_cfg.weight_decay)
    finally:
        loss.close()


def time_finalists(finalists: list[dict], model, unpruned, x_bn: torch.Tensor, image: np.ndarray, runtime: str,
                   seed: int, amx: bool = False) -> list[dict]:
    """Each finalist's record plus `measured_ratio`: the INT8 export of its L1-pruned float model
    (activation ranges from `x_bn`, as the latency table's) timed against the unpruned INT8
    teacher `unpruned`, all interleaved in one session (1 thread, batch 1)."""
    in_shape = tuple(x_bn.shape[1:])
    qat = [int8_qat_form(pruned_copy(model, rec["channels"], in_shape), x_bn) for rec in finalists]
    base, ms = time_against(unpruned, qat, in_shape, runtime, x_bn, image, seed, amx)
    return [{**rec, "measured_ms": t, "unpruned_ms": base, "measured_ratio": round(t / base, 4)}
            for rec, t in zip(finalists, ms)]


RECALIBRATE_TOLERANCE = 0.03  # the table's held-out error on CIFAR-10 VGG16-0.25 is ±3 … 6 % per configuration


def recalibration_scale(timed: list[dict]) -> float:
    """The median of measured ÷ predicted ratio over timed finalists: what the table's ratio is off by
    on this machine now (1.0: none timed)."""
    if not timed:
        return 1.0
    return float(np.median([r["measured_ratio"] / r["latency_ratio_predicted"] for r in timed]))


def choose_round(rounds: list[list[dict]], ratio: float) -> tuple[int, list[dict], list[dict]]:
    """(round index, kept, dropped) over timed finalists of each search round: the latest round with
    a finalist measured within `ratio` (its over-budget ones dropped); none anywhere: the fastest of
    all, as `within_measured_budget` keeps."""
    for i in reversed(range(len(rounds))):
        kept, dropped = within_measured_budget(rounds[i], ratio)
        if kept and kept[0]["measured_ratio"] <= ratio:
            return i, kept, dropped
    pooled = [r for timed in rounds for r in timed]
    kept, dropped = within_measured_budget(pooled, ratio)
    return next((i for i, timed in enumerate(rounds) if kept and kept[0] in timed), len(rounds) - 1), kept, dropped


def within_measured_budget(timed: list[dict], ratio: float) -> tuple[list[dict], list[dict]]:
    """(kept, dropped): the finalists whose `measured_ratio` is within `ratio`, in their order, and
    the others. None within: the fastest one is kept, so that there is always a choice."""
    kept = [r for r in timed if r["measured_ratio"] <= ratio]
    if not kept and timed:
        kept = [min(timed, key=lambda r: r["measured_ratio"])]
    return kept, [r for r in timed if r not in kept]
