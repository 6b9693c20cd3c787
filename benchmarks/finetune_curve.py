"""Fine-tune a copy of a result.json and record every epoch's test accuracy beside the stage's own
validation figures — analysis only, for judging recipes and selection rules: the stage still
decides what to keep on the validation split, and never sees these test figures.

    python benchmarks/finetune_curve.py RUN/result_ppo.json TAG '{"epochs": 40, "ema": 0.999}'

Copies RESULT to RUN/r_TAG.json, fine-tunes it into RUN/ft_TAG/ with FinetuneConfig(**KWARGS),
writes RUN/ft_TAG/curve.json and prints one JSON line: the kept epoch and its test drop, the
drop before fine-tuning, the best drop any epoch reached and the last epoch's drop.
"""

import json
import shutil
import sys
import time
from pathlib import Path

import deploy_kit.finetune as F
from deploy_kit.data import load_dataset
from deploy_kit.train import predict


def main(src: Path, tag: str, kw: dict) -> None:
    result = src.with_name(f"r_{tag}.json")
    shutil.copy(src, result)
    out = src.parent / f"ft_{tag}"
    meta = json.loads((result.parent / "teacher.json").read_text())
    ds = load_dataset(meta["data"], meta["seed"])
    test = ds.split("test")
    curve = []
    frozen_student = F.frozen_student

    def traced(*a, **k):  # every model the stage evaluates passes through here, epoch 0 first
        m = frozen_student(*a, **k)
        curve.append(round(100.0 * float((predict(m, test, ds).argmax(1) == test.labels).mean()), 2))
        return m

    F.frozen_student = traced
    t0 = time.time()
    o = F.finetune(F.FinetuneConfig(result_path=result, out=out, force=True, **kw))
    teacher_test = o.meta["accuracy"]["teacher"]["test"]
    rows = [{"epoch": h["epoch"], "val_acc": h["val_acc"], "val_agree": h["val_agreement"], "val_kl": h["val_kl"],
             "test_drop": round(teacher_test - t, 2)} for h, t in zip(o.meta["epochs"], curve)]
    s = o.summary()
    json.dump({"kw": kw, "summary": s, "rows": rows}, open(out / "curve.json", "w"), indent=1)
    print(json.dumps({"tag": tag, "kw": kw, "kept": s["epoch"], "drop": s["acc_drop"],
                      "before": round(teacher_test - s["acc_student_before"], 2),
                      "best_any": min(r["test_drop"] for r in rows), "last": rows[-1]["test_drop"],
                      "seconds": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
