"""`deploykit import --research`: a research-system QAT checkpoint → a deploykit teacher run folder."""

from __future__ import annotations

from pathlib import Path

import click

from deploy_kit.cli import emit, handle_errors, json_option, say
from deploy_kit.models import ARCHITECTURES, MODEL_ALIASES


@click.command("import")
@click.option("--research", "checkpoint", type=click.Path(path_type=Path), required=True,
              help="The research system's QAT checkpoint ({model}_qat_preconvert.pth: a state_dict).")
@click.option("--model", "arch", required=True, type=click.Choice([*ARCHITECTURES, *MODEL_ALIASES]),
              help="Its architecture (the research names work too: mobilenetv1).")
@click.option("--data", required=True, help="The data it was trained on: digits | cifar10:PATH | imagefolder:PATH.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder to write the teacher into.")
@click.option("--backend", default="fbgemm", show_default=True, type=click.Choice(["fbgemm", "x86", "qnnpack"]),
              help="The engine it was trained for: fbgemm/x86 = activation codes 0..127, qnnpack = 0..255.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1),
              help="Seeds the validation split (as in `train`).")
@click.option("--narrow-weights", is_flag=True,
              help="Move fbgemm's -128 weight codes to -127 (TFLite's int8 weight spec), so the TFLite export "
                   "is bit-exact too; without it ONNX/ORT are exact and TFLite rescales those channels.")
@click.option("--force", is_flag=True, help="Overwrite an existing teacher in --out.")
@json_option
@handle_errors
def command(checkpoint, arch, data, out, backend, seed, narrow_weights, force, as_json):
    """Bring a research-system checkpoint in as an ordinary teacher, keeping its quantization.

    Reads the state_dict with torch.load(weights_only=True) only, maps its layer names, folds its
    BatchNorm, keeps every activation scale/zero point and code range (fbgemm: 0..127) and the
    weight scales, then evaluates it and writes OUT/teacher.safetensors + OUT/teacher.json.
    search, finetune, export and verify take the folder unchanged.

    \b
    Example:
      deploykit import --research outputs/lenet5_qat_preconvert.pth --model lenet5 \\
          --data imagefolder:~/data/cifar10 --out runs/lenet5-research
    """
    from deploy_kit.research import ImportConfig, import_research

    meta = import_research(ImportConfig(checkpoint=checkpoint, model=arch, data=data, out=out, backend=backend,
                                        force=force, seed=seed, narrow_weights=narrow_weights))
    acc, q = meta["accuracy"], meta["quantization"]
    say(f"{meta['model']} from {checkpoint}: activations {q['activation'][0]}..{q['activation'][1]}, "
        f"weights {q['weight'][0]}..{q['weight'][1]}, input quantizer from the {meta['source']['input_quant']}")
    if meta["source"]["requantized_weight_channels"]:
        moved = ", ".join(f"{k} {v}" for k, v in meta["source"]["requantized_weight_channels"].items())
        say(f"note: weight channels on an affine grid (zero point != 0) re-quantized symmetrically: {moved}")
    say(f"  fake_quant (research arithmetic)  val {acc['fake_quant']['val']:6.2f}%   test {acc['fake_quant']['test']:6.2f}%")
    say(f"  int8 (runtime arithmetic)         val {acc['int8']['val']:6.2f}%   test {acc['int8']['test']:6.2f}%")
    say(f"teacher → {out / 'teacher.json'}")
    emit({"checkpoint": str(out / "teacher.safetensors"), "model": meta["model"], "accuracy": acc})
