"""`deploykit import --research`: research-system (gfat-l/inference) checkpoints, built here with
torch.ao's own fbgemm QAT preparation of a module tree named like the research LeNet5 (our code,
not theirs), then imported, checked against the original, exported and verified in the real runtimes."""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.ao.quantization as tq
from click.testing import CliRunner
from torch import nn

from deploy_kit.cli import main
from deploy_kit.data import load_dataset, normalize
from deploy_kit.errors import CheckpointError, ConfigError
from deploy_kit.quant import use_runtime_arithmetic
from deploy_kit.research import ImportConfig, import_research
from deploy_kit.result import check_against_teacher, load_result, notes_for, parse_result
from deploy_kit.teacher import load_teacher


def research_lenet5(width: int = 6) -> nn.Module:
    """LeNet5 as the research system lays it out: plain Conv2d/Linear with bias, separate ReLUs,
    no QuantStub, nothing fused — prepared for QAT with fbgemm's default qconfig."""
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict(conv1=nn.Conv2d(1, width, 5), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
                                  conv2=nn.Conv2d(width, 16, 5), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
                                  flat=nn.Flatten(), fc1=nn.Linear(400, 120), relu3=nn.ReLU(),
                                  fc2=nn.Linear(120, 84), relu4=nn.ReLU(), fc3=nn.Linear(84, 10)))
    m.train()
    torch.backends.quantized.engine = "fbgemm"
    m.qconfig = tq.get_default_qat_qconfig("fbgemm")
    tq.prepare_qat(m, inplace=True)
    return m


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", 0)


@pytest.fixture(scope="module")
def research_ckpt(tmp_path_factory, digits):
    m = research_lenet5()
    with torch.no_grad():
        for i in range(0, 512, 128):  # observers see real digits: meaningful scales and zero points
            m(torch.from_numpy(normalize(digits.split("train").images[i:i + 128], digits.norm)))
    m.apply(tq.disable_observer)
    path = tmp_path_factory.mktemp("research") / "lenet5_qat_preconvert.pth"
    torch.save(m.state_dict(), path)
    return path, m.eval()


@pytest.fixture(scope="module")
def imported(tmp_path_factory, research_ckpt):
    out = tmp_path_factory.mktemp("imported") / "run"
    import_research(ImportConfig(checkpoint=research_ckpt[0], model="lenet5", data="digits", out=out))
    return out


def test_import_keeps_the_research_quantization(imported, research_ckpt, digits):
    teacher = load_teacher(imported)
    meta = teacher.meta
    assert meta["quantization"] == {"activation": [0, 127], "weight": [-128, 127], "input": [0, 255]}
    assert [q.qmax for q in teacher.layer_quant.values()] == [127] * 4
    sd = research_ckpt[1].state_dict()
    for name in ("conv1", "conv2", "fc1", "fc2"):
        assert teacher.layer_quant[name].scale == pytest.approx(float(sd[f"{name}.activation_post_process.scale"]))
        assert teacher.layer_quant[name].zero_point == int(sd[f"{name}.activation_post_process.zero_point"])
    block = teacher.model.classifier.fc3.op
    assert block.weight_fake_quant.quant_min == -128 and block.activation_post_process.quant_max == 127


def test_imported_model_computes_what_the_research_model_computes(imported, research_ckpt, digits):
    """With the input quantizer off (the research LeNet5 has none) and the plain fake-quant forward,
    deploykit's model gives the research module's logits."""
    model = load_teacher(imported).model
    use_runtime_arithmetic(model, on=False)
    model.quant.activation_post_process.disable_fake_quant()
    x = torch.from_numpy(normalize(digits.split("test").images[:200], digits.norm))
    with torch.no_grad():
        ours, theirs = model(x), research_ckpt[1](x)
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert bool((ours.argmax(1) == theirs.argmax(1)).all())


def _research_result(teacher, **extra) -> dict:
    layers = {n: {"t1_code": q.zero_point + 1, "v1_code": q.zero_point + 3, "t2_code": q.zero_point + 6,
                  "v2_code": q.zero_point + 9, "tmax_code": min(127, q.zero_point + 20)}
              for n, q in teacher.layer_quant.items()}
    return {"layers": layers, "backend": "fbgemm", **extra}


def test_reduced_range_export_verifies_bit_exact(imported, tmp_path):
    """A research PPO result.json on the imported 0..127 teacher: ONNX and ORT reproduce the
    student's logits exactly on every test image."""
    from deploy_kit.export import ExportConfig, export
    from deploy_kit.verify import VerifyConfig, verify_exports

    teacher = load_teacher(imported)
    path = tmp_path / "result.json"
    path.write_text(json.dumps(_research_result(teacher, model="lenet5", selection="constrained-best",
                                                metrics={"acc_teacher": 0, "acc_student": 0, "acc_drop": 0})))
    notes = []
    export(ExportConfig(result_path=path, teacher_path=imported, targets=("onnx", "ort"), out=tmp_path / "exports"),
           progress=notes.append)
    assert any("no per-layer scales" in n for n in notes)
    report = verify_exports(VerifyConfig(exports=tmp_path / "exports", max_drop=100.0, min_agreement=100.0),
                            progress=False)
    lut_rows = [r for r in report.rows if r.checked and "relu" not in r.artifact and r.runtime.startswith("onnx")]
    assert lut_rows and all(r.agreement_student == 100.0 and r.max_abs_logit_diff == 0.0 for r in lut_rows)


def test_supervised_format_takes_the_teachers_model(imported, tmp_path):
    teacher = load_teacher(imported)
    path = tmp_path / "supervised.json"
    path.write_text(json.dumps(_research_result(teacher)))  # no `model`: approx_train.py's format
    result = load_result(path)
    assert result.model is None
    check_against_teacher(result, teacher)
    assert any("names no model" in n and "lenet5" in n for n in notes_for(result, teacher))


