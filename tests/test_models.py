"""The zoo: every architecture builds, trains a step, goes through QAT, converts to INT8 and runs
on CPU; its taps are named, ordered and quantized exactly as the sidecar says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deploy_kit import quant
from deploy_kit.data import Dataset, Split, load_dataset, normalize
from deploy_kit.errors import CheckpointError, ConfigError
from deploy_kit.models import ARCHITECTURES, Tap, build_model
from deploy_kit.teacher import SIDECAR_NAME, WEIGHTS_NAME, load_teacher
from deploy_kit.train import TrainConfig, predict, train_teacher

# the smallest width that still gives every layer more than the 4-channel floor somewhere
TINY_WIDTH = 0.0625
EXPECTED_FIRST_TAPS = {"lenet5": ["conv1", "conv2", "fc1", "fc2"], "nin": ["conv1", "cccp1", "cccp2"],
                       "mobilenet_v1": ["conv1", "dw1", "pw1"], "vgg16": ["conv1_1", "conv1_2", "conv2_1"],
                       "vgg19": ["conv1_1", "conv1_2", "conv2_1"], "alexnet": ["conv1", "conv2", "conv3"]}
TAP_COUNTS = {"lenet5": 4, "nin": 9, "mobilenet_v1": 27, "vgg16": 14, "vgg19": 16, "alexnet": 7}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _small(ds: Dataset, channels: int, n_train: int = 64, n_eval: int = 32) -> Dataset:
    """A few real digits, optionally replicated to 3 channels (the 3×32×32 form of every model)."""
    def cut(split: Split, n: int) -> Split:
        images = split.images[:n]
        if channels == 3:
            images = np.repeat(images, 3, axis=-1)
        return Split(np.ascontiguousarray(images), split.labels[:n])
    splits = {"train": cut(ds.split("train"), n_train), "val": cut(ds.split("val"), n_eval),
              "test": cut(ds.split("test"), n_eval)}
    norm = type(ds.norm)(ds.norm.mean * channels, ds.norm.std * channels)
    return Dataset(ds.spec, ds.classes, splits, norm)


def _fake_quant_tap_codes(model, x: torch.Tensor, layers: dict) -> dict:
    """Codes of the fake-quant (QAT) model's tap outputs, recovered with the sidecar's (s, z)."""
    seen = {}
    hooks = [tap.register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, o.detach()))
             for name, tap in model.taps().items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {n: torch.round(v / layers[n]["scale"]) + layers[n]["zero_point"] for n, v in seen.items()}


def _one_step(model, x, y, lr=1e-3):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_architecture_trains_converts_and_runs_int8(arch, channels, digits):
    """build → one float step → fold BN → QAT → one QAT step → freeze → INT8 on CPU, with the
    same calls `train_teacher` makes (the sidecar's layers are `quant.activation_quant`)."""
    ds = _small(digits, channels)
    torch.manual_seed(0)
    x = torch.from_numpy(normalize(ds.split("train").images[:32], ds.norm))
    y = torch.from_numpy(ds.split("train").labels[:32])
    model = build_model(arch, (channels, 32, 32), 10, TINY_WIDTH)
    assert np.isfinite(_one_step(model, x, y))
    quant.prepare_qat(quant.fold_batchnorm(model))
    assert np.isfinite(_one_step(model, x, y))
    quant.freeze(model.eval())
    layers = {n: q.to_dict() for n, q in quant.activation_quant(model).items()}  # what the sidecar records
    assert list(layers)[:len(EXPECTED_FIRST_TAPS[arch])] == EXPECTED_FIRST_TAPS[arch]
    assert len(layers) == TAP_COUNTS[arch]

    int8 = quant.convert_int8(model, "qnnpack")
    logits = int8(x)
    assert logits.shape == (32, 10) and torch.isfinite(logits).all()
    codes = quant.int8_tap_codes(int8, x)
    assert list(codes) == list(layers)
    fq_codes = _fake_quant_tap_codes(model, x, layers)
    for name, (q, scale, zero_point) in codes.items():
        layer = layers[name]
        assert scale == pytest.approx(layer["scale"], rel=1e-6), name
        assert zero_point == layer["zero_point"], name
        assert layer["qmin"] <= int(q.min()) and int(q.max()) <= layer["qmax"], name
        assert int(q.min()) >= zero_point, name  # after a ReLU nothing sits below the zero point
        diff = (q.to(torch.float32) - fq_codes[name]).abs()
        # The frozen model computes in the runtimes' integer arithmetic, so PyTorch's INT8 kernels
        # agree on ≥ 95% of codes at every tap; qnnpack's own requantization still rounds a few
        # boundary codes by one (the bound was 80% / 97% with plain fake-quant evaluation).
        same, near = (diff == 0).float().mean().item(), (diff <= 1).float().mean().item()
        assert same >= 0.95 and near >= 0.999, f"{arch}/{name}: {same:.1%} equal, {near:.1%} within ±1"


def test_tap_names_and_blocks_are_stable():
    model = build_model("vgg16", (3, 32, 32), 10, width=0.125)
    taps = model.taps()
    assert all(isinstance(t, Tap) for t in taps.values())
    assert list(taps)[-2:] == ["conv5_3", "fc1"]  # the research VGG16 head: fc1 (ReLU) + fc2
    assert "fc2" in model.blocks() and "fc2" not in taps  # the logits are never approximated
    names = [n for n, _ in model.named_modules()]
    assert "features.conv1_1.tap" in names  # the name an exporter finds in the ONNX scopes


def test_tap_fn_replaces_the_activation():
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 32, 32), 10, width=0.5).eval()
    x = torch.randn(2, 1, 32, 32)
    before = model(x)
    model.taps()["conv1"].fn = torch.zeros_like
    after = model(x)
    assert not torch.allclose(before, after)
    model.taps()["conv1"].fn = None
    assert torch.allclose(before, model(x))


