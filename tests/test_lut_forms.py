"""`--lut-form`: how the TFLite file lowers each LUT (select / minmax / saturate), in real LiteRT.

Every form must map all 256 input codes of every LUT layer by the code table, inside the exported
file (the LUT cut out of it, with XNNPACK and with builtin kernels), pass `verify --localize`,
and be recorded in manifest.json and the TFLite metadata. A wrong constant must be caught.
`saturate` is the default; a layer whose saturate LUT fails the code check gets `select` alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from deploy_kit.errors import ConfigError, ExportError
from deploy_kit.lut import ActivationQuant, LayerLUT
from exporters import onnx_to_tf, tf_lut, tflite
from exporters.registry import TARGETS

pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

BRANCH_FREE = [f for f in onnx_to_tf.LUT_FORMS if f != "select"]
# The minmax form is the slowest to export and is covered by the small-model tests below.
FORMS = [pytest.param(f, marks=pytest.mark.slow) if f == "minmax" else f for f in onnx_to_tf.LUT_FORMS]


@pytest.fixture(scope="module")
def lenet_lut_run(export_lenet_run):
    """Factory: the session LeNet5 teacher with LUT_CODES at every layer (conftest), exported to
    ONNX + TFLite with one lut_form; returns (exports folder, teacher)."""
    from deploy_kit.teacher import load_teacher

    made = {}

    def make(form: str):
        if form not in made:
            # the default form's run is a default export (no lut_form given): asserted below
            options = {} if form == onnx_to_tf.DEFAULT_LUT_FORM else {"lut_form": form}
            exports = export_lenet_run(f"lut_form_{form}", ("tflite",), **options)
            made[form] = (exports, load_teacher(exports.parent))
        return made[form]

    return make


def _lut_layers(teacher) -> dict[str, tuple[LayerLUT, ActivationQuant]]:
    from conftest import LUT_CODES

    lut = LayerLUT(*(LUT_CODES[k] for k in ("t1_code", "v1_code", "t2_code", "v2_code", "tmax_code")))
    return {n: (lut, aq) for n, aq in teacher.layer_quant.items()}


@pytest.mark.parametrize("form", FORMS)
def test_each_form_is_full_integer_exact_on_all_codes_and_recorded(lenet_lut_run, form):
    import json

    from ai_edge_litert.interpreter import Interpreter

    exports, teacher = lenet_lut_run(form)
    path = exports / TARGETS["tflite"].path("lut")
    layers = _lut_layers(teacher)
    manifest = json.loads((exports / "manifest.json").read_text())
    assert manifest["lut_form"] == form
    entry = next(a for a in manifest["artifacts"] if a["target"] == "tflite" and a["variant"] == "lut")
    assert entry["lut_form"] == form and set(entry["lut_ops"]) == set(layers)
    assert entry["lut_forms"] == {n: form for n in layers} and entry["lut_fallbacks"] == {}  # no layer fell back
    assert tflite.read_metadata(path)["lut_form"] == form
    assert tflite.read_metadata(path)["lut_forms"] == entry["lut_forms"]

    info = tflite.check_full_integer(path, entry["lut_forms"])
    assert info["float_tensors"] == [] and info["custom_ops"] == []
    if form == "select":
        assert info["ops"]["LESS"] == info["ops"]["SELECT_V2"] == 3 * len(layers)
    else:
        assert "LESS" not in info["ops"] and "SELECT_V2" not in info["ops"]
        with pytest.raises(ExportError, match=r"0 LESS ops, expected 3 per select-lowered LUT layer × 4"):
            tflite.check_full_integer(path, {n: "select" for n in layers})

    # every LUT, cut out of the file with its own ops: all 256 input codes → the code table
    data = path.read_bytes()
    interpreter = Interpreter(model_content=data)
    codes = np.arange(256)
    for layer, (lut, aq) in layers.items():
        model, ops = tflite.lut_submodel(data, *tflite.lut_tensors(interpreter, layer))
        assert set(ops) <= tflite.LUT_OPS[form], (layer, ops)
        want = lut.apply_codes(codes, aq.zero_point)
        for delegates in (True, False):
            np.testing.assert_array_equal(tflite.lut_code_table(model, delegates), want, err_msg=f"{layer} {form}")


def test_saturate_lut_runs_whole_in_xnnpack_and_select_does_not(lenet_lut_run):
    """The point of `saturate`: XNNPACK takes every op of the LUT (one DELEGATE node replaces the
    chain), while LESS/SELECT_V2 stay in LiteRT's builtin kernels."""
    from ai_edge_litert.interpreter import Interpreter

    import json

    for form, whole in (("saturate", True), ("select", False)):
        exports, teacher = lenet_lut_run(form)
        entry = next(a for a in json.loads((exports / "manifest.json").read_text())["artifacts"]
                     if a["target"] == "tflite" and a["variant"] == "lut")
        assert (entry["xnnpack_partitions"] == 1) == whole, entry["xnnpack_partitions"]  # select: 5 on LeNet5
        data = (exports / TARGETS["tflite"].path("lut")).read_bytes()
        for layer in teacher.layer_quant:
            model, ops = tflite.lut_submodel(data, *tflite.lut_tensors(Interpreter(model_content=data), layer))
            sub = Interpreter(model_content=model)
            sub.allocate_tensors()
            names = [op["op_name"] for op in sub._get_ops_details()]
            # the op list keeps the original nodes and appends the delegate's; a DELEGATE node
            # writing the LUT's output means XNNPACK runs the chain up to it
            delegated_out = {o for op in sub._get_ops_details() if op["op_name"] == "DELEGATE" for o in op["outputs"]}
            assert (names.count("DELEGATE") == 1 and sub.get_output_details()[0]["index"] in delegated_out) == whole, \
                (form, layer, names)


