"""The LUT lowerings: how one layer's Less/Where staircase becomes TensorFlow ops that the TFLite
converter turns into exact INT8 kernels (exporters/onnx_to_tf.py has the whole translator).

`select` is the chain's own ops (LESS + SELECT_V2, DESIGN §2). `minmax`: s·[q > t] =
min(max(x, a), a + s) − a with a = s·(t − z), weighted and summed — MAXIMUM/MINIMUM/SUB/MUL/ADD.
`saturate`: a few terms whose clamps int8 saturation does for free (`saturate_plan`),
SUB/MUL/ADD/LEAKY_RELU: every op XNNPACK takes in int8. benchmarks/tflite_lut_forms.py times them.
"""

from __future__ import annotations

import numpy as np

from deploy_kit.errors import ExportError
from deploy_kit.lut import ActivationQuant, LayerLUT

LUT_FORMS = ("select", "minmax", "saturate")
# The default is the fastest form that is proven exact on all 256 codes at export (DESIGN §4b):
# `saturate` runs whole in XNNPACK. A layer where it cannot be proven falls back to FALLBACK's form.
DEFAULT_LUT_FORM = "saturate"
FALLBACK = {"saturate": "select"}  # form → the form its unprovable layers get (select always holds)


def _tf():
    import tensorflow as tf

    return tf


def _fq(x, lo: float, hi: float):
    return _tf().quantization.fake_quant_with_min_max_vars(x, np.float32(lo), np.float32(hi), num_bits=8)


def lut_steps(lut: LayerLUT, quant: ActivationQuant) -> list[tuple[int, int]]:
    """The staircase as (threshold code t, height w in codes): LUT(q) = z + Σ w·[q > t] for
    q <= tmax, and q above. Zero heights (v2 = tmax) are dropped."""
    steps = [(lut.t1, lut.v1 - quant.zero_point), (lut.t2, lut.v2 - lut.v1), (lut.tmax, lut.tmax - lut.v2)]
    if steps[0][1] < 0:
        raise ExportError(f"v1={lut.v1} is below the zero point {quant.zero_point}: the staircase is not monotone, "
                          "so it has no branch-free form; export with --lut-form select")
    return [(t, w) for t, w in steps if w]


# TFLite's int8 LESS rescales each input by its own scale with only 8 fractional bits
# (kernels/comparisons.cc: left_shift = 8), i.e. it compares values rounded to 1/256 in real
# units. Rounding is monotone, so a half-code margin s/2 wider than one unit (s > 1/128) keeps
# every comparison exact; a LUT input finer than that is compared at scale s·k (k a power of
# two: exact in float and in int8, one MUL) against thresholds ×k. Measured on all 256 codes:
# s = 0.0031 and 0.006 missed codes at t1/t2/tmax; 0.0079..0.009 never did. 25% headroom.
LESS_MIN_SCALE = 1.25 / 128


def _select(x, lut: LayerLUT, quant: ActivationQuant):
    """The ONNX graph's chain, op for op: Where(x < t1', 0, Where(x < t2', v1, Where(x < tmax', v2,
    x))) with its half-code thresholds and on-grid values (DESIGN §2) — 3 LESS + 3 SELECT_V2."""
    tf, s, z = _tf(), quant.scale, quant.zero_point
    k = 2.0 ** max(0, int(np.ceil(np.log2(LESS_MIN_SCALE / s))))
    probe = x if k == 1 else _fq(x * np.float32(k), k * s * (quant.qmin - z), k * s * (quant.qmax - z))
    (t1, t2, tmax), (v0, v1, v2) = lut.thresholds(quant) * np.float32(k), lut.levels(quant).astype(np.float32)
    y = tf.where(tf.math.less(probe, tmax), v2, x)
    y = tf.where(tf.math.less(probe, t2), v1, y)
    return tf.where(tf.math.less(probe, t1), v0, y)


