"""The reward on a real (tiny) teacher: ~0 for a near-identity staircase, much worse for a
destructive one, and the stacked/cached evaluation equals scoring the real student directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deploy_kit.data import load_dataset, normalize
from deploy_kit.lut import LayerLUT
from deploy_kit.search.reward import RewardConfig, RewardModel, attention_map, suffix_modules
from deploy_kit.search.space import CodeSpace, uniform_sample
from deploy_kit.search.state import TmaxRule, initial_codes, layer_states, nonzero_percentile
from deploy_kit.teacher import load_teacher


@pytest.fixture(scope="module")
def setup(lenet_teacher):
    teacher = load_teacher(lenet_teacher)
    ds = load_dataset(teacher.meta["data"], teacher.meta["seed"])
    train = ds.split("train")
    x = torch.from_numpy(normalize(train.images[:96], ds.norm))
    y = torch.from_numpy(train.labels[:96])
    return teacher, x, y


def _reward_model(setup, layers=None, **kw):
    teacher, x, y = setup
    layers = layers or list(teacher.layer_quant)
    return RewardModel(teacher.model, teacher.layer_quant, layers, x, y, RewardConfig(images=len(x), **kw))


def test_near_identity_is_close_to_zero_and_destructive_is_far(setup):
    teacher = setup[0]
    rm = _reward_model(setup)
    # codes 1 and 3 stay, 2 → 1; codes above 3 unchanged: at most one code of error per element
    near = {n: LayerLUT(0, 1, 2, 3, 3) for n in teacher.layer_quant}
    # everything up to code 200 collapses onto three levels
    crush = {n: LayerLUT(10, 11, 20, 21, 200) for n in teacher.layer_quant}
    s_near, s_crush = rm.score([near, crush])
    assert -1e-2 < s_near.reward <= 0 and s_near.agreement == 100.0
    # the tiny teacher's logits are soft, so compare relative to the near-identity reward
    assert s_crush.reward < 100 * s_near.reward and s_crush.reward < -0.05 and s_crush.agreement < 60
    assert s_crush.kl > 0 and s_crush.at > s_near.at >= 0


def test_stacked_cached_scores_equal_the_real_student(setup):
    teacher, x, _ = setup
    layers = ["conv2", "fc1"]  # starts mid-network: exercises the cached prefix
    rm = _reward_model(setup, layers)
    rng = np.random.default_rng(0)
    cands = [{n: uniform_sample(CodeSpace(), 40, rng) for n in layers} for _ in range(5)]
    rm.stack = 2  # force several stacks, one of them partial
    scores = rm.score(cands)
    t_logits = teacher.model(x).detach()
    for cand, score in zip(cands, scores):
        student = teacher.student(cand)
        feats = {}
        hook = student.taps()["conv2"].register_forward_hook(lambda m, i, o: feats.__setitem__("conv2", o))
        with torch.no_grad():
            s_logits = student(x)
        hook.remove()
        kl = F.kl_div(F.log_softmax(s_logits / 2, 1), F.softmax(t_logits / 2, 1), reduction="batchmean") * 4
        t_feat = teacher.model.features.conv2.op(teacher.model.features.pool1(
            teacher.model.features.conv1(teacher.model.quant(x)))).detach()
        at = (attention_map(feats["conv2"]) - attention_map(t_feat)).pow(2).mean()
        assert score.kl == pytest.approx(float(kl), rel=1e-4, abs=1e-6)
        assert score.at == pytest.approx(float(at), rel=1e-4, abs=1e-9)
        assert score.reward == pytest.approx(-(float(kl) + 100 * float(at)), rel=1e-4, abs=1e-6)


def test_suffix_from_a_cached_tap_input_reproduces_the_model(setup):
    teacher, x, _ = setup
    seen = {}
    h = teacher.model.taps()["fc1"].register_forward_hook(lambda m, i, o: seen.__setitem__("in", i[0]))
    with torch.no_grad():
        full = teacher.model(x)
        h.remove()
        out = seen["in"]
        for module in suffix_modules(teacher.model, "fc1"):
            out = module(out)
    torch.testing.assert_close(out, full, rtol=0, atol=0)


def test_states_tmax_and_initial_codes(setup):
    teacher, x, _ = setup
    quant = teacher.layer_quant
    states = layer_states(teacher.model, list(quant), quant, x, TmaxRule(), CodeSpace())
    for name, s in states.items():
        assert s.hist.sum() > 0 and 15 <= s.tmax <= quant[name].qmax
        assert s.tmax == max(15, nonzero_percentile(s.hist, quant[name].zero_point, 0.9) + 10)
        assert s.init.tmax == s.tmax and s.features.shape == (6,) and np.all(np.isfinite(s.features))
    assert [s.features[0] for s in states.values()] == sorted(s.features[0] for s in states.values())


def test_initial_codes_minimize_the_squared_code_error():
    rng = np.random.default_rng(0)
    hist = np.bincount(np.clip(rng.gamma(2.0, 6.0, 5000).astype(int), 0, 255), minlength=256)
    from deploy_kit.lut import ActivationQuant

    q, space, tmax = ActivationQuant(0.1, 0), CodeSpace(), 30
    init = initial_codes(hist, q, tmax, space)

    def err(l):
        codes = np.arange(256)
        return float((hist * (l.apply_codes(codes, 0) - codes) ** 2).sum())

    brute = min(err(LayerLUT(t1, v1, t2, v2, tmax)) for t1 in range(2, 11) for t2 in range(t1 + 4, tmax - 3)
                for v1 in range(t1 + 1, t2) for v2 in range(t2 + 1, tmax + 1))
    assert err(init) <= brute * 1.01  # levels are rounded means, so within rounding of the optimum
