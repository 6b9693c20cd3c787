"""The model zoo, in the 32×32 (CIFAR) form, built from one block and one tap mechanism.

Every approximable activation sits at the end of a `Block` (Conv/Linear → BN → ReLU → Tap) and
is addressed by the block's name (`conv1_1`, `cccp1`, `dw3`, `fc1`, …). The block lives at
`model.features.<name>` or `model.classifier.<name>`, so the name also appears in the ONNX
node scopes (`/features/conv1_1/...`), which is how the exporter finds each activation.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from deploy_kit.errors import ConfigError, DataError


class Tap(nn.Module):
    """Identity in the teacher; a student replaces `fn` with the LUT activation."""

    def __init__(self):
        super().__init__()
        self.fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x):
        return x if self.fn is None else self.fn(x)


class Block(nn.Module):
    """op (Conv2d or Linear) → bn → act → tap. `act` is ReLU or Identity (the classifier head)."""

    def __init__(self, op: nn.Module, relu: bool = True):
        super().__init__()
        self.op = op
        self.bn = nn.BatchNorm2d(op.out_channels) if isinstance(op, nn.Conv2d) else nn.Identity()
        self.act = nn.ReLU() if relu else nn.Identity()
        self.tap = Tap() if relu else nn.Identity()

    def forward(self, x):
        return self.tap(self.act(self.bn(self.op(x))))


def conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> Block:
    return Block(nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False))


def linear(cin: int, cout: int, relu: bool = True) -> Block:
    return Block(nn.Linear(cin, cout), relu)


class ZooModel(nn.Module):
    """quant → features → pool → flatten → classifier → dequant. `quant`/`dequant` are stubs
    that `deploy_kit.quant` swaps in; in float they are identities."""

    def __init__(self, arch: str, features: OrderedDict, head: Callable[[int], OrderedDict],
                 in_shape: tuple[int, int, int], global_pool: bool = False):
        super().__init__()
        self.arch = arch
        self.quant = nn.Identity()
        self.features = nn.Sequential(features)
        self.pool = nn.AdaptiveAvgPool2d(1) if global_pool else nn.Identity()
        self.flatten = nn.Flatten()
        flat = _flat_features(arch, self.features, self.pool, self.flatten, in_shape)
        self.classifier = nn.Sequential(head(flat))
        self.dequant = nn.Identity()

    def forward(self, x):
        x = self.quant(x)
        x = self.flatten(self.pool(self.features(x)))
        return self.dequant(self.classifier(x))

    def blocks(self) -> "OrderedDict[str, Block]":
        """Blocks in forward order, by name."""
        found = [(n, m) for n, m in self.features.named_children() if isinstance(m, Block)]
        found += [(n, m) for n, m in self.classifier.named_children() if isinstance(m, Block)]
        return OrderedDict(found)

    def taps(self) -> "OrderedDict[str, Tap]":
        """The approximable activations, in forward order."""
        return OrderedDict((n, b.tap) for n, b in self.blocks().items() if isinstance(b.tap, Tap))


def _flat_features(arch: str, features: nn.Module, pool: nn.Module, flatten: nn.Module,
                   in_shape: tuple[int, int, int]) -> int:
    """Features per image after the convolutions, by a dry run; images smaller than the model's
    receptive field (its kernels and poolings) are a clear DataError, not a torch traceback."""
    c, h, w = in_shape
    try:
        with torch.no_grad():
            flat = flatten(pool(features(torch.zeros(1, c, h, w)))).shape[1]
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise DataError(f"{arch} cannot take {h}×{w} images: they are smaller than its kernels and poolings "
                        f"need ({first}); use images of at least 32×32 (the zoo's size)") from None
    if flat == 0:
        raise DataError(f"{arch} cannot take {h}×{w} images: nothing is left after its poolings; use 32×32 images")
    return flat


def _ch(c: int, width: float) -> int:
    return max(4, int(round(c * width)))


def _pool(k: int = 2, s: int | None = None, p: int = 0) -> nn.Module:
    return nn.MaxPool2d(k, s or k, p)


def lenet5(cin, n, w):
    c1, c2 = _ch(6, w), _ch(16, w)
    f = OrderedDict(conv1=Block(nn.Conv2d(cin, c1, 5, bias=False)), pool1=_pool(),
                    conv2=Block(nn.Conv2d(c1, c2, 5, bias=False)), pool2=_pool())
    head = lambda flat: OrderedDict(fc1=linear(flat, _ch(120, w)), fc2=linear(_ch(120, w), _ch(84, w)),
                                    fc3=linear(_ch(84, w), n, relu=False))
    return f, head, False


def nin(cin, n, w):
    a, b, c = _ch(192, w), _ch(160, w), _ch(96, w)
    f = OrderedDict(conv1=conv(cin, a, 5), cccp1=conv(a, b, 1), cccp2=conv(b, c, 1), pool1=_pool(3, 2, 1),
                    conv2=conv(c, a, 5), cccp3=conv(a, a, 1), cccp4=conv(a, a, 1), pool2=_pool(3, 2, 1),
                    conv3=conv(a, a, 3), cccp5=conv(a, a, 1), cccp6=conv(a, n, 1))
    # As in the research system (and the NiN paper): the logits are the global average of
    # cccp6's ReLU'd n-channel map; no classifier layer.
    return f, (lambda flat: OrderedDict()), True


MOBILENET_CFG = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


def mobilenet_v1(cin, n, w):
    f = OrderedDict(conv1=conv(cin, _ch(32, w), 3))
    c = _ch(32, w)
    for i, (out, stride) in enumerate(MOBILENET_CFG, start=1):
        f[f"dw{i}"] = conv(c, c, 3, stride, groups=c)
        f[f"pw{i}"] = conv(c, _ch(out, w), 1)
        c = _ch(out, w)
    return f, (lambda flat: OrderedDict(fc=linear(flat, n, relu=False))), True


def _vgg(cfg, hidden: int | None = None):
    """VGG from its layer list. The research system's VGG16 ends in fc1 (512→512, ReLU: a tap) and
    fc2; its VGG19 in a single fc. `hidden` selects the former."""
    def head(flat, n, w):
        if hidden is None:
            return OrderedDict(fc=linear(flat, n, relu=False))
        return OrderedDict(fc1=linear(flat, _ch(hidden, w)), fc2=linear(_ch(hidden, w), n, relu=False))

    def build(cin, n, w):
        f, c, stage, idx = OrderedDict(), cin, 1, 1
        for v in cfg:
            if v == "M":
                f[f"pool{stage}"] = _pool()
                stage, idx = stage + 1, 1
            else:
                f[f"conv{stage}_{idx}"] = conv(c, _ch(v, w), 3)
                c, idx = _ch(v, w), idx + 1
        return f, (lambda flat: head(flat, n, w)), False
    return build


VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


def alexnet(cin, n, w):
    """The research system's CIFAR AlexNet: 5×5 conv1 (stride 2) and conv2, then a 1024→512→256 head."""
    a, b, c, d = _ch(64, w), _ch(192, w), _ch(384, w), _ch(256, w)
    f = OrderedDict(conv1=conv(cin, a, 5, 2), pool1=_pool(), conv2=conv(a, b, 5), pool2=_pool(),
                    conv3=conv(b, c, 3), conv4=conv(c, d, 3), conv5=conv(d, d, 3), pool3=_pool())
    h1, h2 = _ch(512, w), _ch(256, w)
    head = lambda flat: OrderedDict(fc1=linear(flat, h1), drop1=nn.Dropout(0.5), fc2=linear(h1, h2),
                                    drop2=nn.Dropout(0.5), fc3=linear(h2, n, relu=False))
    return f, head, False


