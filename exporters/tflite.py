"""Full-integer TFLite INT8: model.onnx → our translator (`onnx_to_tf`) → TFLiteConverter.

    export_tflite(onnx_path, out_path, io="int8", calibration=x_nchw, layer_quant=...) -> details

Steps, each failing with an ExportError that says where:
1. translate the ONNX graph to a TF function (NHWC), activation ranges fixed by fake-quant ops;
2. the always-on float check: every TF op against onnxruntime on the same inputs (≤ 1e-4);
3. convert with int8 builtins only, calibrated on the given images (the fake-quant ranges win
   over calibration for every activation, so TFLite's codes are the teacher's codes);
4. check the file: no float tensor (but float I/O when asked), no Flex/custom op, the LUT ops
   of each layer's form (3 LESS + 3 SELECT_V2 per `select` layer, none elsewhere); every LUT
   tensor on the teacher's grid, and every LUT, cut out of the file, maps all 256 input codes by
   the code table (XNNPACK and builtin kernels);
5. with `saturate` (the default), a layer whose LUT fails that code check is lowered with
   `select` instead — that layer alone — and steps 1–4 run again (`_convert_proven`); the form
   each layer got is recorded (`lut_forms`, in the details and the file's metadata);
6. embed the metadata and write atomically.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from deploy_kit.errors import ExportError
from deploy_kit.fsutil import atomic_path
from deploy_kit.lut import ActivationQuant, LayerLUT
from exporters import onnx_to_tf

IO_TYPES = ("int8", "float")
FLOAT_CHECK_IMAGES = 4
METADATA_NAME = "deploykit"  # the TFLite metadata entry holding the manifest metadata (JSON)
OPS_PER_LUT = {"LESS": 3, "SELECT_V2": 3}  # per layer lowered with `select`
LUT_FORMS = onnx_to_tf.LUT_FORMS
DEFAULT_LUT_FORM = onnx_to_tf.DEFAULT_LUT_FORM
# The ops one layer's LUT may consist of, per branch-free form (checked on the chain cut out of
# the file). `saturate` holds only int8 ops XNNPACK delegates (ADD/SUB/MUL, LEAKY_RELU).
LUT_OPS = {"select": {"LESS", "SELECT_V2", "MUL"},  # MUL: the rescaled LESS input (LESS_MIN_SCALE)
           "minmax": {"MAXIMUM", "MINIMUM", "RELU", "SUB", "MUL", "ADD"},  # max(x, 0) becomes RELU
           "saturate": {"SUB", "MUL", "ADD", "LEAKY_RELU"}}
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


def check_full_integer(path_or_bytes, lut_forms: dict[str, str], io: str = "int8") -> dict:
    """Raise ExportError unless the model is full-integer with exactly the expected LUT ops:
    3 LESS + 3 SELECT_V2 per layer that `lut_forms` ({layer: form}) lowers with `select`, none
    of either otherwise — so a saturate export holds them only for its fallback layers (the
    branch-free chains' own ops are checked on each chain by check_lut_codes).

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
    selects = sorted(layer for layer, form in lut_forms.items() if form == "select")
    for op, per_layer in OPS_PER_LUT.items():
        found = info["ops"].get(op, 0)
        if found != per_layer * len(selects):
            raise ExportError(f"TFLite model holds {found} {op} ops, expected {per_layer} per select-lowered LUT layer "
                              f"× {len(selects)} ({', '.join(selects) or 'no such layer'}; the other LUTs are "
                              f"branch-free); ops: {info['ops']}")
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


@dataclass(frozen=True)
class Conversion:
    """One translation + conversion of the ONNX graph, checked: the file's bytes and what the
    checks found. `wrong`: {layer: message} for the LUTs whose code table is off."""

    graph: onnx_to_tf.Graph
    tflite: bytes
    info: dict
    float_check: dict
    lut_ops: dict
    wrong: dict


def _convert_checked(proto: onnx.ModelProto, calibration: np.ndarray, io: str, lut_form: str,
                     layer_quant: dict[str, ActivationQuant] | None, select_layers: frozenset[str]) -> Conversion:
    """Steps 1–4 of the module docstring, once; every failure but a LUT's code table raises."""
    graph = onnx_to_tf.read_graph(proto, lut_form, select_layers)
    onnx_to_tf.check_supported(graph)
    t0 = time.perf_counter()
    float_check = onnx_to_tf.check_against_onnxruntime(proto, graph, _float_check_images(calibration))
    float_check["seconds"] = round(time.perf_counter() - t0, 2)
    tflite = convert(graph, calibration, io)
    info = check_full_integer(tflite, graph.lut_forms, io)
    check_lut_grid(tflite, {n: layer_quant[n] for n in graph.luts if layer_quant and n in layer_quant})
    lut_ops, wrong = lut_code_report(tflite, graph.luts, graph.lut_forms)
    return Conversion(graph, tflite, info, float_check, lut_ops, wrong)


def _convert_proven(proto: onnx.ModelProto, calibration: np.ndarray, io: str, lut_form: str,
                    layer_quant: dict[str, ActivationQuant] | None) -> tuple[Conversion, dict[str, str]]:
    """Convert until every LUT maps all 256 codes by the table. A layer of a form with a
    FALLBACK that fails is re-lowered in the fallback form (`select`, the ONNX graph's own ops)
    and the whole file converted again — the converter assigns scales and constants per file,
    so the others are re-checked too. Returns the conversion and {layer: why it fell back}."""
    select: frozenset[str] = frozenset()
    reasons: dict[str, str] = {}
    while True:
        conv = _convert_checked(proto, calibration, io, lut_form, layer_quant, select)
        reasons = {**conv.graph.fallbacks, **reasons}
        unprovable = {layer: msg for layer, msg in conv.wrong.items()
                      if conv.graph.lut_forms[layer] != onnx_to_tf.FALLBACK.get(lut_form)}
        if not conv.wrong:
            return conv, {layer: reasons[layer] for layer in sorted(conv.graph.fallbacks)}
        broken = {layer: msg for layer, msg in conv.wrong.items() if layer not in unprovable}
        if lut_form not in onnx_to_tf.FALLBACK or broken:  # no fallback, or the fallback form itself is off
            raise ExportError(next(iter((broken or conv.wrong).values())))
        reasons.update(unprovable)
        select |= unprovable.keys()


def _check_request(io: str, calibration: np.ndarray | None) -> None:
    if io not in IO_TYPES:
        raise ExportError(f"io must be one of {', '.join(IO_TYPES)}, got {io!r}")
    if calibration is None or len(calibration) == 0:
        raise ExportError("the TFLite target needs calibration images (NCHW float32); none were given")


def export_tflite(onnx_path: Path, out_path: Path, *, io: str = "int8", calibration: np.ndarray,
                  layer_quant: dict[str, ActivationQuant] | None = None, lut_form: str = DEFAULT_LUT_FORM) -> dict:
    """model.onnx → full-integer `out_path`; returns the manifest details (inputs/outputs, op
    counts, the LUT form asked and the one each layer got, the float check's worst node,
    conversion seconds)."""
    _check_request(io, calibration)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proto = onnx.load(str(onnx_path))
    t0 = time.perf_counter()
    conv, fallbacks = _convert_proven(proto, np.asarray(calibration, np.float32), io, lut_form, layer_quant)
    graph, pools = conv.graph, onnx_to_tf.lut_pools(conv.graph)
    forms = dict(sorted(graph.lut_forms.items()))
    tflite = finalize(conv.tflite, {**_onnx_metadata(proto), "lut_form": lut_form, "lut_forms": forms,
                                    "lut_pools": pools}, [graph.input_name], graph.output_names)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(tflite)
    return {**io_details(out_path), "ops": conv.info["ops"], "lut_layers": len(graph.luts), "lut_form": lut_form,
            "lut_forms": forms, "lut_fallbacks": fallbacks, "lut_ops": conv.lut_ops, "lut_pools": pools,
            "xnnpack_partitions": xnnpack_partitions(tflite), "weights": weight_report(proto, tflite),
            "float_check": conv.float_check, "convert_seconds": round(time.perf_counter() - t0, 2)}


def xnnpack_partitions(tflite: bytes) -> int:
    """How many pieces LiteRT's default XNNPACK delegate takes the model in (DELEGATE nodes): 1
    when it runs whole; every op it refuses splits the graph and runs in a builtin kernel."""
    from ai_edge_litert.interpreter import Interpreter

    from deploy_kit.native_log import native_stderr_silenced

    interpreter = Interpreter(model_content=bytes(tflite))
    with native_stderr_silenced():
        interpreter.allocate_tensors()
    return sum(op["op_name"] == "DELEGATE" for op in interpreter._get_ops_details())


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
    """The (input, output) tensor indices of one layer's LUT in a loaded interpreter, whatever
    its form: its first op is found by name (`<layer>/lut/`), the rest by wiring, since the
    last op's output may carry another name (the graph's output, a fused consumer's).
    `select`: x is the data input of the first SELECT_V2 (a LESS may read a rescaled copy,
    see onnx_to_tf.LESS_MIN_SCALE). Branch-free forms: x is the chain's activation-sized input.
    Where the LUT runs after a MaxPool (`lut_pools`), x is the pooled tensor."""
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    ops = [op for op in interpreter._get_ops_details() if op["op_name"] != "DELEGATE"]  # the only API exposing wiring
    key = f"{layer}{onnx_to_tf.LUT_SCOPE}"
    first = next((op for op in ops if op["op_name"] == "SELECT_V2"
                  and any(key in names.get(i, "") for i in op["outputs"])), None)
    if first is not None:
        y = first["outputs"][0]
        for _ in range(2):  # Where(x<t2, v1, ·) then Where(x<t1, v0, ·): each reads the previous as its data
            y = next((op["outputs"][0] for op in ops if op["op_name"] == "SELECT_V2" and op["inputs"][2] == y), y)
        return first["inputs"][2], y
    for form in LUT_FORMS[1:]:
        chain = [op for op in ops if op["op_name"] in LUT_OPS[form]  # a fused name may reach past the chain
                 and any(f"{key}{form}/" in names.get(i, "") for i in op["outputs"])]
        if chain:
            return _branch_free_ends(ops, chain, form, interpreter)
    raise ExportError(f"no LUT of layer {layer} (SELECT_V2 or {'/'.join(LUT_FORMS[1:])} ops writing tensors "
                      f"named {key!r}...) in the TFLite model")


def _branch_free_ends(ops: list[dict], chain: list[dict], form: str, interpreter) -> tuple[int, int]:
    """Extend a named chain by the ops of its form that read only chain tensors and constants
    (its final ADD may be named after a graph output); x = its largest outside input."""
    written = {i for op in ops for i in op["outputs"]}
    produced = {i for op in chain for i in op["outputs"]}
    sizes = {t["index"]: int(np.prod(t["shape"])) for t in interpreter.get_tensor_details()}
    x = max((i for op in chain for i in op["inputs"] if i >= 0 and i not in produced), key=sizes.get)
    for op in ops[ops.index(chain[-1]) + 1:]:
        inputs = [i for i in op["inputs"] if i >= 0]
        if (op["op_name"] in LUT_OPS[form] and any(i in produced for i in inputs)
                and all(i in produced or i == x or i not in written for i in inputs)):
            chain.append(op)
            produced.update(op["outputs"])
    return x, chain[-1]["outputs"][0]


# ----------------------------------------------------------------------------- every code, per LUT

def lut_submodel(tflite: bytes, x: int, y: int) -> tuple[bytes, list[str]]:
    """The ops that compute tensor y from tensor x (and constants), as a model of their own with
    input x and output y: the LUT exactly as the file holds it. Returns (model, op names)."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    model = read_model(tflite)
    sub = model.subgraphs[0]
    producer = {out: i for i, op in enumerate(sub.operators) for out in op.outputs}
    keep, todo = set(), [y]
    while todo:
        t = todo.pop()
        if t == x or t < 0:
            continue
        if t not in producer:
            data = model.buffers[sub.tensors[t].buffer].data
            if data is None or len(data) == 0:
                raise ExportError(f"the LUT ending in tensor {t} reads tensor {t}, neither its input nor a constant")
            continue
        if producer[t] not in keep:
            keep.add(producer[t])
            todo.extend(sub.operators[producer[t]].inputs)
    sub.operators = [op for i, op in enumerate(sub.operators) if i in keep]
    sub.inputs, sub.outputs = np.array([x], np.int32), np.array([y], np.int32)
    model.signatureDefs = []
    ops = _enum_names(schema.BuiltinOperator)
    names = [ops.get(max(model.operatorCodes[op.opcodeIndex].builtinCode,
                         model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode), "?") for op in sub.operators]
    builder = flatbuffers.Builder(len(tflite) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), names


def lut_code_table(model: bytes, default_delegates: bool = True) -> np.ndarray:
    """Output uint8 code of a LUT sub-model for every input code 0..255 (int8 code + 128)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    options = {} if default_delegates else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    interpreter = Interpreter(model_content=model, **options)
    detail = interpreter.get_input_details()[0]
    size = int(np.prod(detail["shape"][1:]))
    batch = -(-256 // size)
    interpreter.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]], strict=False)
    interpreter.allocate_tensors()
    codes = np.resize(np.arange(256), batch * size)
    interpreter.set_tensor(detail["index"], (codes - 128).astype(np.int8).reshape(batch, *detail["shape"][1:]))
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).reshape(-1).astype(np.int32) + 128
    return out[:256]


