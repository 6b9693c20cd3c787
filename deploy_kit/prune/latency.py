"""The latency table: what a channel configuration costs in the target runtime, measured here.

How it is built (chosen for being cheap *and* checked, see benchmarks/prune.md):
  1. a set of channel configurations — uniform keep ratios and seeded random per-layer ones,
     channel counts in steps of 8 (4 for layers under 32 channels);
  2. each is L1-pruned, given INT8 activation ranges on a few training images and exported by
     the project's own exporters (model.onnx → TFLite INT8), so what is timed is the same graph
     form `deploykit export` writes;
  3. all files are timed interleaved (1 thread, batch 1, the median of per-round medians) —
     the machine is shared, and interleaving spreads its load over every model alike — in a
     fresh process with Intel AMX refused unless asked (deploy_kit/amx.py: no phone has it);
  4. a per-layer cost model is fitted by non-negative least squares:
         T = t0 + Σ_layers k_g(l) · MACs_l(c_in, c_out) + m · Σ_layers c_out·H·W
     with one k per layer group (kind, kernel, stride, output size: layers that run the same
     kernel at the same resolution share it). A layer's entry at (c_in, c_out) is then
     k·MACs + m·c_out·H·W; whole models are the sum plus t0.
  5. held-out configurations (not in the fit) are predicted and compared with their measured
     latency: the error is recorded with the table, and `prune` checks it again on its output.

A NetAdapt-style table of isolated single layers was the alternative; it ignores what surrounds
a layer (the issue cites −10.5 % predicted vs −31 % measured), and whole models are what runs.

Cached under $DEPLOYKIT_CACHE/latency/, keyed by model, width, input shape, runtime, the base
channel counts and whether AMX was used; the file records the library versions and is rebuilt
(and the caller told) when they differ.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from deploy_kit import __version__, quant
from deploy_kit.amx import mode as amx_mode
from deploy_kit.data import _cache_dir
from deploy_kit.errors import ConfigError
from deploy_kit.fsutil import write_json
from deploy_kit.models import ZooModel
from deploy_kit.native_log import native_stderr_silenced
from deploy_kit.prune.surgery import LayerInfo, full_channels, pruned_copy, resolve_channels

RUNTIMES = ("litert", "onnxruntime")
CACHE_FORMAT = "deploykit-latency/3"  # /2: the runtime call alone is timed; /3: in a fresh process, AMX refused


def library_versions() -> dict[str, str]:
    import ai_edge_litert
    import onnxruntime
    import tensorflow as tf

    return {"deploykit": __version__, "torch": torch.__version__.split("+")[0], "tensorflow": tf.__version__,
            "ai-edge-litert": getattr(ai_edge_litert, "__version__", "?"), "onnxruntime": onnxruntime.__version__}


def channel_step(c: int) -> int:
    """Counts move in steps of 8 (SIMD width of the int8 kernels); of 4 for layers under 32."""
    return 8 if c >= 32 else 4


def round_channels(c_full: int, ratio: float) -> int:
    step = channel_step(c_full)
    want = ratio * c_full
    if c_full - want < step / 2:  # the full count is the nearest choice even when not a multiple
        return c_full
    return int(min(c_full, max(min(c_full, step), round(want / step) * step)))


# ----------------------------------------------------------------------------- the cost model

def group_key(info: LayerInfo) -> str:
    return f"{info.kind}{info.kernel}s{info.stride}@{info.out_hw}"


@dataclass(frozen=True)
class LatencyTable:
    """The fitted per-layer cost model of one model in one runtime (milliseconds)."""

    infos: dict  # name → LayerInfo
    t0: float
    k: dict  # group key → ms per MAC
    m: float  # ms per output element
    record: dict = field(default_factory=dict)  # samples, validation error, versions: for the cache and the report

    def layer_ms(self, info: LayerInfo, c_in: int, c_out: int) -> float:
        return self.k.get(group_key(info), 0.0) * info.macs(c_in, c_out) + self.m * c_out * info.out_hw

    def predict(self, channels: dict[str, int]) -> float:
        return self.t0 + sum(self.layer_ms(i, ci, co) for i, ci, co in resolve_channels(self.infos, channels))

    def per_layer(self, channels: dict[str, int]) -> dict[str, float]:
        return {i.name: round(self.layer_ms(i, ci, co), 5) for i, ci, co in resolve_channels(self.infos, channels)}

    def steps(self, name: str) -> dict[int, float]:
        """The table row of one prunable layer: ms at each output count (steps of 8), with its
        input at the full count — what the report prints."""
        info = self.infos[name]
        step = channel_step(info.c_out)
        counts = sorted({*range(step, info.c_out + 1, step), info.c_out})
        return {c: round(self.layer_ms(info, info.c_in, c), 5) for c in counts}


def features(infos: dict, channels: dict[str, int], groups: list[str]) -> np.ndarray:
    row = np.zeros(len(groups) + 2)
    row[0] = 1.0
    for info, ci, co in resolve_channels(infos, channels):
        row[1 + groups.index(group_key(info))] += info.macs(ci, co) / 1e6
        row[-1] += co * info.out_hw / 1e6
    return row


def fit(infos: dict, samples: list[tuple[dict, float]]) -> tuple[float, dict, float]:
    """NNLS fit of (t0, k per group, m) to (channels, measured ms) samples."""
    from scipy.optimize import nnls

    groups = sorted({group_key(i) for i in infos.values()})
    a = np.stack([features(infos, ch, groups) for ch, _ in samples])
    b = np.array([ms for _, ms in samples])
    coef, _ = nnls(a, b)
    return float(coef[0]), {g: float(c) / 1e6 for g, c in zip(groups, coef[1:-1])}, float(coef[-1]) / 1e6


# ----------------------------------------------------------------------------- configurations

def sample_configs(infos: dict, n_random: int, seed: int) -> list[dict[str, int]]:
    """Uniform keep ratios first, then seeded random per-layer ratios."""
    full = full_channels(infos)
    configs = [{n: round_channels(c, r) for n, c in full.items()} for r in (1.0, 0.75, 0.5, 0.3)]
    rng = np.random.default_rng(seed)
    for _ in range(n_random):
        configs.append({n: round_channels(c, float(rng.uniform(0.1, 1.0))) for n, c in full.items()})
    return configs


# ----------------------------------------------------------------------------- INT8 export and timing

@torch.no_grad()
def int8_qat_form(float_model: ZooModel, x: torch.Tensor) -> ZooModel:
    """A frozen QAT model (activation ranges observed on `x`) of a float model, without training:
    what the exporters take. Good enough for timing (latency does not depend on the values)."""
    model = quant.prepare_qat(quant.fold_batchnorm(copy.deepcopy(float_model)))
    model.train()
    for i in range(0, len(x), 64):
        model(x[i:i + 64])
    quant.freeze(model)
    return model.eval()


def export_for_runtime(qat_model: ZooModel, in_shape: tuple[int, int, int], runtime: str, folder: Path,
                       stem: str, calibration: np.ndarray) -> Path:
    """model.onnx (QDQ) for onnxruntime, or its TFLite INT8 conversion for LiteRT."""
    from exporters import onnx_graph
    from exporters.tflite import export_tflite

    onnx_path = folder / f"{stem}.onnx"
    onnx_graph.save(onnx_graph.teacher_graph(SimpleNamespace(model=qat_model, meta={"input_shape": list(in_shape)})), onnx_path)
    if runtime == "onnxruntime":
        return onnx_path
    tfl = folder / f"{stem}.tflite"
    with native_stderr_silenced():
        export_tflite(onnx_path, tfl, io="int8", calibration=calibration)
    return tfl


def measure(paths: list[Path], runtime: str, image: np.ndarray, rounds: int = 15, repeats: int = 50,
            seed: int = 0, amx: bool = False) -> list[float]:
    """Median ms per file at batch 1, 1 thread (deploy_kit/timing.py), timed in a fresh process
    with Intel AMX refused unless `amx` (deploy_kit/amx.py: no phone has it, and on hosts that do,
    its INT8 kernels' fixed per-layer cost hides what channels cost)."""
    from deploy_kit import worker

    job = {"op": "latency", "paths": [str(p) for p in paths], "runtime": runtime, "rounds": rounds,
           "repeats": repeats, "seed": seed, "refuse_amx": not amx}
    with tqdm(total=1, desc=f"latency: timing {len(paths)} models", unit="session", leave=False, dynamic_ncols=True):
        meta, _ = worker.call(job, {"x": np.ascontiguousarray(image, np.float32)},
                              failure=f"timing {len(paths)} {runtime} models failed")
    return meta["ms"]


def time_against(unpruned: ZooModel, models: list[ZooModel], in_shape: tuple[int, int, int], runtime: str,
                 x_calib: torch.Tensor, image: np.ndarray, seed: int, amx: bool = False) -> tuple[float, list[float]]:
    """(unpruned ms, ms of each model): frozen QAT models exported for `runtime` and timed
    interleaved with the unpruned one in one session (1 thread, batch 1, 21 rounds)."""
    with tempfile.TemporaryDirectory(prefix="deploykit-timing-") as tmp:
        paths = [export_for_runtime(m, in_shape, runtime, Path(tmp), f"m{i}", x_calib[:8].numpy())
                 for i, m in enumerate([unpruned, *models])]
        ms = measure(paths, runtime, image, rounds=21, seed=seed, amx=amx)
    return ms[0], ms[1:]


# ----------------------------------------------------------------------------- build / cache

@dataclass(frozen=True)
class TableSpec:
    arch: str
    width: float
    in_shape: tuple[int, int, int]
    runtime: str
    base: dict  # the base model's channel counts (prunable layers)
    n_random: int = 12
    n_holdout: int = 3
    seed: int = 0
    amx: bool = False  # time with Intel AMX allowed (deploy_kit/amx.py; no phone has it)

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"unknown --runtime {self.runtime!r}; choose one of: {', '.join(RUNTIMES)}")

    def cache_path(self) -> Path:
        key = json.dumps([self.arch, self.width, list(self.in_shape), self.runtime, sorted(self.base.items()),
                          self.n_random, self.n_holdout, self.seed, amx_mode(self.amx)])
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        shape = "x".join(map(str, self.in_shape))
        return _cache_dir() / "latency" / f"{self.arch}-w{self.width}-{shape}-{self.runtime}-{digest}.json"


