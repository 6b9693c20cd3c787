"""`deploykit prune`: hardware-aware RL channel pruning, distillation and QAT → a new teacher run."""

from __future__ import annotations

from pathlib import Path

import click

from deploy_kit.cli import Finite, emit, handle_errors, json_option, say
from deploy_kit.device import DEVICES


@click.command("prune")
@click.option("--teacher", "teacher", type=click.Path(path_type=Path), required=True,
              help="Run folder written by `deploykit train` (teacher.json + teacher.safetensors).")
@click.option("--budget", default="latency=0.5", show_default=True,
              help="latency=F or macs=F: the pruned model's cost as a fraction F in (0, 1) of the unpruned one's.")
@click.option("--latency-margin", type=Finite(0, 0.5, max_open=True), default=0.02, show_default=True,
              help="A latency budget is searched at budget × (1 − margin) as the latency table predicts it, so that "
                   "what is chosen measures under the budget despite the table's and the machine's few per cent of "
                   "noise; the finalists are timed and the table recalibrated from them, so a small margin suffices. "
                   "The measured checks use the budget itself. MACs budgets are exact and take no margin.")
@click.option("--runtime", default="litert", show_default=True,
              help="Where latency is measured: litert (TFLite INT8, XNNPACK) or onnxruntime.")
@click.option("--amx/--no-amx", default=False, show_default=True,
              help="Let the runtime use Intel AMX while timing. Off by default: no phone has AMX, and on x86 "
                   "servers that do, its INT8 kernels cost a fixed ~5 µs per layer that hides what channels cost "
                   "(Linux x86-64; elsewhere there is nothing to refuse).")
@click.option("--recalibrate/--no-recalibrate", default=True, show_default=True,
              help="Under a latency budget, when the finalists timed as INT8 exports show the table's ratio off by "
                   "more than 3 % (a host's state moves it), search once more with the table scaled by what they "
                   "measured, and keep that round's finalists unless none measures within the budget.")
@click.option("--method", default="ppo", show_default=True,
              help="ppo (the agent) or l1-uniform (the baseline: one keep ratio for every layer).")
@click.option("--episodes", default=64, show_default=True, help="Configurations the agent evaluates.")
@click.option("--alpha", type=Finite(min=0), default=1.0, show_default=True, help="Reward weight of the val accuracy change.")
@click.option("--beta", type=Finite(min=0), default=0.0, show_default=True, help="Reward weight of the MACs reduction.")
@click.option("--gamma", type=Finite(min=0), default=0.0, show_default=True, help="Reward weight of the predicted latency reduction.")
@click.option("--reward", "reward_kind", default="bn", show_default=True,
              help="What the val accuracy ΔP is taken after: bn (BatchNorm re-estimation alone, ~1 s a proposal) or "
                   "kd (also one short distillation epoch on --reward-images training images, the same for every "
                   "proposal; NetAdapt's short fine-tune, ~5–20× slower).")
@click.option("--reward-images", type=click.IntRange(64), default=2000, show_default=True,
              help="Training images (a seeded subset) each proposal is distilled on under --reward kd.")
@click.option("--finalists", type=click.IntRange(0), default=6, show_default=True,
              help="The search's best distinct configurations each distilled briefly and ranked on val; the best is "
                   "distilled in full (0 or 1: the search's own best).")
@click.option("--finalist-images", type=click.IntRange(64), default=10_000, show_default=True,
              help="Training images (a seeded subset) each finalist is distilled on.")
@click.option("--finalist-epochs", type=click.IntRange(1), default=1, show_default=True,
              help="Epochs over those images per finalist.")
@click.option("--kd-epochs", type=click.IntRange(0), default=None,
              help="Distillation epochs (float) from the unpruned teacher.  [default: 2× the teacher's own "
                   "float epochs]")
@click.option("--qat-epochs", default=4, show_default=True, help="QAT epochs after distillation.")
@click.option("--kd-lr", type=Finite(min=0, min_open=True), default=None,
              help="Peak learning rate of the distillation epochs (one-cycle), with the teacher's optimizer.  "
                   "[default: 1e-2 for an SGD teacher, 1e-3 for an Adam one]")
