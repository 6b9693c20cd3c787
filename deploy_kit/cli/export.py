"""`deploykit export`: result.json + teacher → ONNX, ORT Mobile and TFLite INT8 exports."""

from __future__ import annotations

from pathlib import Path

import click

from deploy_kit.cli import emit, handle_errors, json_option, say
from exporters.onnx_to_tf import DEFAULT_LUT_FORM, LUT_FORMS
from exporters.registry import ALL, TARGETS


@click.command("export")
@click.option("--config", "result_path", type=click.Path(path_type=Path), required=True,
              help="result.json written by `deploykit search` (the LUT codes per layer).")
@click.option("--teacher", "teacher_path", type=click.Path(path_type=Path), default=None,
              help="Teacher run folder; default: the `teacher.path` recorded in result.json.")
@click.option("--target", "targets", multiple=True, default=(ALL,), show_default=True,
              type=click.Choice([*TARGETS, ALL]),
              help="Export target (repeatable). model.onnx is always written: every target converts it.")
@click.option("--io", default="int8", show_default=True, type=click.Choice(["int8", "float"]),
              help="TFLite input/output type (ONNX and ORT take and return float: refused unless a tflite target is chosen). "
                   "float for LiteRT.js in the browser, which has no int8 tensors.")
@click.option("--lut-form", default=DEFAULT_LUT_FORM, show_default=True, type=click.Choice(LUT_FORMS),
              help="How the TFLite file lowers each LUT. saturate (default) = 5-7 int8 ops per layer clamped by "
                   "int8 saturation (SUB/MUL/ADD/LEAKY_RELU), all taken by XNNPACK: the fastest form, about the "
                   "ReLU model's speed; a layer whose saturate LUT is not exact on all 256 codes at export falls "
                   "back to select alone (manifest lut_forms). select = 3 LESS + 3 SELECT_V2 (the ONNX graph's "
                   "ops) everywhere; minmax = clamps by MAXIMUM/MINIMUM/SUB/MUL/ADD. All are checked on the "
                   "256 codes and run a LUT that feeds a MaxPool after it; ONNX/ORT keep Less/Where.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Exports folder; default: <folder of result.json>/exports.")
@click.option("--force", is_flag=True, help="Replace an existing exports folder.")
@json_option
@handle_errors
def command(result_path, teacher_path, targets, io, lut_form, out, force, as_json):
    """Rewrite the teacher's ONNX graph with the chosen LUTs and convert it to each target.

    Writes the LUT variant (model.onnx, model.ort, model_int8.tflite) and the plain-ReLU
    teacher under relu/, plus manifest.json (hashes, I/O details, preprocessing, labels).

    \b
    Example:
      deploykit export --config runs/lenet5/result.json --target all
      deploykit export --config result.json --teacher runs/lenet5 --target tflite --io float --out /tmp/x
      deploykit export --config runs/lenet5/result.json --target tflite --lut-form select --force
    """
    from deploy_kit.export import ExportConfig, export

    cfg = ExportConfig(result_path=result_path, teacher_path=teacher_path, targets=tuple(targets), io=io,
                       lut_form=lut_form, out=out, force=force)
    say(f"exporting {result_path} → {cfg.out_dir}")
    summary = export(cfg, progress=say)
    say(f"{len(summary['artifacts'])} artifacts + manifest.json in {summary['seconds']:.1f}s → {summary['out']}")
    emit({"artifacts": [{"target": a["target"], "path": str(Path(summary["out"]) / a["path"]), "bytes": a["bytes"],
                         "sha256": a["sha256"]} for a in summary["artifacts"]],
          "seconds": summary["seconds"]})
