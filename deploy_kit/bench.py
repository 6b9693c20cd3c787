"""`bench`: size, latency, throughput and memory of every export, LUT vs plain ReLU.

Each artifact runs in the same runner `verify` uses, so what is timed is what was verified.
Measurements, per (runtime, artifact):

  latency      batch 1, `warmup` untimed runs, then `repeats` timed runs: p50 and p90 in ms
  throughput   batch 32 (looped at batch 1 by a fixed-size model), images/s over `repeats32` runs
  peak memory  growth of peak RSS (VmHWM) over the RSS just before the model is loaded: model,
               arenas and both workloads. Linux only (None elsewhere).
  size         the artifact's bytes

Every artifact is measured in a fresh Python process: in one long process, memory freed by the
previous runner is reused by the next one (its RSS growth reads as ~0), and allocator and
thread-pool state would carry over into the timings.

The LUT's cost is the ratio of the LUT variant to the ReLU variant of the same target.
Inputs are real test images (normalized), never zeros: TFLite's builtin SELECT_V2 branches per
element, so its cost depends on the data (VGG16-0.5 LUT model: 7.0 ms on a real image, 2.2 ms
on zeros, where every branch goes the same way).
"""

from __future__ import annotations

import gc
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from deploy_kit import runners as rn
from deploy_kit.amx import mode as amx_mode
from deploy_kit.data import load_dataset, normalize
from deploy_kit.errors import ConfigError
from deploy_kit.fsutil import atomic_path, write_json
from exporters import manifest as mf
from exporters.registry import BENCH, RUNTIMES

BENCH_JSON, BENCH_MD = "bench.json", "bench.md"
FLOAT_VARIANT = "float"  # the teacher without quantization, built for bench only (not an export)
SCHEMA = "deploykit-bench/1"
THROUGHPUT_BATCH = 32


@dataclass(frozen=True)
class BenchConfig:
    exports: Path
    warmup: int = 20
    repeats: int = 200
    repeats32: int = 20
    threads: int = 1  # one thread: comparable across runtimes, and what a phone core sees
    seed: int = 0  # which test images feed the timed runs
    float_baseline: bool = True  # also time the unquantized model in onnxruntime
    rounds: int = 1  # >1: every artifact once per round, interleaved; the median round is reported
    amx: bool = False  # let the runtimes use Intel AMX (no phone has it: deploy_kit/amx.py)

    def __post_init__(self):
        if self.warmup < 0 or self.repeats < 1 or self.repeats32 < 1:
            raise ConfigError(f"need --warmup >= 0 and --repeats >= 1, got {self.warmup}, {self.repeats}")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be >= 1, got {self.rounds}")
        if self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")


@dataclass
class BenchRow:
    runtime: str
    target: str
    variant: str
    artifact: str
    bytes: int
    latency_ms_p50: float
    latency_ms_p90: float
    throughput_ips: float
    peak_rss_mb: float | None


# ----------------------------------------------------------------------------- memory

def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak RSS growth (MiB) over the `with` block, from the kernel's own high-water mark."""

    def __enter__(self):
        gc.collect()
        self.base = _status_kib("VmRSS")
        self.ok = self.base is not None and _reset_peak_rss()
        return self

    def __exit__(self, *exc):
        peak = _status_kib("VmHWM") if self.ok else None
        self.mb = None if peak is None else round(max(peak - self.base, 0) / 1024, 2)
        return False


# ----------------------------------------------------------------------------- timing

def latency_ms(runner, x1: np.ndarray, warmup: int, repeats: int) -> tuple[float, float]:
    for _ in range(warmup):
        runner.predict(x1)
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        runner.predict(x1)
        times[i] = time.perf_counter() - start
    return round(float(np.percentile(times, 50)) * 1e3, 4), round(float(np.percentile(times, 90)) * 1e3, 4)


def throughput(runner, x32: np.ndarray, repeats: int) -> float:
    runner.predict(x32)  # warm-up at this batch size (a resize or a new arena happens here)
    start = time.perf_counter()
    for _ in range(repeats):
        runner.predict(x32)
    return round(len(x32) * repeats / (time.perf_counter() - start), 1)


def _artifact(entry: dict, exports: Path) -> mf.Artifact:
    """A manifest entry, checked like every manifest path; the float baseline is bench's own
    file in its temporary folder (absolute path, no manifest hash), made by `float_artifact`."""
    if entry.get("variant") == FLOAT_VARIANT:
        return mf.Artifact("onnx", FLOAT_VARIANT, Path(entry["path"]), "onnxruntime", "", entry["bytes"], entry)
    return mf.artifacts({"artifacts": [entry]}, exports)[0]


