"""The reward: how close a student is to the teacher on a fixed set of train images.

    reward = −( KL_T(teacher ‖ student) · T²  +  λ · AT )

KL_T is the distillation KL of Hinton et al. between temperature-softened outputs (the
research system's `F.kl_div(log_softmax(s/T), softmax(t/T)) · T²`); AT is the attention-transfer
loss of Zagoruyko & Komodakis: the mean squared difference of L2-normalized spatial attention
maps (channel mean of a²) at the chosen layers. Every candidate is scored on the *same* images,
so rewards of different episodes compare.

Speed: the teacher's logits and attention maps are computed once; the network's prefix up to the
first searched layer never changes, so its output is cached too and only the suffix runs; and K
candidates are scored in one forward pass by stacking K copies of the images and giving each
copy its own thresholds (`StackedLUT`).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deploy_kit.errors import ConfigError
from deploy_kit.lut import ActivationQuant, LayerLUT
from deploy_kit.models import ZooModel

STACK_BYTES = 96 << 20  # activation memory one stacked forward may use; bounds K


@dataclass(frozen=True)
class RewardConfig:
    temperature: float = 2.0
    at_weight: float = 100.0  # the research system's weight; AT values are ~1e-4..1e-2
    images: int = 512
    at_layers: tuple[str, ...] | None = None  # None: every searched layer with a spatial output

    def __post_init__(self):
        if self.temperature <= 0 or self.at_weight < 0 or self.images < 1:
            raise ConfigError(f"need --temperature > 0, --at-weight >= 0 and --reward-images >= 1, got "
                              f"{self.temperature}, {self.at_weight}, {self.images}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["at_layers"] = list(self.at_layers) if self.at_layers is not None else None
        return d


@dataclass(frozen=True)
class Score:
    reward: float
    kl: float
    at: float
    agreement: float  # top-1 agreement with the teacher on the reward images, percent
    acc_drop: float  # teacher accuracy minus student accuracy on the reward images, points


class StackedLUT(nn.Module):
    """K staircases at once: the batch holds K stacked copies of the images, copy k uses row k
    of the half-code thresholds `th` [K, 3] and levels `lv` [K, 3] (same form as LUTActivation)."""

    def __init__(self, th: torch.Tensor, lv: torch.Tensor):
        super().__init__()
        self.th, self.lv = th, lv

    def forward(self, x):
        k = self.th.shape[0]
        xs = x.reshape(k, -1)
        th, lv = self.th.unsqueeze(-1).unbind(1), self.lv.unsqueeze(-1).unbind(1)
        y = torch.where(xs < th[0], lv[0], torch.where(xs < th[1], lv[1], torch.where(xs < th[2], lv[2], xs)))
        return y.reshape(x.shape)


def attention_map(a: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis: channel mean of a², flattened and L2-normalized per sample."""
    return F.normalize(a.pow(2).mean(1).flatten(1), dim=1)


def attention_transfer(s_feats: dict[str, torch.Tensor], t_feats: dict[str, torch.Tensor]) -> torch.Tensor:
    """The AT loss: squared attention-map distance, mean over pixels and images, mean over the layers of `t_feats`."""
    return sum((attention_map(s_feats[n]) - attention_map(t_feats[n])).pow(2).mean() for n in t_feats) / len(t_feats)


def suffix_modules(model: ZooModel, layer: str) -> list[nn.Module]:
    """The modules that run after `layer`'s tap input, in forward order (ZooModel.forward)."""
    stages = [*model.features.named_children(), ("pool", model.pool), ("flatten", model.flatten),
              *model.classifier.named_children(), ("dequant", model.dequant)]
    names = [n for n, _ in stages]
    start = names.index(layer)
    return [model.blocks()[layer].tap] + [m for _, m in stages[start + 1:]]


