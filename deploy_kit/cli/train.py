"""`deploykit train`: an INT8 QAT teacher from the zoo."""

from __future__ import annotations

from pathlib import Path

import click

from deploy_kit.cli import Finite, emit, handle_errors, json_option, say
from deploy_kit.device import DEVICES
from deploy_kit.models import ARCHITECTURES, MODEL_ALIASES
from deploy_kit.quant import BACKENDS


@click.command("train")
@click.option("--model", "arch", default="lenet5", show_default=True, type=click.Choice([*ARCHITECTURES, *MODEL_ALIASES]),
              help="Architecture from the zoo (all in their 32×32 CIFAR form); mobilenetv1 = mobilenet_v1.")
@click.option("--data", default="digits", show_default=True,
              help="digits | cifar10:PATH | imagefolder:PATH (train/ test/ [val/] of class folders).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder to write the teacher into.")
@click.option("--width", default=1.0, show_default=True, type=Finite(0, 4, min_open=True), help="Channel multiplier (like MobileNet's α).")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(0, 100_000), help="Float pre-training epochs.")
@click.option("--qat-epochs", default=8, show_default=True, type=click.IntRange(1, 100_000), help="Quantization-aware fine-tuning epochs.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1, 1 << 20))
@click.option("--lr", default=2e-3, show_default=True, type=Finite(0, 10, min_open=True), help="Peak learning rate of float training (Adam, one-cycle).")
@click.option("--optimizer", default="adam", show_default=True, type=click.Choice(["adam", "sgd"]),
              help="Optimizer of the float epochs: sgd is Nesterov momentum 0.9 (try --lr 0.05 --weight-decay 5e-4 "
                   "for VGG on CIFAR-10). QAT always uses Adam.")
@click.option("--weight-decay", default=0.0, show_default=True, type=Finite(0, 1, max_open=True),
              help="L2 weight decay of the float epochs.")
@click.option("--hflip", is_flag=True,
              help="Also mirror images left-right at random (natural images such as CIFAR-10; not for digits).")
@click.option("--crop", default=0, show_default=True, type=click.IntRange(0, 16),
              help="Per-image random crops after padding each side by N pixels (CIFAR-10: 4, with --hflip); "
                   "0 keeps the per-batch shift of up to 2 pixels.")
@click.option("--max-train", type=click.IntRange(min=1), default=None, help="Use only the first N training images (quick runs).")
@click.option("--backend", default="qnnpack", show_default=True, type=click.Choice(BACKENDS),
              help="Quantized engine the INT8 PyTorch model is converted for.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="Intra-op threads; more only pays off for a big model on an idle machine.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICES),
              help="Where the epochs run (auto: CUDA when present). Accuracies are always computed on the CPU.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1),
              help="Seeds the split, the init and the batch order.")
@click.option("--force", is_flag=True, help="Overwrite an existing teacher in --out.")
@json_option
@handle_errors
def command(arch, data, out, width, epochs, qat_epochs, batch_size, lr, optimizer, weight_decay, hflip, crop, max_train, backend, threads, device, seed, force, as_json):
    """Train a float model, fine-tune it with INT8 QAT, convert it to INT8 and evaluate.

    Writes OUT/teacher.safetensors and OUT/teacher.json (architecture, labels, preprocessing,
    per-layer activation scale/zero-point, accuracies).

    \b
    Example:
      deploykit train --model lenet5 --data digits --out runs/lenet5
      deploykit train --model vgg16 --width 0.25 --data cifar10:~/data/cifar-10-batches-py --out runs/vgg16
    """
    from deploy_kit.train import TrainConfig, train_teacher

    cfg = TrainConfig(model=arch, data=data, width=width, epochs=epochs, qat_epochs=qat_epochs,
                      batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay, seed=seed, backend=backend, max_train=max_train,
                      threads=threads, hflip=hflip, crop=crop, device=device)
    meta = train_teacher(cfg, out, force=force)
    acc = meta["accuracy"]
    say(f"{cfg.model} on {data}: {meta['seconds']:.1f}s, {meta['images_per_s']:.0f} img/s")
    for kind in ("float", "fake_quant", "int8"):
        say(f"  {kind:<10} val {acc[kind]['val']:6.2f}%   test {acc[kind]['test']:6.2f}%")
    say(f"teacher → {out / 'teacher.json'}")
    emit({"checkpoint": str(out / "teacher.safetensors"), "model": cfg.model, "seconds": meta["seconds"],
          "accuracy": {k: acc[k] for k in ("float", "int8")}})
