"""The runtime's own call on one image, timed interleaved: what `prune`'s latency table, its
measured gate and its final check read. Runs inside a fresh worker process (deploy_kit/worker.py),
where AMX can be refused before the runtime starts (deploy_kit/amx.py); torch-free, so that the
process starts in about a second."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np


def timed_call(path: Path, runtime: str, image: np.ndarray) -> Callable[[], object]:
    """The runtime's own call on a fixed input — `invoke()`, `session.run` — without the Python
    quantize/transpose around it, which cost ~40 µs here and would read as a fixed model cost."""
    from deploy_kit.runners import LiteRTRunner, OrtRunner

    if runtime == "litert":
        runner = LiteRTRunner(path, threads=1)
        runner.predict(image)  # allocates and sets the input tensor, which stays set
        return runner.interpreter.invoke
    runner = OrtRunner(path, threads=1)
    feed = {runner.input_name: np.ascontiguousarray(image, np.float32)}
    return lambda: runner.session.run(None, feed)


def measure_here(paths: list[Path], runtime: str, image: np.ndarray, rounds: int, repeats: int,
                 seed: int) -> list[float]:
    """Median ms per file at batch 1, 1 thread, in this process: `rounds` interleaved rounds (a
    shuffled order each round) of `repeats` timed runs after a warm-up; the median of the round
    medians."""
    calls = [timed_call(p, runtime, image) for p in paths]
    for call in calls:
        for _ in range(5):
            call()
    per_round = [[] for _ in paths]
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        for i in rng.permutation(len(paths)):
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                calls[i]()
                times.append(time.perf_counter() - t)
            per_round[i].append(float(np.median(times)))
    return [round(1e3 * float(np.median(r)), 5) for r in per_round]
