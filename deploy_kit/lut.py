"""The approximated activation: a monotone staircase over the teacher's uint8 codes.

Reference semantics (DESIGN.md §2), on codes q of a tensor quantized with (s, z):

    q ≤ t1 → z      t1 < q ≤ t2 → v1      t2 < q ≤ tmax → v2      q > tmax → q

Float graphs compare against *half-code* thresholds s·(t − z + ½). A float input that sits on
the grid is then a whole half-step away from every threshold, so float rounding can never
flip a comparison, and the float form equals the code form for every code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deploy_kit.errors import ConfigError

CODE_FIELDS = ("t1", "v1", "t2", "v2", "tmax")


@dataclass(frozen=True)
class ActivationQuant:
    """Per-tensor affine quantization of one activation: x = scale·(q − zero_point)."""

    scale: float
    zero_point: int
    qmin: int = 0
    qmax: int = 255

    def value(self, code) -> np.ndarray:
        """Dequantize like the runtimes do: float32(scale) · float32(code − z)."""
        return np.float32(self.scale) * (np.asarray(code, np.float32) - np.float32(self.zero_point))

    def to_dict(self) -> dict:
        return {"scale": self.scale, "zero_point": self.zero_point, "qmin": self.qmin, "qmax": self.qmax}

    @classmethod
    def from_dict(cls, d: dict) -> "ActivationQuant":
        return cls(float(d["scale"]), int(d["zero_point"]), int(d.get("qmin", 0)), int(d.get("qmax", 255)))


@dataclass(frozen=True)
class LayerLUT:
    """Codes of one layer's staircase. Construction validates 0 ≤ t1 < v1 < t2 < v2 ≤ tmax."""

    t1: int
    v1: int
    t2: int
    v2: int
    tmax: int

    def __post_init__(self):
        if not 0 <= self.t1 < self.v1 < self.t2 < self.v2 <= self.tmax:
            raise ConfigError(f"need 0 <= t1 < v1 < t2 < v2 <= tmax, got {self.describe()}")

    def describe(self) -> str:
        return " ".join(f"{k}={getattr(self, k)}" for k in CODE_FIELDS)

    def check_range(self, quant: ActivationQuant) -> None:
        if self.tmax > quant.qmax:
            raise ConfigError(f"need tmax <= qmax={quant.qmax}, got tmax={self.tmax}")

    def apply_codes(self, q: np.ndarray, zero_point: int) -> np.ndarray:
        """The reference: the output code for every input code."""
        q = np.asarray(q)
        out = np.where(q <= self.t1, zero_point, np.where(q <= self.t2, self.v1, np.where(q <= self.tmax, self.v2, q)))
        return out.astype(q.dtype)

    def commutes_with_max(self, zero_point: int) -> bool:
        """Whether the staircase is monotone non-decreasing on codes, so that LUT(max(a, b)) =
        max(LUT(a), LUT(b)) and it may run after a MaxPool it feeds. Only v1 below the zero
        point breaks it (codes <= t1 would map above the next segment)."""
        return self.v1 >= zero_point

    def thresholds(self, quant: ActivationQuant) -> np.ndarray:
        """Float thresholds s·(t − z + ½) for t1, t2, tmax (float32)."""
        t = np.array([self.t1, self.t2, self.tmax], np.float64)
        return (quant.scale * (t - quant.zero_point + 0.5)).astype(np.float32)

    def levels(self, quant: ActivationQuant) -> np.ndarray:
        """On-grid output values for the three lower segments: 0, s·(v1 − z), s·(v2 − z)."""
        return quant.value([quant.zero_point, self.v1, self.v2])

    def to_json(self) -> dict:
        return {"t1_code": self.t1, "v1_code": self.v1, "t2_code": self.t2, "v2_code": self.v2, "tmax_code": self.tmax}


def lut_float_numpy(x: np.ndarray, lut: LayerLUT, quant: ActivationQuant) -> np.ndarray:
    """The float (half-code) form: what the ONNX and TF graphs compute."""
    th, lv = lut.thresholds(quant), lut.levels(quant)
    return np.where(x < th[0], lv[0], np.where(x < th[1], lv[1], np.where(x < th[2], lv[2], x))).astype(np.float32)


class LUTActivation(torch.nn.Module):
    """The half-code form in PyTorch, installed at a model's `Tap` to make the student.

    With `straight_through` (fine-tuning, in training mode) the forward is the same staircase
    and the backward is the identity: the staircase's own gradient is zero almost everywhere,
    so without it nothing upstream of a LUT would learn (the straight-through estimator that
    fake-quant training uses for rounding)."""

    def __init__(self, lut: LayerLUT, quant: ActivationQuant, straight_through: bool = False):
        super().__init__()
        self.lut, self.quant, self.straight_through = lut, quant, straight_through
        self.register_buffer("th", torch.from_numpy(lut.thresholds(quant)), persistent=False)
        self.register_buffer("lv", torch.from_numpy(lut.levels(quant)), persistent=False)

    def forward(self, x):
        th, lv = self.th, self.lv
        y = torch.where(x < th[0], lv[0], torch.where(x < th[1], lv[1], torch.where(x < th[2], lv[2], x)))
        if self.straight_through and self.training and torch.is_grad_enabled():
            return x + (y - x).detach()
        return y
