"""`--lut-form`: how the TFLite file lowers each LUT (select / minmax / saturate), in real LiteRT.

Every form must map all 256 input codes of every LUT layer by the code table, inside the exported
file (the LUT cut out of it, with XNNPACK and with builtin kernels), pass `verify --localize`,
and be recorded in manifest.json and the TFLite metadata. A wrong constant must be caught.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from deploy_kit.errors import ConfigError, ExportError
from deploy_kit.lut import ActivationQuant, LayerLUT
from exporters import onnx_to_tf, tflite
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
            exports = export_lenet_run(f"lut_form_{form}", ("tflite",), lut_form=form)
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
    assert tflite.read_metadata(path)["lut_form"] == form

    info = tflite.check_full_integer(path, len(layers), lut_form=form)
    assert info["float_tensors"] == [] and info["custom_ops"] == []
    if form == "select":
        assert info["ops"]["LESS"] == info["ops"]["SELECT_V2"] == 3 * len(layers)
    else:
        assert "LESS" not in info["ops"] and "SELECT_V2" not in info["ops"]
        with pytest.raises(ExportError, match="expected 3 per LUT layer"):  # not the default's pattern
            tflite.check_full_integer(path, len(layers), lut_form="select")

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
    monkeypatch.setattr(onnx_to_tf, "lut_steps", lambda lut, quant: [(t + (t == lut.t2), w) for t, w in right(lut, quant)])
    graph = onnx_to_tf.read_graph(proto, form)
    data = tflite.convert(graph, x)
    with pytest.raises(ExportError, match=rf"layer layer: the TFLite LUT \({form}\) maps 1 of 256 codes off the table "
                                          rf"in LiteRT \+ XNNPACK, e.g. code 11 → 6, expected 14"):
        tflite.check_lut_codes(data, graph.luts, form)
    # and the whole export refuses it (the float check against onnxruntime sees it first)
    onnx.save(proto, str(tmp_path / "lut.onnx"))
    with pytest.raises(ExportError):
        tflite.export_tflite(tmp_path / "lut.onnx", tmp_path / "lut.tflite", calibration=x,
                             layer_quant={"layer": aq}, lut_form=form)
    assert not (tmp_path / "lut.tflite").exists()


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
