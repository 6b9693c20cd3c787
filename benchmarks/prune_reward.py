"""Which reward weights should `deploykit prune` use? The agent's search alone (no distillation),
once per (α, β, γ), on one teacher and budget: the chosen configuration's validation accuracy
after BatchNorm re-estimation (the reward's own figure), its MACs and predicted latency.

    python benchmarks/prune_reward.py --teacher runs/vgg16 --budget latency=0.5 --episodes 64 \
        --weights 1,0,0 1,0,0.5 1,0.5,0 1,0,2

Every search starts from the same L1-uniform configuration and seed; with the hard budget every
proposal is within it, so β and γ only trade accuracy for going further below it. Prints a
Markdown table (and JSON lines with --json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deploy_kit.prune import PruneConfig, _with_progress, search_setup
from deploy_kit.prune import agent as ag
from deploy_kit.prune.reward import Scorer
from deploy_kit.teacher import load_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--budget", default="latency=0.5")
    ap.add_argument("--runtime", default="litert")
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", nargs="+", default=["1,0,0", "1,0,0.5", "1,0.5,0"], help="α,β,γ per search")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    teacher = load_teacher(args.teacher)
    meta = teacher.meta
    base = PruneConfig(teacher=args.teacher, budget=args.budget, runtime=args.runtime, episodes=args.episodes,
                       seed=args.seed)
    st = search_setup(base, teacher)
    ds, space = st.ds, st.space
    rows = []
    for text in args.weights:
        alpha, beta, gamma = (float(v) for v in text.split(","))
        cfg = PruneConfig(teacher=args.teacher, budget=args.budget, runtime=args.runtime, episodes=args.episodes,
                          seed=args.seed, alpha=alpha, beta=beta, gamma=gamma)
        clock = time.perf_counter()
        scorer = Scorer(st.model, st.infos, st.table, st.x_bn, ds.split("val"), ds, cfg)
        torch.manual_seed(cfg.seed)
        ag.ppo_prune_search(space, _with_progress(scorer, cfg.episodes), cfg.episodes, cfg.ppo, cfg.seed)
        best = scorer.best()
        first = scorer.records[0]
        rows.append({"alpha": alpha, "beta": beta, "gamma": gamma, "val_acc": best["val_acc"],
                     "val_acc_unpruned": scorer.acc0, "val_acc_l1_uniform": first["val_acc"],
                     "macs_ratio": best["macs_ratio"], "latency_ratio_predicted": best["latency_ratio_predicted"],
                     "best_episode": best["episode"], "episodes": len(scorer.records),
                     "seconds": round(time.perf_counter() - clock, 1), "channels": best["channels"]})
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{meta['model']}-{meta['width']} on {meta['data']}, budget {args.budget}, {args.episodes} episodes, "
          f"seed {args.seed}; val accuracy unpruned {rows[0]['val_acc_unpruned']}%, L1-uniform {rows[0]['val_acc_l1_uniform']}%")
    print("| α, β, γ | chosen val % (BN re-estimated) | MACs × | predicted latency × | found at episode | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['alpha']:g}, {r['beta']:g}, {r['gamma']:g} | {r['val_acc']:.2f} | {r['macs_ratio']:.3f} | "
              f"{r['latency_ratio_predicted']:.3f} | {r['best_episode']} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
