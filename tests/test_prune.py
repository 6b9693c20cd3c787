"""`deploykit prune`: surgery, the agent's hard budget, the latency cache, bad input, and a pruned
teacher going through search → export → verify unchanged (real torch-pruning, real LiteRT)."""

from __future__ import annotations

import dataclasses
import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from deploy_kit import amx
from deploy_kit.cli import main
from deploy_kit.data import load_dataset, normalize
from deploy_kit.errors import ConfigError
from deploy_kit.models import build_model
from deploy_kit.prune import PruneConfig, parse_budget, run_prune
from deploy_kit.prune import agent as ag
from deploy_kit.prune import latency as lt
from deploy_kit.prune import surgery as sg
from deploy_kit.prune.distil import DistilConfig
from deploy_kit.prune.finalists import FinalistConfig
from deploy_kit.search.ppo import PPOConfig
from deploy_kit.teacher import load_teacher
from deploy_kit.train import accuracy, predict

SHAPE = (1, 32, 32)
FAST = ["--episodes", "4", "--kd-epochs", "1", "--qat-epochs", "1"]


def invoke(*args):
    return CliRunner().invoke(main, ["prune", *map(str, args)])


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", 0)


@pytest.fixture(scope="module")
def float_lenet(lenet_teacher, digits):
    x = torch.from_numpy(normalize(digits.split("train").images[:256], digits.norm))
    return sg.float_from_teacher(load_teacher(lenet_teacher), x), x


# ----------------------------------------------------------------------------- surgery

def test_float_model_from_the_qat_teacher_predicts_like_it(lenet_teacher, float_lenet, digits):
    teacher, (model, _) = load_teacher(lenet_teacher), float_lenet
    val = digits.split("val")
    agree = (predict(model, val, digits).argmax(1) == predict(teacher.model, val, digits).argmax(1)).mean()
    assert agree > 0.95  # float weights vs the INT8 arithmetic: a few boundary images may differ
    assert any(isinstance(b.bn, torch.nn.BatchNorm2d) for b in model.blocks().values())


def test_pruning_removes_channels_physically_and_keeps_the_largest_l1(float_lenet):
    model, _ = float_lenet
    w = model.blocks()["conv2"].op.weight.detach().clone()
    pruned = sg.pruned_copy(model, {"conv2": 8, "fc1": 64}, SHAPE)
    counts = sg.channel_counts(pruned)
    assert counts["conv2"] == 8 and counts["fc1"] == 64 and counts["conv1"] == 6
    assert pruned.blocks()["conv2"].bn.num_features == 8
    assert pruned.blocks()["fc1"].op.in_features == 8 * 25  # through Flatten
    strongest = w.abs().flatten(1).sum(1).argsort(descending=True)[:8].sort().values
    assert torch.equal(pruned.blocks()["conv2"].op.weight, w[strongest])
    assert pruned(torch.zeros(2, *SHAPE)).shape == (2, 10)


def test_bn_reestimation_repairs_a_pruned_model(float_lenet, digits):
    model, x = float_lenet
    val = digits.split("val")
    pruned = sg.pruned_copy(model, {"conv1": 4, "conv2": 8}, SHAPE)
    before = accuracy(predict(pruned, val, digits), val.labels)
    after = accuracy(predict(sg.reestimate_bn(pruned, x), val, digits), val.labels)
    assert after >= before - 1.0


def test_build_model_takes_channel_counts(float_lenet):
    model, _ = float_lenet
    pruned = sg.pruned_copy(model, {"conv1": 4, "fc2": 40}, SHAPE)
    built = build_model("lenet5", SHAPE, 10, channels=sg.channel_counts(pruned))
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    with pytest.raises(ConfigError, match="unknown layer"):
        build_model("lenet5", SHAPE, 10, channels={"conv9": 4})


def test_macs_follow_the_channel_counts(float_lenet):
    model, _ = float_lenet
    infos = sg.layer_infos(model, SHAPE)
    full = sg.full_channels(infos)
    assert list(full) == ["conv1", "conv2", "fc1", "fc2"]  # the last layer keeps its classes
    conv2 = infos["conv2"]
    assert sg.macs(infos, {**full, "conv1": 3}) == sg.macs(infos, full) - 3 * 784 * 25 - 3 * 16 * 25 * 100
    assert conv2.macs(6, 16) == 6 * 16 * 25 * 100


@pytest.mark.parametrize("arch", ["nin", "mobilenet_v1", "vgg16", "alexnet"])
def test_torch_pruning_handles_the_zoo(arch):
    """Depthwise groups (MobileNet), NiN's fixed class maps, VGG and AlexNet heads: the pruned model
    runs, has the asked counts, matches the MACs computed from the counts, and a model built from
    the counts has the same shapes (how a pruned teacher is loaded)."""
    shape = (3, 32, 32)
    model = build_model(arch, shape, 10, 0.25).eval()
    infos = sg.layer_infos(model, shape)
    rng = np.random.default_rng(0)
    want = {n: lt.round_channels(c, float(rng.uniform(0.1, 1))) for n, c in sg.full_channels(infos).items()}
    pruned = sg.pruned_copy(model, want, shape)
    assert pruned(torch.zeros(2, *shape)).shape == (2, 10)
    assert {n: sg.channel_counts(pruned)[n] for n in want} == want
    own = sg.layer_infos(pruned, shape)
    assert sg.macs(own, sg.full_channels(own)) == sg.macs(infos, want)
    built = build_model(arch, shape, 10, 0.25, channels=sg.channel_counts(pruned))
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}