def _minmax(x, lut: LayerLUT, quant: ActivationQuant):
    """Every tensor on the layer's grid (scale s): MAXIMUM/MINIMUM keep their input's scale."""
    tf, s, z = _tf(), quant.scale, quant.zero_point
    lo, hi = s * (0 - z), s * (255 - z)

    def on_grid(v):
        return _fq(v, lo, hi)

    def above(t: int):  # s·[q > t] = min(max(x, a), a + s) − a
        a = np.float32(s * (t - z))
        return on_grid(on_grid(tf.minimum(on_grid(tf.maximum(x, a)), a + np.float32(s))) - a)

    a_max = np.float32(s * (lut.tmax - z))
    y = on_grid(on_grid(tf.maximum(x, a_max)) - a_max)  # the identity part, above tmax
    for t, w in lut_steps(lut, quant):
        y = on_grid(y + on_grid(above(t) * np.float32(w)))
    return y


# `saturate`: the staircase as a sum of a few terms, each one or two int8 ops XNNPACK takes, and
# each exact because it ends in a clamp that int8 saturation does for free. On codes q (grid s, z):
#   step(t, h)       h·[q > t]: SUB x − s·(t−z) into a tensor spanning [0, s], then MUL by h
#                    (one code of x already fills the tensor, so the step is sharp).
#   pair(a, b, M, T) M·[a < q <= b] + T·[q > b], for T <= 2M: SUB x − c into a tensor of scale
#                    (b−a)·s whose bottom code is 0 — codes count the thresholds passed, one per
#                    b−a codes of x, starting at a — then MUL by M saturating at T (two thresholds
#                    crossed, 2M, clamps to T). Two jumps for the price of one.
#   ramp(t)          max(q − t − 1, 0): SUB x − s·(t+1−z) into [0, 255·s]; the identity above tmax.
#   jump_ramp(t, h)  −h for q <= t, q − t − 1 above: SUB into a tensor whose bottom code is
#                    x = s·(t−z), then LEAKY_RELU with alpha h (h <= 128, XNNPACK's ratio limit).
#                    Its −h below t is added back to the first jump; what that leaves below t1
#                    is negative, and the final sum's own clamp at code 0 takes it to 0 — so
#                    only where the zero point is 0.
# Every op's input/output scale ratio stays within XNNPACK's int8 limits (ADD/SUB below 256).
SATURATE_OPS = {"step": 2, "pair": 2, "ramp": 1, "jump_ramp": 2}
LEAKY_RELU_MAX_ALPHA = 128


def _jumps(lut: LayerLUT, quant: ActivationQuant) -> tuple[list[tuple[int, int]], bool]:
    """The staircase as jumps (t, h): LUT(q) = z + Σ h·[q > t], plus the identity above tmax
    (the jump at tmax lands on tmax+1). Returns (jumps, whether an identity part exists)."""
    identity = lut.tmax < 255
    jumps = [(t, w) for t, w in lut_steps(lut, quant) if t != lut.tmax]
    if identity:
        jumps.append((lut.tmax, lut.tmax + 1 - lut.v2))
    return jumps, identity


def _pairings(jumps: list[tuple[int, int]]) -> list[list[tuple]]:
    """Every way to cover consecutive jumps with single steps and pairs. A pair needs T <= 2M, and
    M != b−a: a MUL by exactly 1 is folded away by the converter, and the clamp at T with it (a
    gain nudged off 1 rounded the middle level one code high in LiteRT's builtin kernels)."""
    if not jumps:
        return [[]]
    (t, h), rest = jumps[0], jumps[1:]
    ways = [[("step", t, h), *tail] for tail in _pairings(rest)]
    if rest and rest[0][1] <= h and h != rest[0][0] - t:
        ways += [[("pair", t, rest[0][0], h, h + rest[0][1]), *tail] for tail in _pairings(rest[1:])]
    return ways


def saturate_ops(plan: list[tuple], zero_point: int) -> int:
    """TFLite ops of a plan: each term's (a step of height 1, or at the zero point, is one op),
    plus the ADDs that sum them."""
    def ops(kind: str, *args) -> int:
        return 1 if kind == "step" and (args[1] == 1 or args[0] == zero_point) else SATURATE_OPS[kind]
    return sum(ops(*term) for term in plan) + len(plan) - 1


