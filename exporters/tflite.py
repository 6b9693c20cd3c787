"""Full-integer TFLite INT8: model.onnx → our translator (`onnx_to_tf`) → TFLiteConverter.

    export_tflite(onnx_path, out_path, io="int8", calibration=x_nchw, layer_quant=...) -> details

Steps, each failing with an ExportError that says where:
1. translate the ONNX graph to a TF function (NHWC), activation ranges fixed by fake-quant ops;
2. the always-on float check: every TF op against onnxruntime on the same inputs (≤ 1e-4);
3. convert with int8 builtins only, calibrated on the given images (the fake-quant ranges win
   over calibration for every activation, so TFLite's codes are the teacher's codes);
4. check the file: no float tensor (but float I/O when asked), no Flex/custom op, 3 LESS +
   3 SELECT_V2 per LUT layer; then embed the ONNX metadata and write atomically.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from deploy_kit.errors import ExportError
from deploy_kit.fsutil import atomic_path
from deploy_kit.lut import ActivationQuant
from exporters import onnx_to_tf

IO_TYPES = ("int8", "float")
FLOAT_CHECK_IMAGES = 4
METADATA_NAME = "deploykit"  # the TFLite metadata entry holding the manifest metadata (JSON)
OPS_PER_LUT = {"LESS": 3, "SELECT_V2": 3}
# Tensors that may be float in a full-integer model: none, except the I/O edges when io="float".
_FLOAT_TYPES = {"FLOAT32", "FLOAT16", "FLOAT64"}


# ----------------------------------------------------------------------------- reading a .tflite

def _enum_names(enum_cls) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_")}


def read_model(path_or_bytes):
    """The .tflite flatbuffer as TF's generated object API (`ModelT`)."""
    from tensorflow.lite.python import schema_py_generated as schema

    data = path_or_bytes if isinstance(path_or_bytes, (bytes, bytearray)) else Path(path_or_bytes).read_bytes()
    return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(data), 0))


def inspect(path_or_bytes) -> dict:
    """Op histogram, custom ops, and float tensors (by name) of the main subgraph."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = read_model(path_or_bytes)
    ops, types = _enum_names(schema.BuiltinOperator), _enum_names(schema.TensorType)
    codes = []
    for oc in model.operatorCodes:
        code = max(oc.builtinCode, oc.deprecatedBuiltinCode)  # the schema keeps both fields
        custom = oc.customCode.decode() if isinstance(oc.customCode, bytes) else oc.customCode
        codes.append(f"CUSTOM:{custom}" if ops.get(code) == "CUSTOM" else ops.get(code, str(code)))
    sub = model.subgraphs[0]
    names = [t.name.decode() if isinstance(t.name, bytes) else t.name for t in sub.tensors]
    op_list = [codes[op.opcodeIndex] for op in sub.operators]
    io = set(sub.inputs) | set(sub.outputs)
    floats = [names[i] for i, t in enumerate(sub.tensors) if types[t.type] in _FLOAT_TYPES]
    float_edges = {names[i] for i in io if types[sub.tensors[i].type] in _FLOAT_TYPES}
    return {"ops": dict(sorted(Counter(op_list).items())), "custom_ops": sorted({o for o in op_list if o.startswith("CUSTOM") or o.startswith("Flex")}),
            "float_tensors": floats, "float_io": sorted(float_edges), "subgraphs": len(model.subgraphs),
            "metadata": [m.name.decode() if isinstance(m.name, bytes) else m.name for m in model.metadata or []]}


def check_full_integer(path_or_bytes, lut_layers: int, io: str = "int8") -> dict:
    """Raise ExportError unless the model is full-integer with exactly the expected LUT ops.

    Float tensors allowed: only the graph's own input/output when io="float" (and the single
    QUANTIZE/DEQUANTIZE edge tensors TFLite uses for them)."""
    info = inspect(path_or_bytes)
    if info["custom_ops"]:
        raise ExportError(f"TFLite model holds custom/Flex ops {info['custom_ops']}; expected TFLite int8 builtins only")
    allowed = set(info["float_io"]) if io == "float" else set()
    stray = [n for n in info["float_tensors"] if n not in allowed]
    if stray:
        raise ExportError(f"TFLite model is not full-integer: {len(stray)} float tensor(s), e.g. {stray[:3]}; "
                          "an op was left in float (check the ops the converter kept)")
    for op, per_layer in OPS_PER_LUT.items():
        found = info["ops"].get(op, 0)
        if found != per_layer * lut_layers:
            raise ExportError(f"TFLite model holds {found} {op} ops, expected {per_layer} per LUT layer × {lut_layers}; "
                              f"ops: {info['ops']}")
    return info


# ----------------------------------------------------------------------------- conversion

def _representative(calibration: np.ndarray):
    """Calibration images (NCHW float) as the converter's NHWC samples, one image at a time."""
    def samples():
        for image in calibration:
            yield [np.ascontiguousarray(image[None].transpose(0, 2, 3, 1), np.float32)]
    return samples