@click.option("--kd-temperature", type=Finite(min=0, min_open=True), default=4.0, show_default=True, help="Distillation temperature T.")
@click.option("--kd-alpha", type=Finite(0, 1), default=0.7, show_default=True, help="Weight of the KD term (1 − it on the labels' CE).")
@click.option("--kd-at-weight", type=Finite(min=0), default=100.0, show_default=True,
              help="Weight λ of attention transfer at every conv block during distillation (0: logits only).")
@click.option("--qat-kd/--qat-ce", default=True, show_default=True,
              help="QAT epochs with the distillation loss, or with plain cross-entropy as `train`.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICES),
              help="Where distillation and QAT run.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1),
              help="Intra-op CPU threads (1 suits a shared machine; raise it on an idle one).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1),
              help="Seeds the agent, the BN and timing images, the latency table's configurations and training.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder for the pruned teacher.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out folder.")
@json_option
@handle_errors
def command(teacher, budget, latency_margin, runtime, amx, recalibrate, method, episodes, alpha, beta, gamma, reward_kind, reward_images, finalists, finalist_images, finalist_epochs,
            kd_epochs, qat_epochs, kd_lr, kd_temperature, kd_alpha, kd_at_weight, qat_kd, device, threads, seed, out, force, as_json):
    """Remove channels under a latency or MACs budget, then distil and QAT the pruned model.

    An actor-critic agent (the LUT search's PPO) picks a keep ratio per layer under a hard budget,
    priced by a latency table measured here in the chosen runtime (cached in $DEPLOYKIT_CACHE);
    channels go by L1 norm (torch-pruning). The search's best few configurations are each
    distilled briefly and the best on the validation split is distilled in full. The output is
    an ordinary teacher run folder: search, finetune, export, verify and bench take it unchanged.

    \b
    Example:
      deploykit prune --teacher runs/vgg16 --budget latency=0.5 --out runs/vgg16-pruned
      deploykit prune --teacher runs/lenet5 --budget macs=0.5 --out runs/lenet5-pruned

    (LeNet5's LiteRT latency is fixed overhead: a latency budget cannot be reached there.)
    """
    from deploy_kit.prune import PruneConfig, run_prune
    from deploy_kit.prune.distil import DistilConfig
    from deploy_kit.prune.finalists import FinalistConfig

    cfg = PruneConfig(teacher=teacher, budget=budget, latency_margin=latency_margin, runtime=runtime, amx=amx, recalibrate=recalibrate, method=method, episodes=episodes, alpha=alpha,
                      beta=beta, gamma=gamma, reward=reward_kind, reward_images=reward_images, seed=seed, device=device, threads=threads,
                      finalists=FinalistConfig(count=finalists, images=finalist_images, epochs=finalist_epochs),
                      distil=DistilConfig(epochs=kd_epochs, qat_epochs=qat_epochs, lr=kd_lr, temperature=kd_temperature,
                                          alpha=kd_alpha, at_weight=kd_at_weight, qat_kd=qat_kd))
    outcome = run_prune(cfg, out, force=force, say=say)
    p, acc = outcome.meta["pruning"], outcome.meta["accuracy"]["int8"]
    lat = p["latency_ms"]
    full = p["channels_full"]
    say("channels: " + ", ".join(f"{n} {full[n]}→{c}" for n, c in outcome.meta["channels"].items() if n in full))
    say(f"MACs {p['macs']['ratio']:.3f}× · {runtime} latency (AMX {lat['amx']}) measured {lat['measured']['pruned']:.4f} ms vs "
        f"{lat['measured']['unpruned']:.4f} ms ({lat['measured_ratio']:.3f}×; table predicted {lat['predicted_ratio']:.3f}×: "
        f"error {lat['table_error_pct']['ratio']:+.1f}% on the ratio, {lat['table_error_pct']['pruned']:+.1f}% on the ms)")
    recal = p.get("recalibration") or {}
    if recal.get("applied"):
        say(f"recalibrated: the first search's finalists measured {recal['scale']:.3f}× the table's ratio; searched again at "
            f"{recal['search_ratio_predicted']:.3f}× predicted; the scaled table's ratio error {recal['ratio_error_pct']:+.1f}%")
    say(f"INT8 accuracy: val {acc['val']:.2f}%  test {acc['test']:.2f}%  (unpruned test {p['source']['accuracy_int8']['test']:.2f}%)")
    say(f"teacher → {out / 'teacher.json'}   ({', '.join(f'{k} {v:.0f}s' for k, v in outcome.seconds.items())})")
    emit(outcome.summary())
