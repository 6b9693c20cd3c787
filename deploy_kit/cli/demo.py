"""`deploykit demo`: the whole pipeline on the bundled `digits` data, in one command."""

from __future__ import annotations

from pathlib import Path

import click

from deploy_kit.cli import Finite, emit, handle_errors, json_option, say
from deploy_kit.models import ARCHITECTURES, MODEL_ALIASES
from exporters.onnx_to_tf import LUT_FORMS


@click.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Run folder for every stage's output (teacher, result.json, exports/, report.html).")
@click.option("--model", "arch", default="lenet5", show_default=True, type=click.Choice([*ARCHITECTURES, *MODEL_ALIASES]),
              help="Architecture; the 5-minute figure is for lenet5.")
@click.option("--data", default="digits", show_default=True,
              help="digits (bundled, offline) | cifar10:PATH | imagefolder:PATH.")
@click.option("--width", default=1.0, show_default=True, type=Finite(0, 4, min_open=True), help="Channel multiplier.")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(0, 100_000), help="Float training epochs.")
@click.option("--qat-epochs", default=8, show_default=True, type=click.IntRange(max=100_000), help="Quantization-aware fine-tuning epochs.")
@click.option("--episodes", default=600, show_default=True, type=click.IntRange(max=10_000_000),
              help="Search budget (reward evaluations); twice `search`'s default, for a lower-KL configuration.")
@click.option("--finetune-epochs", default=40, show_default=True, type=click.IntRange(min=0),
              help="Fine-tuning epochs with the LUTs in place (`deploykit finetune`); 0 skips the stage.")
@click.option("--finetune-ema", default=0.999, show_default=True, type=Finite(0, 1, max_open=True),
              help="`finetune --ema`: keep a moving average of the weights (per-step decay; 0 = off).")
@click.option("--lut-form", default="saturate", show_default=True, type=click.Choice(LUT_FORMS),
              help="How the TFLite export lowers each LUT; saturate, the default, is the fast one in LiteRT "
                   "(see `export --help`).")
@click.option("--bench-repeats", default=100, show_default=True, type=click.IntRange(max=1_000_000), help="Timed batch-1 runs per artifact.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1),
              help="Seeds training, the search, fine-tuning and the bench inputs.")
@click.option("--prune", "prune", default=None, metavar="METRIC=F",
              help="Also run `deploykit prune` after train (e.g. latency=0.5; off by default). The unpruned "
                   "teacher goes to OUT/unpruned/.")
@click.option("--force", is_flag=True, help="Replace the outputs of a previous run in --out.")
@json_option
@handle_errors
def command(out, arch, data, width, epochs, qat_epochs, episodes, finetune_epochs, finetune_ema, lut_form, bench_repeats, seed,
            prune, force, as_json):
    """Train → search → finetune → export (all targets) → verify → bench → report, into one run folder.

    Prints a line per stage, then the verify and bench tables and the report's path. Exits 1
    if an export fails verification (everything, the report included, is still written).
    About 80 s for the defaults on an idle 2-core machine (lenet5 on digits).

    \b
    Example:
      deploykit demo
      deploykit demo --out runs/demo-seed1 --seed 1
      deploykit demo --out runs/demo-fast --lut-form saturate
      deploykit demo --out runs/demo-pruned --model vgg16 --width 0.5 --prune latency=0.5
      deploykit demo --model nin --width 0.25 --data cifar10:~/data/cifar-10-batches-py --out runs/nin
    """
    from tqdm import tqdm

    from deploy_kit.bench import BENCH_MD
    from deploy_kit.cli.verify import render_table
    from deploy_kit.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=out, model=arch, data=data, width=width, epochs=epochs, qat_epochs=qat_epochs,
                     episodes=episodes, finetune_epochs=finetune_epochs, finetune_ema=finetune_ema,
                     lut_form=lut_form, bench_repeats=bench_repeats, seed=seed, force=force, prune=prune)
    bar = None

    def on_evaluation(ev):
        nonlocal bar
        bar = bar or tqdm(total=episodes, desc="search", unit="eval", dynamic_ncols=True, leave=False)
        bar.update(1)
        bar.set_postfix(best=f"{ev.best_reward:.4f}", refresh=False)
        if bar.n >= episodes:
            bar.close()

    try:
        outcome = run_demo(cfg, progress=say, on_evaluation=on_evaluation)
    finally:
        if bar is not None:
            bar.close()
    say()
    say(f"verify ({outcome.verify.data} {outcome.verify.split}, {outcome.verify.images} images):")
    for line in render_table(outcome.verify.rows):
        say(line)
    say()
    say((outcome.out / "exports" / BENCH_MD).read_text().rstrip())
    say()
    say(f"{'PASSED' if outcome.verify.passed else 'FAILED'}: whole pipeline in {outcome.seconds:.0f}s "
        f"({', '.join(f'{s.name} {s.seconds:.0f}s' for s in outcome.stages)})")
    say(f"report → {outcome.report['report']}")
    emit(outcome.summary())
    outcome.verify.raise_for_failures()
