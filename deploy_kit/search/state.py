"""What the search knows about each layer, from the teacher's activation codes on the train split.

Per layer: the code histogram, a state vector for the agent (depth ratio, mean, std, 90th
percentile, all normalized), the ceiling `tmax` (a percentile of the non-zero codes plus an
offset) and histogram-based initial codes that the agent and the greedy search start from.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np
import torch

from deploy_kit.errors import ConfigError
from deploy_kit.lut import ActivationQuant, LayerLUT
from deploy_kit.models import ZooModel
from deploy_kit.search.space import NUM_CODES, CodeSpace, check_tmax, project

STATE_FEATURES = ("depth", "mean", "std", "p90", "tmax", "nonzero")


@dataclass(frozen=True)
class TmaxRule:
    """tmax = percentile of the non-zero codes + offset, at least `minimum`, at most qmax;
    or the same `fixed` code for every layer."""

    percentile: float = 90.0
    offset: int = 10
    minimum: int = 15  # the research system's floor: narrower staircases were never useful
    fixed: int | None = None

    def __post_init__(self):
        if not 0 < self.percentile <= 100:
            raise ConfigError(f"--tmax-percentile must be in (0, 100], got {self.percentile}")
        if self.offset < 0 or self.minimum < 0:
            raise ConfigError(f"--tmax-offset must be >= 0, got {self.offset}")
        if self.fixed is not None and not 0 <= self.fixed <= 255:
            raise ConfigError(f"--tmax-fixed must be a code in 0..255, got {self.fixed}")

    def to_dict(self) -> dict:
        return asdict(self)

    def apply(self, hist: np.ndarray, quant: ActivationQuant) -> int:
        if self.fixed is not None:
            return self.fixed
        p = nonzero_percentile(hist, quant.zero_point, self.percentile / 100)
        return int(min(max(p + self.offset, self.minimum), quant.qmax))


@dataclass(frozen=True)
class LayerState:
    name: str
    quant: ActivationQuant
    hist: np.ndarray  # counts of codes 0..255 on the state images
    features: np.ndarray  # float32, STATE_FEATURES
    tmax: int
    init: LayerLUT


def to_codes(x: torch.Tensor, quant: ActivationQuant) -> torch.Tensor:
    """The uint8 code of an activation that is already on the grid (the QAT teacher's taps are)."""
    return torch.clamp(torch.round(x / quant.scale) + quant.zero_point, quant.qmin, quant.qmax).long()


@torch.no_grad()
def code_histograms(model: ZooModel, layers: list[str], quant: dict[str, ActivationQuant],
                    x: torch.Tensor, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Histogram of each tap's input codes (the teacher's ReLU output) over the images `x`."""
    hist = {n: torch.zeros(NUM_CODES, dtype=torch.long) for n in layers}
    taps = model.taps()

    def hook(name):
        def record(_module, inputs, _output):
            hist[name] += torch.bincount(to_codes(inputs[0], quant[name]).flatten(), minlength=NUM_CODES)
        return record

    handles = [taps[n].register_forward_hook(hook(n)) for n in layers]
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    return {n: h.numpy() for n, h in hist.items()}


def nonzero_percentile(hist: np.ndarray, zero_point: int, q: float) -> int:
    """The smallest code c > z with at least a fraction q of the non-zero codes at or below it."""
    counts = hist.astype(np.float64).copy()
    counts[:zero_point + 1] = 0
    if counts.sum() == 0:
        return zero_point
    cdf = np.cumsum(counts) / counts.sum()
    return int(np.searchsorted(cdf, q - 1e-12))


def _conditional_mean(hist: np.ndarray, lo: int, hi: int) -> int:
    """Mean code of the histogram mass in (lo, hi]: the level that minimizes squared error there."""
    codes = np.arange(lo + 1, hi + 1)
    w = hist[lo + 1:hi + 1].astype(np.float64)
    return int(round((codes * w).sum() / w.sum())) if w.sum() > 0 else (lo + hi + 1) // 2


def initial_codes(hist: np.ndarray, quant: ActivationQuant, tmax: int, space: CodeSpace) -> LayerLUT:
    """The staircase with the least squared code error over the histogram (a 3-level Lloyd-Max
    quantizer of the codes up to tmax, the lowest level pinned at zero), over every legal
    (t1, t2); each level is its segment's mean code. Exhaustive via prefix sums: ≤ 11 × 256 pairs."""
    w = hist[:tmax + 1].astype(np.float64)
    q = np.arange(tmax + 1, dtype=np.float64)
    s0, s1, s2 = (np.concatenate([[0.0], np.cumsum(w * q ** k)]) for k in (0, 1, 2))

    def sse(lo, hi):  # squared error of codes in (lo, hi] around their mean; arrays allowed
        n, a, b = s0[hi + 1] - s0[lo + 1], s1[hi + 1] - s1[lo + 1], s2[hi + 1] - s2[lo + 1]
        return b - np.divide(a * a, n, out=np.zeros_like(a), where=n > 0)

    z = quant.zero_point
    best = None
    lo1, hi1 = space.t1_bounds(torch.tensor(tmax))
    for t1 in range(int(lo1), int(hi1) + 1):
        below = (w[:t1 + 1] * (q[:t1 + 1] - z) ** 2).sum()
        t2 = np.arange(t1 + space.gap, tmax - space.gap + 1)
        err = below + sse(t1, t2) + sse(t2, np.full_like(t2, tmax))
        i = int(np.argmin(err))
        if best is None or err[i] < best[0]:
            best = (err[i], t1, int(t2[i]))
    _, t1, t2 = best
    return project(space, t1, _conditional_mean(hist, t1, t2), t2, _conditional_mean(hist, t2, tmax), tmax)


def state_features(hist: np.ndarray, quant: ActivationQuant, depth: float, tmax: int) -> np.ndarray:
    span = float(max(quant.qmax - quant.zero_point, 1))
    codes = np.arange(NUM_CODES, dtype=np.float64) - quant.zero_point
    p = hist / max(hist.sum(), 1)
    mean = float((p * codes).sum())
    std = float(np.sqrt(max((p * (codes - mean) ** 2).sum(), 0.0)))
    p90 = nonzero_percentile(hist, quant.zero_point, 0.9) - quant.zero_point
    nonzero = float(p[quant.zero_point + 1:].sum())
    return np.array([depth, mean / span, std / span, p90 / span, (tmax - quant.zero_point) / span, nonzero], np.float32)


def layer_states(model: ZooModel, layers: list[str], quant: dict[str, ActivationQuant], x: torch.Tensor,
                 rule: TmaxRule, space: CodeSpace, keep_tmax: dict[str, int] | None = None) -> "OrderedDict[str, LayerState]":
    """Everything the search needs per layer, from one pass of the teacher over `x`. `keep_tmax`
    fixes a layer's ceiling instead of the rule (a re-search keeps the one it started from)."""
    all_taps = list(model.taps())
    hists = code_histograms(model, layers, quant, x)
    keep_tmax = keep_tmax or {}
    tmax = {n: keep_tmax[n] if n in keep_tmax else rule.apply(hists[n], quant[n]) for n in layers}
    for n, t in tmax.items():
        if t > quant[n].qmax:
            raise ConfigError(f"layer {n}: tmax={t} is above the layer's qmax={quant[n].qmax}; lower --tmax-fixed")
    check_tmax(space, tmax)
    out = OrderedDict()
    for n in layers:
        depth = all_taps.index(n) / max(len(all_taps) - 1, 1)
        out[n] = LayerState(n, quant[n], hists[n], state_features(hists[n], quant[n], depth, tmax[n]), tmax[n],
                            initial_codes(hists[n], quant[n], tmax[n], space))
    return out
