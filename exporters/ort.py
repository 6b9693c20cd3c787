"""ORT Mobile: the `.ort` flatbuffer and `required_operators.config`, by onnxruntime's own
converter (`onnxruntime.tools.convert_onnx_models_to_ort`, Fixed optimization style).

The converter bakes in the graph optimizations, so the optimized graph it also saves is what
a phone runs. We record which ops it holds: with uint8 activations ORT fuses every
DQ → Conv/Gemm → Q into `QLinearConv`/`QGemm` next to the float LUT (DESIGN.md §5), with the
default `session.qdqisint8allowed=0`, so no session option is needed at load time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import onnx

from deploy_kit.errors import ExportError

CONFIG_NAME = "required_operators.config"
# Session options the .ort file needs at load time. Empty: uint8 activations fuse to
# QLinearConv without `session.qdqisint8allowed` (checked by runtime_tests/test_onnx_ort.py).
SESSION_OPTIONS: dict[str, str] = {}


# The converter runs in a child process of its own, with address-space randomization off and a
# fixed environment. Why: onnxruntime serializes the .ort file's kernel-type-string table in the
# order of an unordered container keyed by addresses, so the same model.onnx converted by two
# processes gave files differing in ~900 bytes (same size, same content, another order). With
# the addresses fixed, the same input gives the same bytes on the same installation. Where the
# kernel refuses to turn randomization off (some sandboxes), the manifest says so
# (`reproducible: false`) and the file is still verified by its sha256 like any other.
_CHILD = """
import contextlib, io, logging, sys
from pathlib import Path
from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort
logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
with contextlib.redirect_stdout(io.StringIO()):
    convert_onnx_models_to_ort(Path(sys.argv[1]), output_dir=Path(sys.argv[2]),
                               optimization_styles=[OptimizationStyle.Fixed], save_optimized_onnx_model=True)
"""
_ADDR_NO_RANDOMIZE = 0x0040000


def _fixed_addresses() -> None:
    """preexec: turn address-space randomization off for the child (Linux personality(2))."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    current = libc.personality(0xFFFFFFFF)
    if current != -1:
        libc.personality(current | _ADDR_NO_RANDOMIZE)


def _aslr_off_possible() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    done = subprocess.run([sys.executable, "-c", "print(open('/proc/self/personality').read())"],
                          capture_output=True, text=True, preexec_fn=_fixed_addresses)
    try:
        return bool(int(done.stdout.strip(), 16) & _ADDR_NO_RANDOMIZE)
    except ValueError:
        return False


def _convert(onnx_path: Path, work: Path) -> tuple[Path, Path, Path, bool]:
    src = work / "model.onnx"
    shutil.copyfile(onnx_path, src)
    out = work / "out"
    fixed = _aslr_off_possible()
    env = {"PYTHONHASHSEED": "0", "PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
           **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {})}
    done = subprocess.run([sys.executable, "-c", _CHILD, "model.onnx", "out"], cwd=work, env=env,
                          capture_output=True, text=True, preexec_fn=_fixed_addresses if fixed else None)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()] or ["(no message)"]
        raise ExportError(f"onnxruntime could not convert {onnx_path.name} to ORT format: {lines[-1][:300]}")
    return out / "model.ort", out / f"model.{CONFIG_NAME}", out / "model.optimized.onnx", fixed


def _portable_config(config: Path, ort_name: str) -> str:
    """required_operators.config without the temporary path it was generated in."""
    lines = config.read_text().splitlines()
    return "\n".join(f"# - {ort_name}" if ln.startswith("# - ") else ln for ln in lines) + "\n"


def optimized_ops(optimized_onnx: Path) -> dict[str, int]:
    """Op histogram of the graph onnxruntime actually runs."""
    return dict(sorted(Counter(n.op_type for n in onnx.load(str(optimized_onnx)).graph.node).items()))


def export_ort(onnx_path: Path, out_path: Path, **_options) -> dict:
    """model.onnx → `out_path` (.ort) and `required_operators.config` beside it."""
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    with tempfile.TemporaryDirectory(prefix="deploykit-ort-") as tmp:
        ort_file, config, optimized, reproducible = _convert(onnx_path, Path(tmp))
        ops = optimized_ops(optimized)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(ort_file, out_path)
        (out_path.parent / CONFIG_NAME).write_text(_portable_config(config, out_path.name))
    from exporters.onnx_graph import io_details

    return {**io_details(onnx_path), "operators_config": CONFIG_NAME, "session_options": SESSION_OPTIONS,
            "optimized_ops": ops, "reproducible": reproducible, "int8_conv": ops.get("QLinearConv", 0) > 0 or ops.get("QGemm", 0) > 0}