@pytest.mark.parametrize("form", FORMS)
def test_each_form_passes_verify_with_localize(lenet_lut_run, form):
    from deploy_kit.verify import VerifyConfig, verify_exports

    exports, _ = lenet_lut_run(form)
    report = verify_exports(VerifyConfig(exports=exports, localize=True), progress=False)
    assert report.passed, report.failures()
    row = next(r for r in report.rows if r.checked and r.artifact == TARGETS["tflite"].path("lut"))
    assert row.agreement_student >= 99.0
    assert row.localize["layers"] and all(e["table_mismatch"] == 0 for e in row.localize["layers"].values())
    # the student's codes (pooled like the export's where its LUT runs after the MaxPool) are the export's
    assert all(e["share_differing"] == 0 for e in row.localize["layers"].values())


@pytest.mark.parametrize("form", ["select", "saturate"])
def test_luts_run_after_their_max_pool(lenet_lut_run, form):
    """conv1 and conv2 feed a 2×2 MaxPool: their LUTs run on the pooled tensor (a quarter of the
    values), recorded in the manifest and the file; fc1/fc2 have no pool and stay put."""
    import json

    from ai_edge_litert.interpreter import Interpreter

    exports, teacher = lenet_lut_run(form)
    path = exports / TARGETS["tflite"].path("lut")
    window = {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 0, 0]}
    entry = next(a for a in json.loads((exports / "manifest.json").read_text())["artifacts"]
                 if a["target"] == "tflite" and a["variant"] == "lut")
    assert entry["lut_pools"] == {"conv1": window, "conv2": window}
    assert tflite.read_metadata(path)["lut_pools"] == entry["lut_pools"]
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    ops = [op for op in interpreter._get_ops_details() if op["op_name"] != "DELEGATE"]
    producer = {o: i for i, op in enumerate(ops) for o in op["outputs"]}
    for layer in ("conv1", "conv2"):
        x, _ = tflite.lut_tensors(interpreter, layer)
        assert ops[producer[x]]["op_name"] == "MAX_POOL_2D", layer
    for layer in ("fc1", "fc2"):
        x, _ = tflite.lut_tensors(interpreter, layer)
        assert ops[producer[x]]["op_name"] == "FULLY_CONNECTED", layer


