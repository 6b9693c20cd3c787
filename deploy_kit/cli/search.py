"""`deploykit search`: per-layer LUT codes for a teacher → result.json."""

from __future__ import annotations

from pathlib import Path

import click

from deploy_kit.cli import Finite, emit, handle_errors, json_option, say
from deploy_kit.device import DEVICES, resolve_device


def _layer_list(_ctx, _param, value):
    return tuple(n.strip() for n in value.split(",") if n.strip()) if value else None


@click.command("search")
@click.option("--teacher", type=click.Path(path_type=Path), required=True,
              help="Run folder (or teacher.json) written by `deploykit train`.")
@click.option("--method", default="ppo", show_default=True, type=click.Choice(["ppo", "random", "greedy"]),
              help="PPO agent, or a baseline with the same reward and budget.")
@click.option("--episodes", default=300, show_default=True, type=click.IntRange(1, 10_000_000), help="Budget: number of reward evaluations.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1),
              help="Seeds the reward images, the agent and the sampling.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICES),
              help="Where the reward passes run (auto: CUDA when present); validation re-scoring is on the CPU.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="result.json to write [default: TEACHER/result.json]; its log goes next to it (search_log.jsonl, "
                   "or search_log.NAME.jsonl for NAME.json).")
@click.option("--from-student", type=click.Path(path_type=Path), default=None,
              help="Re-search the codes for the fine-tuned student this result.json names (reward still against "
                   "the teacher), keeping each layer's tmax from that result unless --tmax-fixed; `deploykit "
                   "finetune` on the new result then starts from that student.")
@click.option("--layers", callback=_layer_list, default=None,
              help="Comma-separated layers to approximate (default: all); the others keep their ReLU.")
@click.option("--max-acc-drop", default=1.0, show_default=True, type=Finite(0, 100),
              help="Selection: validation accuracy drop (points) a candidate may lose.")
@click.option("--top-n", default=5, show_default=True, type=click.IntRange(1, 10_000), help="Best-reward candidates re-scored on validation.")
@click.option("--temperature", default=2.0, show_default=True, type=Finite(0, 1000, min_open=True), help="Distillation temperature T of the KL term.")
@click.option("--at-weight", default=100.0, show_default=True, type=Finite(0, 1e9), help="λ of the attention-transfer term.")
@click.option("--reward-images", default=512, show_default=True, type=click.IntRange(1, 1_000_000), help="Fixed train images every reward uses.")
@click.option("--tmax-percentile", default=90.0, show_default=True, type=Finite(0, 100), help="tmax = this percentile of non-zero codes …")
@click.option("--tmax-offset", default=10, show_default=True, type=click.IntRange(0, 255), help="… plus this offset (at least 15, at most qmax).")
@click.option("--tmax-fixed", type=click.IntRange(1, 255), default=None, help="Use this tmax code for every layer instead.")
@click.option("--force", is_flag=True, help="Overwrite an existing result.json.")
@json_option
@handle_errors
def command(teacher, method, episodes, seed, device, out, from_student, layers, max_acc_drop, top_n, temperature, at_weight,
            reward_images, tmax_percentile, tmax_offset, tmax_fixed, force, as_json):
    """Search each layer's staircase codes (t1, v1, t2, v2, tmax) so the student stays close to
    the teacher: reward = −(KL + λ·attention transfer) on train images; the top candidates are
    re-scored on the validation split; test accuracy is reported for the chosen one only.

    \b
    Example:
      deploykit search --teacher runs/lenet5 --episodes 300 --seed 0
      deploykit search --teacher runs/lenet5 --method random --layers conv2,fc1 --out runs/lenet5/random.json
    """
    from tqdm import tqdm

    from deploy_kit.search import RewardConfig, SearchConfig, TmaxRule, run_search

    cfg = SearchConfig(method=method, episodes=episodes, seed=seed, device=device, layers=layers, top_n=top_n,
                       max_acc_drop=max_acc_drop,
                       tmax=TmaxRule(percentile=tmax_percentile, offset=tmax_offset, fixed=tmax_fixed),
                       reward=RewardConfig(temperature=temperature, at_weight=at_weight, images=reward_images))
    resolve_device(device)  # a missing GPU is one line, before the progress bar starts
    bar = None  # made at the first evaluation: an input error before it stays one line

    def progress(ev):
        nonlocal bar
        bar = bar or tqdm(total=episodes, desc=f"search {method}", unit="eval", dynamic_ncols=True, leave=False)
        bar.update(1)
        bar.set_postfix(best=f"{ev.best_reward:.4f}", drop=f"{ev.score.acc_drop:.1f}pt", refresh=False)

    try:
        outcome = run_search(teacher, cfg, out=out, force=force, on_evaluation=progress, from_student=from_student)
    finally:
        if bar is not None:
            bar.close()
    s, m = outcome.summary(), outcome.result.metrics
    say(f"{method}: {s['evaluations']} evaluations in {s['seconds']:.1f}s "
        f"({s['evaluations'] / max(s['seconds'], 1e-9):.1f}/s), best reward {s['best_reward']:.4f}")
    say(f"selection: {outcome.result.selection}")
    for name, lut in outcome.result.layers.items():
        say(f"  {name:<10} {lut.describe()}")
    say(f"test accuracy: teacher {m['acc_teacher']:.2f}%  student {m['acc_student']:.2f}%  drop {m['acc_drop']:.2f} pts")
    say(f"result → {outcome.path}   log → {outcome.log_path}")
    emit(s)
