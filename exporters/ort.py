"""ORT Mobile: the `.ort` flatbuffer and `required_operators.config`, by onnxruntime's own
converter (`onnxruntime.tools.convert_onnx_models_to_ort`, Fixed optimization style).

The converter bakes in the graph optimizations, so the optimized graph it also saves is what
a phone runs. We record which ops it holds: with uint8 activations ORT fuses every
DQ → Conv/Gemm → Q into `QLinearConv`/`QGemm` next to the float LUT (DESIGN.md §5), with the
default `session.qdqisint8allowed=0`, so no session option is needed at load time.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import onnx

from deploy_kit.errors import ExportError

CONFIG_NAME = "required_operators.config"
# Session options the .ort file needs at load time. Empty: uint8 activations fuse to
# QLinearConv without `session.qdqisint8allowed` (checked by runtime_tests/test_onnx_ort.py).
SESSION_OPTIONS: dict[str, str] = {}


def _convert(onnx_path: Path, work: Path) -> tuple[Path, Path, Path]:
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # "Created config in <tmp>"

    src = work / "model.onnx"
    shutil.copyfile(onnx_path, src)
    out = work / "out"
    chatter = io.StringIO()  # the converter prints progress on stdout, which --json owns
    try:
        with contextlib.redirect_stdout(chatter):
            convert_onnx_models_to_ort(src, output_dir=out, optimization_styles=[OptimizationStyle.Fixed],
                                       save_optimized_onnx_model=True)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        first = str(exc).strip().splitlines()[0][:300]
        raise ExportError(f"onnxruntime could not convert {onnx_path.name} to ORT format: {first}") from None
    return out / "model.ort", out / f"model.{CONFIG_NAME}", out / "model.optimized.onnx"


def optimized_ops(optimized_onnx: Path) -> dict[str, int]:
    """Op histogram of the graph onnxruntime actually runs."""
    return dict(sorted(Counter(n.op_type for n in onnx.load(str(optimized_onnx)).graph.node).items()))


def export_ort(onnx_path: Path, out_path: Path, **_options) -> dict:
    """model.onnx → `out_path` (.ort) and `required_operators.config` beside it."""
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    with tempfile.TemporaryDirectory(prefix="deploykit-ort-") as tmp:
        ort_file, config, optimized = _convert(onnx_path, Path(tmp))
        ops = optimized_ops(optimized)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(ort_file, out_path)
        shutil.move(config, out_path.parent / CONFIG_NAME)
    from exporters.onnx_graph import io_details

    return {**io_details(onnx_path), "operators_config": CONFIG_NAME, "session_options": SESSION_OPTIONS,
            "optimized_ops": ops, "int8_conv": ops.get("QLinearConv", 0) > 0 or ops.get("QGemm", 0) > 0}