def test_max_pool_codes_matches_torch_with_and_without_pads():
    import torch

    from deploy_kit.verify import max_pool_codes

    codes = np.random.default_rng(0).integers(0, 256, (2, 3, 9, 9))
    for window in ({"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 0, 0]},
                   {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}):
        want = torch.nn.functional.max_pool2d(torch.from_numpy(codes).double(), window["kernel_shape"],
                                              window["strides"], window["pads"][0]).long().numpy()
        np.testing.assert_array_equal(max_pool_codes(codes, window), want)


# (codes, zero point) → the terms saturate_plan picks and their op count (docs/RUNTIMES.md)
PLANS = [
    ((10, 37, 62, 96, 127), 0, ["pair", "jump_ramp"], 5),       # h = 37, 59, 32: pair(37+32 ≥ 59), jump at tmax
    ((9, 30, 61, 119, 144), 0, ["step", "pair", "ramp"], 7),    # h = 30, 89, 26: 89 > 56, so t2 pairs with tmax
    ((5, 9, 20, 31, 60), 3, ["step", "step", "step", "ramp"], 10),  # z > 0, every jump taller than the one before
    ((3, 6, 10, 14, 14), 0, ["step", "pair", "ramp"], 7),       # v2 = tmax: the tmax jump is one code
    ((1, 3, 10, 255, 255), 3, ["step", "ramp"], 4),             # one jump; the empty ramp lands y on the grid
    ((0, 1, 2, 3, 255), 0, ["step", "step"], 4),                # no identity part; a step at the zero point is one op
    ((2, 130, 131, 132, 133), 0, ["pair", "jump_ramp"], 5),
    ((2, 120, 245, 250, 254), 0, ["step", "pair", "ramp"], 7),  # the counter's offset 241·s is past 127.5·s
    ((3, 21, 25, 31, 35), 2, ["pair", "step", "ramp"], 7),      # not pair(25, 35): M = b−a = 10
    ((10, 88, 100, 116, 117), 0, ["step", "pair", "ramp"], 7),  # so would pair(10, 100) with M = 88 + 2
]


@pytest.mark.parametrize("codes, z, kinds, ops", PLANS)
def test_saturate_plan_picks_the_cheapest_terms(codes, z, kinds, ops):
    plan = onnx_to_tf.saturate_plan(LayerLUT(*codes), ActivationQuant(0.02, z))
    assert [term[0] for term in plan] == kinds
    assert onnx_to_tf.saturate_ops(plan, z) == ops


@pytest.mark.parametrize("codes, z, kinds, ops", PLANS)
def test_saturate_plans_are_exact_and_whole_in_xnnpack(tmp_path, codes, z, kinds, ops):
    """Each plan in a real file: all 256 codes by the table (export_tflite checks, XNNPACK and
    builtin), the chain holds exactly the planned ops, and XNNPACK runs all of it."""
    from ai_edge_litert.interpreter import Interpreter

    lut, aq = LayerLUT(*codes), ActivationQuant(0.0213, z)
    proto, x = _lut_model(tmp_path, lut, aq)
    onnx.save(proto, str(tmp_path / "lut.onnx"))
    details = tflite.export_tflite(tmp_path / "lut.onnx", tmp_path / "lut.tflite", calibration=x,
                                   layer_quant={"layer": aq}, lut_form="saturate")
    assert sum(details["lut_ops"]["layer"].values()) == ops
    data = (tmp_path / "lut.tflite").read_bytes()
    model, _ = tflite.lut_submodel(data, *tflite.lut_tensors(Interpreter(model_content=data), "layer"))
    sub = Interpreter(model_content=model)
    sub.allocate_tensors()
    delegates = [op for op in sub._get_ops_details() if op["op_name"] == "DELEGATE"]
    assert len(delegates) == 1 and sub.get_output_details()[0]["index"] in delegates[0]["outputs"]


# ----------------------------------------------------------------------------- small models

def _lut_model(tmp_path: Path, lut: LayerLUT, aq: ActivationQuant) -> tuple[onnx.ModelProto, np.ndarray]:
    from test_onnx_to_tf import lut_layer_model

    proto = lut_layer_model(lut, aq)
    return proto, aq.value(np.arange(256).reshape(1, 1, 16, 16)).astype(np.float32)


def test_read_graph_recovers_the_codes_of_each_lut(tmp_path):
    lut, aq = LayerLUT(3, 6, 10, 14, 20), ActivationQuant(0.0125, 0)
    proto, _ = _lut_model(tmp_path, lut, aq)
    for form in onnx_to_tf.LUT_FORMS:
        graph = onnx_to_tf.read_graph(proto, form)
        (layer, (found, quant)), = graph.luts.items()
        assert layer == "layer" and found == lut and quant.scale == pytest.approx(aq.scale) and quant.zero_point == 0
        assert sum(n.op == onnx_to_tf.LUT_NODE for n in graph.nodes) == 1
    with pytest.raises(ExportError, match="lut_form must be one of select, minmax, saturate"):
        onnx_to_tf.read_graph(proto, "gather")


# v2 = tmax (a zero-height step) on a fine scale; t1 = z and tmax at the top code; a zero point > 0;
# v1 = z and v2 = tmax = 255: a single step
@pytest.mark.parametrize("lut, aq", [(LayerLUT(3, 6, 10, 14, 14), ActivationQuant(0.003, 0)),
                                     (LayerLUT(0, 1, 2, 3, 255), ActivationQuant(0.05, 0)),
                                     (LayerLUT(5, 9, 20, 31, 60), ActivationQuant(0.02, 3)),
                                     (LayerLUT(1, 3, 10, 255, 255), ActivationQuant(0.02, 3))])  # one step
@pytest.mark.parametrize("form", BRANCH_FREE)
def test_branch_free_forms_are_exact_on_edge_codes(tmp_path, form, lut, aq):
    proto, x = _lut_model(tmp_path, lut, aq)
    onnx.save(proto, str(tmp_path / "lut.onnx"))
    details = tflite.export_tflite(tmp_path / "lut.onnx", tmp_path / "lut.tflite", calibration=x,
                                   layer_quant={"layer": aq}, lut_form=form)  # raises unless all 256 codes match
    assert details["lut_form"] == form and set(details["lut_ops"]["layer"]) <= tflite.LUT_OPS[form]


@pytest.mark.parametrize("form", BRANCH_FREE)
def test_a_wrong_constant_in_a_branch_free_lut_is_caught(tmp_path, monkeypatch, form):
    """One threshold one code too high: the float check is bypassed (convert directly) so that
    the code check alone must find it, naming the layer and the first wrong code."""
    lut, aq = LayerLUT(3, 6, 10, 14, 20), ActivationQuant(0.0125, 0)
    proto, x = _lut_model(tmp_path, lut, aq)
    right = onnx_to_tf.lut_steps
    monkeypatch.setattr(tf_lut, "lut_steps", lambda lut, quant: [(t + (t == lut.t2), w) for t, w in right(lut, quant)])
    graph = onnx_to_tf.read_graph(proto, form)
    data = tflite.convert(graph, x)
    with pytest.raises(ExportError, match=rf"layer layer: the TFLite LUT \({form}\) maps 1 of 256 codes off the table "
                                          rf"in LiteRT \+ XNNPACK, e.g. code 11 → 6, expected 14"):
        tflite.check_lut_codes(data, graph.luts, graph.lut_forms)
    # and the whole export refuses it (the float check against onnxruntime sees it first)
    onnx.save(proto, str(tmp_path / "lut.onnx"))
    with pytest.raises(ExportError):
        tflite.export_tflite(tmp_path / "lut.onnx", tmp_path / "lut.tflite", calibration=x,
                             layer_quant={"layer": aq}, lut_form=form)
    assert not (tmp_path / "lut.tflite").exists()


# ----------------------------------------------------------------------------- the default and its fallback

def test_the_default_export_is_saturate_everywhere(lenet_lut_run):
    """ExportConfig, `export` and `demo` default to saturate; a default export of LeNet5 holds it
    at every layer (no LESS/SELECT_V2 at all) and says so in the manifest and the file."""
    import json

    from click.testing import CliRunner

    from deploy_kit.cli import main
    from deploy_kit.demo import DemoConfig
    from deploy_kit.export import ExportConfig

    assert ExportConfig(result_path=Path("r.json")).lut_form == DemoConfig().lut_form == "saturate"
    for command in ("export", "demo"):
        help_text = " ".join(CliRunner().invoke(main, [command, "--help"]).output.split())
        assert "[default: saturate]" in help_text, command
    exports, teacher = lenet_lut_run("saturate")  # made without a lut_form
    manifest = json.loads((exports / "manifest.json").read_text())
    entry = next(a for a in manifest["artifacts"] if a["target"] == "tflite" and a["variant"] == "lut")
    assert manifest["lut_form"] == entry["lut_form"] == "saturate"
    assert entry["lut_forms"] == {n: "saturate" for n in teacher.layer_quant}
    assert "LESS" not in entry["ops"] and "SELECT_V2" not in entry["ops"]


def _lut_chain_model(luts: dict[str, LayerLUT], aq: ActivationQuant, hw: int = 16,
                     pooled: tuple[str, ...] = ()) -> onnx.ModelProto:
    """input → Q/DQ → [<layer>/lut Less/Where ×3 → Q/DQ (→ MaxPool 2×2 → Q/DQ for `pooled`)] per
    layer, in order → output: several LUT layers in one file, each named as the rewrite names
    them; a pooled layer's LUT precedes its pool (as in graphs deploykit did not rewrite)."""
    from onnx import TensorProto, helper

    from test_onnx_to_tf import _const, _qdq

    nodes, inits, x = _qdq("input_q", "input", aq.scale, aq.zero_point)
    for layer, lut in luts.items():
        consts = zip(("t1", "t2", "tmax", "v0", "v1", "v2"), (*lut.thresholds(aq), *lut.levels(aq)))
        inits += [_const(f"{layer}/lut/{k}", np.float32(v)) for k, v in consts]
        y = x
        for t, v in (("tmax", "v2"), ("t2", "v1"), ("t1", "v0")):
            nodes.append(helper.make_node("Less", [x, f"{layer}/lut/{t}"], [f"{layer}/lut/below_{t}"],
                                          name=f"{layer}/lut/Less_{t}"))
            nodes.append(helper.make_node("Where", [f"{layer}/lut/below_{t}", f"{layer}/lut/{v}", y],
                                          [f"{layer}/lut/out_{t}"], name=f"{layer}/lut/Where_{t}"))
            y = f"{layer}/lut/out_{t}"
        more_nodes, more_inits, x = _qdq(f"{layer}/out", y, aq.scale, aq.zero_point)
        nodes, inits = nodes + more_nodes, inits + more_inits
        if layer in pooled:
            nodes.append(helper.make_node("MaxPool", [x], [f"{layer}/pool"], name=f"{layer}/MaxPool",
                                          kernel_shape=[2, 2], strides=[2, 2]))
            more_nodes, more_inits, x = _qdq(f"{layer}/pool_q", f"{layer}/pool", aq.scale, aq.zero_point)
            nodes, inits = nodes + more_nodes, inits + more_inits
    nodes.append(helper.make_node("Identity", [x], ["output"], name="output/Identity"))
    out = hw // 2 ** len(pooled)
    graph = helper.make_graph(nodes, "lut_chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, hw, hw])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, out, out])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# A plan that is exact in float but not in int8: pair(3, 10) with a gain of exactly M/(b−a) = 1,
# which saturate_plan once chose (commit 0f96e3c) and now never does — the converter folds that MUL
# together with the clamp at T, and most codes come out off the table. It is a real plan of real
# terms, so the export converts it for real and only the 256-code check in LiteRT can refuse it.
UNIT_GAIN_LUT = LayerLUT(3, 7, 10, 12, 20)
UNIT_GAIN_PLAN = [("pair", 3, 10, 7, 12), ("step", 20, 9), ("ramp", 20)]


def test_a_layer_whose_saturate_lut_is_not_exact_falls_back_to_select_alone(tmp_path, monkeypatch):
    """The seam: saturate_plan, which the translator asks for each layer's terms. Layer `a` gets
    the unit-gain plan: its saturate LUT fails the code check, so the export re-lowers `a` alone
    with select and converts again; `b` keeps saturate. The file is full-integer with exactly one
    layer's LESS/SELECT_V2, every LUT in it maps all 256 codes (XNNPACK and builtin kernels), the
    whole file maps each code through both, and the manifest details and metadata say which layer
    got which form and why."""
    from ai_edge_litert.interpreter import Interpreter

    aq = ActivationQuant(0.0213, 0)
    luts = {"a": UNIT_GAIN_LUT, "b": LayerLUT(3, 6, 10, 14, 20)}
    real_plan = onnx_to_tf.saturate_plan
    monkeypatch.setattr(tf_lut, "saturate_plan",
                        lambda lut, quant: UNIT_GAIN_PLAN if lut == UNIT_GAIN_LUT else real_plan(lut, quant))
    onnx.save(_lut_chain_model(luts, aq), str(tmp_path / "luts.onnx"))
    codes = np.arange(256).reshape(1, 1, 16, 16)
    details = tflite.export_tflite(tmp_path / "luts.onnx", tmp_path / "luts.tflite", calibration=aq.value(codes).astype(np.float32),
                                   layer_quant={"a": aq, "b": aq})

    assert details["lut_form"] == "saturate" and details["lut_forms"] == {"a": "select", "b": "saturate"}
    assert list(details["lut_fallbacks"]) == ["a"] and "codes off the table" in details["lut_fallbacks"]["a"]
    assert details["lut_ops"]["a"] == {"LESS": 3, "SELECT_V2": 3}
    assert set(details["lut_ops"]["b"]) <= tflite.LUT_OPS["saturate"]
    data = (tmp_path / "luts.tflite").read_bytes()
    meta = tflite.read_metadata(data)
    assert meta["lut_form"] == "saturate" and meta["lut_forms"] == details["lut_forms"]
    tflite.check_full_integer(data, details["lut_forms"])  # LESS/SELECT_V2 for `a` only
    with pytest.raises(ExportError, match=r"3 LESS ops, expected 3 per select-lowered LUT layer × 0"):
        tflite.check_full_integer(data, {"a": "saturate", "b": "saturate"})
    tflite.check_lut_codes(data, {n: (lut, aq) for n, lut in luts.items()}, details["lut_forms"])

    interpreter = Interpreter(model_content=data)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], (codes.transpose(0, 2, 3, 1) - 128).astype(np.int8))
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).astype(np.int32) + 128
    want = luts["b"].apply_codes(luts["a"].apply_codes(codes, 0), 0)
    np.testing.assert_array_equal(got.transpose(0, 3, 1, 2), want)


