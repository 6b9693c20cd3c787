"""The rows of benchmarks/research_import.md for one pipeline.sh output folder.

    python benchmarks/research/table.py runs/research/nin [more folders…]

Reads OUT/ckpt/train_research.json, OUT/{full,narrow}/compare.json and
OUT/narrow/exports/verify.json; prints the accuracy row and the export row in markdown.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(x: float) -> str:
    return f"{x:.2f} %"


def accuracy_row(out: Path) -> str:
    train = json.loads((out / "ckpt" / "train_research.json").read_text())
    c = json.loads((out / "full" / "compare.json").read_text())
    ref, fq, i8 = c["research_stored_scales_acc"], c["deploykit_fake_quant"], c["deploykit_int8"]
    images = train["images"]
    return (f"| {c['model']} | {Path(c['data'].partition(':')[2]).name} {images['train']:,} / {images['test']:,} "
            f"| {pct(train['research_final_eval_acc'])} | {pct(ref)} "
            f"| {pct(fq['acc'])} ({fq['acc'] - ref:+.2f}) | {pct(i8['acc'])} ({i8['acc'] - ref:+.2f}) "
            f"| {pct(fq['top1_agreement'])} / {fq['max_abs_dlogit']:.2g} (fake-quant); "
            f"{pct(i8['top1_agreement'])} / {i8['max_abs_dlogit']:.2g} (int8) "
            f"| {train['seconds']['float']:.0f} + {train['seconds']['qat']:.0f} s |")


def export_row(out: Path) -> str:
    v = json.loads((out / "narrow" / "exports" / "verify.json").read_text())
    cells = {}
    for r in v["rows"]:
        if r["runtime"].startswith("pytorch"):
            continue
        agr = r["agreement_student"] if r["variant"] == "lut" else r["agreement_teacher"]
        cells[(r["variant"], r["artifact"].split("/")[-1])] = f"{agr:.2f} %, {r['max_abs_logit_diff']:.2g}"
    order = [("lut", "model.onnx"), ("lut", "model.ort"), ("lut", "model_int8.tflite"),
             ("relu", "model.onnx"), ("relu", "model.ort"), ("relu", "model_int8.tflite")]
    model = json.loads((out / "full" / "compare.json").read_text())["model"]
    return f"| {model} | `--narrow-weights` | " + " | ".join(cells.get(k, "—") for k in order) + \
        f" | {'PASSED' if v['passed'] else 'FAILED'} |"


if __name__ == "__main__":
    for folder in map(Path, sys.argv[1:]):
        print(accuracy_row(folder))
        print(export_row(folder))
