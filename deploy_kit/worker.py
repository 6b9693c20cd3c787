"""The one subprocess worker: `python -m deploy_kit.worker DIR`.

Three callers need a fresh Python process: `IsolatedRunner` (a runtime the table marks isolated —
tflite_runtime, whose TFLite C++ symbols clash with TensorFlow's when both load in one process),
`bench` (every artifact timed in a process of its own, so allocator and thread-pool state do not
carry over and the RSS growth is the model's) and `prune`'s latency timing (a process where Intel
AMX can be refused before the runtime starts: `refuse_amx`, deploy_kit/amx.py). All go through
`call`: the job as DIR/job.json and its arrays as DIR/in.npz; the worker answers DIR/out.json
(scalars) and DIR/out.npz (arrays). A refused job exits non-zero with one line on stderr, which
becomes the caller's error line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from deploy_kit.errors import DeployKitError, ExportError


def call(job: dict, arrays: dict[str, np.ndarray], failure: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Run `job` in a fresh process; `failure` prefixes the worker's last stderr line on error."""
    with tempfile.TemporaryDirectory(prefix="deploykit-worker-") as tmp:
        folder = Path(tmp)
        (folder / "job.json").write_text(json.dumps(job))
        np.savez(folder / "in.npz", **arrays)
        done = subprocess.run([sys.executable, "-m", "deploy_kit.worker", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()] or ["no output"]
            raise ExportError(f"{failure}: {lines[-1][:300]}")
        with np.load(folder / "out.npz", allow_pickle=False) as out:
            return json.loads((folder / "out.json").read_text()), dict(out)


# ----------------------------------------------------------------------------- the worker's side

def _refuse_amx() -> None:
    from deploy_kit import amx

    why = amx.refuse()
    if why and amx.host_has_amx():
        raise ExportError(f"cannot refuse Intel AMX to the timing process ({why}); pass --amx to time with it")

def _runner(job: dict):
    from deploy_kit.runners import make_runner

    return make_runner(job["entry"], Path(job["exports"]), job["runtime"], job.get("threads"),
                       job["batch_size"], isolate=False)  # this process is the isolation


def _predict(job: dict, x: np.ndarray) -> tuple[dict, dict]:
    runner = _runner(job)
    start = time.perf_counter()
    logits = runner.predict(x)
    return {"seconds": time.perf_counter() - start}, {"logits": logits}


def _tap_codes(job: dict, x: np.ndarray) -> tuple[dict, dict]:
    from deploy_kit.lut import ActivationQuant  # (imports torch: only for --localize)

    quant = {n: ActivationQuant.from_dict(d) for n, d in job["layer_quant"].items()}
    codes = _runner(job).tap_codes(x, job["layers"], quant)
    return {}, {f"{n}/{k}": getattr(c, k) for n, c in codes.items() for k in ("before", "after")}


def _bench(job: dict, x: np.ndarray) -> tuple[dict, dict]:
    from deploy_kit.bench import BenchConfig, measure

    exports = Path(job["exports"])
    cfg = BenchConfig(exports=exports, **job["config"])
    return measure(job["entry"], exports, job["runtime"], cfg, x), {}


def _latency(job: dict, x: np.ndarray) -> tuple[dict, dict]:
    from deploy_kit.timing import measure_here

    ms = measure_here([Path(p) for p in job["paths"]], job["runtime"], x, job["rounds"], job["repeats"], job["seed"])
    return {"ms": ms}, {}


def _amx_probe(job: dict, x: np.ndarray) -> tuple[dict, dict]:
    from deploy_kit import amx

    return {"errno": amx.probe()}, {}


OPS = {"predict": _predict, "tap_codes": _tap_codes, "bench": _bench, "latency": _latency, "amx_probe": _amx_probe}


def main(folder: Path) -> None:
    job = json.loads((folder / "job.json").read_text())
    if job.get("refuse_amx"):  # before any runtime starts: XNNPACK asks for AMX once, at start-up
        _refuse_amx()
    with np.load(folder / "in.npz", allow_pickle=False) as arrays:
        x = arrays["x"]
    meta, out = OPS[job["op"]](job, x)
    np.savez(folder / "out.npz", **out)
    (folder / "out.json").write_text(json.dumps(meta))


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
    except DeployKitError as exc:  # the message is the caller's error line
        sys.exit(str(exc))