def measure(entry: dict, exports: Path, runtime: str, cfg: BenchConfig, x32: np.ndarray) -> dict:
    """Load one artifact and time it, in this process (bench_artifact's fresh worker). The
    runtime is imported before the memory baseline: its code is shared by every model, the
    model's own cost is what we report."""
    import importlib

    importlib.import_module(RUNTIMES[runtime].module)
    with PeakRSS() as mem:
        runner = rn.make_runner(_artifact(entry, exports), exports, runtime=runtime, threads=cfg.threads,
                                batch_size=THROUGHPUT_BATCH, isolate=False)  # this worker is the fresh process
        p50, p90 = latency_ms(runner, x32[:1], cfg.warmup, cfg.repeats)
        ips = throughput(runner, x32, cfg.repeats32)
    return {"runtime": runner.name, "latency_ms_p50": p50, "latency_ms_p90": p90, "throughput_ips": ips,
            "peak_rss_mb": mem.mb}


def bench_artifact(art: mf.Artifact, runtime: str, exports: Path, cfg: BenchConfig, x32: np.ndarray) -> BenchRow:
    """`measure` in a fresh interpreter (deploy_kit/worker.py, the one isolated runners use)."""
    from deploy_kit import worker

    job = {"op": "bench", "entry": art.entry, "exports": str(exports), "runtime": runtime,
           "config": {k: v for k, v in asdict(cfg).items() if k != "exports"}, "refuse_amx": not cfg.amx}
    m, _ = worker.call(job, {"x": x32}, failure=f"{art.relpath} could not be run in {runtime}")
    name = "float.onnx (not exported)" if art.variant == FLOAT_VARIANT else art.relpath
    return BenchRow(m["runtime"], art.target, art.variant, name, art.path.stat().st_size,
                    m["latency_ms_p50"], m["latency_ms_p90"], m["throughput_ips"], m["peak_rss_mb"])


def median_row(runs: list[BenchRow]) -> BenchRow:
    """Per-measure median over rounds (each measure on its own: they come from different runs)."""
    def med(key):
        values = [getattr(r, key) for r in runs if getattr(r, key) is not None]
        return round(float(np.median(values)), 4) if values else None

    first = runs[0]
    return BenchRow(first.runtime, first.target, first.variant, first.artifact, first.bytes, med("latency_ms_p50"),
                    med("latency_ms_p90"), med("throughput_ips"), med("peak_rss_mb"))


def float_artifact(teacher, folder: Path) -> mf.Artifact:
    """The teacher entirely in float as ONNX (exporters.onnx_graph.float_graph), in `folder`:
    the baseline the INT8 exports' latency and size are compared with."""
    from exporters import onnx_graph

    path = folder / "float.onnx"
    onnx_graph.save(onnx_graph.float_graph(teacher), path)
    entry = {"target": "onnx", "variant": FLOAT_VARIANT, "path": str(path.resolve()), "runtime": "onnxruntime",
             "sha256": "", "bytes": path.stat().st_size}
    return mf.Artifact("onnx", FLOAT_VARIANT, path, "onnxruntime", "", entry["bytes"], entry)


# ----------------------------------------------------------------------------- ratios and rendering

def lut_ratios(rows: list[BenchRow]) -> list[dict]:
    """LUT / ReLU for each (runtime, target): the cost of the approximation."""
    relu = {(r.runtime, r.target): r for r in rows if r.variant == "relu"}
    out = []
    for r in rows:
        base = relu.get((r.runtime, r.target))
        if r.variant == "lut" and base is not None:
            out.append({"runtime": r.runtime, "target": r.target,
                        "latency_p50": round(r.latency_ms_p50 / base.latency_ms_p50, 3),
                        "throughput": round(r.throughput_ips / base.throughput_ips, 3),
                        "bytes": round(r.bytes / base.bytes, 3)})
    return out


