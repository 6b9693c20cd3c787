"""`--device auto|cpu|cuda`: where training work runs.

Only *training* moves (train's epochs, finetune's epochs, the search's reward passes). The integer
references — teacher and student in the runtime arithmetic, whose accuracies go into teacher.json,
result.json and verify — are always evaluated on the CPU, so they are bit-identical whatever
device trained the weights.
"""

from __future__ import annotations

import torch

from deploy_kit.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def check_device_name(name: str) -> None:
    if name not in DEVICES:
        raise ConfigError(f"unknown --device {name!r}; choose one of: {', '.join(DEVICES)}")


def resolve_device(name: str) -> torch.device:
    """auto → CUDA when torch sees a GPU, else the CPU; cuda without a GPU is a ConfigError."""
    check_device_name(name)
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        # TF32 rounds conv/matmul inputs to 10 mantissa bits: fake-quant training would then see
        # other sums than the CPU does. Full float32 keeps the two devices close.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda")
    if name == "cuda":
        build = "this torch build has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
        raise ConfigError(f"--device cuda: {build} (torch {torch.__version__}); use --device cpu or --device auto")
    return torch.device("cpu")
