"""INT8 QAT: BN folding, the fake-quant scheme, INT8 conversion and the codes at each tap."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from deploy_kit import quant
from deploy_kit.data import load_dataset, normalize
from deploy_kit.errors import ConfigError
from deploy_kit.models import build_model
from deploy_kit.teacher import SIDECAR_NAME, load_teacher


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def teacher(lenet_teacher):
    return load_teacher(lenet_teacher)


@pytest.fixture(scope="module")
def sidecar(lenet_teacher):
    return json.loads((lenet_teacher / SIDECAR_NAME).read_text())


def _x(ds, n=64):
    return torch.from_numpy(normalize(ds.split("test").images[:n], ds.norm))


def _trained_bn_model():
    """A float model whose BatchNorm statistics are not the identity (so folding has work to do)."""
    torch.manual_seed(0)
    model = build_model("vgg16", (3, 32, 32), 10, width=0.125)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32) * 2 + 0.5)
    return model.eval()


def test_fold_batchnorm_keeps_the_function():
    model = _trained_bn_model()
    x = torch.randn(4, 3, 32, 32)
    before = model(x)
    quant.fold_batchnorm(model)
    assert all(isinstance(b.bn, torch.nn.Identity) for b in model.blocks().values())
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)


def test_qat_model_quantizes_every_block_and_the_input():
    model = quant.qat_model(build_model("nin", (3, 32, 32), 10, width=0.125))
    assert isinstance(model.quant, torch.ao.quantization.QuantStub)
    for name, block in model.blocks().items():
        assert hasattr(block.op, "weight_fake_quant"), name
        assert hasattr(block.op, "activation_post_process"), name
    # the taps themselves carry no observer: the activation is quantized by the fused Conv+ReLU
    assert all(not hasattr(t, "activation_post_process") for t in model.taps().values())


def test_weights_are_int8_per_channel_symmetric(teacher):
    for name, block in teacher.model.blocks().items():
        codes, scale = quant.weight_quant(block)
        assert codes.dtype == torch.int8 and int(codes.min()) >= -127 and int(codes.max()) <= 127, name
        assert scale.shape == (block.op.weight.shape[0],), name
        # symmetric: each channel's largest |weight| lands on code ±127
        per_channel = codes.reshape(codes.shape[0], -1).abs().amax(1)
        assert (per_channel == 127).float().mean() > 0.9, name
        assert int(block.op.weight_fake_quant.zero_point.abs().max()) == 0, name


def test_activation_quant_matches_sidecar(teacher, sidecar):
    aq = quant.activation_quant(teacher.model)
    assert list(aq) == list(sidecar["layers"])
    for name, q in aq.items():
        assert q.to_dict() == sidecar["layers"][name]
        assert (q.qmin, q.qmax) == (0, 255) and q.zero_point == 0  # ReLU output: min observed is 0
    assert quant.input_quant(teacher.model).to_dict() == sidecar["input_quant"]
    assert sidecar["arithmetic"] == quant.ARITHMETIC  # its accuracies were measured in the runtime arithmetic
    assert quant.output_quant(teacher.model).to_dict() == sidecar["output_quant"]


def test_int8_tap_codes_agree_with_sidecar_and_fake_quant(teacher, sidecar, digits):
    x = _x(digits)
    int8 = quant.convert_int8(teacher.model, sidecar["backend"])
    codes = quant.int8_tap_codes(int8, x)
    values = {}
    hooks = [t.register_forward_hook(lambda m, i, o, n=n: values.__setitem__(n, o.detach()))
             for n, t in teacher.model.taps().items()]
    with torch.no_grad():
        teacher.model(x)
    for h in hooks:
        h.remove()
    for name, (q, scale, zero_point) in codes.items():
        layer = sidecar["layers"][name]
        assert q.dtype == torch.uint8
        assert scale == pytest.approx(layer["scale"], rel=1e-6) and zero_point == layer["zero_point"]
        # the fake-quant model's activation is on the same grid: value / s + z is an integer code
        fq = values[name] / layer["scale"] + layer["zero_point"]
        assert torch.allclose(fq, fq.round(), atol=1e-3), name
        same = (q.float() == fq.round()).float().mean().item()
        within_one = ((q.float() - fq.round()).abs() <= 1).float().mean().item()
        # the frozen teacher computes in the runtimes' integer arithmetic (int32 bias, float32
        # requantization); qnnpack rounds its requantization its own way on very few codes
        assert same >= 0.999 and within_one == 1.0, f"{name}: {same:.3%} equal, {within_one:.3%} within ±1"
        assert int(q.max()) > 0, f"{name}: an all-zero activation tells nothing"


def test_int8_and_fake_quant_predictions_agree(teacher, sidecar, digits):
    x = _x(digits, 256)
    int8 = quant.convert_int8(teacher.model, sidecar["backend"])
    with torch.no_grad():
        agree = (int8(x).argmax(1) == teacher.model(x).argmax(1)).float().mean().item()
    assert agree >= 0.999


def test_export_form_has_weights_on_the_int8_grid(teacher, digits):
    x = _x(digits, 32)
    exported = quant.export_form(teacher.model)
    # export_form traces the fake-quant arithmetic (torch.onnx turns it into Q/DQ); compare it
    # with the teacher in the same arithmetic
    fake_quant = quant.use_runtime_arithmetic(copy.deepcopy(teacher.model), on=False)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), fake_quant(x), rtol=1e-5, atol=1e-5)
    for name, block in exported.blocks().items():
        codes, scale = quant.weight_quant(teacher.model.blocks()[name])
        shape = (-1,) + (1,) * (codes.dim() - 1)
        ratio = block.op.weight.detach() / scale.reshape(shape)
        np.testing.assert_allclose(ratio.numpy(), codes.float().numpy(), atol=1e-4)


@pytest.mark.parametrize("backend", quant.BACKENDS)
def test_convert_int8_for_every_backend(teacher, digits, backend):
    int8 = quant.convert_int8(teacher.model, backend)
    out = int8(_x(digits, 8))
    assert out.shape == (8, 10) and torch.isfinite(out).all()


def test_bad_backend_and_float_model_are_config_errors(teacher):
    with pytest.raises(ConfigError, match="unknown quantized backend 'tpu'"):
        quant.convert_int8(teacher.model, "tpu")
    with pytest.raises(ConfigError, match="is this a QAT model"):
        quant.activation_quant(build_model("lenet5", (1, 32, 32), 10))


def test_freeze_stops_the_observers(teacher, digits):
    model = copy.deepcopy(teacher.model).train()
    before = {n: q.scale for n, q in quant.activation_quant(model).items()}
    with torch.no_grad():
        model(_x(digits, 32) * 5)  # a wildly different range would move a live observer
    after = {n: q.scale for n, q in quant.activation_quant(model).items()}
    assert before == after


def test_runtime_arithmetic_binds_each_block_to_its_input_grid():
    lenet = quant.qat_model(build_model("lenet5", (1, 32, 32), 10))
    quant.disable_observers(lenet)
    blocks, acts = lenet.blocks(), quant.activation_quant(lenet)
    assert blocks["conv1"].op.input_quant == quant.input_quant(lenet)
    assert blocks["fc1"].op.input_quant == acts["conv2"]  # max pool and flatten keep the grid
    nin = quant.qat_model(build_model("nin", (3, 32, 32), 10, width=0.125))
    quant.disable_observers(nin)
    last = quant.activation_quant(nin)["cccp6"]
    # the int8 global pool keeps the grid: NiN's logits (its average, no fc) are on cccp6's grid
    assert nin.pool.grid == last and quant.output_quant(nin) == last
    mobile = quant.qat_model(build_model("mobilenet_v1", (3, 32, 32), 10, width=0.125))
    quant.disable_observers(mobile)
    assert mobile.blocks()["fc"].op.input_quant == quant.activation_quant(mobile)["pw13"]
    unbound = quant.use_runtime_arithmetic(copy.deepcopy(lenet), on=False)
    assert all(b.op.input_quant is None for b in unbound.blocks().values())


def test_bias_codes_round_half_to_even_on_the_int32_grid():
    w_scale = torch.tensor([0.5, 0.25, 1e-12])
    codes, scale = quant.bias_codes(torch.tensor([1.25, -0.375, 1.0]), 1.0, w_scale)
    assert scale.dtype == torch.float32
    # 1.25/0.5 = 2.5 → 2 (even), −0.375/0.25 = −1.5 → −2 (even); an overflowing bias saturates
    assert codes.tolist() == [2, -2, 2**31 - 1]


def test_runtime_arithmetic_rounds_the_requantized_sum_half_to_even():
    """One Linear block by hand: y_q = clamp(round_half_even((Σ x_q·w_q + b_q)·M)), M = s_in·s_w/s_out."""
    model = quant.qat_model(build_model("lenet5", (1, 32, 32), 10))
    op = model.blocks()["fc3"].op
    rows = [(0, 1, 0.0), (1, 1, 0.0), (0, 1, 1.0), (0, -1, 0.0), (2, 1, 0.0), (3, 1, 0.7)]  # (input, weight code, bias)
    with torch.no_grad():
        op.weight.zero_()
        op.bias.zero_()
        for out, (i, w, b) in enumerate(rows):
            op.weight[out, i], op.bias[out] = 0.5 * w, b
    op.weight_fake_quant.scale = torch.full((op.out_features,), 0.5)  # weight codes ±1, s_w = 0.5
    op.weight_fake_quant.zero_point = torch.zeros(op.out_features, dtype=torch.int32)
    op.activation_post_process.scale.fill_(1.0)  # s_out = 1, z = 0, codes 0..255 → M = 0.5
    op.activation_post_process.zero_point.fill_(0)
    quant.disable_observers(model)
    op.input_quant = quant.ActivationQuant(1.0, 0)  # x holds its own codes
    x = torch.zeros(1, op.in_features)
    x[0, :4] = torch.tensor([5.0, 7.0, 600.0, 4.0])
    with torch.no_grad():
        y = op.eval()(x)[0, :6].tolist()
    # 2.5 → 2, 3.5 → 4 (half to even); bias 1.0 is b_q = 2: (5 + 2)·0.5 = 3.5 → 4; −2.5 → 0; 300 → 255;
    # bias 0.7 is b_q = round(1.4) = 1: (4 + 1)·0.5 = 2.5 → 2, where float fake-quant gives 2 + 0.7 → 3
    assert y == [2, 4, 4, 0, 255, 2]
    quant.use_runtime_arithmetic(model, on=False)
    with torch.no_grad():
        assert op(x)[0, 5].item() == 3


def test_global_pool_rounds_the_mean_code_half_to_even_on_its_input_grid():
    pool = quant.GridAveragePool(1)
    pool.grid = quant.ActivationQuant(0.1, 0)
    codes = torch.tensor([[0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3], [1, 2, 2, 2]], dtype=torch.float32)
    x = (codes * np.float32(0.1)).reshape(1, 4, 2, 2)
    with torch.no_grad():
        got = pool.eval()(x).reshape(-1) / np.float32(0.1)
    assert torch.round(got).tolist() == [0, 2, 2, 2]  # 0.5 → 0, 1.5 → 2, 2.5 → 2, 1.75 → 2
    pool.grid = None
    torch.testing.assert_close(pool(x).reshape(-1), x.mean((-2, -1)).reshape(-1))  # unbound: the float pool


def test_runtime_arithmetic_stays_exact_past_float32_integers():
    """1,000 inputs at code 255 times weight codes 127: partial sums pass 2^24, where float32
    would round them; the block then accumulates in float64 and still matches int64."""
    op = quant.Linear(1000, 2, qconfig=quant.qat_qconfig())
    op.activation_post_process = quant.qat_qconfig().activation()
    codes = np.full((2, 1000), 127)
    codes[1, ::3] = -101
    with torch.no_grad():
        op.weight.copy_(torch.from_numpy(codes).float())
        op.bias.copy_(torch.tensor([3.0, -7.0]))
    op.weight_fake_quant.scale = torch.ones(2)
    op.weight_fake_quant.zero_point = torch.zeros(2, dtype=torch.int32)
    op.activation_post_process.scale.fill_(2.0**18)  # power of two: M is exact, so is the reference
    op.activation_post_process.zero_point.fill_(0)
    op.input_quant = quant.ActivationQuant(1.0, 0)
    x = np.full(1000, 255)
    x[::7] = 254
    assert op._integer_params().dtype == torch.float64
    with torch.no_grad():
        got = op.eval()._runtime_forward(torch.from_numpy(x).float()[None])[0] / 2.0**18
    acc = codes.astype(np.int64) @ x + np.array([3, -7])
    assert got.tolist() == np.clip(np.round(acc / 2.0**18), 0, 255).tolist()