# ----------------------------------------------------------------------------- the agent

@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_every_episode_meets_the_budget(float_lenet, ratio):
    model, _ = float_lenet
    infos = sg.layer_infos(model, SHAPE)
    cost = lambda ch: float(sg.macs(infos, ch))  # noqa: E731
    space = ag.ChannelSpace(infos, cost, ratio * cost(sg.full_channels(infos)))
    agent = ag.PruneAgent(space, PPOConfig(episodes_per_update=8), seed=0)
    _, actions, masks, _, chosen = agent.act(8)
    assert all(cost(c) <= space.budget for c in chosen)
    assert masks.gather(2, actions[..., None]).all()  # every action was legal when drawn
    assert len({tuple(c.values()) for c in chosen}) > 1
    for c in chosen:
        for name, n in c.items():
            full = space.full[name]
            assert n == full or n % lt.channel_step(full) == 0


def test_same_seed_same_episodes(float_lenet):
    model, _ = float_lenet
    infos = sg.layer_infos(model, SHAPE)
    cost = lambda ch: float(sg.macs(infos, ch))  # noqa: E731
    space = ag.ChannelSpace(infos, cost, 0.5 * cost(sg.full_channels(infos)))
    a = ag.PruneAgent(space, PPOConfig(), seed=3).act(4)[-1]
    b = ag.PruneAgent(space, PPOConfig(), seed=3).act(4)[-1]
    assert a == b


def test_search_starts_from_the_l1_uniform_configuration(float_lenet):
    model, _ = float_lenet
    infos = sg.layer_infos(model, SHAPE)
    cost = lambda ch: float(sg.macs(infos, ch))  # noqa: E731
    space = ag.ChannelSpace(infos, cost, 0.5 * cost(sg.full_channels(infos)))
    seen = []
    ag.ppo_prune_search(space, lambda configs: seen.extend(configs) or [0.0] * len(configs), 5, PPOConfig(), seed=0)
    uniform = ag.uniform_config(space)
    assert len(seen) == 5 and seen[0] == uniform and cost(uniform) <= space.budget
    bigger = {n: lt.round_channels(space.full[n], ag.uniform_ratio(space) + 1 / 64) for n in uniform}
    assert bigger == uniform or cost(bigger) > space.budget  # the largest uniform ratio within budget


def test_channel_rounding():
    assert lt.round_channels(84, 1.0) == 84 and lt.round_channels(84, 0.5) == 40
    assert lt.round_channels(6, 0.1) == 4 and lt.round_channels(128, 0.01) == 8


# ----------------------------------------------------------------------------- latency cache

