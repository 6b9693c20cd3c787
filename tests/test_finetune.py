"""`deploykit finetune` on the tiny LeNet5/digits teacher: the student it writes, the hash chain
that ties it to its teacher and result.json, and every refusal (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from deploy_kit import quant
from deploy_kit.cli import main
from deploy_kit.data import load_dataset
from deploy_kit.errors import CheckpointError, ConfigError, OutputExistsError
from deploy_kit.finetune import (SELECTIONS, FinetuneConfig, TapRecorder, default_lr, finetune, frozen_student,
                                 mcnemar_worse, trainable_student)
from deploy_kit.fsutil import sha256_file, write_json
from deploy_kit.lut import LayerLUT, LUTActivation
from deploy_kit.result import content_digest, load_result
from deploy_kit.student import load_student
from deploy_kit.teacher import load_teacher
from deploy_kit.train import accuracy, predict

# A coarse staircase over the bulk of the codes (p50..p90 of the tiny teacher): far from the teacher, so fine-tuning has something to recover.
CODES = {"t1_code": 10, "v1_code": 40, "t2_code": 70, "v2_code": 110, "tmax_code": 150}


def make_run(lenet_teacher, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for f in lenet_teacher.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    teacher = load_teacher(folder)
    write_json(folder / "result.json", {"model": "lenet5", "layers": {n: dict(CODES) for n in teacher.layer_quant},
                                        "teacher": {"path": "teacher.json", "sha256": teacher.sha256}})
    return folder


def tiny(run, **kw) -> FinetuneConfig:
    return FinetuneConfig(result_path=run / "result.json", **{"epochs": 3, "max_train": 400, "device": "cpu", **kw})


@pytest.fixture(scope="module")
def tuned(lenet_teacher, tmp_path_factory):
    run = make_run(lenet_teacher, tmp_path_factory.mktemp("finetune") / "run")
    # KL and AT only: the tiny teacher is weak (~70 % val), and a label term would pull the
    # student away from it, which this module's KL check would then see.
    return run, finetune(tiny(run, ce_weight=0.0))


def test_straight_through_lut_passes_gradients_only_when_training():
    lut, q = LayerLUT(2, 5, 9, 14, 24), quant.ActivationQuant(0.1, 0)
    x = torch.linspace(0, 3, 31, requires_grad=True)
    ste = LUTActivation(lut, q, straight_through=True).train()
    ste(x).sum().backward()
    assert torch.all(x.grad == 1)
    y_plain = LUTActivation(lut, q)(x.detach())
    assert torch.equal(ste.eval()(x.detach()), y_plain)  # same staircase forward
    x.grad = None
    LUTActivation(lut, q).train()(x).sum().backward()
    assert torch.all(x.grad[x.detach() < 2.45] == 0)  # the staircase's own gradient is flat below tmax


def test_epoch_zero_is_exactly_the_searched_student(lenet_teacher):
    teacher = load_teacher(lenet_teacher)
    luts = {n: LayerLUT(10, 40, 70, 110, 150) for n in teacher.layer_quant}
    ds = load_dataset("digits", 0)
    before = frozen_student(trainable_student(teacher, luts, torch.device("cpu")), teacher, luts)
    assert np.array_equal(predict(before, ds.split("val"), ds), predict(teacher.student(luts), ds.split("val"), ds))
    # digits pixels take few values; noise images put inputs between every grid step, so a
    # student that skipped the input quantizer (a lost QAT observer hook) would differ here
    x = torch.randn(64, *teacher.meta["input_shape"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(before(x), teacher.student(luts).eval()(x))
        # the same after a forward with the training loop's tap recorders attached
        model = trainable_student(teacher, luts, torch.device("cpu"))
        rec = TapRecorder(model, ["conv1"])
        model(x)
        assert torch.equal(frozen_student(model, teacher, luts)(x), teacher.student(luts).eval()(x))
        rec.close()


def test_sidecar_and_result_entry(tuned):
    run, outcome = tuned
    meta = json.loads((run / "student.json").read_text())
    raw = json.loads((run / "result.json").read_text())
    assert meta["format"] == "deploykit-student/1" and meta["weights_sha256"] == sha256_file(run / "student.safetensors")
    assert meta["teacher"]["sha256"] == load_teacher(run).sha256
    assert meta["result"]["digest"] == content_digest(raw)  # the student entry is not part of the digest
    assert raw["student"]["path"] == "student.json" and raw["student"]["sha256"] == sha256_file(run / "student.json")
    assert meta["layers"] == raw["layers"]
    epochs = meta["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3] and epochs[0]["loss"] is None
    p_worse = meta["selection"]["mcnemar_p_last_worse_than_epoch0"]
    assert meta["selection"]["rule"] == "final" and meta["recipe"]["selection"] == SELECTIONS["final"]
    assert meta["chosen_epoch"] == (0 if p_worse < 0.05 else 3)  # the last epoch unless measurably worse
    assert meta["accuracy"]["after"]["val"] == epochs[meta["chosen_epoch"]]["val_acc"]
    assert set(meta["layer_at_distance"]) == {"conv1", "conv2"}
    assert meta["recipe"]["epochs"] == 3 and meta["recipe"]["seed"] == 0 and meta["device"] == "cpu"
    assert meta["recipe"]["lr"] == 1e-3 and meta["recipe"]["lr_rule"] == "default for lenet5"
    m = raw["student"]["metrics"]
    assert m["acc_drop"] == pytest.approx(m["acc_teacher"] - m["acc_student"], abs=0.011)


def test_exact_gain_is_what_the_saved_student_wins_back_per_layer(tuned):
    """student.json's layer_exact_gain, recomputed from the files alone: the saved student with one
    layer's LUT removed, against the saved student with every LUT, on validation."""
    run, outcome = tuned
    meta = json.loads((run / "student.json").read_text())
    result = load_result(run / "result.json")
    teacher = load_teacher(run)
    student = load_student(result, teacher)
    ds = load_dataset("digits", 0)
    val = ds.split("val")
    luts = dict(result.layers)
    acc = lambda m: accuracy(predict(m, val, ds), val.labels)  # noqa: E731
    base = acc(student.student(luts))
    assert base == pytest.approx(meta["accuracy"]["after"]["val"], abs=0.01)
    gains = meta["layer_exact_gain"]
    assert set(gains) == set(luts) and len(luts) >= 2
    for name in luts:
        exact = acc(student.student({n: lut for n, lut in luts.items() if n != name}))
        assert gains[name] == pytest.approx(exact - base, abs=0.011)
    assert outcome.summary()["layer_exact_gain"] == gains


