"""A result.json in the research system's PPO format for an imported teacher, with the codes its
PPO search starts from (approx_train_ppo.py's per-layer initialisation), so the export can be
checked without running the research search.

    python benchmarks/research/hand_result.py runs/research/nin-narrow runs/research/nin-narrow/result_research.json

Per tap: tmax = the 90th percentile of the non-zero activation codes on training images + 10,
at least 15 (the research defaults), and at most the teacher's qmax (127 under fbgemm: the
research code caps at 255, which would leave its own code range); then its initial codes
t1 = ⌊0.35·tmax⌋, t2 = ⌊0.7·tmax⌋, v1, v2 the midpoints — each clamped into its PPO sampler's
range (t1 ∈ [2, min(10, tmax−8)], t2 ∈ [t1+4, tmax−4], v1 ∈ [t1+1, t2−1], v2 ∈ [t2+1, tmax];
DESIGN.md §2). The file holds only the research keys (`layers`, `backend`, `model`,
`selection`, `metrics`): no scales, no teacher path.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from common import one_thread
from deploy_kit.data import Dataset, load_dataset
from deploy_kit.lut import LayerLUT
from deploy_kit.teacher import load_teacher
from deploy_kit.train import accuracy, batches, predict

RESEARCH_NAMES = {"mobilenet_v1": "mobilenetv1"}


def tap_codes(teacher, ds: Dataset, images: int) -> dict[str, np.ndarray]:
    """Every tap's activation codes on the first `images` training images."""
    codes: dict[str, list] = {n: [] for n in teacher.model.taps()}
    quants = teacher.layer_quant
    hooks = [tap.register_forward_hook(lambda m, i, o, n=n: codes[n].append(
                 (torch.round(o / quants[n].scale) + quants[n].zero_point).flatten().numpy()))
             for n, tap in teacher.model.taps().items()]
    split = ds.split("train")
    sub = type(split)(split.images[:images], split.labels[:images])
    with torch.no_grad():
        for x, _ in batches(sub, ds, 128):
            teacher.model(x)
    for h in hooks:
        h.remove()
    return {n: np.concatenate(c) for n, c in codes.items()}


def research_initial_codes(codes: np.ndarray, zero_point: int, qmax: int) -> LayerLUT:
    nonzero = codes[codes > zero_point] - zero_point
    p90 = int(np.percentile(nonzero, 90)) if nonzero.size else 0
    tmax = min(qmax, max(15, p90 + 10))
    t1 = min(max(int(0.35 * tmax), 2), min(10, tmax - 8))
    t2 = min(max(int(0.7 * tmax), t1 + 4), tmax - 4)
    v1 = min(max((t1 + t2) // 2, t1 + 1), t2 - 1)
    v2 = min(max((t2 + tmax) // 2, t2 + 1), tmax)
    return LayerLUT(t1, v1, t2, v2, tmax)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="an imported teacher's run folder")
    p.add_argument("out", type=Path)
    p.add_argument("--images", type=int, default=256, help="training images for the code histograms")
    args = p.parse_args()

    one_thread()
    teacher = load_teacher(args.run)
    meta = teacher.meta
    ds = load_dataset(meta["data"], meta["seed"])
    ds = Dataset(ds.spec, ds.classes, ds.splits, teacher.norm)
    codes = tap_codes(teacher, ds, args.images)
    luts = {n: research_initial_codes(codes[n], q.zero_point, q.qmax) for n, q in teacher.layer_quant.items()}
    test = ds.split("test")
    acc_t = accuracy(predict(teacher.model, test, ds), test.labels)
    acc_s = accuracy(predict(teacher.student(luts), test, ds), test.labels)
    result = {"layers": {n: {"t1_code": l.t1, "v1_code": l.v1, "t2_code": l.t2, "v2_code": l.v2, "tmax_code": l.tmax}
                         for n, l in luts.items()},
              "backend": meta["backend"], "model": RESEARCH_NAMES.get(meta["model"], meta["model"]),
              "selection": "research PPO initial codes (hand_result.py, not searched)",
              "metrics": {"acc_teacher": acc_t, "acc_student": acc_s, "acc_drop": round(acc_t - acc_s, 2)}}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["metrics"]), f"→ {args.out}")


if __name__ == "__main__":
    main()
