"""`deploykit bench`: size, latency, throughput and memory of every export, LUT vs ReLU."""

from __future__ import annotations

from pathlib import Path

import click

from deploy_kit.cli import SEED, emit, handle_errors, json_option, say, say_skipped_runtimes


@click.command("bench")
@click.option("--exports", type=click.Path(path_type=Path), required=True,
              help="The folder written by `deploykit export` (holds manifest.json).")
@click.option("--warmup", default=20, show_default=True, type=click.IntRange(0, 1_000_000), help="Untimed batch-1 runs before timing.")
@click.option("--repeats", default=200, show_default=True, type=click.IntRange(1, 1_000_000), help="Timed batch-1 runs (p50/p90 over these).")
@click.option("--repeats32", default=20, show_default=True, type=click.IntRange(1, 1_000_000), help="Timed batch-32 runs for throughput.")
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(1, 1000),
              help="Measure every artifact this many times, interleaved, and report the median (noisy machines).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1, 1024), help="Threads per runtime.")
@click.option("--amx/--no-amx", default=False, show_default=True,
              help="Let the runtimes use Intel AMX. Off by default, as `prune` times: no phone has AMX, and on x86 "
                   "servers that do, its INT8 kernels cost a fixed ~5 µs per layer (pass --amx to time an x86 server "
                   "deployment as it will run).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Chooses the test images fed to the timed runs.")
@click.option("--float-baseline/--no-float-baseline", default=True, show_default=True,
              help="Also time the unquantized model in onnxruntime (variant `float`, not an export).")
@json_option
@handle_errors
def command(exports, warmup, repeats, repeats32, rounds, threads, amx, seed, float_baseline, as_json):
    """Batch-1 latency p50/p90 after warm-up, throughput at batch 32, peak memory and size, per
    runtime, for the LUT model and the plain-ReLU model; writes bench.json and bench.md next
    to manifest.json. Re-running replaces bench.json and bench.md (no --force needed); the
    artifacts themselves are never modified.

    \b
    Example:
      deploykit bench --exports runs/lenet5/exports
    """
    from deploy_kit.bench import BENCH_MD, BenchConfig, bench_exports

    cfg = BenchConfig(exports=exports, warmup=warmup, repeats=repeats, repeats32=repeats32, rounds=rounds,
                      threads=threads, amx=amx, seed=seed, float_baseline=float_baseline)
    report = bench_exports(cfg)
    say((Path(exports) / BENCH_MD).read_text().rstrip())
    say_skipped_runtimes()
    say(f"→ {Path(exports) / 'bench.json'}, {Path(exports) / BENCH_MD}")
    keys = ("runtime", "variant", "latency_ms_p50", "latency_ms_p90", "throughput_ips", "bytes")
    emit({"rows": [{k: r[k] for k in keys} for r in report["rows"]]})