def test_default_learning_rate_is_per_model(tmp_path):
    assert default_lr("lenet5") == 1e-3
    assert {default_lr(m) for m in ("vgg16", "vgg19", "mobilenet_v1", "nin", "alexnet")} == {3e-4}
    given = FinetuneConfig(result_path=tmp_path / "result.json", lr=5e-4)
    assert given.peak_lr("vgg16") == 5e-4 and given.recipe("vgg16")["lr_rule"] == "given"
    auto = FinetuneConfig(result_path=tmp_path / "result.json")
    assert auto.peak_lr("vgg16") == 3e-4 and auto.recipe("vgg16")["lr"] == 3e-4


def test_mcnemar_counts_only_the_images_where_the_two_differ():
    right = np.ones(100, bool)
    worse = lambda k: np.r_[np.zeros(k, bool), np.ones(100 - k, bool)]  # noqa: E731
    assert mcnemar_worse(right, right) == 1.0  # identical: nothing to test
    assert mcnemar_worse(right, worse(3)) == pytest.approx(1 / 8)  # 3 of 3 against: not yet significant
    assert mcnemar_worse(right, worse(5)) == pytest.approx(1 / 32)  # 5 of 5: significant at 0.05
    assert mcnemar_worse(worse(5), right) == 1.0  # better is never "worse"
    mixed_before, mixed_after = np.array([1, 1, 0, 0], bool), np.array([0, 0, 1, 1], bool)
    assert mcnemar_worse(mixed_before, mixed_after) == pytest.approx(11 / 16)


def test_select_best_keeps_the_best_validation_epoch(lenet_teacher, tmp_path):
    run = make_run(lenet_teacher, tmp_path / "run")
    meta = finetune(tiny(run, select="best", ema=0.0, ce_weight=0.0)).meta
    best = max(meta["epochs"], key=lambda e: (e["val_acc"], e["val_agreement"], -e["val_kl"]))
    assert meta["chosen_epoch"] == best["epoch"] and meta["recipe"]["selection"] == SELECTIONS["best"]
    assert meta["accuracy"]["after"]["val"] == best["val_acc"]


def test_final_falls_back_to_the_searched_student_when_training_broke_it(lenet_teacher, tmp_path):
    run = make_run(lenet_teacher, tmp_path / "run")
    meta = finetune(tiny(run, epochs=1, lr=5.0, ema=0.0)).meta  # a learning rate that wrecks the weights
    assert meta["epochs"][1]["val_acc"] < meta["epochs"][0]["val_acc"] - 20
    assert meta["chosen_epoch"] == 0 and meta["selection"]["mcnemar_p_last_worse_than_epoch0"] < 0.05
    assert meta["accuracy"]["after"]["val"] == meta["epochs"][0]["val_acc"]