@pytest.mark.parametrize("width", [1.0, 0.25, 2.0])
def test_width_scales_channels(width):
    model = build_model("nin", (3, 32, 32), 7, width=width)
    assert model.blocks()["conv1"].op.out_channels == max(4, round(192 * width))
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


def test_unknown_model_and_bad_width_are_config_errors():
    with pytest.raises(ConfigError, match="unknown model 'resnet'.*lenet5"):
        build_model("resnet", (1, 32, 32), 10)
    with pytest.raises(ConfigError, match="width"):
        build_model("lenet5", (1, 32, 32), 10, width=0)
    with pytest.raises(ConfigError, match="unknown model"):
        TrainConfig(model="resnet")
    for bad in (dict(batch_size=0), dict(lr=0), dict(max_train=-5), dict(threads=0), dict(qat_epochs=0)):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)


# ---- the checkpoint ----------------------------------------------------------------------------

def test_reload_reproduces_logits(lenet_teacher, digits):
    meta = json.loads((lenet_teacher / SIDECAR_NAME).read_text())
    first, second = load_teacher(lenet_teacher), load_teacher(lenet_teacher / WEIGHTS_NAME)
    test = Split(digits.split("test").images[:128], digits.split("test").labels[:128])
    a, b = predict(first.model, test, digits), predict(second.model, test, digits)
    np.testing.assert_array_equal(a, b)
    # the reloaded fake-quant model is the one that was evaluated at training time
    full = predict(first.model, digits.split("test"), digits)
    acc = round(100.0 * float((full.argmax(1) == digits.split("test").labels).mean()), 2)
    assert acc == meta["accuracy"]["fake_quant"]["test"]
    int8 = quant.convert_int8(first.model, meta["backend"])
    int8_logits = predict(int8, digits.split("test"), digits)
    acc8 = round(100.0 * float((int8_logits.argmax(1) == digits.split("test").labels).mean()), 2)
    assert acc8 == meta["accuracy"]["int8"]["test"]


def test_sidecar_records_what_later_stages_need(lenet_teacher):
    meta = json.loads((lenet_teacher / SIDECAR_NAME).read_text())
    for key in ("model", "width", "backend", "data", "seed", "classes", "input_shape", "layout", "normalization",
                "input_quant", "output_quant", "layers", "accuracy", "weights_sha256", "config", "versions"):
        assert key in meta, key
    assert meta["format"] == "deploykit-teacher/1"
    assert meta["classes"] == [str(i) for i in range(10)] and meta["input_shape"] == [1, 32, 32]
    assert list(meta["layers"]) == ["conv1", "conv2", "fc1", "fc2"]
    for layer in meta["layers"].values():
        assert layer["scale"] > 0 and layer["qmin"] == 0 and layer["qmax"] == 255
    assert set(meta["accuracy"]) == {"float", "fake_quant", "int8"}
    assert meta["versions"]["torch"].startswith("2.13")


