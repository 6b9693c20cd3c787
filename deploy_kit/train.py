"""The train stage: float pre-training, BN folding, QAT, INT8 conversion, evaluation."""

from __future__ import annotations

import math
import platform
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from deploy_kit import quant
from deploy_kit.data import Dataset, Split, load_dataset, normalize
from deploy_kit.device import check_device_name, resolve_device
from deploy_kit.errors import ConfigError
from deploy_kit.fsutil import check_writable
from deploy_kit.models import ARCHITECTURES, ZooModel, build_model, canonical_model
from deploy_kit.teacher import SIDECAR_NAME, WEIGHTS_NAME, save_teacher


OPTIMIZERS = ("adam", "sgd")


def make_optimizer(params, kind: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam, or SGD with Nesterov momentum 0.9 (the one-cycle schedule cycles the momentum)."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


@dataclass(frozen=True)
class TrainConfig:
    model: str = "lenet5"
    data: str = "digits"
    width: float = 1.0
    epochs: int = 30
    qat_epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    qat_lr: float = 2e-4
    # The float epochs' optimizer. Adam needs no tuning and suits the small models; SGD with Nesterov
    # momentum and weight decay generalizes better on the deeper ones (VGG16-0.25 on CIFAR-10:
    # benchmarks/cifar10.md). QAT is a short fine-tune and always uses Adam at qat_lr.
    optimizer: str = "adam"
    weight_decay: float = 0.0
    augment: bool = True
    # Random horizontal flips (per image) on top of the shifts: right for natural images
    # (CIFAR-10: +several points), wrong for digits and text, so it is opt-in.
    hflip: bool = False
    # Per-image random crops after zero-padding each side by `crop` pixels (0: off, the per-batch
    # shift above instead). The standard CIFAR-10 recipe is 4 with --hflip: measured +2–3 points
    # on VGG16-0.25 over the per-batch shift (benchmarks/cifar10.md).
    crop: int = 0
    seed: int = 0
    backend: str = "qnnpack"
    max_train: int | None = None  # cap on training images, for quick runs
    # Intra-op threads while training. One is the default because this machine is shared: with two
    # threads per process, every parallel region waits for a descheduled sibling, and a LeNet5 step
    # measured 986 ms instead of 67 ms under load. Raise it for a big model on an idle machine.
    threads: int = 1
    device: str = "auto"  # where the epochs run (deploy_kit/device.py); evaluation is always on the CPU

    def __post_init__(self):
        object.__setattr__(self, "model", canonical_model(self.model))
        if self.model not in ARCHITECTURES:
            raise ConfigError(f"unknown model {self.model!r}; choose one of: {', '.join(ARCHITECTURES)}")
        if self.epochs < 0 or self.qat_epochs < 1:
            raise ConfigError(f"need epochs >= 0 and qat_epochs >= 1, got {self.epochs} and {self.qat_epochs}")
        if self.batch_size < 1 or self.lr <= 0 or self.qat_lr <= 0 or (self.max_train is not None and self.max_train < 1):
            raise ConfigError(f"need batch_size >= 1, lr > 0, qat_lr > 0 and max_train >= 1, got {self.batch_size}, "
                              f"{self.lr}, {self.qat_lr}, {self.max_train}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown --optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if not (math.isfinite(self.weight_decay) and 0 <= self.weight_decay < 1):
            raise ConfigError(f"--weight-decay must be in [0, 1), got {self.weight_decay}")
        if not 0 <= self.crop <= 16:
            raise ConfigError(f"--crop must be 0..16 pixels of padding, got {self.crop}")
        if self.threads < 1:
            raise ConfigError(f"need threads >= 1, got {self.threads}")
        if self.backend not in quant.BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; choose one of {', '.join(quant.BACKENDS)}")
        if not (math.isfinite(self.lr) and math.isfinite(self.qat_lr)):
            raise ConfigError(f"--lr must be a finite number, got {self.lr}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be in 0..2^63-1, got {self.seed}")
        check_device_name(self.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batches(split: Split, ds: Dataset, batch_size: int):
    """Normalized (x, y) tensors over a split, in order."""
    for i in range(0, len(split), batch_size):
        x = torch.from_numpy(normalize(split.images[i:i + batch_size], ds.norm))
        yield x, torch.from_numpy(split.labels[i:i + batch_size])


@torch.no_grad()
def predict(model: torch.nn.Module, split: Split, ds: Dataset, batch_size: int = 256) -> np.ndarray:
    """Logits of `model` over a split (float32, N×classes)."""
    model.eval()
    return np.concatenate([model(x).float().numpy() for x, _ in batches(split, ds, batch_size)])


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return round(100.0 * float((logits.argmax(1) == labels).mean()), 2)


def augment(x: torch.Tensor, gen: torch.Generator, hflip: bool = False, pad: int = 2, crop: int = 0) -> torch.Tensor:
    """Random translation by up to `pad` pixels (edge-replicate padding, random crop), one shift per
    batch — or, with `crop` > 0, an independent crop per image after zero-padding by `crop` pixels;
    with `hflip`, each image is also mirrored with probability ½."""
    n, _, h, w = x.shape
    if crop:
        x = random_crops(x, gen, crop)
    else:
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
        x = padded[:, :, dy:dy + h, dx:dx + w]
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    return x


def random_crops(x: torch.Tensor, gen: torch.Generator, pad: int) -> torch.Tensor:
    """One random h×w window per image out of the zero-padded batch (zero is the dataset mean
    after normalization), gathered in one indexing step."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # n×h×1
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # n×1×w
    batch = torch.arange(n)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


# OneCycleLR divides by the length of its warm-up phase minus one: 0.2 × steps must reach 2.
MIN_ONE_CYCLE_STEPS = 10


def _one_cycle(opt: torch.optim.Optimizer, lr: float, steps: int):
    """One-cycle LR; a run too short for its warm-up (a few batches) keeps the peak LR constant."""
    if steps < MIN_ONE_CYCLE_STEPS:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _step: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)


def run_epochs(model: ZooModel, train: Split, ds: Dataset, cfg: TrainConfig, epochs: int, lr: float,
                label: str, gen: torch.Generator, device: torch.device, loss_fn=None,
                optimizer: str = "adam", weight_decay: float = 0.0) -> None:
    """Train in place on `device`; the model is back on the CPU afterwards. `loss_fn(logits, y, x)`
    replaces the cross-entropy (`deploykit prune` distils with it)."""
    model.to(device)
    opt = make_optimizer(model.parameters(), optimizer, lr, weight_decay)
    steps = max(1, epochs * ((len(train) + cfg.batch_size - 1) // cfg.batch_size))
    sched = _one_cycle(opt, lr, steps)
    bar = tqdm(range(epochs), desc=label, unit="epoch", leave=False, dynamic_ncols=True)
    for _ in bar:
        model.train()
        order = torch.randperm(len(train), generator=gen).numpy()
        shuffled = Split(train.images[order], train.labels[order])
        seen = correct = total_loss = 0
        for x, y in batches(shuffled, ds, cfg.batch_size):
            if cfg.augment:
                x = augment(x, gen, cfg.hflip, crop=cfg.crop)
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = loss_fn(logits, y, x) if loss_fn else F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            total_loss += float(loss.detach()) * len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{100 * correct / seen:.1f}%")
    model.cpu()


def fit_and_quantize(model: ZooModel, train: Split, ds: Dataset, cfg: TrainConfig, gen: torch.Generator,
                     device: torch.device, label: str = "float", loss_fn=None, qat_loss_fn=None) -> dict:
    """`cfg.epochs` float epochs (with `loss_fn`, else cross-entropy), BatchNorm folded, then
    `cfg.qat_epochs` of QAT (with `qat_loss_fn`, else cross-entropy) and the weight scales frozen;
    the model is changed in place. Returns the float / fake-quant / INT8 accuracies on val and
    test, as teacher.json records them."""
    run_epochs(model, train, ds, cfg, cfg.epochs, cfg.lr, label, gen, device, loss_fn, cfg.optimizer, cfg.weight_decay)
    acc_float = _evaluate(model, ds)
    quant.prepare_qat(quant.fold_batchnorm(model))
    run_epochs(model, train, ds, cfg, cfg.qat_epochs, cfg.qat_lr, "qat", gen, device, qat_loss_fn)
    quant.freeze(model)
    return {"float": acc_float, "fake_quant": _evaluate(model, ds),
            "int8": _evaluate(quant.convert_int8(model, cfg.backend), ds)}


def _evaluate(model, ds: Dataset) -> dict:
    return {s: accuracy(predict(model, ds.split(s), ds), ds.split(s).labels) for s in ("val", "test")}


def versions() -> dict:
    import onnx, onnxruntime, sklearn  # noqa: E401  (reported, not used)
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "scikit-learn": sklearn.__version__}


@contextmanager
def torch_threads(n: int):
    """Run a block with `n` intra-op threads, then give the caller its setting back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_teacher(cfg: TrainConfig, out_dir: Path, force: bool = False, ds: Dataset | None = None) -> dict:
    """Train, quantize and save a teacher into `out_dir`; returns the sidecar metadata."""
    check_writable(Path(out_dir), force=True, kind="dir")  # a folder (or nothing) where nothing is on the way
    for name in (SIDECAR_NAME, WEIGHTS_NAME):
        check_writable(Path(out_dir) / name, force)
    device = resolve_device(cfg.device)  # --device cuda without a GPU fails here, before any work
    with torch_threads(cfg.threads):
        return _train_teacher(cfg, Path(out_dir), ds, device)


def _train_teacher(cfg: TrainConfig, out_dir: Path, ds: Dataset | None, device: torch.device) -> dict:
    start = time.perf_counter()
    seed_everything(cfg.seed)
    ds = ds or load_dataset(cfg.data, cfg.seed)
    train = ds.split("train")
    if cfg.max_train:
        train = Split(train.images[:cfg.max_train], train.labels[:cfg.max_train])
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg.model, ds.input_shape, len(ds.classes), cfg.width)
    accuracy = fit_and_quantize(model, train, ds, cfg, gen, device)
    seconds = round(time.perf_counter() - start, 2)
    meta = {
        "model": cfg.model, "width": cfg.width, "backend": cfg.backend, "data": cfg.data, "seed": cfg.seed,
        "classes": list(ds.classes), "input_shape": list(ds.input_shape), "layout": "NCHW",
        "normalization": ds.norm.to_dict(),
        "input_quant": quant.input_quant(model).to_dict(), "output_quant": quant.output_quant(model).to_dict(),
        "layers": {n: q.to_dict() for n, q in quant.activation_quant(model).items()},
        "accuracy": accuracy, "arithmetic": quant.ARITHMETIC,
        "train_images": len(train), "images_per_s": round(len(train) * (cfg.epochs + cfg.qat_epochs) / seconds, 1),
        "seconds": seconds, "config": asdict(cfg), "device": str(device), "versions": versions(),
    }
    save_teacher(model, meta, Path(out_dir))
    return meta