def test_the_unit_gain_plan_really_breaks_the_saturate_lut(tmp_path, monkeypatch):
    """The fallback test's premise, checked on its own: lowered with that plan, the converted LUT
    maps codes off the table (else the fallback above would prove nothing)."""
    aq = ActivationQuant(0.0213, 0)
    real_plan = onnx_to_tf.saturate_plan
    monkeypatch.setattr(tf_lut, "saturate_plan",
                        lambda lut, quant: UNIT_GAIN_PLAN if lut == UNIT_GAIN_LUT else real_plan(lut, quant))
    proto, x = _lut_model(tmp_path, UNIT_GAIN_LUT, aq)
    graph = onnx_to_tf.read_graph(proto, "saturate")
    _, wrong = tflite.lut_code_report(tflite.convert(graph, x), graph.luts, graph.lut_forms)
    assert list(wrong) == ["layer"] and "LiteRT + XNNPACK" in wrong["layer"]


def test_a_layer_without_a_saturate_plan_is_lowered_with_select():
    """v1 below the zero point: the staircase is not monotone, so saturate has no plan for it; the
    translator picks select for that layer at once (no conversion spent), and says why."""
    aq = ActivationQuant(0.02, 3)
    proto = _lut_chain_model({"a": LayerLUT(1, 2, 5, 8, 20), "b": LayerLUT(5, 9, 20, 31, 60)}, aq)
    graph = onnx_to_tf.read_graph(proto)  # the default form
    assert graph.lut_forms == {"a": "select", "b": "saturate"}
    assert list(graph.fallbacks) == ["a"] and "not monotone" in graph.fallbacks["a"]
    assert onnx_to_tf.read_graph(proto, "select").fallbacks == {}  # an explicit select is all-select


