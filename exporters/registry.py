"""The two tables everything else reads: export targets (`TARGETS`) and the runtimes that run
them (`RUNTIMES`). The CLI's `--target` choice, verify, bench and the parametrized tests all
read these; adding a target is one row plus its module, adding a runtime one row plus its runner
class (deploy_kit/runners.py).

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
        if self.runtime not in RUNTIMES or self.name not in RUNTIMES[self.runtime].loads:
            raise ValueError(f"target {self.name}: runtime must be one of those that load it, got {self.runtime!r}")

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


# ----------------------------------------------------------------------------- runtimes

VERIFY, BENCH = "verify", "bench"


def _importable(module: str) -> tuple[bool, str | None]:
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        found = False
    return found, None


@dataclass(frozen=True)
class Runtime:
    """One runtime that runs exported files: which targets' artifacts it loads, the runner class
    that drives it, whether it must run in a process of its own, and how it is installed."""

    name: str
    runner: str  # "module:Class", imported on first use; the class implements runners.Runner
    module: str  # the Python module the runtime lives in (bench imports it before its memory baseline)
    loads: tuple[str, ...]  # target names whose artifacts it runs
    label: str | None = None  # row label when it is not the runtime's name
    isolated: bool = False  # always in a fresh process (deploy_kit/worker.py), never beside TensorFlow
    extra: str | None = None  # the pyproject extra that installs it; None: a core dependency
    uses: tuple[str, ...] = (VERIFY, BENCH)
    options: tuple[tuple[str, object], ...] = ()  # keyword options for the runner class
    status_fn: str | None = None  # "module:function" → (usable, why not), when importable is not enough

    def runner_class(self) -> type:
        module, _, cls = self.runner.partition(":")
        return getattr(importlib.import_module(module), cls)

    def status(self) -> tuple[bool, str | None]:
        """(usable here, why not — None when simply not installed)."""
        if self.status_fn is None:
            return _importable(self.module)
        module, _, fn = self.status_fn.partition(":")
        return getattr(importlib.import_module(module), fn)()

    def available(self) -> bool:
        return self.status()[0]

    def install_hint(self) -> str:
        return f"pip install -e '.[{self.extra}]'" if self.extra else "pip install -e ."


RUNTIMES: dict[str, Runtime] = {
    "onnxruntime": Runtime("onnxruntime", "deploy_kit.runners:OrtRunner", "onnxruntime", ("onnx", "ort")),
    "litert": Runtime("litert", "deploy_kit.runners:LiteRTRunner", "ai_edge_litert.interpreter", ("tflite",)),
    # tflite_runtime and TensorFlow/LiteRT carry the same TFLite C++ symbols and the copy loaded
    # first wins: after TensorFlow was imported, tflite_runtime 2.14 could not read any model.
    "tflite_runtime": Runtime("tflite_runtime", "deploy_kit.runners:LiteRTRunner", "tflite_runtime.interpreter",
                              ("tflite",), isolated=True, extra="tflite-runtime",
                              status_fn="deploy_kit.runners:tflite_runtime_status"),
    # LiteRT without its default XNNPACK delegate, timed by bench only: XNNPACK takes neither LESS
    # nor SELECT_V2, so this row shows what a LUT costs where a graph falls back to builtin kernels.
    "litert-builtin": Runtime("litert-builtin", "deploy_kit.runners:LiteRTRunner", "ai_edge_litert.interpreter",
                              ("tflite",), label="litert (no XNNPACK)", uses=(BENCH,),
                              options=(("default_delegates", False),)),
}


def runtime(name: str, where: str = "") -> Runtime:
    """The table's entry, or a ConfigError naming the runtimes deploykit runs."""
    if name not in RUNTIMES:
        raise ConfigError(f"{where}unknown runtime {name!r}; deploykit runs {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def runtimes_loading(target: str, use: str = VERIFY, usable_only: bool = True) -> list[Runtime]:
    """The runtimes that run `target`'s artifacts for `use` (verify or bench), in table order."""
    return [r for r in RUNTIMES.values()
            if target in r.loads and use in r.uses and (not usable_only or r.available())]


# ----------------------------------------------------------------------------- targets

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
