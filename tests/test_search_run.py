"""A short search end to end on the tiny teacher: result.json is valid, reproducible, and accepted
by the later stages' loader; bad inputs are one readable ConfigError."""

from __future__ import annotations

import json
import shutil

import pytest

from deploy_kit.errors import CheckpointError, ConfigError, OutputExistsError
from deploy_kit.result import SCHEMA, check_against_teacher, load_result
from deploy_kit.search import PPOConfig, RewardConfig, SearchConfig, TmaxRule, run_search
from deploy_kit.teacher import load_teacher


def tiny(method="ppo", **kw) -> SearchConfig:
    return SearchConfig(method=method, episodes=kw.pop("episodes", 8), reward=RewardConfig(images=32),
                        state_images=256, ppo=PPOConfig(episodes_per_update=4), top_n=3, **kw)


@pytest.fixture(scope="module")
def ppo_run(lenet_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "result.json"
    return run_search(lenet_teacher, tiny(), out=out)


def test_result_is_valid_and_accepted_by_the_loader(ppo_run, lenet_teacher):
    result = load_result(ppo_run.path)
    teacher = load_teacher(lenet_teacher)
    quant = check_against_teacher(result, teacher)
    assert list(result.layers) == list(teacher.layer_quant) == list(quant)
    raw = json.loads(ppo_run.path.read_text())
    assert raw["schema"] == SCHEMA and raw["model"] == "lenet5"
    assert raw["teacher"]["sha256"] == teacher.sha256
    assert (ppo_run.path.parent / raw["teacher"]["path"]).resolve() == (lenet_teacher / "teacher.json").resolve()
    for name, layer in raw["layers"].items():
        assert {"t1_code", "v1_code", "t2_code", "v2_code", "tmax_code", "scale", "zero_point", "qmin", "qmax"} <= set(layer)
    m = raw["metrics"]
    assert m["acc_drop"] == pytest.approx(m["acc_teacher"] - m["acc_student"], abs=0.011)
    assert set(m["val"]) == {"acc_teacher", "acc_student", "acc_drop"}
    s = raw["search"]
    assert (s["method"], s["budget"], s["evaluations"], s["seed"]) == ("ppo", 8, 8, 0)
    assert s["reward"]["temperature"] == 2.0 and "percentile" in s["tmax"]
    assert raw["selection"].startswith(("constrained-best", "best-accuracy"))
    assert [c["rank"] for c in raw["candidates"]] == list(range(1, len(raw["candidates"]) + 1))
    rewards = [c["reward"] for c in raw["candidates"]]
    assert rewards == sorted(rewards, reverse=True)
    assert "seconds" not in json.dumps(raw)  # wall-clock time would break reproducibility


def test_episode_log(ppo_run):
    lines = [json.loads(l) for l in ppo_run.log_path.read_text().splitlines()]
    evals, done = lines[:-1], lines[-1]
    assert [e["evaluation"] for e in evals] == list(range(1, 9)) and done["evaluations"] == 8
    best = [e["best_reward"] for e in evals]
    assert best == [max(e["reward"] for e in evals[:i + 1]) for i in range(8)]
    assert all({"reward", "kl", "at"} <= set(e) for e in evals)


def test_same_seed_gives_an_identical_file(ppo_run, lenet_teacher):
    first = ppo_run.path.read_bytes()
    again = run_search(lenet_teacher, tiny(), out=ppo_run.path, force=True)
    assert again.path.read_bytes() == first
    other = run_search(lenet_teacher, tiny(seed=1), out=ppo_run.path.with_name("seed1.json"))
    assert json.loads(other.path.read_text())["candidates"] != json.loads(first)["candidates"]


@pytest.mark.parametrize("method", ["random", "greedy"])
def test_baselines_use_the_same_budget(lenet_teacher, tmp_path, method):
    o = run_search(lenet_teacher, tiny(method, episodes=10), out=tmp_path / "r.json")
    assert len(o.evaluations) == 10 and o.result.search["method"] == method
    check_against_teacher(load_result(o.path), load_teacher(lenet_teacher))


def test_layers_restricts_the_search(lenet_teacher, tmp_path):
    o = run_search(lenet_teacher, tiny(layers=("fc1", "conv2"), episodes=4), out=tmp_path / "r.json")
    assert list(o.result.layers) == ["conv2", "fc1"]  # forward order
    assert load_teacher(lenet_teacher).student(o.result.layers).taps()["conv1"].fn is None


def test_research_format_still_loads(ppo_run, lenet_teacher, tmp_path):
    raw = json.loads(ppo_run.path.read_text())
    research = {"model": raw["model"], "backend": "qnnpack", "selection": raw["selection"],
                "metrics": {k: raw["metrics"][k] for k in ("acc_teacher", "acc_student", "acc_drop")},
                "layers": {n: {k: v for k, v in d.items() if k.endswith("_code")} for n, d in raw["layers"].items()}}
    path = tmp_path / "research.json"
    path.write_text(json.dumps(research))
    result = load_result(path)
    assert result.quant == {} and result.layers == load_result(ppo_run.path).layers
    check_against_teacher(result, load_teacher(lenet_teacher))
    # fbgemm codes run 0..127: applied to this 0..255 teacher they would mean other values
    path.write_text(json.dumps({**research, "backend": "fbgemm"}))
    with pytest.raises(ConfigError, match=r"searched on backend fbgemm \(activation codes 0..127\).*0..255"):
        check_against_teacher(load_result(path), load_teacher(lenet_teacher))


def test_default_out_and_no_overwrite(lenet_teacher, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lenet_teacher, run)
    o = run_search(run, tiny(episodes=2))
    assert o.path == run / "result.json" and (run / "search_log.jsonl").is_file()
    with pytest.raises(OutputExistsError, match="--force"):
        run_search(run, tiny(episodes=2))


def test_bad_inputs_are_config_errors(lenet_teacher, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown layer\(s\) conv9; lenet5 has: conv1, conv2, fc1, fc2"):
        run_search(lenet_teacher, tiny(layers=("conv1", "conv9")), out=tmp_path / "a.json")
    with pytest.raises(ConfigError, match="tmax=8 leaves no legal codes"):
        run_search(lenet_teacher, tiny(tmax=TmaxRule(fixed=8)), out=tmp_path / "b.json")
    with pytest.raises(ConfigError, match="unknown --method 'bayes'"):
        tiny("bayes")
    with pytest.raises(CheckpointError, match="no teacher at"):
        run_search(tmp_path / "nowhere", tiny(), out=tmp_path / "c.json")
    assert not any(tmp_path.glob("*.json"))