def test_cache_from_other_library_versions_is_rebuilt_and_said(float_lenet, tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOYKIT_CACHE", str(tmp_path))
    model, _ = float_lenet
    infos = sg.layer_infos(model, SHAPE)
    spec = lt.TableSpec("lenet5", 1.0, SHAPE, "litert", sg.full_channels(infos))
    spec.cache_path().parent.mkdir(parents=True)
    versions = {**lt.library_versions(), "ai-edge-litert": "0.0.1"}
    spec.cache_path().write_text(json.dumps({"format": lt.CACHE_FORMAT, "versions": versions, "t0": 1, "k": {}, "m": 0}))
    table, why = lt.load_cached(spec, infos)
    assert table is None and "other library versions" in why and "ai-edge-litert 0.0.1" in why
    spec.cache_path().write_text(json.dumps({"format": lt.CACHE_FORMAT, "versions": lt.library_versions(),
                                             "t0": 0.5, "k": {}, "m": 0.0}))
    table, why = lt.load_cached(spec, infos)
    assert why is None and table.predict(sg.full_channels(infos)) == 0.5


@pytest.mark.parametrize("load, warned", [(0.9, False), (2.0, True)])
def test_busy_machine_is_said_before_the_table_is_timed(float_lenet, tmp_path, monkeypatch, load, warned):
    monkeypatch.setenv("DEPLOYKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(lt.os, "getloadavg", lambda: (load, load, load))
    built = []
    monkeypatch.setattr(lt, "build_table", lambda *a, **k: built.append(a) or "table")  # the timing itself is not what is tested
    model, x = float_lenet
    infos = sg.layer_infos(model, SHAPE)
    said = []
    spec = lt.TableSpec("lenet5", 1.0, SHAPE, "litert", sg.full_channels(infos))
    assert lt.latency_table(spec, model, infos, x, x[:1].numpy(), say=said.append) == "table" and built
    assert any("quiet machine" in line and str(spec.cache_path()) in line for line in said) == warned
    assert lt.other_load() == max(0.0, round(load - 1, 2))


# ----------------------------------------------------------------------------- timing without AMX

@pytest.mark.skipif(not amx.applicable(), reason="AMX permission exists on Linux x86-64 only")
def test_the_timing_process_refuses_amx_and_nothing_else():
    """The seccomp filter answers the AMX tile request (what XNNPACK sends at start-up) with EPERM,
    in the worker process only; without it the request is granted, or refused for a reason other
    than EPERM where the CPU has no AMX."""
    from deploy_kit import worker

    x = {"x": np.zeros(1, np.float32)}
    refused, _ = worker.call({"op": "amx_probe", "refuse_amx": True}, x, failure="probe")
    allowed, _ = worker.call({"op": "amx_probe", "refuse_amx": False}, x, failure="probe")
    assert refused["errno"] == errno.EPERM and allowed["errno"] != errno.EPERM
    assert allowed["errno"] == 0 or not amx.host_has_amx()
    assert amx.probe() != errno.EPERM  # this (test) process keeps its permission: the filter went to the child only


def test_amx_mode_is_recorded_and_keys_the_latency_cache(float_lenet, monkeypatch):
    model, _ = float_lenet
    full = sg.full_channels(sg.layer_infos(model, SHAPE))
    monkeypatch.setattr(amx, "host_has_amx", lambda: True)
    assert (amx.mode(False), amx.mode(True)) == ("refused", "used")
    spec = lt.TableSpec("lenet5", 1.0, SHAPE, "litert", full)
    assert spec.amx is False and PruneConfig(teacher=Path("x")).amx is False  # refused unless asked
    assert spec.cache_path() != dataclasses.replace(spec, amx=True).cache_path()  # a table timed with AMX is not reused
    monkeypatch.setattr(amx, "host_has_amx", lambda: False)
    assert amx.mode(False) == amx.mode(True) == "absent"
    assert spec.cache_path() == dataclasses.replace(spec, amx=True).cache_path()  # nothing to refuse: the same timing


def test_a_fixed_cost_timed_with_amx_names_it(float_lenet, monkeypatch):
    from deploy_kit.prune import _check_reachable, _space

    model, _ = float_lenet
    infos = sg.layer_infos(model, SHAPE)
    cost = lambda ch: float(sg.macs(infos, ch))  # noqa: E731
    smallest = _space(infos, cost, PruneConfig(teacher=Path("x"))).reachable() / cost(sg.full_channels(infos))
    cfg = PruneConfig(teacher=Path("x"), budget=f"latency={smallest / 2:.3f}", amx=True)
    monkeypatch.setattr(amx, "host_has_amx", lambda: True)
    with pytest.raises(ConfigError, match=r"timed with --amx: .* drop --amx"):
        _check_reachable(_space(infos, cost, cfg), cfg, "lenet5", fixed=0.8)
    default = dataclasses.replace(cfg, amx=False)
    with pytest.raises(ConfigError) as refused:
        _check_reachable(_space(infos, cost, default), default, "lenet5", fixed=0.8)
    assert "fixed cost" in str(refused.value) and "--amx" not in str(refused.value)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("budget, expected", [
    ("latency=1.5", "must be in (0, 1)"), ("latency=0", "must be in (0, 1)"),
    ("speed=0.5", "METRIC=FRACTION"), ("latency=abc", "is not a number"), ("macs=0.01", "cannot get below"),
])
def test_bad_budget_exits_2_and_writes_nothing(lenet_teacher, tmp_path, budget, expected):
    r = invoke("--teacher", lenet_teacher, "--budget", budget, "--out", tmp_path / "p", *FAST)
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and expected in r.stderr
    assert not (tmp_path / "p").exists() and "Traceback" not in r.output


def test_a_latency_budget_is_searched_below_the_budget_by_the_margin(float_lenet):
    from deploy_kit.prune import _check_reachable, _space

    model, _ = float_lenet
    infos = sg.layer_infos(model, SHAPE)
    cost = lambda ch: float(sg.macs(infos, ch))  # noqa: E731  (any cost: the margin scales whichever)
    full = cost(sg.full_channels(infos))
    for budget, margin, searched in [("latency=0.5", 0.05, 0.475), ("latency=0.5", 0.0, 0.5), ("macs=0.5", 0.2, 0.5)]:
        cfg = PruneConfig(teacher=Path("x"), budget=budget, latency_margin=margin)
        assert cfg.search_ratio == pytest.approx(searched)
        assert _space(infos, cost, cfg).budget == pytest.approx(searched * full)
    smallest = _space(infos, cost, PruneConfig(teacher=Path("x"))).reachable() / full
    edge = PruneConfig(teacher=Path("x"), budget=f"latency={smallest + 0.01:.3f}", latency_margin=0.2)
    with pytest.raises(ConfigError, match=r"pass a budget >= .* with --latency-margin 0.2, or lower the margin"):
        _check_reachable(_space(infos, cost, edge), edge, "lenet5")
    with pytest.raises(ConfigError, match=r"On this machine 84% of its litert INT8 time is a fixed cost"):
        _check_reachable(_space(infos, cost, edge), edge, "lenet5", fixed=0.836)  # the table's t0 share, when latency
    no_margin = dataclasses.replace(edge, latency_margin=0.0)
    _check_reachable(_space(infos, cost, no_margin), no_margin, "lenet5")  # reachable at the budget itself
    for bad in (-0.1, 0.5, float("nan")):
        with pytest.raises(ConfigError, match="--latency-margin must be in"):
            PruneConfig(teacher=Path("x"), latency_margin=bad)


def test_unknown_runtime_and_existing_output(lenet_teacher, tmp_path):
    r = invoke("--teacher", lenet_teacher, "--runtime", "coreml", "--out", tmp_path / "p", *FAST)
    assert r.exit_code == 2 and "unknown --runtime 'coreml'" in r.stderr
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "teacher.json").write_text("{}")
    r = invoke("--teacher", lenet_teacher, "--out", tmp_path / "p", *FAST)
    assert r.exit_code == 2 and "already exists; pass --force" in r.stderr
    assert [f.name for f in (tmp_path / "p").iterdir()] == ["teacher.json"]
    assert (tmp_path / "p" / "teacher.json").read_text() == "{}"
    with pytest.raises(ConfigError):
        PruneConfig(teacher=lenet_teacher, alpha=-1)
    assert parse_budget("macs=0.25") == ("macs", 0.25)


def test_distillation_rate_follows_the_teachers_optimizer(lenet_teacher, tmp_path):
    from deploy_kit.prune.distil import default_lr

    assert default_lr("sgd") == 1e-2 and default_lr("adam") == 1e-3
    assert DistilConfig().lr is None and DistilConfig(lr=0.05).lr == 0.05
    with pytest.raises(ConfigError):
        DistilConfig(lr=0)
    with pytest.raises(ConfigError):
        PruneConfig(teacher=lenet_teacher, threads=0)
    for flag in ("--kd-lr", "--kd-at-weight"):
        r = CliRunner().invoke(main, ["prune", "--teacher", str(lenet_teacher), flag, "-1", "--out", str(tmp_path / "p")])
        assert r.exit_code == 2 and flag in r.output and not (tmp_path / "p").exists()
    with pytest.raises(ConfigError, match="--kd-at-weight"):
        DistilConfig(at_weight=float("nan"))


def test_distillation_runs_longer_than_the_teacher_trained_unless_told(lenet_teacher, tmp_path):
    assert DistilConfig().epochs is None
    assert DistilConfig().resolved("sgd", 40).epochs == 80 and DistilConfig().resolved("adam", 3).epochs == 6
    assert DistilConfig(epochs=3).resolved("sgd", 40).epochs == 3
    assert DistilConfig(epochs=0).resolved("adam", 40).epochs == 0  # 0 is a choice (QAT only), not "unset"
    with pytest.raises(ConfigError, match="--kd-epochs"):
        DistilConfig(epochs=-1)
    r = invoke("--teacher", lenet_teacher, "--kd-epochs", "-1", "--out", tmp_path / "p")
    assert r.exit_code == 2 and "--kd-epochs" in r.output and not (tmp_path / "p").exists()


def _conv_taps(model):
    return [b.tap for b in model.blocks().values() if isinstance(b.op, torch.nn.Conv2d)]


def test_distillation_adds_attention_transfer_at_every_conv_block(lenet_teacher, float_lenet, digits):
    """loss(λ) = loss(0) + λ · mean over conv blocks of the attention-map distance, computed here
    from hooks of the test's own; the term reaches the first block's weights; close() unhooks."""
    from deploy_kit.prune.distil import Distillation

    teacher = load_teacher(lenet_teacher).model
    model, x_bn = float_lenet
    student = sg.reestimate_bn(sg.pruned_copy(model, {"conv1": 4, "conv2": 8}, SHAPE), x_bn).train()
    x, y = x_bn[:32], torch.from_numpy(digits.split("train").labels[:32])
    feats = {}
    hooks = [tap.register_forward_hook(lambda m, i, o, key=(who, k): feats.__setitem__(key, o))
             for who, net in (("s", student), ("t", teacher)) for k, tap in enumerate(_conv_taps(net))]
    plain, with_at = Distillation(teacher, student, DistilConfig(at_weight=0)), Distillation(teacher, student, DistilConfig(at_weight=100))
    logits = student(x)
    loss0, loss1 = plain(logits, y, x), with_at(logits, y, x)
    for h in hooks:
        h.remove()

    def amap(a):
        a = a.pow(2).mean(1).flatten(1)
        return a / a.norm(dim=1, keepdim=True)
    n = len(_conv_taps(student))
    assert n == 2
    at = sum(float((amap(feats["s", k]) - amap(feats["t", k])).pow(2).mean()) for k in range(n)) / n
    assert at > 0 and float(loss1 - loss0) == pytest.approx(100 * at, rel=1e-4)
    (loss1 - loss0).backward()
    assert student.blocks()["conv1"].op.weight.grad.abs().sum() > 0
    plain.close()
    with_at.close()
    assert all(not tap._forward_hooks for net in (student, teacher) for tap in _conv_taps(net))


@pytest.mark.parametrize("qat_kd", [True, False])
def test_qat_epochs_distil_unless_cross_entropy_is_asked_for(lenet_teacher, float_lenet, digits, qat_kd, monkeypatch):
    from deploy_kit.data import Split
    from deploy_kit.prune import distil
    from deploy_kit.train import TrainConfig

    calls = []
    real = distil.Distillation.__call__
    monkeypatch.setattr(distil.Distillation, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    teacher = load_teacher(lenet_teacher).model
    model, x_bn = float_lenet
    student = sg.reestimate_bn(sg.pruned_copy(model, {"conv2": 8}, SHAPE), x_bn)
    train = Split(digits.split("train").images[:128], digits.split("train").labels[:128])
    cfg = DistilConfig(epochs=0, qat_epochs=1, qat_kd=qat_kd)
    _, acc, _ = distil.distil_and_qat(student, teacher, train, digits, TrainConfig(batch_size=64), cfg,
                                      torch.Generator().manual_seed(0), torch.device("cpu"))
    assert len(calls) == (2 if qat_kd else 0)  # the 2 QAT batches; 0 float epochs
    assert set(acc) == {"float", "fake_quant", "int8"}
    assert all(not tap._forward_hooks for net in (student, teacher) for tap in _conv_taps(net))


# ----------------------------------------------------------------------------- finalists

def test_shortlist_takes_the_best_distinct_configurations():
    from deploy_kit.prune.finalists import shortlist

    recs = [{"episode": e, "channels": {"conv1": c}, "reward": r}
            for e, c, r in [(1, 4, -0.5), (2, 6, -0.2), (3, 6, -0.2), (4, 2, -0.9), (5, 5, -0.2), (6, 3, -0.3)]]
    assert [r["episode"] for r in shortlist(recs, 3)] == [2, 5, 6]  # episode 3 repeats 2; ties: the earlier first
    assert [r["episode"] for r in shortlist(recs, 1)] == [2] and len(shortlist(recs, 99)) == 5


def test_finalists_are_ranked_by_val_after_a_short_distillation(lenet_teacher, float_lenet, digits):
    """A configuration cut to its floors and a lightly cut one, each distilled for one short epoch:
    the ranking follows their val accuracy after it, not the search's order, and is reproducible."""
    from deploy_kit.prune.finalists import FinalistConfig, rank_finalists
    from deploy_kit.train import TrainConfig

    teacher = load_teacher(lenet_teacher).model
    model, x_bn = float_lenet
    full = sg.full_channels(sg.layer_infos(model, SHAPE))
    floors = {n: min(c, lt.channel_step(c)) for n, c in full.items()}
    finalists = [{"episode": 1, "channels": floors, "val_acc": 50.0, "reward": 0.0},
                 {"episode": 2, "channels": {**full, "conv2": full["conv2"] - 4}, "val_acc": 40.0, "reward": -0.1}]
    cfg = FinalistConfig(count=2, images=256)
    distil = DistilConfig().resolved("adam", 3)

    def rank():
        return rank_finalists(finalists, model, teacher, x_bn, digits, TrainConfig(batch_size=64), distil, cfg, 0,
                              torch.device("cpu"), say=lambda _: None)
    ranked = rank()
    assert [r["episode"] for r in ranked] == [2, 1] and [r["search_rank"] for r in ranked] == [2, 1]
    assert ranked[0]["short_val_acc"] > ranked[1]["short_val_acc"]
    assert [r["short_val_acc"] for r in rank()] == [r["short_val_acc"] for r in ranked]
    for bad in (dict(count=-1), dict(images=10), dict(epochs=0)):
        with pytest.raises(ConfigError, match="--finalist"):
            FinalistConfig(**bad)


def test_finalists_measured_over_a_latency_budget_are_dropped():
    from deploy_kit.prune.finalists import within_measured_budget

    timed = [{"episode": e, "measured_ratio": r} for e, r in [(1, 0.51), (2, 0.49), (3, 0.50), (4, 0.47)]]
    kept, dropped = within_measured_budget(timed, 0.5)
    assert [r["episode"] for r in kept] == [2, 3, 4] and [r["episode"] for r in dropped] == [1]  # order kept
    kept, dropped = within_measured_budget(timed, 0.4)  # none within: the fastest stays, so there is a choice
    assert [r["episode"] for r in kept] == [4] and [r["episode"] for r in dropped] == [1, 2, 3]
    assert within_measured_budget([], 0.5) == ([], [])


def test_recalibration_scale_and_the_round_kept():
    from deploy_kit.prune.finalists import choose_round, recalibration_scale

    timed = [{"episode": e, "latency_ratio_predicted": p, "measured_ratio": m}
             for e, p, m in [(1, 0.47, 0.43), (2, 0.46, 0.42), (3, 0.40, 0.40)]]
    assert recalibration_scale(timed) == pytest.approx(0.43 / 0.47)  # the median, not the mean
    assert recalibration_scale([]) == 1.0
    first = [{"episode": 1, "measured_ratio": 0.43}, {"episode": 2, "measured_ratio": 0.44}]
    second = [{"episode": 9, "measured_ratio": 0.51}, {"episode": 10, "measured_ratio": 0.48}]
    assert choose_round([first, second], 0.5) == (1, [second[1]], [second[0]])  # the latest round with one within
    over = [{"episode": 9, "measured_ratio": 0.52}, {"episode": 10, "measured_ratio": 0.53}]
    assert choose_round([first, over], 0.5) == (0, first, [])  # none within: the first round's stand
    i, kept, dropped = choose_round([[{"episode": 1, "measured_ratio": 0.55}], over], 0.5)
    assert (i, kept, len(dropped)) == (1, [over[0]], 2)  # none anywhere: the fastest of all


class _MacsTable:
    """A latency table whose ms are the MACs (its ratio is what the search prices)."""

    def __init__(self, infos):
        self.infos = infos

    def predict(self, channels):
        return float(sg.macs(self.infos, channels))


def test_the_kd_reward_scores_each_proposal_after_a_short_distillation(lenet_teacher, float_lenet, digits):
    """--reward kd: every proposal is distilled for one epoch on the same seeded images before its val
    accuracy is taken (a cut model scores higher than after BN alone, the same on a second scorer);
    the unpruned model's figure stays its own, untrained."""
    from deploy_kit.prune import SearchSetup, _reward_training
    from deploy_kit.prune.reward import Scorer
    from deploy_kit.train import TrainConfig

    model, x_bn = float_lenet
    infos = sg.layer_infos(model, SHAPE)
    full = sg.full_channels(infos)
    floors = {n: min(c, lt.channel_step(c)) for n, c in full.items()}
    st = SearchSetup(digits, x_bn, model, infos, None, None, _MacsTable(infos), None)
    teacher, distil = load_teacher(lenet_teacher), DistilConfig().resolved("adam", 3)

    def scorer(reward):
        cfg = PruneConfig(teacher=Path("x"), budget="macs=0.5", reward=reward, reward_images=512)
        train = _reward_training(cfg, st, teacher, TrainConfig(batch_size=64), distil, torch.device("cpu"))
        assert (train is None) == (reward == "bn")
        return Scorer(model, infos, st.table, x_bn, digits.split("val"), digits, cfg, train)
    bn, kd, kd_again = scorer("bn"), scorer("kd"), scorer("kd")
    assert bn.acc0 == kd.acc0  # the teacher's own float model, never distilled onto itself
    after_bn, after_kd = bn.one(floors), kd.one(floors)
    assert after_kd["val_acc"] > after_bn["val_acc"] + 5 and after_kd["reward"] > after_bn["reward"]
    assert kd_again.one(floors) == after_kd  # same images, order and augmentation: reproducible
    for bad, match in ((dict(reward="accuracy"), "unknown --reward 'accuracy'"), (dict(reward_images=8), "--reward-images")):
        with pytest.raises(ConfigError, match=match):
            PruneConfig(teacher=Path("x"), **bad)


@pytest.mark.parametrize("scale, applied", [(0.8, True), (1.02, False)])
def test_a_table_the_finalists_show_off_is_recalibrated_and_searched_again(float_lenet, digits, scale, applied):
    """A host where every configuration measures `scale` × the table's ratio (a table timed in the
    machine's other state): off by more than the tolerance, the search runs again at the budget the
    measured scale implies and its finalists, timed again, are the ones kept."""
    from deploy_kit.prune import SearchSetup, _recalibrate
    from deploy_kit.prune.finalists import choose_round, shortlist
    from deploy_kit.prune.reward import Scorer

    model, x_bn = float_lenet
    infos = sg.layer_infos(model, SHAPE)
    table = _MacsTable(infos)
    cfg = PruneConfig(teacher=Path("x"), budget="latency=0.5", latency_margin=0.05, episodes=8,
                      ppo=PPOConfig(episodes_per_update=4))
    full = table.predict(sg.full_channels(infos))
    space = ag.ChannelSpace(infos, table.predict, cfg.search_ratio * full)
    st = SearchSetup(digits, x_bn, model, infos, None, None, table, space)
    scorer = Scorer(model, infos, table, x_bn, digits.split("val"), digits, cfg)
    ag.ppo_prune_search(space, scorer, cfg.episodes, cfg.ppo, cfg.seed)

    def timed(records):  # what this host measures: the table's ratio × scale
        return [{**r, "measured_ratio": round(r["latency_ratio_predicted"] * scale, 4)} for r in records]
    rounds, seconds, said = [timed(shortlist(scorer.records, 6))], {}, []
    recal = _recalibrate(cfg, st, scorer, rounds, timed, 6, said.append, seconds)
    assert recal["scale"] == pytest.approx(scale, abs=1e-3) and recal["applied"] is applied
    assert recal["search_ratio_predicted"] == pytest.approx(cfg.search_ratio / scale, rel=1e-3)
    if not applied:
        assert len(rounds) == 1 and len(scorer.records) == 8 and not said and "recalibrated_search" not in seconds
        from deploy_kit.report import _recalibration_fact
        assert "within ±3 %: no second search" in _recalibration_fact(recal)
        return
    assert len(rounds) == 2 and len(scorer.records) == 16 and "searching again at 0.594× predicted" in said[0]
    second = scorer.records[8:]
    assert {r["round"] for r in second} == {2} and {r["round"] for r in scorer.records[:8]} == {1}
    assert all(r["latency_ratio_predicted"] <= cfg.search_ratio / scale + 1e-3 for r in second)
    assert max(r["latency_ratio_predicted"] for r in second) > cfg.search_ratio  # the room the first search left
    assert all(r["measured_ratio"] <= 0.5 for r in rounds[1])
    assert [r["episode"] for r in rounds[1]] == [r["episode"] for r in recal["rounds"][1]]
    assert choose_round(rounds, cfg.ratio)[0] == 1 and seconds["recalibrated_search"] >= 0
    from deploy_kit.report import _recalibration_fact
    assert "searched again at ×0.5937 predicted" in _recalibration_fact({**recal, "chosen_round": 2})
    from deploy_kit.prune import with_scaled_error
    done = with_scaled_error(recal, predicted=0.55, measured=0.46)  # the chosen model, after distillation
    assert done["predicted_ratio"] == pytest.approx(0.44, abs=1e-3) and done["ratio_error_pct"] == pytest.approx(-4.35, abs=0.05)
    assert "ratio error on the chosen model -4.3" in _recalibration_fact({**done, "chosen_round": 2})
    assert with_scaled_error({**recal, "applied": False}, 0.55, 0.46) == {**recal, "applied": False}
    assert with_scaled_error(None, 0.55, 0.46) is None


def test_recalibration_can_be_turned_off_and_an_unreachable_one_is_said(float_lenet, digits):
    from deploy_kit.prune import SearchSetup, _recalibrate
    from deploy_kit.prune.finalists import shortlist
    from deploy_kit.prune.reward import Scorer

    model, x_bn = float_lenet
    infos = sg.layer_infos(model, SHAPE)
    table = _MacsTable(infos)
    for cfg, scale, expect in [
            (PruneConfig(teacher=Path("x"), episodes=1, recalibrate=False), 0.5, "off"),
            (PruneConfig(teacher=Path("x"), episodes=1), 20.0, "below what the model can reach")]:
        space = ag.ChannelSpace(infos, table.predict, cfg.search_ratio * table.predict(sg.full_channels(infos)))
        scorer = Scorer(model, infos, table, x_bn, digits.split("val"), digits, cfg)
        scorer([ag.uniform_config(space)])
        rounds, said = [[{**r, "measured_ratio": r["latency_ratio_predicted"] * scale} for r in shortlist(scorer.records, 6)]], []
        recal = _recalibrate(cfg, SearchSetup(digits, x_bn, model, infos, None, None, table, space), scorer, rounds,
                             None, 6, said.append, {})
        assert not recal["applied"] and len(rounds) == 1 and len(scorer.records) == 1
        if expect == "off":
            assert recal["enabled"] is False and not said
        else:
            assert recal["unreachable"] and expect in said[0]
    r = invoke("--help")
    assert "--no-recalibrate" in r.output


def test_finalists_recalibrate_against_real_litert_timing(lenet_teacher, float_lenet, digits):
    """The whole finalist stage under a latency budget, timed in LiteRT: a table that prices LeNet5 by
    MACs (its real INT8 latency is mostly fixed cost) is shown far off by the first round's exports,
    the search runs again at the recalibrated budget, that round is timed too, and the finalists
    kept are those the measured gate allows."""
    from deploy_kit.prune import SearchSetup, _finalists
    from deploy_kit.prune.reward import Scorer
    from deploy_kit.train import TrainConfig

    model, x_bn = float_lenet
    infos = sg.layer_infos(model, SHAPE)
    table = _MacsTable(infos)
    cfg = PruneConfig(teacher=lenet_teacher, budget="latency=0.9", latency_margin=0.05, episodes=4,
                      ppo=PPOConfig(episodes_per_update=4), finalists=FinalistConfig(count=3, images=64))
    space = ag.ChannelSpace(infos, table.predict, cfg.search_ratio * table.predict(sg.full_channels(infos)))
    assert space.reachable() / table.predict(space.full) < 0.3  # LeNet5's floors: 0.287× its MACs
    image = normalize(digits.split("val").images[:1], digits.norm)
    st = SearchSetup(digits, x_bn, model, infos, image, None, table, space)
    scorer = Scorer(model, infos, table, x_bn, digits.split("val"), digits, cfg)
    ag.ppo_prune_search(space, scorer, cfg.episodes, cfg.ppo, cfg.seed)
    said, seconds = [], {}
    finalists, dropped, recal = _finalists(cfg, st, load_teacher(lenet_teacher), scorer, TrainConfig(batch_size=64),
                                           DistilConfig().resolved("adam", 1), torch.device("cpu"), said.append, seconds)
    # MACs fall to ≤ 0.855× but the fixed cost stays: the table's ratio is far too low; 0.855 / scale ≥ 0.3
    assert 1.03 < recal["scale"] < 2.8 and recal["applied"] and len(recal["rounds"]) == 2
    assert recal["search_ratio_predicted"] == pytest.approx(0.855 / recal["scale"], rel=1e-3)
    assert {r["round"] for r in scorer.records} == {1, 2} and seconds["recalibrated_search"] >= 0
    assert any("searching again" in m for m in said) and "finalists" in seconds
    rounds = recal["rounds"]
    assert all(r["latency_ratio_predicted"] <= recal["search_ratio_predicted"] + 1e-3 for r in rounds[1])
    chosen = rounds[recal["chosen_round"] - 1]
    within = [r for r in chosen if r["measured_ratio"] <= 0.9]
    kept = {r["episode"] for r in finalists}
    if within:  # the gate: every finalist kept measured within the budget, the others were dropped
        assert kept == {r["episode"] for r in within} and len(dropped) == len(chosen) - len(within)
        assert recal["chosen_round"] == 2 or not any(r["measured_ratio"] <= 0.9 for r in rounds[1])
    else:  # nothing anywhere within: the fastest of both rounds
        assert len(finalists) == 1 and finalists[0]["measured_ratio"] == min(r["measured_ratio"] for rnd in rounds for r in rnd)
        assert any("every finalist measured over" in m for m in said)
        assert f"{len(dropped)} of {len(dropped) + 1} finalists measured over the budget" in " ".join(said)
    assert all("short_val_acc" in r for r in finalists) or len(finalists) == 1


def test_finalists_are_timed_as_int8_exports_against_the_unpruned_teacher(lenet_teacher, float_lenet, digits):
    """Real LiteRT exports of each finalist and of the unpruned teacher, timed in one session; the
    gate then keeps what its measured ratio allows (no speed is asserted: only what is recorded)."""
    from deploy_kit.prune.finalists import time_finalists, within_measured_budget

    model, x_bn = float_lenet
    full = sg.full_channels(sg.layer_infos(model, SHAPE))
    floors = {n: min(c, lt.channel_step(c)) for n, c in full.items()}
    finalists = [{"episode": 1, "channels": floors}, {"episode": 2, "channels": {**full, "conv2": full["conv2"] - 4}}]
    image = normalize(digits.split("val").images[:1], digits.norm)
    timed = time_finalists(finalists, model, load_teacher(lenet_teacher).model, x_bn, image, "litert", 0)
    assert [r["episode"] for r in timed] == [1, 2] and [r["channels"] for r in timed] == [floors, finalists[1]["channels"]]
    assert len({r["unpruned_ms"] for r in timed}) == 1 and all(r["measured_ms"] > 0 for r in timed)
    assert all(r["measured_ratio"] == round(r["measured_ms"] / r["unpruned_ms"], 4) for r in timed)
    fastest = min(timed, key=lambda r: r["measured_ratio"])
    kept, dropped = within_measured_budget(timed, fastest["measured_ratio"])
    assert fastest in kept and all(r["measured_ratio"] <= fastest["measured_ratio"] for r in kept)
    assert len(kept) + len(dropped) == 2


def test_bad_finalist_options_exit_2_and_write_nothing(lenet_teacher, tmp_path):
    for flag, value in (("--finalists", "-1"), ("--finalist-images", "8"), ("--finalist-epochs", "0")):
        r = invoke("--teacher", lenet_teacher, flag, value, "--out", tmp_path / "p")
        assert r.exit_code == 2 and flag in r.output and not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_pruned_teacher_goes_through_search_export_verify(lenet_teacher, tmp_path):
    """prune (real LiteRT latency table) → search → export (ONNX, TFLite) → verify, unchanged."""
    from deploy_kit.export import ExportConfig, export
    from deploy_kit.search import SearchConfig, run_search
    from deploy_kit.verify import VerifyConfig, verify_exports

    out = tmp_path / "pruned"
    cfg = PruneConfig(teacher=lenet_teacher, budget="macs=0.5", episodes=8, table_random=4,
                      distil=DistilConfig(qat_epochs=1))  # KD epochs: 2 × the teacher's
    summary = run_prune(cfg, out).summary()
    meta = json.loads((out / "teacher.json").read_text())
    p = meta["pruning"]
    assert p["macs"]["ratio"] <= 0.5 and summary["channels"] == meta["channels"]
    assert sum(meta["channels"].values()) < sum(p["channels_full"].values()) + 10
    assert p["latency_ms"]["measured"]["pruned"] > 0 and p["latency_table"]["holdout_error_pct"]
    assert p["latency_ms"]["amx"] == amx.mode(False) in ("refused", "absent")  # timed as a phone would run it
    assert isinstance(p["latency_table"]["other_load"], float)  # recorded from the table that priced the search
    assert p["seed"] == 0 and p["budget"] == {"metric": "macs", "ratio": 0.5, "text": "macs=0.5", "search_ratio": 0.5}
    assert p["distil"]["lr"] == meta["config"]["lr"] == 1e-3  # the Adam teacher's default distillation rate
    assert p["distil"]["at_weight"] == DistilConfig().at_weight and p["distil"]["qat_kd"] is True
    assert p["reward"]["kind"] == "bn" and p["reward"]["kd_images"] == 0 and p["reward"]["bn_images"] == 256
    from conftest import LENET_TEACHER_CONFIG
    assert p["distil"]["epochs"] == meta["config"]["epochs"] == 6  # 2 × the fixture's 3 epochs
    assert LENET_TEACHER_CONFIG["epochs"] == 3
    log = [json.loads(line) for line in (out / "prune_log.jsonl").read_text().splitlines()]
    assert len(log) == 8 and all(e["macs_ratio"] <= 0.5 for e in log)
    ranked = p["finalists"]["ranked"]  # the search's best distinct configurations, briefly distilled
    distinct = {tuple(sorted(e["channels"].items())) for e in log}
    assert 2 <= len(ranked) == min(6, len(distinct)) and p["finalists"]["count"] == 6
    assert [r["short_val_acc"] for r in ranked] == sorted((r["short_val_acc"] for r in ranked), reverse=True)
    assert p["reward"]["chosen"] == ranked[0] and {n: meta["channels"][n] for n in ranked[0]["channels"]} == ranked[0]["channels"]
    assert min(r["search_rank"] for r in ranked) == 1 and "finalists" in p["stage_seconds"]
    assert p["finalists"]["over_budget"] == [] and not any("measured_ratio" in r for r in ranked)  # MACs: exact
    from deploy_kit.report import REPORT_NAME, write_report
    write_report(out)  # its pruning section: channels kept per layer, the table, the finalists
    page = (out / REPORT_NAME).read_text()
    assert "<h2>Pruning</h2>" in page and f"{len(ranked)} finalists" in page and "reward: val % after BN" in page and f"Intel AMX {amx.mode(False)}" in page
    assert f"{ranked[0]['short_val_acc']} (#{ranked[0]['search_rank']})" in page

    teacher = load_teacher(out)  # builds the model from the recorded counts
    assert sg.channel_counts(teacher.model) == meta["channels"]
    # a pruned teacher can be pruned again: its float model rebuilds (torch-pruning traces under no_grad too)
    ds = load_dataset("digits", 0)
    x = torch.from_numpy(normalize(ds.split("train").images[:64], ds.norm))
    assert sg.channel_counts(sg.float_from_teacher(teacher, x)) == meta["channels"]
    outcome = run_search(out, SearchConfig(method="random", episodes=4, seed=0))
    export(ExportConfig(result_path=outcome.path, targets=("onnx", "tflite")))
    # the exports must reproduce the student; how much the LUT costs this 1-epoch model is not the point
    report = verify_exports(VerifyConfig(exports=out / "exports", max_drop=100.0), progress=False)
    assert report.passed, report.rows


def test_demo_checks_the_prune_budget_before_any_work(tmp_path):
    from deploy_kit.demo import DemoConfig, run_demo

    with pytest.raises(ConfigError, match="must be in"):
        run_demo(DemoConfig(out=tmp_path / "demo", prune="latency=2"))
    assert not (tmp_path / "demo").exists()