def lut_code_report(tflite: bytes, luts: dict[str, tuple[LayerLUT, ActivationQuant]],
                    lut_forms: dict[str, str]) -> tuple[dict, dict]:
    """Every LUT in the file, cut out with its own ops, against LayerLUT.apply_codes on each of
    the 256 input codes — in LiteRT with XNNPACK and with the builtin kernels, since the two
    round differently. Returns ({layer: op histogram of its chain}, {layer: what is off}).
    An op outside the layer's form is a lowering bug, raised at once."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=bytes(tflite))
    ops_by_layer, wrong = {}, {}
    for layer, (lut, aq) in sorted(luts.items()):
        form = lut_forms[layer]
        model, ops = lut_submodel(tflite, *lut_tensors(interpreter, layer))
        stray = sorted(set(ops) - LUT_OPS[form])
        if stray:
            raise ExportError(f"layer {layer}: the TFLite LUT holds {stray}, expected only {sorted(LUT_OPS[form])} "
                              f"for lut_form={form}")
        ops_by_layer[layer] = dict(sorted(Counter(ops).items()))
        message = _code_table_error(model, layer, lut, aq, form)
        if message:
            wrong[layer] = message
    return ops_by_layer, wrong


def _code_table_error(model: bytes, layer: str, lut: LayerLUT, aq: ActivationQuant, form: str) -> str | None:
    want = lut.apply_codes(np.arange(256), aq.zero_point)
    for delegates, runtime in ((True, "LiteRT + XNNPACK"), (False, "LiteRT builtin kernels")):
        got = lut_code_table(model, delegates)
        wrong = np.flatnonzero(got != want)
        if wrong.size:
            q = int(wrong[0])
            return (f"layer {layer}: the TFLite LUT ({form}) maps {wrong.size} of 256 codes off the table in "
                    f"{runtime}, e.g. code {q} → {got[q]}, expected {want[q]} ({lut.describe()}); the lowering is "
                    "wrong" + (" — export with --lut-form select" if form not in ("select", *onnx_to_tf.FALLBACK) else ""))
    return None


def check_lut_codes(tflite: bytes, luts: dict[str, tuple[LayerLUT, ActivationQuant]], lut_forms: dict[str, str]) -> dict:
    """lut_code_report, raising ExportError for the first LUT whose table is off; returns
    {layer: op histogram of its chain}."""
    ops_by_layer, wrong = lut_code_report(tflite, luts, lut_forms)
    if wrong:
        raise ExportError(next(iter(wrong.values())))
    return ops_by_layer