def saturate_plan(lut: LayerLUT, quant: ActivationQuant) -> list[tuple]:
    """The cheapest exact sum of terms for one LUT (see above), as (kind, *args) tuples."""
    jumps, identity = _jumps(lut, quant)
    plans = []
    if identity:
        plans += [[*p, ("ramp", lut.tmax)] for p in _pairings(jumps)]
        (t, h), first = jumps[-1], jumps[:-1]
        if quant.zero_point == 0 and h <= LEAKY_RELU_MAX_ALPHA and first:
            first = [(first[0][0], first[0][1] + h), *first[1:]]
            plans += [[*p, ("jump_ramp", t, h)] for p in _pairings(first)]
    else:
        plans += [[*p, ("ramp", lut.tmax)] if len(p) == 1 else p for p in _pairings(jumps)]  # (*)
    return min(plans, key=lambda plan: saturate_ops(plan, quant.zero_point))
# (*) one term alone would end on its own range: an empty ramp's ADD is what lands y on the grid


def _sat_step(x, s: float, z: int, t: int, h: int):
    if t == z:  # x − 0 is x itself, which already has its range: clamp 2h·x to [0, h·s] instead
        return _fq(x * np.float32(2 * h), 0.0, s * h)
    step = _fq(x - np.float32(s * (t - z)), 0.0, s)
    return _fq(step * np.float32(h), 0.0, s * h) if h != 1 else step


def _sat_pair(x, s: float, z: int, a: int, b: int, m: int, top: int):
    d = b - a
    # code 0 (value 0) for q <= a, 1 for a < q <= b, 2 for b < q <= b+d, …: the half codes of x
    # at a+½ and b+½ land on the half codes of the counter, so no input sits near a tie.
    # The offset c, a multiple of s/2, is pinned to that grid where it fits (|c| <= 127.5·s): the
    # converter would give the scalar the scale |c|/255, and XNNPACK refuses a SUB whose
    # input/output scale ratio is below 1/1024 — which |c|/255 only is while |c| < (b−a)·s/4.
    # An offset of 0 (a − z + ½ = d/2) would let the converter drop the SUB and feed x's grid to
    # the MUL: a quarter code (grid s/4) keeps it, still between a and a+1, off every tie.
    codes = a + 0.5 - z - 0.5 * d
    codes, grid = (codes, max(s / 2, abs(s * codes) / 255)) if codes else (0.25, s / 4)
    offset = _fq(_tf().constant(np.float32(s * codes)), *((0.0, 255 * grid) if codes > 0 else (-255 * grid, 0.0)))
    count = _fq(x - offset, 0.0, 255 * d * s)
    return _fq(count * np.float32(m / d), s * (top - 255), s * top)


def _sat_ramp(x, s: float, z: int, t: int):
    return _fq(x - np.float32(s * (t + 1 - z)), 0.0, s * 255)


def _sat_jump_ramp(x, s: float, z: int, t: int, h: int):
    shifted = _fq(x - np.float32(s * (t + 1 - z)), -s, 254 * s)  # every q <= t at the bottom code, −s
    return _fq(_tf().nn.leaky_relu(shifted, alpha=float(h)), -h * s, (255 - h) * s)


SATURATE_TERMS = {"step": _sat_step, "pair": _sat_pair, "ramp": _sat_ramp, "jump_ramp": _sat_jump_ramp}


def _saturate(x, lut: LayerLUT, quant: ActivationQuant):
    """`saturate_plan`'s terms, summed: partial sums of the non-negative terms on [0, 255·s]
    (their total is at most tmax+1−z codes), the identity term last, onto the layer's grid."""
    s, z = quant.scale, quant.zero_point
    terms = [SATURATE_TERMS[kind](x, s, z, *args) for kind, *args in saturate_plan(lut, quant)]
    y = terms[0]
    for i, term in enumerate(terms[1:], start=2):
        y = _fq(y + term, *((s * (0 - z), s * (255 - z)) if i == len(terms) else (0.0, s * 255)))
    return y


LOWERINGS = {"select": _select, "minmax": _minmax, "saturate": _saturate}
