"""Compare pruned teachers at one budget: INT8 accuracy, MACs, the latency table's prediction and
the measured LiteRT latency of each INT8 export, all timed in one interleaved session.

    python benchmarks/prune.py --unpruned runs/vgg50 --run ppo=runs/vgg50-ppo --run l1-uniform=runs/vgg50-l1u \
        --run width-0.33=runs/vgg33 [--runtime litert] [--rounds 31]

Runs given with --run may be pruned teachers (`deploykit prune`) or plain zoo teachers of another
--width (`deploykit train`): all are priced with the unpruned model's latency table. Each run's
INT8 test drop against the unpruned teacher comes with a two-sided exact McNemar p-value over the
same test images (is the drop more than chance?). `--pair A:B` (repeatable) compares two of the runs on
the same val and test images: each one's accuracy, the images only one gets right, and the McNemar p.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from deploy_kit.amx import mode as amx_mode
from deploy_kit.data import load_dataset, normalize
from deploy_kit.finetune import mcnemar_worse
from deploy_kit.prune import latency as lt
from deploy_kit.prune import surgery as sg
from deploy_kit.teacher import load_teacher
from deploy_kit.train import predict


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact McNemar p over the same images (a, b: right or wrong per image)."""
    return min(1.0, 2 * min(mcnemar_worse(a, b), mcnemar_worse(b, a)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--unpruned", type=Path, required=True)
    ap.add_argument("--run", action="append", default=[], help="NAME=RUN_FOLDER")
    ap.add_argument("--runtime", default="litert", choices=lt.RUNTIMES)
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--repeats", type=int, default=50, help="timed runs per model per round (more: a longer, steadier window)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--amx", action="store_true", help="time with Intel AMX allowed (as `deploykit prune --amx`)")
    ap.add_argument("--pair", action="append", default=[], help="A:B, two run names to compare image by image")
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = {"unpruned": args.unpruned, **{r.split("=", 1)[0]: Path(r.split("=", 1)[1]) for r in args.run}}
    pairs = [tuple(p.split(":", 1)) for p in args.pair]
    unknown = sorted({n for p in pairs for n in p} - set(runs)) + [p for p in args.pair if ":" not in p]
    if unknown:
        raise SystemExit(f"--pair takes A:B with names given to --run (or unpruned); not: {', '.join(unknown)}")
    teachers = {name: load_teacher(path) for name, path in runs.items()}
    base = teachers["unpruned"]
    in_shape = tuple(base.meta["input_shape"])
    ds = load_dataset(base.meta["data"], base.meta["seed"])
    x = torch.from_numpy(normalize(ds.split("train").images[:256], ds.norm))
    image = normalize(ds.split("val").images[:1], ds.norm)
    infos = sg.layer_infos(sg.float_from_teacher(base, x), in_shape)
    full = sg.full_channels(infos)
    table, why = lt.load_cached(lt.TableSpec(base.meta["model"], base.meta["width"], in_shape, args.runtime, full, seed=args.seed,
                                                amx=args.amx), infos)
    if table is None:
        raise SystemExit(f"no latency table for the unpruned model ({why}); run `deploykit prune` on it first")
    with tempfile.TemporaryDirectory() as tmp:
        paths = [lt.export_for_runtime(t.model, in_shape, args.runtime, Path(tmp), name, x[:8].numpy())
                 for name, t in teachers.items()]
        ms = dict(zip(teachers, lt.measure(paths, args.runtime, image, rounds=args.rounds, repeats=args.repeats, seed=args.seed,
                                                      amx=args.amx)))
    test = ds.split("test")
    right = {name: predict(t.model, test, ds).argmax(1) == test.labels for name, t in teachers.items()}
    rows = []
    for name, t in teachers.items():
        counts = {n: c for n, c in sg.channel_counts(t.model).items() if n in full}
        pred = table.predict(counts)
        acc = t.meta["accuracy"]["int8"]
        a, b = right["unpruned"], right[name]
        rows.append({"run": name, "int8_val": acc["val"], "int8_test": acc["test"],
                     "test_drop": round(100 * float(a.mean() - b.mean()), 2),
                     "mcnemar_p": float(f"{mcnemar_p(a, b):.2g}"),
                     "macs_ratio": round(sg.macs(infos, counts) / sg.macs(infos, full), 3),
                     "measured_ms": ms[name], "measured_ratio": round(ms[name] / ms["unpruned"], 3),
                     "predicted_ms": round(pred, 5), "table_error_pct": round(100 * (pred - ms[name]) / ms[name], 1),
                     "channels": list(counts.values())})
    print(json.dumps(rows, indent=1))
    print(f"\nAMX: {amx_mode(args.amx)} while timing")
    print("\n| run | INT8 val % | INT8 test % | test drop (McNemar p) | MACs × | measured ms | measured × | table ms | table error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['int8_val']} | {r['int8_test']} | {r['test_drop']:.2f} ({r['mcnemar_p']}) | {r['macs_ratio']} | {r['measured_ms']:.4f} | "
              f"{r['measured_ratio']} | {r['predicted_ms']:.4f} | {r['table_error_pct']:+.1f} % |")
    print("\nchannels:", {r["run"]: r["channels"] for r in rows})
    print("mean |table error|:", round(float(np.mean([abs(r["table_error_pct"]) for r in rows])), 1), "%")
    if pairs:
        print("\n| A vs B | split | A % | B % | only A right | only B right | McNemar p |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for split in ("val", "test"):
            images = ds.split(split)
            ok = {n: predict(teachers[n].model, images, ds).argmax(1) == images.labels for n in {n for p in pairs for n in p}}
            for a_name, b_name in pairs:
                a, b = ok[a_name], ok[b_name]
                print(f"| {a_name} vs {b_name} | {split} | {100 * a.mean():.2f} | {100 * b.mean():.2f} | {int((a & ~b).sum())} | "
                      f"{int((b & ~a).sum())} | {mcnemar_p(a, b):.2g} |")


if __name__ == "__main__":
    main()