def convert(graph: onnx_to_tf.Graph, calibration: np.ndarray, io: str = "int8") -> bytes:
    import tensorflow as tf

    module = onnx_to_tf.tf_module(graph)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _representative(calibration)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    io_type = tf.int8 if io == "int8" else tf.float32
    converter.inference_input_type = converter.inference_output_type = io_type
    try:
        return converter.convert()
    except Exception as exc:  # the converter raises ConverterError and plain RuntimeErrors
        first = str(exc).strip().splitlines()[0][:300]
        raise ExportError(f"the TFLite converter failed: {first}") from None


def finalize(tflite: bytes, metadata: dict, input_names: list[str], output_names: list[str]) -> bytes:
    """Name the I/O tensors as in the ONNX graph (the converter calls them `serve_input`,
    `StatefulPartitionedCall:0`) and add a `deploykit` metadata entry (JSON bytes in its own
    buffer) — the standard TFLite model-metadata slot, ignored by interpreters."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    model = read_model(tflite)
    sub = model.subgraphs[0]
    for indices, names in ((sub.inputs, input_names), (sub.outputs, output_names)):
        for index, name in zip(indices, names):
            sub.tensors[index].name = name
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(metadata, sort_keys=True).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    builder = flatbuffers.Builder(len(tflite) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def read_metadata(path_or_bytes) -> dict | None:
    model = read_model(path_or_bytes)
    for m in model.metadata or []:
        if (m.name.decode() if isinstance(m.name, bytes) else m.name) == METADATA_NAME:
            return json.loads(bytes(model.buffers[m.buffer].data).decode())
    return None


def _onnx_metadata(proto: onnx.ModelProto) -> dict:
    from exporters.manifest import METADATA_PREFIX

    out = {}
    for p in proto.metadata_props:
        key = p.key[len(METADATA_PREFIX):] if p.key.startswith(METADATA_PREFIX) else p.key
        try:
            out[key] = json.loads(p.value)
        except json.JSONDecodeError:
            out[key] = p.value
    return out


# ----------------------------------------------------------------------------- I/O details

def io_details(path_or_bytes) -> dict:
    """Manifest `inputs`/`outputs`, read back from the model in LiteRT."""
    from ai_edge_litert.interpreter import Interpreter

    kwargs = {"model_content": bytes(path_or_bytes)} if isinstance(path_or_bytes, (bytes, bytearray)) \
        else {"model_path": str(path_or_bytes)}
    interpreter = Interpreter(**kwargs)

    def entry(d: dict, layout: str | None) -> dict:
        scale, zero = d["quantization"]
        shape = [int(v) if v >= 0 else "batch" for v in d.get("shape_signature", d["shape"])]
        out = {"name": d["name"], "shape": shape, "dtype": np.dtype(d["dtype"]).name}
        if layout:
            out["layout"] = layout
        out["quantization"] = {"scale": float(scale), "zero_point": int(zero)} if scale else None
        return out

    return {"inputs": [entry(d, "NHWC") for d in interpreter.get_input_details()],
            "outputs": [entry(d, None) for d in interpreter.get_output_details()]}


def _int8_weights(path_or_bytes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every per-channel int8 constant tensor: name → (codes, scales)."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = read_model(path_or_bytes)
    out = {}
    for t in model.subgraphs[0].tensors:
        q, data = t.quantization, model.buffers[t.buffer].data
        if t.type == schema.TensorType.INT8 and data is not None and q is not None and q.scale is not None:
            codes = np.asarray(data, np.uint8).view(np.int8).reshape(t.shape)
            out[t.name.decode() if isinstance(t.name, bytes) else t.name] = (codes, np.asarray(q.scale, np.float32))
    return out


def _onnx_weights(proto: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """Conv/Gemm node name → (int8 codes, scales, op) from its weight DequantizeLinear."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    dq = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    out = {}
    for n in proto.graph.node:
        if n.op_type in ("Conv", "Gemm") and n.input[1] in dq:
            codes, scale = inits[dq[n.input[1]].input[0]], inits[dq[n.input[1]].input[1]]
            if codes.dtype == np.int8:
                out[n.name] = (codes, scale, n.op_type)
    return out


def _onnx_codes_as_tflite(codes: np.ndarray, op: str, tfl_shape: tuple) -> np.ndarray:
    if op == "Gemm":
        return codes
    if tfl_shape[0] == 1 and codes.shape[1] == 1 and codes.shape[0] != 1:  # depthwise [1, kh, kw, C]
        return codes.transpose(1, 2, 3, 0)
    return codes.transpose(0, 2, 3, 1)  # [O, I, kh, kw] → [O, kh, kw, I]


