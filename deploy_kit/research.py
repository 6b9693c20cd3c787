"""Import a QAT checkpoint of the research system (public repo gfat-l/inference) as a teacher.

What it saves (`train_qat.py`): `torch.save(model.state_dict())` of the eager-mode QAT model
after `fuse_model()` and `prepare_qat` with `get_default_qat_qconfig(backend)`. Its naming:

    conv_seq blocks   NAME.conv.{weight, bias, weight_fake_quant.*, activation_post_process.*}
                      (train_qat.py fuses in eval mode, so BatchNorm is already folded into a
                      ConvReLU2d; a model fused in train mode keeps NAME.conv.bn.*: folded here)
    Linear+ReLU       NAME.linear.{weight, bias, weight_fake_quant.*, activation_post_process.*}
    plain layers      NAME.{weight, bias, weight_fake_quant.*, activation_post_process.*}
                      (the classifier, and every LeNet5 layer: LeNet5 fuses nothing)
    input             quant.activation_post_process.*   (LeNet5 has no QuantStub)

fbgemm/x86 quantize activations with reduce_range (codes 0..127) and weights per channel,
symmetric, on −128..127; qnnpack uses 0..255 and one weight scale per tensor. Both are kept:
deploykit builds its own QAT model with those code ranges and carries the checkpoint's scales,
zero points and weights into it, so every activation code means what it meant in the research
model (in the research arithmetic, measured: the same logits to the last bit).

LeNet5's activation fake-quant sits on the conv output *before* its ReLU (zero point > 0). That
is the same function as deploykit's fused block: ReLU then the same (s, z) — for x < 0 both give
code z (value 0), for x ≥ 0 the same round(x/s) + z. Its missing input quantizer is calibrated
on the training images (0..255 codes): the one thing that differs from the research model,
which feeds float pixels to conv1.
"""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deploy_kit import quant
from deploy_kit.data import Dataset, Normalization, load_dataset, normalize
from deploy_kit.errors import CheckpointError, ConfigError
from deploy_kit.fsutil import check_writable, sha256_file
from deploy_kit.models import ARCHITECTURES, ZooModel, build_model, canonical_model
from deploy_kit.teacher import SIDECAR_NAME, save_teacher
from deploy_kit.train import accuracy, predict, versions

# The research trainer's normalization (utils.py: CIFAR_MEAN / CIFAR_STD), used for 3-channel data.
RESEARCH_NORM = Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
BACKEND_RANGES = {"fbgemm": quant.CodeRanges((0, 127), (-128, 127), (0, 127)),
                  "x86": quant.CodeRanges((0, 127), (-128, 127), (0, 127)),
                  "qnnpack": quant.CodeRanges((0, 255), (-128, 127), (0, 255))}
BN_EPS = 1e-5  # nn.BatchNorm2d's default, which the research conv_seq blocks use
CALIBRATION_IMAGES = 2048


@dataclass(frozen=True)
class ImportConfig:
    checkpoint: Path
    model: str
    data: str
    out: Path
    backend: str = "fbgemm"
    force: bool = False
    seed: int = 0
    # TFLite's int8 weights are symmetric −127..127 by spec: its converter re-derives a channel's
    # scale as max|w|/127 and so moves every fbgemm channel that holds a −128 code (measured:
    # 3 of LeNet5's 5 layers, scale 1/127 off). `narrow` moves those codes to −127 at import.
    narrow_weights: bool = False

    def __post_init__(self):
        object.__setattr__(self, "model", canonical_model(self.model))
        if self.model not in ARCHITECTURES:
            raise ConfigError(f"unknown model {self.model!r}; choose one of: {', '.join(ARCHITECTURES)} (or mobilenetv1)")
        if self.backend not in BACKEND_RANGES:
            raise ConfigError(f"unknown backend {self.backend!r}; the research system trains with one of "
                              f"{', '.join(BACKEND_RANGES)}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint as a plain {name: tensor} dict. Only `weights_only=True` unpickling: any
    other object in the pickle is refused, never constructed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; pass the research system's {{model}}_qat_preconvert.pth")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"{path}: not a plain state_dict that loads with weights_only=True ({first}); "
                              "deploykit never unpickles arbitrary objects — save model.state_dict()") from None
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a state_dict (a dict of name → tensor), found "
                              f"{type(obj).__name__}; save model.state_dict() of the QAT model")
    return obj


def _prefix(sd: dict, name: str) -> str:
    """Where block `name` lives in the research state_dict."""
    for p in (f"{name}.conv", f"{name}.linear", name):
        if f"{p}.weight" in sd:
            return p
    raise CheckpointError(f"the checkpoint has no weights for layer {name} (looked for {name}.conv.weight, "
                          f"{name}.linear.weight, {name}.weight); is it a checkpoint of this model?")