def test_training_moves_the_student_towards_the_teacher(tuned):
    run, outcome = tuned
    epochs = outcome.meta["epochs"]
    assert min(e["val_kl"] for e in epochs[1:]) < 0.8 * epochs[0]["val_kl"]
    teacher = load_teacher(run)
    student = load_student(load_result(run / "result.json"), teacher)
    changed = [not torch.equal(a, b) for a, b in zip(student.model.state_dict().values(), teacher.model.state_dict().values())]
    assert any(changed) if outcome.meta["chosen_epoch"] else not any(changed)


def test_loaded_student_keeps_the_teachers_grids_and_rederived_weight_scales(tuned):
    run, outcome = tuned
    teacher = load_teacher(run)
    result = load_result(run / "result.json")
    student = load_student(result, teacher)
    assert quant.activation_quant(student.model) == quant.activation_quant(teacher.model)
    assert quant.input_quant(student.model) == quant.input_quant(teacher.model)
    for block in student.model.blocks().values():
        w = block.op.weight.detach()
        expected = w.abs().flatten(1).amax(1) / 127
        assert torch.allclose(block.op.weight_fake_quant.scale, expected, rtol=1e-6)
    # the accuracy written is the loaded student's, in the runtime arithmetic
    ds = load_dataset("digits", 0)
    test = ds.split("test")
    acc = round(100.0 * float((predict(student.student(result.layers), test, ds).argmax(1) == test.labels).mean()), 2)
    assert acc == outcome.meta["accuracy"]["after"]["test"] == result.student["metrics"]["acc_student"]


