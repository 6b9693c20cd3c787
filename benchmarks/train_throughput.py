"""Training throughput (images/s) of every zoo architecture on 3×32×32 input: a float step and a
QAT step (fake-quant weights and activations), so later stages can size their defaults.

    python benchmarks/train_throughput.py                       # width 1.0, batch 128, 3 timed steps each
    python benchmarks/train_throughput.py --widths 1.0 0.25 --steps 2

Prints a markdown table and writes it to benchmarks/train_throughput.md. The input is real
digits images replicated to three channels: throughput does not depend on content, but the
step is the same one `deploykit train` takes (Adam, cross-entropy, train mode).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deploy_kit import quant
from deploy_kit.data import load_dataset, normalize
from deploy_kit.models import ARCHITECTURES, build_model

OUT = Path(__file__).with_suffix(".md")


def _batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_dataset("digits", seed=0)
    train = ds.split("train")
    idx = np.arange(batch_size) % len(train)
    images = np.repeat(train.images[idx], 3, axis=-1)
    norm = type(ds.norm)(ds.norm.mean * 3, ds.norm.std * 3)
    return torch.from_numpy(normalize(images, norm)), torch.from_numpy(train.labels[idx])


def _images_per_s(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, warmup: int, steps: int) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(x) / (time.perf_counter() - start)


def measure(arch: str, x, y, width: float, warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = build_model(arch, (3, 32, 32), 10, width)
    params = sum(p.numel() for p in model.parameters())
    float_ips = _images_per_s(model, x, y, warmup, steps)
    quant.prepare_qat(quant.fold_batchnorm(model))
    qat_ips = _images_per_s(model, x, y, warmup, steps)
    return {"model": arch, "params": params, "taps": len(model.taps()), "float": float_ips, "qat": qat_ips}


def render(tables: dict[float, list[dict]], args) -> str:
    load = os.getloadavg()
    lines = [
        f"# Training throughput, 3×32×32, batch {args.batch}",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) (`deploykit train`'s default), "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); load average at the end "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}. {args.warmup} warm-up + {args.steps} timed steps per cell.",
        "The machine is shared: other jobs ran at the same time, so read these as lower bounds.",
    ]
    for width, rows in tables.items():
        lines += ["", f"## width {width}", "",
                  "| model | params | taps | float img/s | QAT img/s | QAT/float | 1 QAT epoch of 50k images |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            params = f"{r['params'] / 1e6:.2f} M" if r["params"] >= 1e5 else f"{r['params'] / 1e3:.1f} k"
            lines.append(f"| {r['model']} | {params} | {r['taps']} | {r['float']:.0f} | {r['qat']:.0f} "
                         f"| {r['qat'] / r['float']:.2f} | {50000 / r['qat'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--widths", type=float, nargs="+", default=[1.0])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (train's default is 1)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = _batch(args.batch)
    tables = {}
    for width in args.widths:
        tables[width] = []
        for arch in args.models:
            r = measure(arch, x, y, width, args.warmup, args.steps)
            tables[width].append(r)
            print(f"{arch} @ width {width}: float {r['float']:.0f} img/s, QAT {r['qat']:.0f} img/s", flush=True)
    table = render(tables, args)
    print(table)
    args.out.write_text(table)


if __name__ == "__main__":
    main()
