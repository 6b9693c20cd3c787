"""The pruning reward, R = α·ΔP − β·ΔC − γ·ΔH, for one channel configuration: L1-prune a copy
of the float model, re-estimate its BatchNorm on training images, and take its accuracy on the
validation split (never the test split); ΔC and ΔH are the relative MACs and predicted-latency
changes (≤ 0). Each evaluation is recorded (prune_log.jsonl); repeats are scored once.

Two kinds of ΔP (`PruneConfig.reward`): "bn" scores the pruned copy as it is after BN
re-estimation, as AMC does (no training, ~1 s a proposal); "kd" distils it briefly first (one
epoch on a small seeded subset of training images, the same for every proposal), as NetAdapt
short-fine-tunes each proposal. Why the second exists: on CIFAR-10 VGG16-0.25 at 0.5× latency every
proposal scores 18–23 % after BN alone, and over three searches that figure's correlation with
the finalists' accuracy after one short distillation was −0.29, −0.12 and +0.30 (benchmarks/prune.md):
the search was ranking noise.
"""

from __future__ import annotations

from typing import Callable

from deploy_kit.data import Dataset, Split
from deploy_kit.prune.latency import LatencyTable
from deploy_kit.prune.surgery import config_key, full_channels, macs, pruned_copy, reestimate_bn
from deploy_kit.train import accuracy, predict


class Scorer:
    """The reward: prune a copy, re-estimate BN on training images, `train` it in place when given
    (the "kd" reward's short distillation; never the unpruned model), accuracy on the val split."""

    def __init__(self, model, infos, table: LatencyTable, x_bn, val: Split, ds: Dataset, cfg,
                 train: Callable[[object], None] | None = None):
        self.model, self.infos, self.table, self.x_bn, self.val, self.ds, self.cfg = model, infos, table, x_bn, val, ds, cfg
        self.train = None  # the unpruned model's figure is its own, untrained
        self.in_shape = tuple(x_bn.shape[1:])
        full = full_channels(infos)
        self.acc0, self.macs0, self.ms0 = self._accuracy(full), macs(infos, full), table.predict(full)
        self.train = train
        self.records: list[dict] = []
        self.round = 1  # the search round (2: after the table was recalibrated against measured finalists)
        self._seen: dict[tuple, dict] = {}

    def _accuracy(self, channels: dict[str, int]) -> float:
        model = reestimate_bn(pruned_copy(self.model, channels, self.in_shape), self.x_bn)
        if self.train is not None:
            self.train(model)
        return accuracy(predict(model, self.val, self.ds), self.val.labels)

    def __call__(self, configs: list[dict[str, int]]) -> list[float]:
        return [self.one(c)["reward"] for c in configs]

    def one(self, channels: dict[str, int]) -> dict:
        key = config_key(channels)
        if key not in self._seen:
            acc = self._accuracy(channels)
            dc, dh = macs(self.infos, channels) / self.macs0 - 1, self.table.predict(channels) / self.ms0 - 1
            reward = self.cfg.alpha * (acc - self.acc0) / 100 - self.cfg.beta * dc - self.cfg.gamma * dh
            self._seen[key] = {"channels": dict(channels), "val_acc": acc, "macs_ratio": round(dc + 1, 4),
                               "latency_ratio_predicted": round(dh + 1, 4), "reward": round(reward, 6)}
        rec = {"episode": len(self.records) + 1, "round": self.round, **self._seen[key]}
        self.records.append(rec)
        return rec

    def best(self) -> dict:
        return max(self.records, key=lambda r: (r["reward"], -r["episode"]))
