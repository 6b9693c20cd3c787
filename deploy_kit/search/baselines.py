"""Baselines with the same reward and the same budget as PPO.

random  every candidate drawn uniformly from the joint legal space of each layer.
greedy  coordinate search: from the histogram-based initial codes, for each layer in forward order
        and each code in dependency order, score a spread of legal values with the others fixed
        and keep the best; passes repeat with the spread narrowing around the current value.
"""

from __future__ import annotations

import numpy as np

from deploy_kit.lut import CODE_FIELDS, LayerLUT
from deploy_kit.search.space import SAMPLE_ORDER, CodeSpace, legal_values, uniform_sample
from deploy_kit.search.state import LayerState
from deploy_kit.search.trace import Candidate, Trace

RANDOM_BATCH = 16
GREEDY_SPREAD = 8  # values tried per coordinate and pass


def random_search(trace: Trace, states: list[LayerState], space: CodeSpace, seed: int) -> None:
    rng = np.random.default_rng(seed)
    while trace.remaining > 0:
        n = min(RANDOM_BATCH, trace.remaining)
        trace.evaluate([{s.name: uniform_sample(space, s.tmax, rng) for s in states} for _ in range(n)])


def _replace(lut: LayerLUT, field: str, value: int) -> LayerLUT:
    return LayerLUT(**{**{f: getattr(lut, f) for f in CODE_FIELDS}, field: value})


def _spread(values: range, current: int, radius: int, rng: np.random.Generator) -> list[int]:
    """Up to GREEDY_SPREAD values within `radius` of current, evenly spaced from a random offset."""
    lo, hi = max(values.start, current - radius), min(values.stop - 1, current + radius)
    if hi - lo + 1 <= GREEDY_SPREAD:
        return [v for v in range(lo, hi + 1) if v != current]
    step = (hi - lo) / GREEDY_SPREAD
    offset = rng.uniform(0, step)
    return sorted({int(round(lo + offset + k * step)) for k in range(GREEDY_SPREAD)} - {current})


def greedy_search(trace: Trace, states: list[LayerState], space: CodeSpace, seed: int) -> None:
    rng = np.random.default_rng(seed)
    current: Candidate = {s.name: s.init for s in states}
    best = trace.evaluate([current])[0].reward
    seen = {_key(current)}
    radius = 256
    while trace.remaining > 0:
        improved_or_new = False
        for s in states:
            for field in SAMPLE_ORDER:
                if trace.remaining == 0:
                    return
                lut = current[s.name]
                tries = [{**current, s.name: _replace(lut, field, v)}
                         for v in _spread(legal_values(space, lut, field), getattr(lut, field), radius, rng)]
                tries = [c for c in tries if _key(c) not in seen]
                seen.update(_key(c) for c in tries)
                improved_or_new |= bool(tries)
                for cand, score in zip(tries, trace.evaluate(tries)):
                    if score.reward > best:
                        best, current = score.reward, cand
        radius = max(2, radius // 2)
        if not improved_or_new and radius == 2:
            return  # converged: every neighbour within ±2 of every code was scored


def _key(c: Candidate) -> tuple:
    return tuple((n, l.t1, l.v1, l.t2, l.v2) for n, l in sorted(c.items()))