def _copy_run(src, dst):
    dst.mkdir()
    for name in (SIDECAR_NAME, WEIGHTS_NAME):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_checkpoint_of_another_model_is_refused(lenet_teacher, tmp_path):
    with pytest.raises(CheckpointError, match="is a lenet5, but vgg16 was asked for"):
        load_teacher(lenet_teacher, expect_model="vgg16")


def test_checkpoint_with_another_width_is_refused(lenet_teacher, tmp_path):
    run = _copy_run(lenet_teacher, tmp_path / "run")
    meta = json.loads((run / SIDECAR_NAME).read_text())
    meta["width"] = 0.5
    (run / SIDECAR_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"does not fit a lenet5 \(width 0.5\)"):
        load_teacher(run)


def test_corrupted_weights_are_refused(lenet_teacher, tmp_path):
    run = _copy_run(lenet_teacher, tmp_path / "run")
    weights = bytearray((run / WEIGHTS_NAME).read_bytes())
    weights[-3] ^= 0xFF
    (run / WEIGHTS_NAME).write_bytes(bytes(weights))
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        load_teacher(run)


def test_truncated_weights_with_matching_hash_are_refused(lenet_teacher, tmp_path):
    """Someone re-hashed a damaged file: the loader must still fail with a CheckpointError."""
    from deploy_kit.fsutil import sha256_file

    run = _copy_run(lenet_teacher, tmp_path / "run")
    data = (run / WEIGHTS_NAME).read_bytes()
    (run / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    meta = json.loads((run / SIDECAR_NAME).read_text())
    meta["weights_sha256"] = sha256_file(run / WEIGHTS_NAME)
    (run / SIDECAR_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError):
        load_teacher(run)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "something-else"}), json.dumps([1, 2])])
def test_bad_sidecar_is_refused(lenet_teacher, tmp_path, content):
    run = _copy_run(lenet_teacher, tmp_path / "run")
    (run / SIDECAR_NAME).write_text(content)
    with pytest.raises(CheckpointError):
        load_teacher(run)


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no teacher at"):
        load_teacher(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / SIDECAR_NAME).write_text(json.dumps({"format": "deploykit-teacher/1", "model": "lenet5"}))
    with pytest.raises(CheckpointError, match="lacks width, data, seed, classes, input_shape"):
        load_teacher(run)


def test_sidecar_without_its_weights_is_refused(lenet_teacher, tmp_path):
    run = _copy_run(lenet_teacher, tmp_path / "run")
    (run / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match="teacher.safetensors is missing"):
        load_teacher(run)


def test_research_system_architectures():
    """Layer shapes of the research system's model files (gfat-l/inference) at width 1, 3×32×32."""
    alex = build_model("alexnet", (3, 32, 32), 10)
    assert alex.features.conv1.op.kernel_size == (5, 5) and alex.features.conv1.op.stride == (2, 2)
    assert alex.features.conv2.op.kernel_size == (5, 5)
    assert [(b.op.in_features, b.op.out_features) for b in alex.classifier.children() if hasattr(b, "op")] == \
        [(1024, 512), (512, 256), (256, 10)]
    nin = build_model("nin", (3, 32, 32), 10)
    assert len(nin.classifier) == 0 and nin.features.cccp6.op.out_channels == 10  # logits = cccp6's average
    assert nin.features.pool1.padding == 1 and nin(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    vgg = build_model("vgg16", (3, 32, 32), 10)
    assert [n for n in vgg.classifier.named_children() if n[0].startswith("fc")][0][1].op.in_features == 512


def test_mobilenetv1_is_an_alias():
    assert build_model("mobilenetv1", (3, 32, 32), 10).arch == "mobilenet_v1"
    assert TrainConfig(model="mobilenetv1").model == "mobilenet_v1"
