"""The constrained code space of one layer's staircase, and its masks.

Codes are sampled in dependency order t1 → t2 → v1 → v2 under the research system's bounds
(DESIGN.md §2), which guarantee that every sampled tuple is legal:

    t1 ∈ [t1_min, min(t1_max, tmax − 2·gap)]   t2 ∈ [t1 + gap, tmax − gap]
    v1 ∈ [t1 + 1, t2 − 1]                        v2 ∈ [t2 + 1, tmax]

Masks are boolean rows over all 256 codes so a policy can keep one fixed-width head per code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from deploy_kit.errors import ConfigError
from deploy_kit.lut import LayerLUT

NUM_CODES = 256
SAMPLE_ORDER = ("t1", "t2", "v1", "v2")  # dependency order; actions are stored in this order


@dataclass(frozen=True)
class CodeSpace:
    t1_min: int = 2
    t1_max: int = 10
    gap: int = 4  # t2 − t1 ≥ gap and tmax − t2 ≥ gap: room for v1 and v2 to differ from the thresholds

    def __post_init__(self):
        if not (0 <= self.t1_min <= self.t1_max and self.gap >= 2):
            raise ConfigError(f"code space needs 0 <= t1_min <= t1_max and gap >= 2, got {asdict(self)}")

    @property
    def min_tmax(self) -> int:
        """The smallest tmax that leaves at least one legal tuple."""
        return self.t1_min + 2 * self.gap

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- bounds, all on integer tensors of the same shape -----------------------------------
    def t1_bounds(self, tmax):
        return torch.full_like(tmax, self.t1_min), torch.clamp(tmax - 2 * self.gap, max=self.t1_max)

    def t2_bounds(self, t1, tmax):
        return t1 + self.gap, tmax - self.gap

    @staticmethod
    def v1_bounds(t1, t2):
        return t1 + 1, t2 - 1

    @staticmethod
    def v2_bounds(t2, tmax):
        return t2 + 1, tmax

    def bounds(self, field: str, codes: dict, tmax):
        """(lo, hi) of `field` given the codes sampled before it."""
        if field == "t1":
            return self.t1_bounds(tmax)
        if field == "t2":
            return self.t2_bounds(codes["t1"], tmax)
        if field == "v1":
            return self.v1_bounds(codes["t1"], codes["t2"])
        return self.v2_bounds(codes["t2"], tmax)


def range_mask(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """[..., 256] bool: code c is allowed iff lo ≤ c ≤ hi."""
    c = torch.arange(NUM_CODES)
    return (c >= lo.unsqueeze(-1)) & (c <= hi.unsqueeze(-1))


def action_masks(space: CodeSpace, actions: torch.Tensor, tmax: torch.Tensor) -> torch.Tensor:
    """Masks of all four heads for stored actions [..., 4] (SAMPLE_ORDER): [..., 4, 256]."""
    codes = dict(zip(SAMPLE_ORDER, actions.unbind(-1)))
    return torch.stack([range_mask(*space.bounds(f, codes, tmax)) for f in SAMPLE_ORDER], dim=-2)


def check_tmax(space: CodeSpace, tmax: dict[str, int]) -> None:
    for name, t in tmax.items():
        if t < space.min_tmax:
            raise ConfigError(f"layer {name}: tmax={t} leaves no legal codes (need tmax >= {space.min_tmax} for "
                              f"t1 >= {space.t1_min} and gaps of {space.gap}); raise --tmax-offset or --tmax-percentile")


def is_legal(space: CodeSpace, lut: LayerLUT) -> bool:
    t = torch.tensor(lut.tmax)
    for field in SAMPLE_ORDER:
        lo, hi = space.bounds(field, {k: torch.tensor(getattr(lut, k)) for k in SAMPLE_ORDER}, t)
        if not int(lo) <= getattr(lut, field) <= int(hi):
            return False
    return True


def project(space: CodeSpace, t1: int, v1: int, t2: int, v2: int, tmax: int) -> LayerLUT:
    """The nearest legal tuple, clamping each code in dependency order."""
    codes = {}
    for field, want in zip(SAMPLE_ORDER, (t1, t2, v1, v2)):
        lo, hi = space.bounds(field, {k: torch.tensor(v) for k, v in codes.items()}, torch.tensor(tmax))
        codes[field] = int(min(max(want, int(lo)), int(hi)))
    return LayerLUT(codes["t1"], codes["v1"], codes["t2"], codes["v2"], tmax)


def uniform_sample(space: CodeSpace, tmax: int, rng: np.random.Generator) -> LayerLUT:
    """One tuple drawn uniformly from the *joint* legal set (not field by field, which would
    favour tuples with narrow v ranges). For t1, t2 fixed there are (t2−t1−1)·(tmax−t2) tuples."""
    t1s = np.arange(space.t1_min, min(space.t1_max, tmax - 2 * space.gap) + 1)
    t2s = np.arange(NUM_CODES)
    weight = np.array([np.where((t2s >= t1 + space.gap) & (t2s <= tmax - space.gap),
                                (t2s - t1 - 1) * (tmax - t2s), 0) for t1 in t1s], dtype=np.float64)
    flat = rng.choice(weight.size, p=(weight / weight.sum()).ravel())
    t1, t2 = int(t1s[flat // NUM_CODES]), int(flat % NUM_CODES)
    v1 = int(rng.integers(t1 + 1, t2))
    v2 = int(rng.integers(t2 + 1, tmax + 1))
    return LayerLUT(t1, v1, t2, v2, tmax)


def legal_values(space: CodeSpace, lut: LayerLUT, field: str) -> range:
    """All values of `field` that keep `lut` legal with the other codes fixed."""
    others = {k: getattr(lut, k) for k in SAMPLE_ORDER}
    bounds = {"t1": (space.t1_min, min(space.t1_max, lut.tmax - 2 * space.gap, others["t2"] - space.gap, others["v1"] - 1)),
              "t2": (max(lut.t1 + space.gap, lut.v1 + 1), min(lut.tmax - space.gap, lut.v2 - 1)),
              "v1": (lut.t1 + 1, lut.t2 - 1),
              "v2": (lut.t2 + 1, lut.tmax)}
    lo, hi = bounds[field]
    return range(lo, hi + 1)