def test_report_shows_before_and_after(tuned, tmp_path):
    from deploy_kit.report import write_report

    run, outcome = tuned
    summary = write_report(run, out=tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "finetune" not in summary["missing"]
    section = page[page.index("<h2>Fine-tuning</h2>"):]
    a = outcome.meta["accuracy"]
    assert f"kept epoch <b>{outcome.meta['chosen_epoch']}</b>" in section
    assert f"{a['before']['test']:.2f}" in section and f"{a['after']['test']:.2f}" in section
    assert "conv1" in section and "conv2" in section and 'alt="fine-tuning curve"' in section
    gains = section[section.index("val gain if exact"):]
    assert all(f"<td>{n}</td><td class=\"num\">{g:+.2f}</td>" in gains
               for n, g in outcome.meta["layer_exact_gain"].items())
    assert f"after fine-tuning: student {a['after']['test']}%" in page


def test_research_on_the_students_weights_then_finetune_continues_from_them(tuned, tmp_path):
    from deploy_kit.search import PPOConfig, RewardConfig, SearchConfig, run_search

    run, first = tuned
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg = SearchConfig(episodes=8, reward=RewardConfig(images=32), state_images=256, ppo=PPOConfig(episodes_per_update=4),
                       top_n=2)
    again = run_search(copy, cfg, out=copy / "round2.json", from_student=copy / "result.json")
    assert (copy / "search_log.round2.jsonl").is_file()
    base = again.result.search["base_student"]
    assert base["path"] == "student.json" and base["weights_sha256"] == first.meta["weights_sha256"]
    # the ceiling of every layer is the one the first round searched under, not re-derived
    assert base["tmax"] == "kept from the base result" and base["start"] == "the base result's codes"
    # the codes round 1 trained with are the first candidate scored, so they compete in the selection
    first_scored = json.loads((copy / "search_log.round2.jsonl").read_text().splitlines()[0])
    assert first_scored["evaluation"] == 1 and all(c == list(CODES.values()) for c in first_scored["layers"].values())
    assert {n: l.tmax for n, l in again.result.layers.items()} == {n: CODES["tmax_code"] for n in again.result.layers}
    second = finetune(FinetuneConfig(result_path=copy / "round2.json", out=copy / "round2", epochs=1, max_train=400,
                                     ce_weight=0.0, device="cpu"))
    assert second.meta["init"] == {"student": "../student.json", "weights_sha256": first.meta["weights_sha256"]}
    # epoch 0 of round 2 is the re-searched student on the round-1 weights, as the search measured it
    assert second.meta["accuracy"]["before"]["test"] == again.result.metrics["acc_student"]
    # a base student changed afterwards is refused, not trained from
    meta = json.loads((copy / "student.json").read_text())
    meta["recipe"]["lr"] = 1.0
    write_json(copy / "student.json", meta)
    with pytest.raises(CheckpointError, match="differs from the one round2.json recorded"):
        finetune(FinetuneConfig(result_path=copy / "round2.json", out=copy / "round3", epochs=1, device="cpu", force=True))


def test_hash_chain_refuses_a_changed_result_or_teacher(tuned, tmp_path):
    run, _ = tuned
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    teacher = load_teacher(copy)
    raw = json.loads((copy / "result.json").read_text())
    raw["layers"]["fc1"]["v2_code"] += 1  # an edited code: the student was trained for others
    write_json(copy / "result.json", raw)
    with pytest.raises(CheckpointError, match="another result.json"):
        load_student(load_result(copy / "result.json"), teacher)
    raw["layers"]["fc1"]["v2_code"] -= 1
    write_json(copy / "result.json", raw)
    meta = json.loads((copy / "student.json").read_text())
    meta["teacher"]["sha256"] = "0" * 64
    write_json(copy / "student.json", meta)
    with pytest.raises(CheckpointError, match="differs from the one result.json recorded"):
        load_student(load_result(copy / "result.json"), teacher)
    raw["student"]["sha256"] = sha256_file(copy / "student.json")
    write_json(copy / "result.json", raw)
    with pytest.raises(CheckpointError, match="fine-tuned from teacher"):
        load_student(load_result(copy / "result.json"), teacher)


def test_student_path_must_stay_inside_its_folder(tuned, tmp_path):
    run, _ = tuned
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    raw = json.loads((copy / "result.json").read_text())
    raw["student"]["path"] = "../../etc/passwd"
    write_json(copy / "result.json", raw)
    with pytest.raises(ConfigError, match='"student.path": expected a relative path inside the file\'s own folder'):
        load_result(copy / "result.json")  # refused where result.json is read, before any use


@pytest.mark.parametrize("gains", [{"conv1": "lots"}, {"conv1": None}, [0.5], {"conv1": [1]}])
def test_resealed_student_with_bad_exact_gains_is_refused(tuned, tmp_path, gains):
    """A student.json whose layer_exact_gain is not {layer: number}, with result.json's hash updated
    to match: the schema refuses it — one line, exit 2, no export written."""
    run, _ = tuned
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    meta = json.loads((copy / "student.json").read_text())
    meta["layer_exact_gain"] = gains
    write_json(copy / "student.json", meta)
    raw = json.loads((copy / "result.json").read_text())
    raw["student"]["sha256"] = sha256_file(copy / "student.json")
    write_json(copy / "result.json", raw)
    with pytest.raises(CheckpointError, match="layer_exact_gain"):
        load_student(load_result(copy / "result.json"), load_teacher(copy))
    res = CliRunner().invoke(main, ["export", "--config", str(copy / "result.json"), "--target", "onnx",
                                    "--out", str(tmp_path / "exports")])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "layer_exact_gain" in lines[0]
    assert not (tmp_path / "exports").exists()


def test_existing_student_needs_force(tuned):
    run, _ = tuned
    before = {p.name: sha256_file(p) for p in run.iterdir()}
    with pytest.raises((OutputExistsError, ConfigError)):
        finetune(tiny(run))
    assert {p.name: sha256_file(p) for p in run.iterdir()} == before


@pytest.mark.parametrize("kw, match", [
    ({"epochs": 0}, "--epochs"), ({"device": "tpu"}, "unknown --device"), ({"lr": float("nan")}, "--lr"),
    ({"kd_weight": 0.0, "ce_weight": 0.0, "at_weight": 0.0}, "not all 0"), ({"seed": -1}, "--seed"),
    ({"ema": 1.0}, "--ema"), ({"ema": -0.1}, "--ema"),
])
def test_bad_config(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(result_path=tmp_path / "result.json", **kw)


def test_result_for_another_teacher_is_refused(lenet_teacher, tmp_path):
    run = make_run(lenet_teacher, tmp_path / "run")
    raw = json.loads((run / "result.json").read_text())
    raw["teacher"]["sha256"] = "f" * 64
    write_json(run / "result.json", raw)
    with pytest.raises(ConfigError, match="was searched on teacher"):
        finetune(tiny(run, epochs=1))
    assert not (run / "student.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda is valid here")
def test_cuda_without_a_gpu_is_one_line(lenet_teacher, tmp_path):
    run = make_run(lenet_teacher, tmp_path / "run")
    res = CliRunner().invoke(main, ["finetune", "--config", str(run / "result.json"), "--device", "cuda"])
    assert res.exit_code == 2 and "--device cuda" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (run / "student.json").exists()


def test_weight_average_follows_the_weights_and_is_what_is_kept(lenet_teacher, tmp_path):
    from deploy_kit.finetune import WeightAverage

    teacher = load_teacher(lenet_teacher)
    luts = {n: LayerLUT(10, 40, 70, 110, 150) for n in teacher.layer_quant}
    model = trainable_student(teacher, luts, torch.device("cpu"))
    average = WeightAverage(model, decay=0.5)
    start = [p.detach().clone() for p in average.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average.update(model)  # first step: decay min(0.5, 2/11) → 9/11 of the way to the weights
    for a, s0 in zip(average.model.parameters(), start):
        assert torch.allclose(a, s0 + 9 / 11, atol=1e-6)
    run = make_run(lenet_teacher, tmp_path / "run")
    outcome = finetune(tiny(run, epochs=2, ema=0.9))
    assert outcome.meta["recipe"]["ema"] == 0.9
    result = load_result(run / "result.json")
    kept = load_student(result, teacher).student(result.layers)
    ds = load_dataset("digits", 0)
    val = ds.split("val")
    chosen = outcome.meta["epochs"][outcome.meta["chosen_epoch"]]  # what was evaluated is what was saved
    assert round(100.0 * float((predict(kept, val, ds).argmax(1) == val.labels).mean()), 2) == chosen["val_acc"]


def test_cli_names_the_costliest_layer_and_the_search_that_leaves_it_out(lenet_teacher, tmp_path):
    run = make_run(lenet_teacher, tmp_path / "run")
    res = CliRunner().invoke(main, ["finetune", "--config", str(run / "result.json"), "--epochs", "1",
                                    "--max-train", "200", "--device", "cpu", "--out", str(run / "student"), "--json"])
    assert res.exit_code == 0, res.output
    gains = json.loads(res.stdout)["layer_exact_gain"]
    assert gains == json.loads((run / "student" / "student.json").read_text())["layer_exact_gain"]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("costliest LUT")]
    if max(gains.values()) <= 0:  # no layer would win anything back: nothing to suggest
        assert lines == []
        return
    name = max(gains, key=gains.get)
    rest = ",".join(n for n in gains if n != name)
    assert lines == [f"costliest LUT: {name} (val +{gains[name]:.2f} pts if left exact); to leave it out: "
                     f"`deploykit search --teacher {run} --layers {rest} --out NEW.json`"]


@pytest.mark.parametrize("args, match", [(["--epochs", "0"], "--epochs"), (["--device", "tpu"], "--device"),
                                         (["--ema", "1"], "--ema")])
def test_cli_refusals(lenet_teacher, tmp_path, args, match):
    run = make_run(lenet_teacher, tmp_path / "run")
    res = CliRunner().invoke(main, ["finetune", "--config", str(run / "result.json"), *args])
    assert res.exit_code == 2 and match in res.output and len(res.output.strip().splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == ["result.json", "teacher.json", "teacher.safetensors"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: the GPU path of finetune cannot run")
def test_gpu_finetune_reports_cpu_arithmetic(lenet_teacher, tmp_path):
    run = make_run(lenet_teacher, tmp_path / "run")
    outcome = finetune(tiny(run, epochs=1, device="cuda"))
    assert outcome.meta["device"].startswith("cuda")
    teacher = load_teacher(run)
    result = load_result(run / "result.json")
    student = load_student(result, teacher)
    ds = load_dataset("digits", 0)
    test = ds.split("test")
    acc = round(100.0 * float((predict(student.student(result.layers), test, ds).argmax(1) == test.labels).mean()), 2)
    assert acc == outcome.meta["accuracy"]["after"]["test"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda is valid here")
@pytest.mark.parametrize("command", ["train", "search"])
def test_train_and_search_refuse_cuda_without_a_gpu(lenet_teacher, tmp_path, command):
    out = tmp_path / "out"
    args = (["train", "--model", "lenet5", "--epochs", "0", "--qat-epochs", "1", "--out", str(out)] if command == "train"
            else ["search", "--teacher", str(lenet_teacher), "--episodes", "2", "--out", str(out / "r.json")])
    res = CliRunner().invoke(main, [*args, "--device", "cuda"])
    assert res.exit_code == 2 and "--device cuda" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not out.exists()


def test_device_auto_and_cpu_resolve_here():
    from deploy_kit.device import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown --device"):
        resolve_device("tpu")