def load_cached(spec: TableSpec, infos: dict) -> tuple[LatencyTable | None, str | None]:
    """The cached table, or None and why it was not used (None: no cache at all)."""
    path = spec.cache_path()
    if not path.is_file():
        return None, None
    try:
        rec = json.loads(path.read_text())
        if rec.get("format") != CACHE_FORMAT:
            return None, f"latency cache {path} has format {rec.get('format')!r}; rebuilt"
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None, f"latency cache {path} is corrupt; rebuilt"
    now = library_versions()
    if rec.get("versions") != now:
        changed = {k: (rec.get("versions", {}).get(k), v) for k, v in now.items() if rec.get("versions", {}).get(k) != v}
        said = ", ".join(f"{k} {a} → {b}" for k, (a, b) in changed.items())
        return None, f"latency cache {path.name} was measured with other library versions ({said}); rebuilt"
    return LatencyTable(infos, rec["t0"], rec["k"], rec["m"], rec), None


def build_table(spec: TableSpec, float_model: ZooModel, infos: dict, x_calib: torch.Tensor, image: np.ndarray,
                load: float | None = None) -> LatencyTable:
    """Export, time and fit (see the module docstring); writes the cache, with `load` (other work on
    the machine as the timing began) recorded."""
    configs = sample_configs(infos, spec.n_random + spec.n_holdout, spec.seed)
    fitset = configs[:len(configs) - spec.n_holdout]
    with tempfile.TemporaryDirectory(prefix="deploykit-latency-") as tmp:
        paths = []
        for i, ch in enumerate(tqdm(configs, desc="latency table: export", unit="model", leave=False, dynamic_ncols=True)):
            qat = int8_qat_form(pruned_copy(float_model, ch, spec.in_shape), x_calib)
            paths.append(export_for_runtime(qat, spec.in_shape, spec.runtime, Path(tmp), f"m{i}", x_calib[:8].numpy()))
        ms = measure(paths, spec.runtime, image, seed=spec.seed, amx=spec.amx)
    samples = list(zip(configs, ms))
    t0, k, m = fit(infos, samples[:len(fitset)])
    table = LatencyTable(infos, t0, k, m)
    errors = [100.0 * (table.predict(ch) - got) / got for ch, got in samples[len(fitset):]]
    record = {"format": CACHE_FORMAT, "arch": spec.arch, "width": spec.width, "input_shape": list(spec.in_shape),
              "runtime": spec.runtime, "versions": library_versions(), "seed": spec.seed, "t0": t0, "k": k, "m": m,
              "samples": [{"channels": ch, "ms": t, "holdout": j >= len(fitset)} for j, (ch, t) in enumerate(samples)],
              "holdout_error_pct": [round(e, 2) for e in errors],
              "holdout_mean_abs_error_pct": round(float(np.mean(np.abs(errors))), 2) if errors else None,
              "method": "whole-model INT8 exports, interleaved medians, NNLS per-layer-group fit", "threads": 1,
              "amx": amx_mode(spec.amx),
              "other_load": load}
    write_json(spec.cache_path(), record)
    return LatencyTable(infos, t0, k, m, record)