def test_backend_must_match_the_teachers_codes(imported, tmp_path):
    teacher = load_teacher(imported)
    raw = _research_result(teacher, model="lenet5", backend="qnnpack")
    with pytest.raises(ConfigError, match=r"searched on backend qnnpack \(activation codes 0..255\).*0..127"):
        check_against_teacher(parse_result(raw), teacher)
    with pytest.raises(ConfigError, match="unknown backend 'tpu'"):
        parse_result({**raw, "backend": "tpu"})


def test_mobilenetv1_alias():
    assert parse_result({"model": "mobilenetv1", "layers": {"dw1": {"t1_code": 2, "v1_code": 3, "t2_code": 6,
                                                                    "v2_code": 8, "tmax_code": 20}}}).model == "mobilenet_v1"
    assert ImportConfig(checkpoint="x", model="mobilenetv1", data="digits", out="y").model == "mobilenet_v1"


def _cli(*args):
    return CliRunner().invoke(main, ["import", *map(str, args)])


def test_a_pickle_that_is_not_a_state_dict_is_refused_unread(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"args": argparse.Namespace(lr=1)}, path)  # needs a class: weights_only refuses it
    out = tmp_path / "run"
    r = _cli("--research", path, "--model", "lenet5", "--data", "digits", "--out", out)
    assert r.exit_code == 2 and "weights_only" in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists()
    torch.save([torch.zeros(1)], path)
    r = _cli("--research", path, "--model", "lenet5", "--data", "digits", "--out", out)
    assert r.exit_code == 2 and "expected a state_dict" in r.output and not out.exists()


def test_another_width_names_the_key_and_shapes(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(research_lenet5(width=8).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"features.conv1.op.weight: the checkpoint has shape \[8, 1, 5, 5\].*\[6, 1, 5, 5\]"):
        import_research(ImportConfig(checkpoint=path, model="lenet5", data="digits", out=tmp_path / "run"))
    with pytest.raises(CheckpointError, match="no weights for layer conv1_1"):
        import_research(ImportConfig(checkpoint=path, model="vgg16", data="digits", out=tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_existing_output_and_unknown_backend(imported, research_ckpt):
    r = _cli("--research", research_ckpt[0], "--model", "lenet5", "--data", "digits", "--out", imported)
    assert r.exit_code == 2 and "--force" in r.output
    r = _cli("--research", research_ckpt[0], "--model", "lenet5", "--data", "digits", "--out", imported,
             "--backend", "tpu")
    assert r.exit_code == 2


def test_a_teacher_of_a_changed_architecture_is_refused(imported, tmp_path):
    import shutil

    run = tmp_path / "old"
    shutil.copytree(imported, run)
    meta = json.loads((run / "teacher.json").read_text())
    meta.pop("zoo")
    (run / "teacher.json").write_text(json.dumps(meta))
    load_teacher(run)  # no `zoo` (written before it existed) but weights that fit: loads
    meta["model"] = "alexnet"  # an AlexNet sidecar from before the research architecture: LeNet5-shaped weights
    (run / "teacher.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="zoo version 1.*alexnet changed in version 2"):
        load_teacher(run)


@pytest.mark.slow
def test_narrow_weights_make_the_tflite_export_bit_exact(research_ckpt, tmp_path):
    """TFLite re-derives int8 weight scales as max|w|/127; with fbgemm's −128 codes moved to −127
    at import, LiteRT reproduces the student's logits exactly on a 0..127 teacher."""
    from deploy_kit.export import ExportConfig, export
    from deploy_kit.verify import VerifyConfig, verify_exports

    run = tmp_path / "run"
    import_research(ImportConfig(checkpoint=research_ckpt[0], model="lenet5", data="digits", out=run, narrow_weights=True))
    teacher = load_teacher(run)
    assert teacher.meta["quantization"]["weight"] == [-127, 127]
    (run / "result.json").write_text(json.dumps(_research_result(teacher, model="lenet5")))
    export(ExportConfig(result_path=run / "result.json", teacher_path=run, targets=("tflite",), out=run / "exports"))
    report = verify_exports(VerifyConfig(exports=run / "exports", max_drop=100.0, min_agreement=100.0), progress=False)
    rows = [r for r in report.rows if r.checked and r.runtime == "litert"]
    assert len(rows) == 2 and all(r.max_abs_logit_diff == 0.0 for r in rows)


def test_affine_weight_channels_become_symmetric():
    """fbgemm's fused fake-quant leaves one-signed channels on an affine grid (zero point 127/−128);
    int8 runtimes take only symmetric per-channel weights: those channels are re-quantized."""
    from deploy_kit.research import symmetric_weights

    w = torch.tensor([[0.5, -0.25, 0.1], [-0.676, -0.0835, -0.3]])
    mapped = {"features.dw1.op.weight": w, "features.dw1.op.weight_fake_quant.scale": torch.tensor([0.5 / 127.5, 0.676 / 255]),
              "features.dw1.op.weight_fake_quant.zero_point": torch.tensor([0, 127], dtype=torch.int32)}
    assert symmetric_weights(mapped, (-128, 127)) == {"dw1": 1}
    assert mapped["features.dw1.op.weight_fake_quant.zero_point"].tolist() == [0, 0]
    assert torch.equal(mapped["features.dw1.op.weight"][0], w[0])  # symmetric channels untouched
    s1 = float(mapped["features.dw1.op.weight_fake_quant.scale"][1])
    assert s1 == pytest.approx(float(mapped["features.dw1.op.weight"][1].abs().max()) / 127.5)
    assert torch.allclose(mapped["features.dw1.op.weight"][1], w[1], atol=0.676 / 255)  # the research values, on its grid