def vs_float(rows: list[BenchRow]) -> list[dict]:
    """Every export relative to the float model in onnxruntime (the INT8 exports' speed-up)."""
    base = next((r for r in rows if r.variant == FLOAT_VARIANT), None)
    if base is None:
        return []
    return [{"runtime": r.runtime, "target": r.target, "variant": r.variant,
             "latency_p50": round(r.latency_ms_p50 / base.latency_ms_p50, 3),
             "throughput": round(r.throughput_ips / base.throughput_ips, 3), "bytes": round(r.bytes / base.bytes, 3)}
            for r in rows if r is not base]


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# bench: {report['model']} ({report['data']})", "",
             f"{s['threads']} thread(s); latency at batch 1 after {s['warmup']} warm-up runs, {s['repeats']} timed; "
             f"throughput at batch {THROUGHPUT_BATCH} over {s['repeats32']} runs; median of {s['rounds']} interleaved "
             f"round(s), each artifact in a fresh process; Intel AMX {s.get('amx_mode', '?')}. Peak memory: growth of peak RSS while loading and running "
             "that artifact. `float`: the unquantized teacher, timed for reference (not an export). "
             "Machine: " + report["machine"], "",
             "| runtime | variant | artifact | size (B) | p50 ms | p90 ms | img/s @32 | peak RSS MiB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        mem = "—" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.1f}"
        lines.append(f"| {r['runtime']} | {r['variant']} | {r['artifact']} | {r['bytes']:,} | {r['latency_ms_p50']:.3f} | "
                     f"{r['latency_ms_p90']:.3f} | {r['throughput_ips']:,.0f} | {mem} |")
    lines += ["", "LUT / ReLU (same runtime and target):", "", "| runtime | target | latency p50 | throughput | size |",
              "|---|---|---:|---:|---:|"]
    for q in report["lut_over_relu"]:
        lines.append(f"| {q['runtime']} | {q['target']} | {q['latency_p50']:.3f} | {q['throughput']:.3f} | {q['bytes']:.3f} |")
    if report["vs_float"]:
        lines += ["", "Relative to the float model (no quantization, ReLU) in onnxruntime:", "",
                  "| runtime | variant | target | latency p50 | throughput | size |", "|---|---|---|---:|---:|---:|"]
        for q in report["vs_float"]:
            lines.append(f"| {q['runtime']} | {q['variant']} | {q['target']} | {q['latency_p50']:.3f} | "
                         f"{q['throughput']:.3f} | {q['bytes']:.3f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the command

def bench_exports(cfg: BenchConfig, progress: bool = True) -> dict:
    """Bench every runtime of every artifact (hash-checked first); writes bench.json and
    bench.md next to the manifest (replaced on each run: they record the latest bench)."""
    from tqdm import tqdm

    from deploy_kit.verify import ordered

    exports = Path(cfg.exports)
    manifest = mf.load_manifest(exports)
    items = ordered(mf.check_exports(manifest, exports))
    teacher = mf.load_manifest_teacher(manifest, exports)
    test = load_dataset(manifest.get("data") or teacher.meta["data"], seed=int(manifest.get("seed", 0))).split("test")
    pick = np.random.default_rng(cfg.seed).choice(len(test), size=min(THROUGHPUT_BATCH, len(test)), replace=False)
    x32 = normalize(test.images[np.sort(pick)], teacher.norm)
    x32 = np.concatenate([x32] * -(-THROUGHPUT_BATCH // len(x32)))[:THROUGHPUT_BATCH]

    jobs = [(a, runtime) for a in items for runtime in rn.runtimes_for(a, BENCH)]
    with tempfile.TemporaryDirectory(prefix="deploykit-bench-") as tmp:
        if cfg.float_baseline:
            jobs.append((float_artifact(teacher, Path(tmp)), "onnxruntime"))
        # Rounds interleave the artifacts, so a burst of load on a shared machine hits all of
        # them alike instead of skewing one ratio.
        bar = tqdm(total=len(jobs) * cfg.rounds, desc="bench", unit="run", disable=None if progress else True, leave=False)
        runs: list[list[BenchRow]] = [[] for _ in jobs]
        for _ in range(cfg.rounds):
            for i, (art, runtime) in enumerate(jobs):
                runs[i].append(bench_artifact(art, runtime, exports, cfg, x32))
                bar.update()
        bar.close()
        rows = [median_row(r) for r in runs]
    report = {"schema": SCHEMA, "model": manifest.get("model"), "data": manifest.get("data"),
              "settings": {**asdict(cfg), "exports": str(exports), "throughput_batch": THROUGHPUT_BATCH,
                           "amx_mode": amx_mode(cfg.amx)},
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
                         f"{platform.python_version()}",
              "rows": [asdict(r) for r in rows], "lut_over_relu": lut_ratios(rows), "vs_float": vs_float(rows)}
    write_json(exports / BENCH_JSON, report)
    with atomic_path(exports / BENCH_MD) as tmp:
        tmp.write_text(markdown(report))
    return report

