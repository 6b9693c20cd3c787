"""Should the QAT epochs after pruning distil (`--qat-kd`, the default) or use plain cross-entropy
(`--qat-ce`, as `train`)? Both objectives, from the same start: a pruned run's weights, taken back
to a float model (BatchNorm folded again, fresh fake quantization), then the same QAT epochs with
the same seed, the unpruned teacher as the distillation target.

    python benchmarks/prune_qat.py --run runs/vgg16-pruned --qat-epochs 2

Prints the INT8 val/test accuracy of each (and JSON lines with --json). The start is a model that
was already QAT'd once, so the figures compare the two objectives, not a whole prune run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from deploy_kit.data import load_dataset, normalize
from deploy_kit.prune import _train_config
from deploy_kit.prune.distil import DistilConfig, distil_and_qat
from deploy_kit.prune.surgery import float_from_teacher
from deploy_kit.teacher import load_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a `deploykit prune` run folder")
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--at-weight", type=float, default=None, help="default: the run's own")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pruned = load_teacher(args.run)
    source = pruned.meta["pruning"]["source"]
    unpruned = load_teacher(Path(source["path"]))
    ds = load_dataset(pruned.meta["data"], pruned.meta["seed"])
    train = ds.split("train")
    pick = np.random.default_rng(args.seed).permutation(len(train))[:256]
    x_bn = torch.from_numpy(normalize(train.images[pick], ds.norm))
    recorded = pruned.meta["pruning"]["distil"]
    at = recorded.get("at_weight", 0.0) if args.at_weight is None else args.at_weight
    rows = []
    for qat_kd in (False, True):
        clock = time.perf_counter()
        student = float_from_teacher(pruned, x_bn)
        cfg = DistilConfig(epochs=0, qat_epochs=args.qat_epochs, qat_lr=recorded["qat_lr"], temperature=recorded["temperature"],
                           alpha=recorded["alpha"], at_weight=at, qat_kd=qat_kd)
        _, acc, _ = distil_and_qat(student, unpruned.model, train, ds, _train_config(pruned), cfg,
                                   torch.Generator().manual_seed(args.seed), torch.device("cpu"))
        rows.append({"qat": "kd" if qat_kd else "ce", "at_weight": at if qat_kd else 0.0, "epochs": args.qat_epochs,
                     "int8": acc["int8"], "start_int8": pruned.meta["accuracy"]["int8"],
                     "seconds": round(time.perf_counter() - clock, 1)})
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.run}: {args.qat_epochs} QAT epochs from its own weights (recorded INT8 "
          f"val {rows[0]['start_int8']['val']}, test {rows[0]['start_int8']['test']})\n")
    print("| QAT objective | INT8 val % | INT8 test % | s |\n|---|---:|---:|---:|")
    for r in rows:
        name = "cross-entropy (`--qat-ce`)" if r["qat"] == "ce" else f"distillation, λ_AT {r['at_weight']:g} (`--qat-kd`)"
        print(f"| {name} | {r['int8']['val']:.2f} | {r['int8']['test']:.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