def weight_report(proto: onnx.ModelProto, path_or_bytes) -> dict:
    """Do TFLite's int8 weights equal the ONNX ones? The converter re-derives each channel's
    scale as max|w|/127; with our symmetric −127..127 codes that should be our scale and codes."""
    tfl = _int8_weights(path_or_bytes)
    layers, scales_equal, codes_equal, worst = 0, 0, 0, 0.0
    for name, (codes, scale, op) in _onnx_weights(proto).items():
        prefix = onnx_to_tf.tf_scope(name) + "/"
        match = [v for k, v in tfl.items() if k.startswith(prefix) and v[1].size == scale.size]
        if len(match) != 1:
            continue
        layers += 1
        t_codes, t_scale = match[0]
        scales_equal += bool(np.array_equal(t_scale, scale.astype(np.float32)))
        worst = max(worst, float(np.max(np.abs(t_scale / scale.astype(np.float32) - 1))))
        mine = _onnx_codes_as_tflite(codes, op, t_codes.shape)
        codes_equal += bool(mine.shape == t_codes.shape and np.array_equal(mine, t_codes))
    return {"layers": layers, "scales_equal": scales_equal, "codes_equal": codes_equal,
            "max_rel_scale_diff": worst}


# ----------------------------------------------------------------------------- the target

def _float_check_images(calibration: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(calibration[:FLOAT_CHECK_IMAGES], np.float32)


def export_tflite(onnx_path: Path, out_path: Path, *, io: str = "int8", calibration: np.ndarray,
                  layer_quant: dict[str, ActivationQuant] | None = None) -> dict:
    """model.onnx → full-integer `out_path`; returns the manifest details (inputs/outputs, op
    counts, the float check's worst node, conversion seconds)."""
    if io not in IO_TYPES:
        raise ExportError(f"io must be one of {', '.join(IO_TYPES)}, got {io!r}")
    if calibration is None or len(calibration) == 0:
        raise ExportError("the TFLite target needs calibration images (NCHW float32); none were given")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proto = onnx.load(str(onnx_path))
    graph = onnx_to_tf.read_graph(proto)
    onnx_to_tf.check_supported(graph)
    t0 = time.perf_counter()
    float_check = onnx_to_tf.check_against_onnxruntime(proto, graph, _float_check_images(calibration))
    t1 = time.perf_counter()
    tflite = convert(graph, np.asarray(calibration, np.float32), io)
    lut_names = sorted({n.name.split("/lut/")[0] for n in graph.nodes if n.op == "Less" and "/lut/" in n.name})
    lut_layers = sum(1 for n in graph.nodes if n.op == "Less") // OPS_PER_LUT["LESS"]
    info = check_full_integer(tflite, lut_layers, io)
    check_lut_grid(tflite, {n: layer_quant[n] for n in lut_names if layer_quant and n in layer_quant})
    tflite = finalize(tflite, _onnx_metadata(proto), [graph.input_name], graph.output_names)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(tflite)
    return {**io_details(out_path), "ops": info["ops"], "lut_layers": lut_layers,
            "weights": weight_report(proto, tflite),
            "float_check": {**float_check, "seconds": round(t1 - t0, 2)},
            "convert_seconds": round(time.perf_counter() - t1, 2)}


def check_lut_grid(tflite: bytes, layer_quant: dict[str, ActivationQuant]) -> None:
    """Each LUT's input and output tensor must sit on the teacher's grid (scale s, zero point
    z−128): then the int8 codes TFLite compares and selects are the teacher's codes + const."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=bytes(tflite))
    details = {t["index"]: t for t in interpreter.get_tensor_details()}
    for layer, aq in layer_quant.items():
        for index in lut_tensors(interpreter, layer):
            scale, zero = details[index]["quantization"]
            if not np.isclose(scale, aq.scale, rtol=1e-6, atol=0) or zero != aq.zero_point - 128:
                raise ExportError(f"layer {layer}: TFLite LUT tensor {details[index]['name']!r} is quantized with "
                                  f"scale {scale:.6g}, zero point {zero}; expected the teacher's {aq.scale:.6g}, "
                                  f"{aq.zero_point - 128} (z−128) — the converter moved the LUT off the grid")


def lut_tensors(interpreter, layer: str) -> tuple[int, int]:
    """The (input, output) tensor indices of one layer's LUT chain in a loaded interpreter:
    the data input of its first SELECT_V2 (the LUT's x — a LESS may read a rescaled copy, see
    onnx_to_tf.LESS_MIN_SCALE) and the output of its last one."""
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    key = f"{layer}/lut/"
    selects = [op for op in interpreter._get_ops_details()  # the only API exposing op wiring
               if op["op_name"] == "SELECT_V2" and any(key in names.get(i, "") for i in op["outputs"])]
    if not selects:
        raise ExportError(f"no SELECT_V2 of layer {layer} (tensor names containing {key!r}) in the TFLite model")
    return selects[0]["inputs"][2], selects[-1]["outputs"][0]