ARCHITECTURES = {"lenet5": lenet5, "nin": nin, "mobilenet_v1": mobilenet_v1, "vgg16": _vgg(VGG16, hidden=512),
                 "vgg19": _vgg(VGG19), "alexnet": alexnet}


# The zoo's architecture version, recorded in every teacher.json (`zoo`). A model whose layers
# changed since a version is refused in a teacher written before it (never mis-loaded):
# version 2 builds the research system's VGG16 head (fc1 512→512 + fc2), AlexNet (5×5
# conv1/conv2, 1024→512→256 head) and NiN (padded 3×3/2 max pools, no fc).
ZOO_VERSION = 2
CHANGED_IN = {"vgg16": (2, "its head is now fc1 (512→512, ReLU) + fc2"),
              "alexnet": (2, "conv1/conv2 are now 5×5 and its head 512→256→classes"),
              "nin": (2, "its max pools are padded and the logits are cccp6's average, without an fc")}

# Names the research system (gfat-l/inference) spells differently; accepted wherever a model is named.
MODEL_ALIASES = {"mobilenetv1": "mobilenet_v1"}


def canonical_model(name: str) -> str:
    return MODEL_ALIASES.get(name, name)


def build_model(arch: str, in_shape: tuple[int, int, int], num_classes: int, width: float = 1.0,
                channels: dict[str, int] | None = None) -> ZooModel:
    """A float model of the zoo. `in_shape` is (C, H, W). `channels` ({block: output channels},
    from a pruned teacher's teacher.json) narrows the named blocks after building."""
    arch = canonical_model(arch)
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown model {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    if not 0 < width <= 4:
        raise ConfigError(f"--width must be in (0, 4], got {width}")
    features, head, global_pool = ARCHITECTURES[arch](in_shape[0], num_classes, width)
    model = ZooModel(arch, features, head, in_shape, global_pool)
    if channels:
        from deploy_kit.prune.surgery import prune_to  # torch-pruning loads only for pruned models

        prune_to(model, channels, in_shape, keep="first")
    return model
