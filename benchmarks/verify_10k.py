"""Seconds for `verify` on a 10,000-image 32×32×3 test split, through every runtime.

    python benchmarks/verify_10k.py --out /tmp/verify10k [--lut-form saturate]   # builds, trains, exports, verifies

No download: the split is an ImageFolder made of real `digits` images, replicated to three
channels. train/ holds the digits train split; test/ holds 10,000 images drawn (seeded) from the
digits test split, each shifted by −2…2 pixels, so the images are real but repeat. A LeNet-5
teacher is trained on it, every layer gets the same LUT codes (2, 5, 9, 14, 24), all targets are
exported, and `verify` runs on the full test split. Prints the verify table's timing summary.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

CODES = {"t1_code": 2, "v1_code": 5, "t2_code": 9, "v2_code": 14, "tmax_code": 24}


def build_folder(root: Path, images: int, seed: int) -> None:
    from PIL import Image

    from deploy_kit.data import load_dataset

    digits = load_dataset("digits", seed=seed)

    def dump(split: str, pixels: np.ndarray, labels: np.ndarray) -> None:
        for i, (im, y) in enumerate(zip(pixels, labels)):
            folder = root / split / str(y)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.repeat(im, 3, axis=-1)).save(folder / f"{i:05d}.png")

    train, test = digits.split("train"), digits.split("test")
    dump("train", train.images, train.labels)
    rng = np.random.default_rng(seed)
    pick, shifts = rng.integers(0, len(test), images), rng.integers(-2, 3, (images, 2))
    shifted = np.stack([np.roll(test.images[i], tuple(s), axis=(0, 1)) for i, s in zip(pick, shifts)])
    dump("test", shifted, test.labels[pick])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lut-form", default="select", help="how the TFLite file lowers each LUT (export --lut-form)")
    a = p.parse_args()

    from deploy_kit.export import ExportConfig, export
    from deploy_kit.fsutil import write_json
    from deploy_kit.teacher import load_teacher
    from deploy_kit.train import TrainConfig, train_teacher
    from deploy_kit.verify import VerifyConfig, verify_exports

    folder, run = a.out / "digits3", a.out / "run"
    if not folder.exists():
        build_folder(folder, a.images, a.seed)
    if not (run / "teacher.json").exists():
        train_teacher(TrainConfig(model="lenet5", data=f"imagefolder:{folder}", epochs=10, qat_epochs=3, seed=a.seed), run)
    teacher = load_teacher(run)
    write_json(run / "result.json", {"model": teacher.arch, "layers": {n: dict(CODES) for n in teacher.layer_quant},
                                     "teacher": {"path": ".", "sha256": teacher.sha256}})
    export(ExportConfig(result_path=run / "result.json", lut_form=a.lut_form, force=True))
    start = time.perf_counter()
    report = verify_exports(VerifyConfig(exports=run / "exports"))
    print(f"verify: {report.images} images × {len(report.rows)} runtimes in {time.perf_counter() - start:.1f} s "
          f"(passed: {report.passed})")
    for r in report.rows:
        print(f"  {r.runtime:<24} {r.artifact:<24} {r.images_per_s:>8.0f} img/s  agreement {r.agreement_student:.2f}%")


if __name__ == "__main__":
    main()