def _folded(sd: dict, p: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias with the research ConvBnReLU2d's BatchNorm folded in (its eval forward:
    conv(x, fq(w·γ/σ)) − γμ/σ + β, σ = sqrt(var + eps))."""
    w, b = sd[f"{p}.weight"].float(), sd.get(f"{p}.bias")
    if f"{p}.bn.running_var" not in sd:
        return w, b
    gamma, beta = sd[f"{p}.bn.weight"].float(), sd[f"{p}.bn.bias"].float()
    mean, var = sd[f"{p}.bn.running_mean"].float(), sd[f"{p}.bn.running_var"].float()
    factor = gamma / torch.sqrt(var + BN_EPS)
    bias = beta - factor * mean + (b.float() * factor if b is not None else 0)
    return w * factor.reshape((-1,) + (1,) * (w.dim() - 1)), bias


def _block_state(sd: dict, p: str, target: str, used: set) -> dict[str, torch.Tensor]:
    w, b = _folded(sd, p)
    out = {f"{target}.weight": w}
    if b is not None:
        out[f"{target}.bias"] = b
    for key, value in sd.items():
        if key.startswith(f"{p}.weight_fake_quant.") or key.startswith(f"{p}.activation_post_process."):
            out[target + key[len(p):]] = value
            used.add(key)
    used.update(k for k in sd if k in (f"{p}.weight", f"{p}.bias") or k.startswith(f"{p}.bn."))
    scale = out.get(f"{target}.weight_fake_quant.scale")
    if scale is not None and scale.numel() == 1 and w.shape[0] > 1:  # qnnpack: one scale per tensor
        out[f"{target}.weight_fake_quant.scale"] = scale.expand(w.shape[0]).clone()
        out[f"{target}.weight_fake_quant.zero_point"] = torch.zeros(w.shape[0], dtype=torch.int32)
    return out


def symmetric_weights(mapped: dict, weight_range: tuple[int, int]) -> dict[str, int]:
    """Make every weight quantizer symmetric (zero point 0), in place; returns {layer: channels changed}.

    torch's fused fbgemm weight fake-quant left some channels whose weights all share one sign on
    an affine grid (zero point 127 or −128; measured on MobileNetV1's depthwise layers), which no
    int8 runtime's per-channel weights can hold. Those channels keep the research model's
    fake-quantized weights, re-quantized on the symmetric grid its observer would have chosen:
    scale max|w| / ((qmax − qmin) / 2), zero point 0."""
    lo, hi = weight_range
    changed = {}
    for key in [k for k in mapped if k.endswith(".weight_fake_quant.zero_point")]:
        zp = mapped[key]
        bad = zp != 0
        if not bool(bad.any()):
            continue
        prefix = key[: -len(".weight_fake_quant.zero_point")]
        w, s = mapped[f"{prefix}.weight"].clone(), mapped[f"{prefix}.weight_fake_quant.scale"].clone().float()
        shape = (-1,) + (1,) * (w.dim() - 1)
        zf = zp.float().reshape(shape)
        w_fq = (torch.clamp(torch.round(w / s.reshape(shape)) + zf, -128, 127) - zf) * s.reshape(shape)
        w[bad] = w_fq[bad]
        s[bad] = w_fq[bad].flatten(1).abs().amax(1).clamp_min(1e-12) / ((hi - lo) / 2)
        mapped[f"{prefix}.weight"], mapped[f"{prefix}.weight_fake_quant.scale"] = w, s
        mapped[key] = torch.zeros_like(zp)
        changed[prefix.split(".")[1]] = int(bad.sum())
    return changed


def map_state_dict(sd: dict, model: ZooModel) -> dict[str, torch.Tensor]:
    """The research names → deploykit's QAT state_dict (`features.NAME.op.*`, `classifier.NAME.op.*`,
    `quant.*`). Every research key must be used and every weight shape must fit."""
    used: set[str] = set()
    mapped: dict[str, torch.Tensor] = {}
    for name, block in model.blocks().items():
        parent = "features" if name in dict(model.features.named_children()) else "classifier"
        mapped.update(_block_state(sd, _prefix(sd, name), f"{parent}.{name}.op", used))
    for key, value in sd.items():
        if key.startswith("quant."):
            mapped[key] = value
            used.add(key)
    unused = sorted(k for k in sd if k not in used and not k.startswith("dequant."))
    if unused:
        raise CheckpointError(f"the checkpoint has layers this {model.arch} lacks: {', '.join(unused[:4])}"
                              f"{' …' if len(unused) > 4 else ''}; is --model right?")
    expected = model.state_dict()
    for key, value in mapped.items():
        if key.endswith((".weight", ".bias")) and key in expected and expected[key].shape != value.shape:
            raise CheckpointError(f"{key}: the checkpoint has shape {list(value.shape)}, deploykit's {model.arch} for "
                                  f"this data expects {list(expected[key].shape)}; check --model and --data "
                                  "(input channels, classes)")
    return mapped


def _calibrate_input(model: ZooModel, ds: Dataset, seed: int) -> None:
    """LeNet5 has no QuantStub: observe the input quantizer on training images (min/max)."""
    train = ds.split("train")
    pick = np.sort(np.random.default_rng(seed).choice(len(train), min(CALIBRATION_IMAGES, len(train)), replace=False))
    fq = model.quant.activation_post_process
    fq.enable_observer()
    fq.disable_fake_quant()
    fq(torch.from_numpy(normalize(train.images[pick], ds.norm)))
    fq.calculate_qparams()
    scale, zp = fq.activation_post_process.calculate_qparams()
    fq.scale.resize_(scale.shape).copy_(scale)
    fq.zero_point.resize_(zp.shape).copy_(zp)
    fq.enable_fake_quant()
    fq.disable_observer()


def _check_ranges(model: ZooModel, backend: str) -> None:
    for name, q in quant.activation_quant(model).items():
        if not q.qmin <= q.zero_point <= q.qmax:
            raise CheckpointError(f"layer {name}: zero point {q.zero_point} is outside {backend}'s codes "
                                  f"{q.qmin}..{q.qmax}; pass the --backend the checkpoint was trained with")


def _plain_fake_quant_accuracy(model: ZooModel, ds: Dataset) -> dict:
    """The research code's own evaluation: plain fake-quant forward (float convs and bias)."""
    quant.use_runtime_arithmetic(model, on=False)
    try:
        return {s: accuracy(predict(model, ds.split(s), ds), ds.split(s).labels) for s in ("val", "test")}
    finally:
        quant.use_runtime_arithmetic(model)


