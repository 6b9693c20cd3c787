"""The research model and deploykit's import of its checkpoint, image by image, on the same test images.

    python benchmarks/research/compare.py nin runs/research/nin/nin_qat_preconvert.pth runs/research/nin-full \
        --data imagefolder:/work/data/cifar10-small --research /work/research

The research side is its own class, fused and fbgemm-prepared as train_qat.py does, with the
checkpoint loaded and its observers off (`model.apply(disable_observer)`), so its scales are the
stored ones — what the checkpoint and the import hold. deploykit's side is the imported teacher
in plain fake-quant (the research arithmetic) and in the integer runtimes' arithmetic (int32
bias, per-channel requantization: what every export reproduces). Prints and writes
RUN/compare.json: accuracies, top-1 agreement and max |Δlogit| of each against the research model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch.ao.quantization import disable_observer, get_default_qat_qconfig, prepare_qat

from common import RESEARCH_MODELS, import_research, one_thread, research_dataset, research_model_class, research_path
from deploy_kit import quant
from deploy_kit.teacher import load_teacher
from deploy_kit.train import accuracy, predict


def research_model(name: str, checkpoint: Path, classes: int) -> torch.nn.Module:
    model = research_model_class(name)(num_classes=classes)
    model.eval()
    model.fuse_model()
    model.train()
    torch.backends.quantized.engine = "fbgemm"
    model.qconfig = get_default_qat_qconfig("fbgemm")
    prepare_qat(model, inplace=True)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    model.apply(disable_observer)
    return model.eval()


def against(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> dict:
    return {"acc": accuracy(logits, labels),
            "top1_agreement": round(100.0 * float((logits.argmax(1) == reference.argmax(1)).mean()), 2),
            "max_abs_dlogit": float(np.abs(logits - reference).max()),
            # images whose largest logit is shared by several classes (argmax takes the first):
            # the int8 logits of a barely trained model sit on few output codes
            "tied_top1": int(((logits == logits.max(1, keepdims=True)).sum(1) > 1).sum()),
            # disagreements where the reference's pick is one of the tied largest logits
            "disagree_within_tie": int(((logits.argmax(1) != reference.argmax(1)) &
                                        (logits[np.arange(len(logits)), reference.argmax(1)] == logits.max(1))).sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=sorted(RESEARCH_MODELS))
    p.add_argument("checkpoint", type=Path, help="the research {model}_qat_preconvert.pth")
    p.add_argument("run", type=Path, help="deploykit import --out folder of that checkpoint")
    p.add_argument("--data", required=True, help="the --data spec the checkpoint was trained/imported with")
    p.add_argument("--research", default=None, help="research repo (default: $RESEARCH_REPO)")
    p.add_argument("--split", default="test", choices=("val", "test"))
    args = p.parse_args()

    one_thread()
    import_research(research_path(args.research))
    ds = research_dataset(args.data)
    split = ds.split(args.split)
    ref = predict(research_model(args.model, args.checkpoint, len(ds.classes)), split, ds)
    teacher = load_teacher(args.run).model
    int8 = predict(teacher, split, ds)
    quant.use_runtime_arithmetic(teacher, on=False)
    fake_quant = predict(teacher, split, ds)

    out = {"model": args.model, "checkpoint": str(args.checkpoint), "run": str(args.run), "data": args.data,
           "split": args.split, "images": len(split),
           "research_stored_scales_acc": accuracy(ref, split.labels),
           "research_tied_top1": int(((ref == ref.max(1, keepdims=True)).sum(1) > 1).sum()),
           "deploykit_fake_quant": against(ref, fake_quant, split.labels),
           "deploykit_int8": against(ref, int8, split.labels)}
    log = args.checkpoint.parent / "train_research.json"
    if log.is_file():
        out["research_eval_as_it_ran"] = json.loads(log.read_text())["research_final_eval_acc"]
    (args.run / "compare.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
