"""Channel surgery on the float zoo models: which layers can lose channels, what a channel
configuration costs in MACs, and removing channels physically with torch-pruning (DepGraph),
which also shrinks the coupled BatchNorm, the next conv's or linear's inputs (through Flatten)
and depthwise groups.

A train run stores only the QAT teacher (BatchNorm folded into the conv, a bias added). Pruning
acts on a float model in the zoo's own form (Conv without bias → BN): `float_from_teacher`
rebuilds one from the teacher's float (latent, not fake-quantized) weights, with each BN set to
an exact identity-plus-bias whose running statistics are those measured on training images, so
that BN re-estimation after pruning maps the shifted activations back to the teacher's scale.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from deploy_kit.errors import ConfigError
from deploy_kit.models import ZooModel, build_model

# Blocks whose output channels mean something fixed: NiN's last conv emits one map per class.
FIXED_LAYERS = {"nin": ("cccp6",)}


@dataclass(frozen=True)
class LayerInfo:
    """One block of the chain, as the cost model and the agent see it."""

    name: str
    kind: str  # "conv" | "depthwise" | "linear"
    c_in: int
    c_out: int
    kernel: int
    stride: int
    out_hw: int  # output pixels (1 for a linear)
    in_mult: int  # inputs per channel of the previous block (Flatten of an h×w map: h·w)
    prunable: bool

    def macs(self, c_in: int, c_out: int) -> int:
        if self.kind == "depthwise":
            return c_out * self.kernel ** 2 * self.out_hw
        return c_in * self.in_mult * c_out * self.kernel ** 2 * self.out_hw

    @property
    def params(self) -> int:
        if self.kind == "depthwise":
            return self.c_out * self.kernel ** 2
        return self.c_in * self.in_mult * self.c_out * self.kernel ** 2


def layer_infos(model: ZooModel, in_shape: tuple[int, int, int]) -> "OrderedDict[str, LayerInfo]":
    """Every block in forward order, with its shape read off one forward pass."""
    out_hw, in_elems = {}, {}
    blocks = model.blocks()

    def record(name):
        def hook(_module, inputs, output):
            out_hw[name], in_elems[name] = output[0, 0].numel(), inputs[0][0].numel()
        return hook

    hooks = [b.op.register_forward_hook(record(n)) for n, b in blocks.items()]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *in_shape))
    finally:
        for h in hooks:
            h.remove()
    fixed = FIXED_LAYERS.get(model.arch, ())
    infos, prev_c = OrderedDict(), in_shape[0]
    names = list(blocks)
    for i, (name, block) in enumerate(blocks.items()):
        op = block.op
        if isinstance(op, nn.Conv2d):
            depthwise = op.groups > 1 and op.groups == op.in_channels
            kind, c_in, c_out, k, s = ("depthwise" if depthwise else "conv"), op.in_channels, op.out_channels, op.kernel_size[0], op.stride[0]
            mult, hw = 1, out_hw[name]
        else:
            kind, c_in, c_out, k, s, hw = "linear", op.in_features, op.out_features, 1, 1, 1
            mult = in_elems[name] // prev_c
            c_in = prev_c
        prunable = i < len(names) - 1 and kind != "depthwise" and name not in fixed
        infos[name] = LayerInfo(name, kind, c_in, c_out, k, s, hw, mult, prunable)
        prev_c = c_out
    return infos


def full_channels(infos: "OrderedDict[str, LayerInfo]") -> dict[str, int]:
    return {n: i.c_out for n, i in infos.items() if i.prunable}


def config_key(channels: dict[str, int]) -> tuple:
    """A hashable key of one channel configuration, whatever the order of its layers."""
    return tuple(sorted(channels.items()))


def resolve_channels(infos: "OrderedDict[str, LayerInfo]", channels: dict[str, int]) -> list[tuple[LayerInfo, int, int]]:
    """(layer, c_in, c_out) of every block under `channels` (prunable layers' output counts);
    a depthwise block follows its input, everything else keeps its own count."""
    out, prev, first = [], None, True
    for info in infos.values():
        c_in = info.c_in if first else prev
        c_out = channels.get(info.name, info.c_out) if info.prunable else (c_in if info.kind == "depthwise" else info.c_out)
        out.append((info, c_in, c_out))
        prev, first = c_out, False
    return out


def macs(infos: "OrderedDict[str, LayerInfo]", channels: dict[str, int]) -> int:
    return sum(i.macs(ci, co) for i, ci, co in resolve_channels(infos, channels))


# ----------------------------------------------------------------------------- physical pruning

def _out_pruner(op: nn.Module):
    import torch_pruning as tp

    return tp.prune_conv_out_channels if isinstance(op, nn.Conv2d) else tp.prune_linear_out_channels


def _dependency_graph(model: ZooModel, in_shape: tuple[int, int, int]):
    import torch_pruning as tp

    with torch.enable_grad():  # DepGraph traces autograd; callers may be under no_grad (float_from_teacher)
        return tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *in_shape), verbose=False)


def l1_order(op: nn.Module) -> torch.Tensor:
    """Output channels from the weakest to the strongest by the L1 norm of their weights."""
    return op.weight.detach().abs().flatten(1).sum(1).argsort()


def prune_to(model: ZooModel, channels: dict[str, int], in_shape: tuple[int, int, int],
             keep: str = "l1") -> ZooModel:
    """Remove channels in place until each named block has `channels[name]` outputs. `keep="l1"`
    keeps the largest-L1 filters (AMC, Li et al.); `keep="first"` keeps the first ones (to give a
    freshly built model a pruned teacher's shape before loading its weights)."""
    blocks = model.blocks()
    unknown = [n for n in channels if n not in blocks]
    if unknown:
        raise ConfigError(f"channel counts name unknown layer(s) {', '.join(unknown)}; {model.arch} has {', '.join(blocks)}")
    graph = _dependency_graph(model, in_shape)
    for name, want in channels.items():
        op = blocks[name].op
        have = op.out_channels if isinstance(op, nn.Conv2d) else op.out_features
        if not 1 <= want <= have:
            raise ConfigError(f"layer {name}: cannot keep {want} of its {have} channels")
        if want == have:
            continue
        drop = l1_order(op)[:have - want].tolist() if keep == "l1" else list(range(want, have))
        group = graph.get_pruning_group(op, _out_pruner(op), idxs=sorted(drop))
        group.prune()
    return model


def pruned_copy(model: ZooModel, channels: dict[str, int], in_shape: tuple[int, int, int]) -> ZooModel:
    return prune_to(copy.deepcopy(model), channels, in_shape)


def channel_counts(model: ZooModel) -> dict[str, int]:
    return {n: (b.op.out_channels if isinstance(b.op, nn.Conv2d) else b.op.out_features) for n, b in model.blocks().items()}


# ----------------------------------------------------------------------------- BatchNorm

@torch.no_grad()
def reestimate_bn(model: ZooModel, x: torch.Tensor, batch_size: int = 128) -> ZooModel:
    """Recompute every BN's running mean/var on `x` (cumulative average, affine kept), in place:
    the cheap repair that makes a pruned network's accuracy a fair reward (AMC, EagleEye)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    for bn in bns:
        bn.momentum = 0.1
        bn.eval()
    return model


@torch.no_grad()
def float_from_teacher(teacher, x: torch.Tensor) -> ZooModel:
    """The teacher as a float zoo model (Conv → BN), from its latent float weights; see the
    module docstring. `x`: a few hundred normalized training images for the BN statistics."""
    meta = teacher.meta
    model = build_model(meta["model"], tuple(meta["input_shape"]), len(meta["classes"]), meta["width"],
                        channels=meta.get("channels"))
    qat = teacher.model.blocks()
    hooks = []
    for name, block in model.blocks().items():
        src = qat[name].op
        block.op.weight.copy_(src.weight.detach())
        if isinstance(block.bn, nn.BatchNorm2d):
            hooks.append(block.op.register_forward_hook(_identity_bn_hook(block.bn, src.bias.detach())))
        elif block.op.bias is not None:
            block.op.bias.copy_(src.bias.detach())
    try:
        model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return model.eval()


def _identity_bn_hook(bn: nn.BatchNorm2d, bias: torch.Tensor):
    """Set `bn` from the conv output it is about to see: running stats measured, γ = √(var+ε) and
    β = bias + mean, so BN(y) = y + bias exactly (the folded conv's output)."""
    def hook(_module, _inputs, y):
        mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(torch.sqrt(var + bn.eps))
        bn.bias.copy_(bias + mean)
    return hook
