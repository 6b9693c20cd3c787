"""The one table of export targets. The CLI's `--target` choice, verify, bench and the
parametrized tests all read `TARGETS`; adding a target is one row here plus its module.

Every target converts the rewritten ONNX graph (`model.onnx`, the source of all targets) and
has the same signature:

    export(onnx_path: Path, out_path: Path, *, io: str, calibration: np.ndarray,
           layer_quant: dict[str, ActivationQuant]) -> dict

returning the artifact's manifest details (`inputs`, `outputs`, and anything target-specific).
Export functions are imported lazily, so a missing TensorFlow only breaks the tflite target.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from deploy_kit.errors import ConfigError

RUNTIMES = ("onnxruntime", "litert")
VARIANTS = {"lut": "", "relu": "relu/"}  # variant → sub-folder of the exports dir


@dataclass(frozen=True)
class Target:
    name: str
    filename: str
    runtime: str
    export_fn: str  # "module:function", imported on first use
    description: str
    calibrated: bool = False  # needs calibration images (post-training quantization)
    options: tuple[str, ...] = ()  # the export options (ExportConfig fields) it takes beyond the defaults

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ValueError(f"target {self.name}: runtime must be one of {RUNTIMES}, got {self.runtime!r}")

    def exporter(self) -> Callable:
        module, _, fn = self.export_fn.partition(":")
        return getattr(importlib.import_module(module), fn)

    def available(self) -> bool:
        """Whether this target's exporter can be imported here (tests skip the ones that cannot)."""
        try:
            self.exporter()
        except (ImportError, AttributeError):
            return False
        return True

    def path(self, variant: str = "lut") -> str:
        """Path of the artifact inside the exports folder."""
        return VARIANTS[variant] + self.filename


TARGETS: dict[str, Target] = {
    "onnx": Target("onnx", "model.onnx", "onnxruntime", "exporters.onnx_graph:export_onnx",
                   "QDQ ONNX (opset 17): int8 weights, uint8 activations, LUT as Less/Where between DQ and Q"),
    "ort": Target("ort", "model.ort", "onnxruntime", "exporters.ort:export_ort",
                  "ORT Mobile flatbuffer + required_operators.config for a reduced build"),
    "tflite": Target("tflite", "model_int8.tflite", "litert", "exporters.tflite:export_tflite",
                     "full-integer TFLite INT8 (int8 I/O unless --io float), LUT per --lut-form (default saturate)",
                     calibrated=True, options=("io", "lut_form")),
}
ALL = "all"


def target_names() -> list[str]:
    return list(TARGETS)


def resolve(names) -> list[Target]:
    """`["all"]` or target names → Targets in registry order; unknown names are a ConfigError."""
    names = [names] if isinstance(names, str) else list(names)
    if ALL in names:
        return list(TARGETS.values())
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise ConfigError(f"unknown target {unknown[0]!r}; choose from {', '.join(TARGETS)} or {ALL}")
    return [t for n, t in TARGETS.items() if n in names]


def check_options(targets: list[Target], given: dict[str, str]) -> None:
    """Options set away from their defaults (`{"io": "float"}`) must apply to a chosen target: an
    option no chosen target takes would be silently ignored, so it is a ConfigError naming the
    targets that take it."""
    for option, value in given.items():
        if not any(option in t.options for t in targets):
            takers = [t.name for t in TARGETS.values() if option in t.options]
            flag = "--" + option.replace("_", "-")
            raise ConfigError(f"{flag} {value} applies to the {', '.join(takers)} target only, not to "
                              f"{', '.join(t.name for t in targets)}; add --target {takers[0]} or drop {flag}")