def import_research(cfg: ImportConfig) -> dict:
    """Read, map, check, evaluate and save; returns the teacher.json metadata."""
    check_writable(Path(cfg.out) / SIDECAR_NAME, cfg.force)
    sd = read_state_dict(cfg.checkpoint)
    ds = load_dataset(cfg.data, cfg.seed)
    if ds.input_shape[0] == 3:
        ds = Dataset(ds.spec, ds.classes, ds.splits, RESEARCH_NORM)
    ranges = BACKEND_RANGES[cfg.backend]
    if cfg.narrow_weights:
        ranges = dataclasses.replace(ranges, weight=(-127, 127))
    has_input_quant = any(k.startswith("quant.") for k in sd)
    if not has_input_quant:  # calibrated here: the finest grid, closest to the float input it replaces
        ranges = dataclasses.replace(ranges, input=(0, 255))
    model = quant.qat_model(build_model(cfg.model, ds.input_shape, len(ds.classes), 1.0), ranges)
    mapped = map_state_dict(sd, model)
    requantized = symmetric_weights(mapped, ranges.weight)
    try:
        model.load_state_dict(mapped, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{cfg.checkpoint}: does not fit a {cfg.model}: {str(exc).splitlines()[0][:200]}") from None
    missing = [k for k in model.state_dict() if k not in mapped and not k.startswith("quant.")]
    if missing:
        raise CheckpointError(f"{cfg.checkpoint}: the checkpoint lacks {missing[0]} of deploykit's {cfg.model}; is --model right?")
    if not has_input_quant:
        _calibrate_input(model, ds, cfg.seed)
    quant.disable_observers(model)
    model.eval()
    _check_ranges(model, cfg.backend)
    acc_runtime = {s: accuracy(predict(model, ds.split(s), ds), ds.split(s).labels) for s in ("val", "test")}
    meta = {
        "model": cfg.model, "width": 1.0, "backend": cfg.backend, "data": cfg.data, "seed": cfg.seed,
        "classes": list(ds.classes), "input_shape": list(ds.input_shape), "layout": "NCHW",
        "normalization": ds.norm.to_dict(), "quantization": ranges.to_dict(),
        "input_quant": quant.input_quant(model).to_dict(), "output_quant": quant.output_quant(model).to_dict(),
        "layers": {n: q.to_dict() for n, q in quant.activation_quant(model).items()},
        "accuracy": {"fake_quant": _plain_fake_quant_accuracy(model, ds), "int8": acc_runtime},
        "arithmetic": quant.ARITHMETIC,
        "source": {"research_checkpoint": str(cfg.checkpoint), "sha256": sha256_file(cfg.checkpoint),
                   "input_quant": "checkpoint" if has_input_quant else "calibrated",
                   "requantized_weight_channels": requantized},
        "config": {"model": cfg.model, "data": cfg.data, "backend": cfg.backend, "seed": cfg.seed,
                   "narrow_weights": cfg.narrow_weights},
        "versions": versions(),
    }
    save_teacher(model, meta, Path(cfg.out))
    return meta