def test_the_translator_moves_a_lut_that_precedes_its_pool():
    """deploykit's model.onnx already runs each LUT after the MaxPool it feeds; a graph that does
    not (another producer's, an earlier deploykit's) gets it moved by the translator, and either
    way lut_pools names the layer with its window. A non-monotone LUT (v1 < z) stays put."""
    window = {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 0, 0]}
    aq = ActivationQuant(0.02, 3)
    luts = {"a": LayerLUT(5, 9, 20, 31, 60), "b": LayerLUT(1, 2, 5, 8, 20)}  # b: v1 = 2 < z = 3
    graph = onnx_to_tf.read_graph(_lut_chain_model(luts, aq, pooled=("a", "b")))
    ops = [(n.op, n.name.split("/")[0]) for n in graph.nodes if n.op in ("MaxPool", onnx_to_tf.LUT_NODE)]
    assert ops == [("MaxPool", "a"), (onnx_to_tf.LUT_NODE, "a"), (onnx_to_tf.LUT_NODE, "b"), ("MaxPool", "b")]
    assert onnx_to_tf.lut_pools(graph) == {"a": window}


def test_export_config_rejects_an_unknown_lut_form(tmp_path):
    from deploy_kit.export import ExportConfig

    with pytest.raises(ConfigError, match="--lut-form must be one of select, minmax, saturate, got 'gather'"):
        ExportConfig(result_path=tmp_path / "result.json", lut_form="gather")


def test_cli_lists_the_lut_forms_and_rejects_others(tmp_path):
    from click.testing import CliRunner

    from deploy_kit.cli import main

    assert "--lut-form [select|minmax|saturate]" in CliRunner().invoke(main, ["export", "--help"]).output
    result = CliRunner().invoke(main, ["export", "--config", str(tmp_path / "result.json"), "--lut-form", "gather"])
    assert result.exit_code == 2 and "gather" in result.output and "saturate" in result.output
