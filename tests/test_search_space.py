"""The constrained code space: whatever is sampled, masked or projected is a legal staircase."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deploy_kit.errors import ConfigError
from deploy_kit.lut import LayerLUT
from deploy_kit.search.space import (SAMPLE_ORDER, CodeSpace, action_masks, check_tmax, is_legal, legal_values,
                                     project, range_mask, uniform_sample)

SPACE = CodeSpace()


@pytest.mark.parametrize("tmax", [SPACE.min_tmax, 11, 17, 40, 125, 255])
def test_uniform_samples_are_legal_and_cover_the_space(tmax):
    rng = np.random.default_rng(0)
    luts = [uniform_sample(SPACE, tmax, rng) for _ in range(300)]
    assert all(is_legal(SPACE, l) and l.tmax == tmax for l in luts)
    if tmax >= 40:  # uniform over the joint set: every field takes many values
        assert len({l.t2 for l in luts}) > 10 and len({l.v2 for l in luts}) > 10


def test_uniform_is_uniform_over_the_joint_set():
    tmax = SPACE.min_tmax + 2  # small enough to enumerate
    legal = [(t1, v1, t2, v2) for t1 in range(256) for t2 in range(256) for v1 in range(t1 + 1, t2)
             for v2 in range(t2 + 1, tmax + 1) if is_legal(SPACE, LayerLUT(t1, v1, t2, v2, tmax))]
    rng = np.random.default_rng(1)
    counts = {}
    for _ in range(4000):
        l = uniform_sample(SPACE, tmax, rng)
        counts[(l.t1, l.v1, l.t2, l.v2)] = counts.get((l.t1, l.v1, l.t2, l.v2), 0) + 1
    assert set(counts) == set(legal)
    expected = 4000 / len(legal)
    assert max(abs(c - expected) for c in counts.values()) < 5 * np.sqrt(expected)


def test_sampling_through_the_masks_only_yields_legal_codes():
    """What the agent does: draw each code from its mask given the codes before it."""
    gen = torch.Generator().manual_seed(0)
    tmax = torch.tensor([10, 15, 60, 125, 255] * 40)
    a = torch.zeros(len(tmax), 4, dtype=torch.long)
    for i, f in enumerate(SAMPLE_ORDER):
        mask = range_mask(*SPACE.bounds(f, dict(zip(SAMPLE_ORDER[:i], a[:, :i].unbind(1))), tmax))
        assert mask.any(1).all(), f"empty mask for {f}"
        a[:, i] = torch.multinomial(mask.float(), 1, generator=gen).squeeze(1)
    for (t1, t2, v1, v2), t in zip(a.tolist(), tmax.tolist()):
        assert is_legal(SPACE, LayerLUT(t1, v1, t2, v2, t))
    masks = action_masks(SPACE, a, tmax)  # re-derived for the batched log-probs
    assert masks.gather(2, a.unsqueeze(-1)).all()


@pytest.mark.parametrize("codes", [(0, 0, 0, 0), (50, 1, 3, 300), (9, 100, 50, 51), (2, 3, 6, 7)])
def test_project_and_legal_values_stay_legal(codes):
    lut = project(SPACE, *codes, tmax=30)
    assert is_legal(SPACE, lut)
    for f in SAMPLE_ORDER:
        for v in legal_values(SPACE, lut, f):
            assert is_legal(SPACE, LayerLUT(**{**{k: getattr(lut, k) for k in ("t1", "v1", "t2", "v2", "tmax")}, f: v}))


def test_a_tmax_without_legal_codes_is_a_config_error():
    with pytest.raises(ConfigError, match="conv2: tmax=9 leaves no legal codes"):
        check_tmax(SPACE, {"conv1": 20, "conv2": 9})
