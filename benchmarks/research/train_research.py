"""Train a checkpoint with the research system's own code (train_qat.train_qat: float pre-training,
fuse_model, fbgemm prepare_qat, QAT, torch.save of the state_dict → {model}_qat_preconvert.pth).

Only its data loading is replaced: its get_dataloaders downloads CIFAR-10 through torchvision;
here it gets loaders over the arrays deploykit reads for `--data` (deploykit's train split —
the images left after carving out validation — and its test split), with the research
normalization. The research code's own evaluate() then reports on exactly the test images
that deploykit's import and compare.py score.

    python benchmarks/research/train_research.py nin runs/research/nin --data imagefolder:/work/data/cifar10-small \
        --research /work/research --epochs 3 --qat-epochs 1

Writes OUT/{model}_float_unfused.pth and OUT/{model}_qat_preconvert.pth (the research code's
files) and OUT/train_research.json (seconds per phase, the research evaluate() of each epoch).
"""

from __future__ import annotations

import argparse
import json
import time
from argparse import Namespace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from common import RESEARCH_MODELS, import_research, one_thread, research_dataset, research_path
from deploy_kit.data import normalize


def flip_and_crop(batch, gen: torch.Generator, pad: int = 4):
    """Random horizontal flip and padded random crop: the part of the research train transform
    that matters on a small subset (its rotation and random erasing slow a few-epoch run down)."""
    x, y = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
    flip = torch.rand(len(x), generator=gen) < 0.5
    x[flip] = x[flip].flip(-1)
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, len(x)), generator=gen)
    x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(len(x))])
    return x, y


def loaders(spec: str, seed: int, augment: bool):
    ds = research_dataset(spec, seed)
    tensors = {s: TensorDataset(torch.from_numpy(normalize(ds.split(s).images, ds.norm)),
                                torch.from_numpy(ds.split(s).labels)) for s in ("train", "test")}
    gen = torch.Generator().manual_seed(seed)

    def get_dataloaders(_data_dir, batch_size, _workers):
        collate = (lambda b: flip_and_crop(b, gen)) if augment else None
        return (DataLoader(tensors["train"], batch_size, shuffle=True, generator=gen, collate_fn=collate),
                DataLoader(tensors["test"], batch_size, shuffle=False))
    return get_dataloaders, {s: len(t) for s, t in tensors.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=sorted(RESEARCH_MODELS))
    p.add_argument("out", type=Path)
    p.add_argument("--data", required=True, help="deploykit --data spec, e.g. imagefolder:/work/data/cifar10-small")
    p.add_argument("--research", default=None, help="research repo (default: $RESEARCH_REPO)")
    p.add_argument("--epochs", type=int, default=2, help="float epochs (research --warmup-float-epochs; at least 2)")
    p.add_argument("--qat-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.01, help="research default")
    p.add_argument("--qat-lr", type=float, default=1e-3, help="research default")
    p.add_argument("--batch-size", type=int, default=128, help="research default")
    p.add_argument("--augment", action="store_true", help="random flip + crop (pad 4) on the training images")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    one_thread()
    torch.manual_seed(args.seed)
    train_qat = import_research(research_path(args.research))
    train_qat.get_dataloaders, sizes = loaders(args.data, args.seed, args.augment)

    log = {"model": args.model, "data": args.data, "images": sizes, "args": {k: str(v) for k, v in vars(args).items()},
           "evaluate": [], "seconds": {}}
    research_evaluate = train_qat.evaluate

    def evaluate(model, loader, device):  # the research evaluate, its results kept
        loss, acc = research_evaluate(model, loader, device)
        log["evaluate"].append({"loss": round(loss, 4), "acc": round(100 * acc, 2)})
        return loss, acc
    train_qat.evaluate = evaluate

    research_train_float = train_qat.train_float

    def train_float(a):  # train_qat calls it when no float checkpoint exists; timed separately
        t0 = time.time()
        research_train_float(a)
        log["seconds"]["float"] = round(time.time() - t0, 1)
        log["float_epochs"] = len(log["evaluate"])
    train_qat.train_float = train_float

    ns = Namespace(model=args.model, data="(replaced)", out=str(args.out), batch_size=args.batch_size, workers=0,
                   epochs=args.epochs, warmup_float_epochs=args.epochs, lr=args.lr, qat_epochs=args.qat_epochs,
                   qat_lr=args.qat_lr, backend="fbgemm")
    t0 = time.time()
    train_qat.train_qat(ns)
    log["seconds"]["total"] = round(time.time() - t0, 1)
    log["seconds"]["qat"] = round(log["seconds"]["total"] - log["seconds"].get("float", 0.0), 1)
    # The last evaluate() ran with observers on (the research utils.disable_observer(model) is a
    # no-op on a whole model), and the checkpoint was saved right after it.
    log["research_final_eval_acc"] = log["evaluate"][-1]["acc"]
    (args.out / "train_research.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps({k: log[k] for k in ("seconds", "research_final_eval_acc", "images")}))


if __name__ == "__main__":
    main()