def latency_table(spec: TableSpec, float_model: ZooModel, infos: dict, x_calib: torch.Tensor, image: np.ndarray,
                  say=print) -> LatencyTable:
    table, why = load_cached(spec, infos)
    if table is not None:
        return table
    if why:
        say(why)
    load = other_load()
    if load is not None and load >= BUSY_LOAD:
        say(f"warning: other work is running (1-minute load {load:.1f} besides this run, {os.cpu_count()} cores) "
            f"while the latency table is timed; a busy machine times slow and unevenly and the cached table "
            f"misleads every later run: build it on a quiet machine, or delete {spec.cache_path()} afterwards")
    return build_table(spec, float_model, infos, x_calib, image, load=load)


# Other work worth a warning while tables are timed: on CIFAR-10 VGG16-0.25 a table timed beside one
# distillation job (load ≈ 1 besides the timing) predicted the pruned/unpruned ratio 20.6 % high, and
# the agent cut to 0.300× MACs where a quiet table allowed 0.347× (benchmarks/prune.md, session 11).
BUSY_LOAD = 0.5


def other_load() -> float | None:
    """The 1-minute load average less this process's own runnable thread (None where the OS has none)."""
    try:
        return round(max(0.0, os.getloadavg()[0] - 1.0), 2)
    except (OSError, AttributeError):
        return None
