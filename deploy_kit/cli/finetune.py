"""`deploykit finetune`: train the student's weights with its LUTs in place (distilled from the teacher)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from deploy_kit.cli import Finite, emit, handle_errors, json_option, say
from deploy_kit.device import DEVICES


@click.command("finetune")
@click.option("--config", "result_path", type=click.Path(path_type=Path), required=True,
              help="result.json written by `deploykit search` (the LUT codes to train with).")
@click.option("--teacher", "teacher_path", type=click.Path(path_type=Path), default=None,
              help="Teacher run folder; default: the `teacher.path` recorded in result.json.")
@click.option("--epochs", default=60, show_default=True, type=click.IntRange(1, 100_000),
              help="Training epochs (cosine schedule to 0).")
@click.option("--lr", default=None, type=Finite(min=0, min_open=True),
              help="Peak Adam learning rate (cosine decay to 0).  [default: 1e-3 for lenet5, 3e-4 for the "
                   "deeper, BatchNorm-folded zoo models (1e-3 made VGG16 worse after one epoch)]")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=2.0, show_default=True, type=Finite(min=0, min_open=True),
              help="Distillation temperature T of the KL term.")
@click.option("--kd-weight", default=1.0, show_default=True, type=Finite(min=0),
              help="Weight of KL_T(teacher ‖ student)·T².")
@click.option("--ce-weight", default=0.5, show_default=True, type=Finite(min=0),
              help="Weight of the cross-entropy on the labels.")
@click.option("--at-weight", default=100.0, show_default=True, type=Finite(min=0),
              help="Weight of the attention-transfer term at the conv taps (the search's λ).")
@click.option("--ema", default=0.999, show_default=True, type=Finite(0, 1, max_open=True),
              help="Keep an exponential moving average of the weights with this per-step decay (warm-up "
                   "(1+t)/(10+t)) and evaluate/keep it instead of the raw weights; 0 = off.")
@click.option("--select", default="final", show_default=True, type=click.Choice(["final", "best"]),
              help="What to keep, decided on the validation split: final = the last epoch unless it is worse "
                   "than the untouched student (epoch 0) beyond chance (one-sided McNemar, p < 0.05); best = "
                   "the epoch with the best validation accuracy (picks noise on a small split).")
@click.option("--max-train", type=click.IntRange(min=1), default=None, help="Use only the first N training images.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICES),
              help="Where training runs (auto: CUDA when present). Accuracies are always computed on the CPU.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1), help="Intra-op CPU threads.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1),
              help="Seeds the batch order and augmentation.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for student.safetensors + student.json [default: the folder of result.json].")
@click.option("--force", is_flag=True, help="Replace an existing student (and result.json's `student` entry).")
@json_option
@handle_errors
def command(result_path, teacher_path, epochs, lr, batch_size, temperature, kd_weight, ce_weight, at_weight,
            ema, select, max_train, device, threads, seed, out, force, as_json):
    """Fine-tune the student: the teacher's weights trained with the LUTs of result.json in place
    (straight-through), distilled from the frozen INT8 teacher with
    kd·KL_T·T² + ce·CE + at·AT. Activation grids stay the teacher's, so the codes keep their
    meaning. What is kept is decided on the validation split (--select); the test split is
    measured once.

    Writes student.safetensors + student.json and records the student in result.json, so
    `export` exports its weights and `verify` holds every export to it.

    \b
    Example:
      deploykit finetune --config runs/lenet5/result.json
      deploykit finetune --config runs/vgg16/result.json --epochs 8 --force
    """
    from deploy_kit.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(result_path=result_path, teacher_path=teacher_path, epochs=epochs, lr=lr,
                         batch_size=batch_size, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight,
                         at_weight=at_weight, ema=ema, select=select, max_train=max_train, device=device, threads=threads, seed=seed,
                         out=out, force=force)
    outcome = finetune(cfg, progress=say)
    s = outcome.summary()
    say(f"kept epoch {s['epoch']} (--select {select}); {s['images_per_s']} img/s, {s['seconds']:.1f}s")
    say(f"test accuracy: teacher {s['acc_teacher']:.2f}%  student {s['acc_student_before']:.2f}% → "
        f"{s['acc_student']:.2f}%  drop {s['acc_drop']:.2f} pts")
    gains = s["layer_exact_gain"]
    if gains and max(gains.values()) > 0:
        name = max(gains, key=gains.get)
        teacher_dir = Path(os.path.normpath(outcome.sidecar.parent / outcome.meta["teacher"]["path"])).parent
        say(f"costliest LUT: {name} (val +{gains[name]:.2f} pts if left exact); to leave it out: `deploykit search "
            f"--teacher {teacher_dir} --layers {','.join(n for n in gains if n != name)} --out NEW.json`")
    say(f"student → {outcome.sidecar}   recorded in {outcome.result_path}")
    emit(s)
