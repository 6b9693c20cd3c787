"""The LUT's cost in TFLite INT8 (LiteRT + XNNPACK), in three exact forms, after conv blocks.

    python benchmarks/tflite_lut_forms.py [--layers 4] [--channels 32] [--rounds 3]
    python benchmarks/tflite_lut_forms.py --exports DIR [DIR ...] [--rounds 7] [--repeats 300]

The second form times real exports (`deploykit export --lut-form F`): per folder, the LUT and
ReLU .tflite files in one process, interleaved, batch 1, one thread, `invoke()` only (no
Python-side quantization), median per round and the median of the per-round ratios; plus the
XNNPACK partition count (DELEGATE nodes) and each LUT chain timed alone (cut out of the file by
exporters.tflite.lut_submodel) — where the extra time goes.

`select`  the default form: LESS/SELECT_V2 ×3 (exporters/onnx_to_tf.py). XNNPACK takes neither
          op, so the graph splits around every LUT and SELECT_V2 runs in a builtin kernel.
`minmax`  a branch-free form on the same grid: s·[q > t] = min(max(x, a), a + s) − a with
          a = s·(t − z), so LUT(x) = (v1−z)·step(t1) + (v2−v1)·step(t2) + (tmax−v2)·step(tmax)
          + max(x, a_tmax) − a_tmax — MINIMUM/MAXIMUM/SUB/MUL/ADD (XNNPACK takes no int8
          MINIMUM/MAXIMUM: the graph still splits around each LUT).
`saturate` a few terms clamped by int8 saturation (exporters.onnx_to_tf.saturate_plan:
          5-7 ops of SUB/MUL/ADD/LEAKY_RELU), every op within XNNPACK's limits — one delegate
          partition; in real exports a LUT that feeds a MaxPool runs after it.
All three are the exporter's own lowerings (`exporters.onnx_to_tf.LOWERINGS`).
Both are first checked on all 256 input codes against the code table; then each model
(`layers` × conv3x3 → ReLU [→ LUT] on 1×32×32×channels) is timed at batch 1, one thread.
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from deploy_kit.lut import ActivationQuant, LayerLUT  # noqa: E402
from exporters import onnx_to_tf  # noqa: E402

# One activation grid (s, z) and one LUT on it; ranges fixed by fake-quant as the exporter does.
s, z = 0.05, 0
t1, v1, t2, v2, tmax = 3, 6, 10, 14, 20
LO, HI = s * (0 - z), s * (255 - z)
rng = np.random.default_rng(0)


def fq(x, quant=None):
    lo, hi = (LO, HI) if quant is None else (quant.value(0), quant.value(255))
    return tf.quantization.fake_quant_with_min_max_vars(x, np.float32(lo), np.float32(hi))


LUT = LayerLUT(t1, v1, t2, v2, tmax)


def lut_select(x, quant=ActivationQuant(s, z)):  # the exporter's own lowerings (exporters/onnx_to_tf.py)
    return onnx_to_tf.LOWERINGS["select"](x, LUT, quant)


def lut_minmax(x, quant=ActivationQuant(s, z)):
    return onnx_to_tf.LOWERINGS["minmax"](x, LUT, quant)


def lut_saturate(x, quant=ActivationQuant(s, z)):
    return onnx_to_tf.LOWERINGS["saturate"](x, LUT, quant)


def build(act, layers, channels):
    """`layers` × (conv3x3 → ReLU [→ LUT]). Each layer gets its own grid, s·(1 + k/100), as in a
    trained model: two layers with the same grid and codes would share the LUT's constants, and
    the converter then requantizes a shared fake-quantized constant by its value (saturate's
    counter offset fell out of XNNPACK that way: 11× the ReLU model)."""
    W = (rng.standard_normal((3, 3, channels, channels)) * 0.1).astype(np.float32)
    grids = [ActivationQuant(s * (1 + k / 100), z) for k in range(layers)]

    @tf.function(input_signature=[tf.TensorSpec([1, 32, 32, channels], tf.float32)])
    def f(x):
        x = fq(x)
        for quant in grids:
            x = fq(tf.nn.relu(tf.nn.conv2d(x, W, 1, "SAME")), quant)
            if act is not None:
                x = fq(act(x, quant), quant)
        return x
    conv = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()])
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([rng.uniform(0, 5, (1, 32, 32, channels)).astype(np.float32)] for _ in range(8))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    return conv.convert()


def lat(model, x, n=300):
    it = Interpreter(model_content=model, num_threads=1); it.allocate_tensors()
    d = it.get_input_details()[0]; sc, zp = d["quantization"]
    it.set_tensor(d["index"], np.clip(np.rint(x / sc) + zp, -128, 127).astype(np.int8))
    for _ in range(20): it.invoke()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); it.invoke(); ts.append(time.perf_counter() - t)
    return np.median(ts) * 1e3


def exact(act):
    """TFLite INT8 output codes of `act` alone for every input code vs the table."""
    @tf.function(input_signature=[tf.TensorSpec([256], tf.float32)])
    def g(x):
        return fq(act(fq(x)))
    conv = tf.lite.TFLiteConverter.from_concrete_functions([g.get_concrete_function()])
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([np.linspace(LO, HI, 256).astype(np.float32)] for _ in range(2))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    it = Interpreter(model_content=conv.convert()); it.allocate_tensors()
    di, do = it.get_input_details()[0], it.get_output_details()[0]
    codes = np.arange(256)
    it.set_tensor(di["index"], (codes + di["quantization"][1]).astype(np.int8)); it.invoke()
    out = it.get_tensor(do["index"]).astype(int) - do["quantization"][1]
    want = np.where(codes <= t1, z, np.where(codes <= t2, v1, np.where(codes <= tmax, v2, codes)))
    return int((out != want).sum()), di["quantization"], do["quantization"]


def _invoke_ms(it, inputs, repeats: int) -> float:
    """Median invoke() time, cycling through real quantized images (SELECT_V2's cost is data-dependent)."""
    d = it.get_input_details()[0]
    for q in inputs[:10]:
        it.set_tensor(d["index"], q); it.invoke()
    ts = []
    for i in range(repeats):
        it.set_tensor(d["index"], inputs[i % len(inputs)])
        t = time.perf_counter(); it.invoke(); ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def _interpreter(model):
    kw = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
    it = Interpreter(num_threads=1, **kw); it.allocate_tensors()
    return it


def _quantized_images(it, x_nchw):
    d = it.get_input_details()[0]; sc, zp = d["quantization"]
    x = x_nchw.transpose(0, 2, 3, 1)
    return [np.clip(np.rint(img[None] / sc) + zp, -128, 127).astype(np.int8) for img in x]


def _test_images(folder, count=32):
    from deploy_kit.data import load_dataset, normalize
    from exporters.manifest import load_manifest, load_manifest_teacher

    manifest = load_manifest(folder)
    teacher = load_manifest_teacher(manifest, folder)
    test = load_dataset(manifest["data"], seed=int(manifest.get("seed", 0))).split("test")
    pick = np.sort(np.random.default_rng(0).choice(len(test), size=min(count, len(test)), replace=False))
    return manifest, normalize(test.images[pick], teacher.norm)


def _lut_chain_ms(model_path, layers, repeats):
    """Each LUT chain alone (its own ops cut out of the file), batch 1, on random codes."""
    from exporters import tflite as tfl

    data = Path(model_path).read_bytes()
    full = _interpreter(data)
    out = {}
    for layer in layers:
        sub, _ = tfl.lut_submodel(data, *tfl.lut_tensors(full, layer))
        it = _interpreter(sub)
        d = it.get_input_details()[0]
        codes = [rng.integers(-128, 128, d["shape"]).astype(np.int8) for _ in range(8)]
        out[layer] = _invoke_ms(it, codes, repeats)
    return out


def exports_mode(folders, rounds: int, repeats: int) -> None:
    print("| exports | lut_form | relu ms | lut ms | LUT/ReLU (median of rounds) | min..max | XNNPACK partitions lut/relu "
          "| LUT chains alone ms | ORT LUT/ReLU |\n|---|---|---:|---:|---:|---|---|---:|---:|")
    for folder in folders:
        folder = Path(folder)
        manifest, x = _test_images(folder)
        paths = {v: folder / ("relu/" if v == "relu" else "") / "model_int8.tflite" for v in ("lut", "relu")}
        its = {v: _interpreter(p) for v, p in paths.items()}
        inputs = {v: _quantized_images(it, x) for v, it in its.items()}
        partitions = {v: sum(op["op_name"] == "DELEGATE" for op in it._get_ops_details()) for v, it in its.items()}
        times = {v: [] for v in its}
        for _ in range(rounds):
            for v, it in its.items():
                times[v].append(_invoke_ms(it, inputs[v], repeats))
        ratios = np.array(times["lut"]) / np.array(times["relu"])
        chains = _lut_chain_ms(paths["lut"], list(manifest["layers"]), repeats)
        ort = _ort_ratio(folder, x, rounds, repeats)
        print(f"| {folder} | {manifest.get('lut_form', 'select')} | {np.median(times['relu']):.4f} | "
              f"{np.median(times['lut']):.4f} | {np.median(ratios):.2f} | {ratios.min():.2f}..{ratios.max():.2f} | "
              f"{partitions['lut']}/{partitions['relu']} | {sum(chains.values()):.4f} | {ort:.2f} |", flush=True)


def _ort_ratio(folder, x, rounds: int, repeats: int) -> float:
    """onnxruntime model.onnx LUT/ReLU, one thread, run() only, same images (its LUT is always Less/Where)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = {v: ort.InferenceSession(str(folder / ("relu/" if v == "relu" else "") / "model.onnx"), options,
                                        providers=["CPUExecutionProvider"]) for v in ("lut", "relu")}
    images = [img[None].astype(np.float32) for img in x]

    def run_ms(sess):
        name = sess.get_inputs()[0].name
        for img in images[:10]:
            sess.run(None, {name: img})
        ts = []
        for i in range(repeats):
            t = time.perf_counter(); sess.run(None, {name: images[i % len(images)]}); ts.append(time.perf_counter() - t)
        return float(np.median(ts))

    ratios = []
    for _ in range(rounds):
        ratios.append(run_ms(sessions["lut"]) / run_ms(sessions["relu"]))
    return float(np.median(ratios))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--exports", nargs="+", type=Path, help="time these export folders instead of the synthetic models")
    p.add_argument("--repeats", type=int, default=300)
    a = p.parse_args()
    if a.exports:
        return exports_mode(a.exports, a.rounds, a.repeats)
    for name, act in (("select", lut_select), ("minmax", lut_minmax), ("saturate", lut_saturate)):
        wrong, qin, qout = exact(act)
        print(f"{name}: {wrong} of 256 codes differ from the table (input quant {qin}, output {qout})")
    x = rng.uniform(-1, 4, (1, 32, 32, a.channels)).astype(np.float32)
    models = {k: build(act, a.layers, a.channels) for k, act in (("relu", None), ("select", lut_select), ("minmax", lut_minmax), ("saturate", lut_saturate))}
    print("| round | relu ms | select ms | minmax ms | saturate ms | select/relu | minmax/relu | saturate/relu |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in range(a.rounds):
        t = {k: lat(m, x) for k, m in models.items()}
        print(f"| {r} | {t['relu']:.3f} | {t['select']:.3f} | {t['minmax']:.3f} | {t['saturate']:.3f} | "
              f"{t['select'] / t['relu']:.2f} | {t['minmax'] / t['relu']:.2f} | {t['saturate'] / t['relu']:.2f} |")


if __name__ == "__main__":
    main()
