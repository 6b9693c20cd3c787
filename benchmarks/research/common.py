"""Shared by the research-import drivers: where the research code is, how to import it, and the
CIFAR-10 arrays deploykit reads for a `--data` spec, normalized as the research trainer does.

Benchmark tooling only: nothing in deploy_kit/ or tests/ imports this, and it needs the research
repository (public gfat-l/inference, cloned anywhere) and the images; neither ships with deploykit.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
import warnings
from pathlib import Path

import torch

from deploy_kit.data import Dataset, load_dataset
from deploy_kit.research import RESEARCH_NORM

# The research model classes, by the name its train_qat.py uses.
RESEARCH_MODELS = {"lenet5": ("model_lenet5_tap_quant", "LeNet5TapQuant"),
                   "alexnet": ("model_alexnet_tap_quant", "AlexNetTapQuant"),
                   "nin": ("model_nin_tap_quant", "NiNTapQuant"),
                   "vgg16": ("model_vgg16_tap_quant", "VGG16TapQuant"),
                   "vgg19": ("model_vgg19_tap_quant", "VGG19TapQuant"),
                   "mobilenetv1": ("model_mobilenetv1_tap_quant", "MobileNetV1TapQuant")}


def research_path(arg: str | None) -> Path:
    """The research checkout: --research, else $RESEARCH_REPO."""
    path = Path(arg or os.environ.get("RESEARCH_REPO", ""))
    if not (path / "train_qat.py").is_file():
        sys.exit(f"research repo not found at {str(path) or '(unset)'}: pass --research or set RESEARCH_REPO "
                 "to a clone of gfat-l/inference")
    return path


def import_research(repo: Path):
    """Put the research repo on sys.path and return its train_qat module. Its utils.py imports
    torchvision at module level for the CIFAR loaders we replace; when torchvision is not
    installed (deploykit does not need it) an empty stand-in satisfies that import."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        tv = types.ModuleType("torchvision")
        tv.datasets, tv.transforms = types.ModuleType("torchvision.datasets"), types.ModuleType("torchvision.transforms")
        sys.modules.update({"torchvision": tv, "torchvision.datasets": tv.datasets,
                            "torchvision.transforms": tv.transforms})
    sys.path.insert(0, str(repo))
    return importlib.import_module("train_qat")


def research_model_class(name: str):
    module, cls = RESEARCH_MODELS[name]
    return getattr(importlib.import_module(module), cls)


def research_dataset(spec: str, seed: int = 0) -> Dataset:
    """deploykit's dataset for `spec` (same decode, same train/val/test split as `import`), with
    the research trainer's normalization — the arrays both sides see."""
    ds = load_dataset(spec, seed)
    return Dataset(ds.spec, ds.classes, ds.splits, RESEARCH_NORM)


def one_thread() -> None:
    """One thread (a shared-machine benchmark), and quiet about torch.ao's deprecation: the
    research code is built on it, so the warning says nothing here."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")