class RewardModel:
    """Scores candidate LUT sets (dicts layer → LayerLUT) against the cached teacher."""

    def __init__(self, teacher_model: ZooModel, quant: dict[str, ActivationQuant], layers: list[str],
                 x: torch.Tensor, labels: torch.Tensor, cfg: RewardConfig, device: torch.device = torch.device("cpu"),
                 base_model: ZooModel | None = None):
        """`base_model`: the weights the candidate students run with (a fine-tuned student, to
        re-search its codes); default the teacher's. The reward is always against the teacher."""
        self.cfg, self.quant, self.layers, self.device = cfg, quant, list(layers), device
        self.model = self._prepared(teacher_model)
        x, labels = x.to(device), labels.to(device)
        self.labels = labels
        with torch.no_grad():
            self.start, self.t_logits, t_feats = self._teacher_pass(x)
            if base_model is not None:
                self.model = self._prepared(base_model)
                self.start = self._teacher_pass(x)[0]
        self.at_layers = self._at_layers(t_feats)
        self.t_maps = {n: attention_map(t_feats[n]) for n in self.at_layers}
        self.t_logp = F.log_softmax(self.t_logits / cfg.temperature, dim=1)
        self.t_correct = (self.t_logits.argmax(1) == labels).float().mean().item()
        per_image = max(f[0].numel() for f in t_feats.values()) * 4 * 3  # a few live tensors per stage
        self.stack = max(1, STACK_BYTES // (per_image * len(x)))
        self.suffix = suffix_modules(self.model, self.layers[0])

    def _prepared(self, model: ZooModel) -> ZooModel:
        model = copy.deepcopy(model).eval()
        for tap in model.taps().values():
            tap.fn = None
        if self.device.type != "cpu":
            # The runtime arithmetic is the CPU reference path; on an accelerator the reward uses
            # the fake-quant forward (same weights and grids, a code apart at a few places). The
            # validation re-scoring that selects the result runs on the CPU either way.
            from deploy_kit.quant import use_runtime_arithmetic

            use_runtime_arithmetic(model, on=False)
            model.to(self.device)
        return model

    def _teacher_pass(self, x):
        taps = self.model.taps()
        seen = {}
        hooks = [taps[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0])) for n in self.layers]
        try:
            logits = self.model(x)
        finally:
            for h in hooks:
                h.remove()
        return seen[self.layers[0]], logits, seen

    def _at_layers(self, feats) -> list[str]:
        if self.cfg.at_layers is None:
            return [n for n in self.layers if feats[n].dim() == 4]
        bad = [n for n in self.cfg.at_layers if n not in feats or feats[n].dim() != 4]
        if bad:
            spatial = [n for n in self.layers if feats[n].dim() == 4]
            raise ConfigError(f"attention-transfer layers {bad} are not searched conv layers; choose from: {', '.join(spatial) or 'none'}")
        return list(self.cfg.at_layers)

    @property
    def teacher_accuracy(self) -> float:
        return 100.0 * self.t_correct

    def score(self, candidates: list[dict[str, LayerLUT]]) -> list[Score]:
        out = []
        for i in range(0, len(candidates), self.stack):
            out += self._score_stack(candidates[i:i + self.stack])
        return out

    @torch.no_grad()
    def _score_stack(self, candidates: list[dict[str, LayerLUT]]) -> list[Score]:
        k, n = len(candidates), len(self.labels)
        taps = self.model.taps()
        feats = {}
        hooks = [taps[name].register_forward_hook(lambda m, i, o, name=name: feats.__setitem__(name, o))
                 for name in self.at_layers]
        for name in self.layers:
            luts = [c[name] for c in candidates]
            taps[name].fn = StackedLUT(torch.from_numpy(np.stack([l.thresholds(self.quant[name]) for l in luts])).to(self.device),
                                       torch.from_numpy(np.stack([l.levels(self.quant[name]) for l in luts])).to(self.device))
        try:
            h = self.start.repeat(k, *([1] * (self.start.dim() - 1)))
            for module in self.suffix:
                h = module(h)
        finally:
            for hook in hooks:
                hook.remove()
            for name in self.layers:
                taps[name].fn = None
        return self._scores(h.view(k, n, -1), {m: attention_map(f).view(k, n, -1) for m, f in feats.items()})

    def _scores(self, logits: torch.Tensor, maps: dict[str, torch.Tensor]) -> list[Score]:
        t = self.cfg.temperature
        s_logp = F.log_softmax(logits / t, dim=-1)
        kl = (self.t_logp.exp() * (self.t_logp - s_logp)).sum(-1).mean(-1) * t * t
        at = torch.zeros_like(kl)
        for name, m in maps.items():
            at += (m - self.t_maps[name]).pow(2).mean(dim=(1, 2)) / len(maps)
        reward = -(kl + self.cfg.at_weight * at)
        pred = logits.argmax(-1)
        agree = (pred == self.t_logits.argmax(1)).float().mean(-1) * 100
        drop = (self.t_correct - (pred == self.labels).float().mean(-1)) * 100
        return [Score(*(float(v) for v in row)) for row in zip(reward, kl, at, agree, drop)]
