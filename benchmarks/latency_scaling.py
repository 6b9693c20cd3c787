"""Does a runtime's latency on this machine scale with the channel count? Uniformly L1-pruned
copies of a teacher (keep ratios 1, 0.5, 0.25) timed as INT8 exports in LiteRT and ONNX Runtime
and, for comparison, as float ONNX in ONNX Runtime (1 thread, batch 1, interleaved rounds).

    python benchmarks/latency_scaling.py --teacher runs/vgg40 [--rounds 15]

Where INT8 time stays flat while float time falls, a latency budget cannot be met by pruning on
this machine (`deploykit prune` then refuses it and names the fixed share). On hosts with Intel AMX
every INT8 row is timed twice: with AMX refused (what `deploykit prune` times by default, as on a
phone) and with it allowed (`--amx`), the cause of the flat INT8 time on such hosts.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import onnx
import torch

from deploy_kit import amx
from deploy_kit.data import load_dataset, normalize
from deploy_kit.prune import latency as lt
from deploy_kit.prune import surgery as sg
from deploy_kit.teacher import load_teacher
from exporters.onnx_graph import torch_to_onnx

RATIOS = (1.0, 0.5, 0.25)


def cpu() -> str:
    text = Path("/proc/cpuinfo").read_text()
    name = re.search(r"model name\s*:\s*(.*)", text)
    flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{name.group(1) if name else '?'} ({', '.join(isa)})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    teacher = load_teacher(args.teacher)
    in_shape = tuple(teacher.meta["input_shape"])
    ds = load_dataset(teacher.meta["data"], teacher.meta["seed"])
    x = torch.from_numpy(normalize(ds.split("train").images[:256], ds.norm))
    image = normalize(ds.split("val").images[:1], ds.norm)
    model = sg.float_from_teacher(teacher, x)
    full = sg.full_channels(sg.layer_infos(model, in_shape))
    ms = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = {"litert int8": [], "onnxruntime int8": [], "onnxruntime float": []}
        for r in RATIOS:
            pruned = sg.reestimate_bn(sg.pruned_copy(model, {n: lt.round_channels(c, r) for n, c in full.items()},
                                                     in_shape), x)
            qat = lt.int8_qat_form(pruned, x)
            paths["litert int8"].append(lt.export_for_runtime(qat, in_shape, "litert", folder, f"l{r}", x[:8].numpy()))
            paths["onnxruntime int8"].append(lt.export_for_runtime(qat, in_shape, "onnxruntime", folder, f"o{r}",
                                                                   x[:8].numpy()))
            onnx.save(torch_to_onnx(pruned.eval(), in_shape), folder / f"f{r}.onnx")
            paths["onnxruntime float"].append(folder / f"f{r}.onnx")
        modes = (False, True) if amx.host_has_amx() else (False,)
        for name, files in paths.items():
            for allow in modes if "int8" in name else (False,):
                label = f"{name} (AMX {amx.mode(allow)})" if "int8" in name else name
                ms[label] = lt.measure(files, name.split()[0], image, rounds=args.rounds, amx=allow)
    print(f"{teacher.meta['model']} width {teacher.meta['width']} on {cpu()}; ms at batch 1, 1 thread "
          f"(× the unpruned time)")
    print("| runtime | " + " | ".join(f"keep {r}" for r in RATIOS) + " |")
    print("|---|" + "---:|" * len(RATIOS))
    for name, row in ms.items():
        print(f"| {name} | " + " | ".join(f"{v:.4f} ({v / row[0]:.2f}×)" for v in row) + " |")


if __name__ == "__main__":
    main()
