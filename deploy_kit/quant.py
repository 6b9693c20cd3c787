"""INT8 quantization-aware training. The only module that touches `torch.ao.quantization`
(deprecated upstream but still shipped in torch 2.13), so replacing it later is one file.

Scheme: BatchNorm is folded into the conv before QAT, so each block is Conv/Linear(+bias) → ReLU
→ uint8 per-tensor activation (0..255); weights are int8 per-channel symmetric in −127..127.
The symmetric narrow weight range matters: a converter that re-derives a channel's scale as
max|w|/127 (TFLite does) then lands on exactly our scale and our codes.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.ao.quantization as tq
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from deploy_kit.errors import ConfigError
from deploy_kit.lut import ActivationQuant
from deploy_kit.models import Block, ZooModel

BACKENDS = ("qnnpack", "x86", "fbgemm")


def qat_qconfig() -> tq.QConfig:
    act = tq.FakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                    dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=False)
    weight = tq.FakeQuantize.with_args(observer=tq.PerChannelMinMaxObserver, quant_min=-127, quant_max=127,
                                       dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    return tq.QConfig(activation=act, weight=weight)


def fold_batchnorm(model: ZooModel) -> ZooModel:
    """Fold every block's BatchNorm into its conv (in place); the block's bn becomes Identity."""
    model.eval()
    for block in model.blocks().values():
        if isinstance(block.bn, nn.BatchNorm2d):
            block.op = fuse_conv_bn_eval(block.op, block.bn)
            block.bn = nn.Identity()
    return model


def prepare_qat(model: ZooModel) -> ZooModel:
    """Folded float model → QAT model (fake-quant weights and activations), in place."""
    model.train()
    for block in model.blocks().values():
        if isinstance(block.act, nn.ReLU):
            tq.fuse_modules_qat(block, [["op", "act"]], inplace=True)
    model.quant, model.dequant = tq.QuantStub(), tq.DeQuantStub()
    model.qconfig = qat_qconfig()
    for tap in model.taps().values():
        tap.qconfig = None
    tq.prepare_qat(model, inplace=True)
    return model


def qat_model(arch_model: ZooModel) -> ZooModel:
    """The QAT structure for a fresh float model (used to load a saved teacher)."""
    return prepare_qat(fold_batchnorm(arch_model))


def freeze(model: ZooModel) -> ZooModel:
    """End of QAT: take weight scales from the final weights, then stop every observer."""
    for m in model.modules():
        if hasattr(m, "weight_fake_quant"):
            # Forget the min/max seen during training: the scale must be max|w|/127 of the final
            # weights (every channel then holds a ±127 code), or TFLite re-derives another scale.
            m.weight_fake_quant.activation_post_process.reset_min_max_vals()
            m.weight_fake_quant.enable_observer()
            m.weight_fake_quant(m.weight.detach())
    model.apply(tq.disable_observer)
    return model


def disable_observers(model: ZooModel) -> None:
    model.apply(tq.disable_observer)


def _fake_quant_of(module: nn.Module) -> tq.FakeQuantize:
    fq = getattr(module, "activation_post_process", None)
    if not isinstance(fq, tq.FakeQuantize):
        raise ConfigError(f"{type(module).__name__} carries no activation fake-quant; is this a QAT model?")
    return fq


def _as_quant(fq: tq.FakeQuantize) -> ActivationQuant:
    return ActivationQuant(float(fq.scale.reshape(-1)[0]), int(fq.zero_point.reshape(-1)[0]),
                           int(fq.quant_min), int(fq.quant_max))


def activation_quant(model: ZooModel) -> "OrderedDict[str, ActivationQuant]":
    """The (s, z, qmin, qmax) of every tap's activation, in forward order."""
    return OrderedDict((name, _as_quant(_fake_quant_of(model.blocks()[name].op))) for name in model.taps())


def input_quant(model: ZooModel) -> ActivationQuant:
    return _as_quant(_fake_quant_of(model.quant))


def output_quant(model: ZooModel) -> ActivationQuant:
    last = list(model.classifier.children())[-1]
    return _as_quant(_fake_quant_of(last.op))


def weight_quant(block: Block) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel int8 weight codes and scales of a QAT block."""
    fq = block.op.weight_fake_quant
    scale = fq.scale.detach().clone()
    shape = (-1,) + (1,) * (block.op.weight.dim() - 1)
    codes = torch.clamp(torch.round(block.op.weight.detach() / scale.reshape(shape)), fq.quant_min, fq.quant_max)
    return codes.to(torch.int8), scale


def export_form(model: ZooModel) -> ZooModel:
    """A copy whose weights are already fake-quantized (stored on the int8 grid, as float), so
    torch.onnx sees plain Conv/Gemm weights and only the activation Q/DQ pairs; the exporter
    re-attaches int8 weights itself, with the ranges it needs."""
    out = copy.deepcopy(model).eval()
    for block in out.blocks().values():
        if hasattr(block.op, "weight_fake_quant"):
            codes, scale = weight_quant(block)
            shape = (-1,) + (1,) * (codes.dim() - 1)
            block.op.weight.data = codes.float() * scale.reshape(shape)
            block.op.weight_fake_quant = nn.Identity()
    return out


def convert_int8(model: ZooModel, backend: str = "qnnpack") -> ZooModel:
    """QAT model → a real INT8 model (quantized kernels) for `backend`."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown quantized backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    torch.backends.quantized.engine = backend
    return tq.convert(copy.deepcopy(model).eval(), inplace=False)


def int8_tap_codes(int8_model: ZooModel, x: torch.Tensor) -> "OrderedDict[str, tuple[torch.Tensor, float, int]]":
    """Run the INT8 model and return each tap's (uint8 codes, scale, zero_point)."""
    seen: OrderedDict = OrderedDict()
    hooks = [tap.register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, (o.int_repr(), o.q_scale(), o.q_zero_point())))
             for name, tap in int8_model.taps().items()]
    try:
        with torch.no_grad():
            int8_model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen
