"""PPO vs random vs greedy at equal budget on one teacher (default: LeNet5/digits).

    python benchmarks/search_compare.py --teacher runs/lenet5 --episodes 300 --seeds 0 1 2

For every method and seed: the best reward after 25/50/100/…% of the budget, the final test
accuracy drop of the selected configuration, and how many evaluations PPO needed to reach
random search's best reward of the same seed. Writes a markdown table (stdout and --out) and
the raw numbers as JSON next to it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from deploy_kit.search import PPOConfig, RewardConfig, SearchConfig, run_search

FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def run_one(teacher: Path, method: str, seed: int, episodes: int, prior_width: float, images: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SearchConfig(method=method, seed=seed, episodes=episodes, ppo=PPOConfig(prior_width=prior_width),
                           reward=RewardConfig(images=images))
        o = run_search(teacher, cfg, out=Path(tmp) / "result.json")
    curve = [e.best_reward for e in o.evaluations]
    label = method if method != "ppo" or prior_width == PPOConfig().prior_width else f"ppo-prior{prior_width:g}"
    return {"method": label, "seed": seed,
            "evaluations": len(curve), "curve": curve, "best_reward": max(curve),
            "acc_drop": o.result.metrics["acc_drop"], "val_drop": o.result.metrics["val"]["acc_drop"],
            "seconds": round(o.seconds, 1), "evals_per_s": round(len(curve) / o.seconds, 2)}


def evals_to_reach(curve: list[float], target: float) -> int | None:
    hits = [i + 1 for i, r in enumerate(curve) if r >= target]
    return hits[0] if hits else None


def table(runs: list[dict], episodes: int) -> str:
    random_best = {r["seed"]: r["best_reward"] for r in runs if r["method"] == "random"}
    head = ("| method | seed | " + " | ".join(f"best@{int(f * episodes)}" for f in FRACTIONS) +
            " | evals to reach random's best | test drop (pts) | val drop | s | eval/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        at = [r["curve"][min(len(r["curve"]), int(f * episodes)) - 1] for f in FRACTIONS]
        reach = evals_to_reach(r["curve"], random_best.get(r["seed"], np.inf))
        lines.append(f"| {r['method']} | {r['seed']} | " + " | ".join(f"{v:.4f}" for v in at) +
                     f" | {reach if reach else '—'} | {r['acc_drop']:.2f} | {r['val_drop']:.2f} | {r['seconds']} | {r['evals_per_s']} |")
    by = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    lines.append("")
    lines.append("| method | mean best reward | mean test drop | PPO-style reach ≤ 50% budget |")
    lines.append("|---|---|---|---|")
    for m, rs in by.items():
        reach = [evals_to_reach(r["curve"], random_best.get(r["seed"], np.inf)) for r in rs]
        ok = sum(1 for x in reach if x is not None and x <= episodes // 2)
        lines.append(f"| {m} | {np.mean([r['best_reward'] for r in rs]):.4f} | {np.mean([r['acc_drop'] for r in rs]):.2f} | {ok}/{len(rs)} seeds |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["random", "ppo", "greedy", "ppo-prior0"],
                    help="random | greedy | ppo | ppo-priorW (PPO with prior width W; 0 = no prior)")
    ap.add_argument("--reward-images", type=int, default=RewardConfig().images)
    ap.add_argument("--merge", type=Path, help="Earlier --out .json whose runs join the table.")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("search_compare.md"))
    args = ap.parse_args()
    runs = json.loads(args.merge.read_text()) if args.merge else []
    for method in args.methods:
        for seed in args.seeds:
            name, width = method, PPOConfig().prior_width
            if method.startswith("ppo-prior"):
                name, width = "ppo", float(method.removeprefix("ppo-prior"))
            runs.append(run_one(args.teacher, name, seed, args.episodes, width, args.reward_images))
            r = runs[-1]
            print(f"{r['method']:<12} seed {seed}: best {r['best_reward']:.4f}  test drop {r['acc_drop']:.2f}  "
                  f"{r['seconds']}s", flush=True)
    md = table(runs, args.episodes)
    print(md)
    args.out.write_text(f"teacher: {args.teacher}, budget {args.episodes} evaluations, "
                        f"{args.reward_images} reward images\n\n{md}\n")
    args.out.with_suffix(".json").write_text(json.dumps(runs))


if __name__ == "__main__":
    main()
