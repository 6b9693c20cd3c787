"""onnxruntime: the LUT's cost as exported (float Less/Where between DQ and Q) against the same
Less/Where chain on the uint8 codes themselves, and against one table lookup per layer (Cast +
Gather on the codes: the fewest nodes an exact ONNX LUT can have) — issue 15's ORT target, an
experiment; only the first is what DESIGN §2/§4b allow in the shipped graph.

    python benchmarks/ort_lut_chain.py --exports DIR [DIR ...] --rounds 7 --repeats 300

For each exports folder: `model.onnx` (the LUT graph verify passed), `relu/model.onnx`, and a
rewrite of `model.onnx` in which each layer's chain reads the codes the DQ read, compares them
with `t + 1` (code < t + 1 ⇔ x < s·(t − z + ½), DESIGN §2), selects the level codes, and feeds
the codes straight to the consumers of its trailing Q (the Q and the DQ go). onnxruntime 1.31's
CPU provider runs `Less` and `Where` on uint8, so no float pass is left. The rewrite must give
logits identical to model.onnx on the whole test split, else the script stops. Prints the
optimized graph's node count and batch-1, one-thread latency (`session.run` only, median of
interleaved rounds) with the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper as nh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _scalar(inits: dict, name: str) -> np.ndarray:
    return nh.to_array(inits[name])


def _index(g: onnx.GraphProto) -> tuple[dict, dict, dict, list[str]]:
    """Initializers by name, each tensor's producer and consumers, and the layers with a LUT chain."""
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    layers = sorted({n.name.split("/lut/")[0] for n in g.node if "/lut/Less" in n.name})
    return inits, producer, consumers, layers


def code_domain_chains(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Every `<layer>/lut/` Less/Where chain of a deploykit graph moved onto the uint8 codes."""
    g = proto.graph
    inits, producer, consumers, layers = _index(g)
    drop = set()
    for layer in layers:
        less = [n for n in g.node if n.name.startswith(f"{layer}/lut/Less")]
        wheres = [n for n in g.node if n.name.startswith(f"{layer}/lut/Where")]
        x = less[0].input[0]
        dq = producer[x]
        codes, scale, zero = dq.input
        s, z = float(_scalar(inits, scale)), int(_scalar(inits, zero))
        dtype = _scalar(inits, zero).dtype
        for n in less:  # x < s·(t − z + ½)  ⇔  code < t + 1
            t = round(float(_scalar(inits, n.input[1])) / s + z - 0.5)
            g.initializer.append(nh.from_array(np.array(t + 1, dtype), f"{n.name}/code"))
            n.input[0], n.input[1] = codes, f"{n.name}/code"
        chained = {i for w in wheres for i in w.input}
        for w in wheres:
            v = round(float(_scalar(inits, w.input[1])) / s) + z
            g.initializer.append(nh.from_array(np.array(v, dtype), f"{w.name}/code"))
            w.input[1] = f"{w.name}/code"
            if w.input[2] == x:
                w.input[2] = codes
        last = next(w for w in wheres if w.output[0] not in chained)
        q = consumers[last.output[0]][0]
        same_grid = [float(_scalar(inits, q.input[1])), int(_scalar(inits, q.input[2]))] == [s, z]
        assert q.op_type == "QuantizeLinear" and same_grid, f"{layer}: not DQ → chain → Q on one grid"
        for n in g.node:
            for k, name in enumerate(n.input):
                if name == q.output[0]:
                    n.input[k] = last.output[0]
        drop.add(q.name)
        if all(c in less or c in wheres for c in consumers[x]):
            drop.add(dq.name)
    kept = [n for n in g.node if n.name not in drop]
    del g.node[:]
    g.node.extend(kept)
    del g.value_info[:]  # the chain's tensors changed type
    onnx.checker.check_model(proto)
    return proto


def gather_chains(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Every layer's chain as one table lookup on its codes: Cast(codes → int32) → Gather(256-entry
    table). The table is the chain itself evaluated on every code (so it is exact by construction);
    not Less/Where, so not what DESIGN §2 and §4b allow in the shipped graph — measured to size the
    gap only."""
    proto = code_domain_chains(proto)
    g = proto.graph
    inits, producer, consumers, layers = _index(g)
    drop = set()
    for layer in layers:
        chain = [n for n in g.node if n.name.startswith(f"{layer}/lut/") and n.op_type in ("Less", "Where")]
        names = {n.name for n in chain}
        last = next(n for n in chain if n.op_type == "Where" and not any(c.name in names for c in consumers.get(n.output[0], [])))
        codes = next(n for n in chain if n.op_type == "Less").input[0]
        # every code of the dtype; as int8, indices 128..255 are −128..−1, which Gather reads from the end
        q = np.arange(256).astype(_scalar(inits, next(n for n in chain if n.op_type == "Less").input[1]).dtype)

        def value(name: str) -> np.ndarray:
            if name == codes:
                return q
            if name in inits:
                return np.broadcast_to(_scalar(inits, name), q.shape)
            n = producer[name]
            if n.op_type == "Less":
                return value(n.input[0]) < value(n.input[1])
            return np.where(value(n.input[0]), value(n.input[1]), value(n.input[2]))
        table = value(last.output[0]).astype(q.dtype)
        g.initializer.append(nh.from_array(table, f"{layer}/lut/table"))
        idx = onnx.helper.make_node("Cast", [codes], [f"{layer}/lut/idx"], name=f"{layer}/lut/Cast", to=onnx.TensorProto.INT32)
        look = onnx.helper.make_node("Gather", [f"{layer}/lut/table", f"{layer}/lut/idx"], [last.output[0]],
                                     name=f"{layer}/lut/Gather", axis=0)
        drop |= names
        g.node.extend([idx, look])
    kept = [n for n in g.node if n.name not in drop]
    del g.node[:]
    g.node.extend(_toposort(kept, {i.name for i in g.input} | {i.name for i in g.initializer}))
    onnx.checker.check_model(proto)
    return proto


def _toposort(nodes: list, ready: set) -> list:
    out, pending = [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(i in ready or not i for i in n.input):
                out.append(n)
                ready |= set(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError("graph has a cycle or a missing input")
        pending = rest
    return out


def _session(path: Path, optimized: Path | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if optimized:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _logits(session, x: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 256]})[0] for i in range(0, len(x), 256)])


def _median_us(session, x1: np.ndarray, repeats: int) -> float:
    feed = {session.get_inputs()[0].name: x1}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6


def measure(folder: Path, rounds: int, repeats: int, tmp: Path) -> dict:
    from deploy_kit.data import load_dataset, normalize
    from exporters.manifest import load_manifest, load_manifest_teacher

    manifest = load_manifest(folder)
    teacher = load_manifest_teacher(manifest, folder)
    test = load_dataset(manifest["data"], seed=int(manifest.get("seed", 0))).split("test")
    x = normalize(test.images, teacher.norm).astype(np.float32)
    code_path = tmp / f"{folder.parent.name}_codes.onnx"
    onnx.save(code_domain_chains(onnx.load(str(folder / "model.onnx"))), str(code_path))
    gather_path = tmp / f"{folder.parent.name}_gather.onnx"
    onnx.save(gather_chains(onnx.load(str(folder / "model.onnx"))), str(gather_path))
    paths = {"relu": folder / "relu" / "model.onnx", "float chain": folder / "model.onnx", "code chain": code_path,
             "gather": gather_path}
    sessions = {k: _session(p, tmp / f"{folder.parent.name}_{k.replace(' ', '_')}.opt.onnx") for k, p in paths.items()}
    exported = _logits(sessions["float chain"], x)
    for k in ("code chain", "gather"):
        moved = _logits(sessions[k], x)
        if not np.array_equal(exported, moved):
            raise SystemExit(f"{folder}: the {k} rewrite changes the logits (max |Δ| {np.abs(exported - moved).max()})")
    nodes = {k: sum(Counter(n.op_type for n in onnx.load(str(tmp / f"{folder.parent.name}_{k.replace(' ', '_')}.opt.onnx"))
                            .graph.node).values()) for k in paths}
    x1 = x[:1]
    for s in sessions.values():
        _median_us(s, x1, 50)  # warm-up
    per_round = {k: [] for k in sessions}
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for k in rng.permutation(list(sessions)):
            per_round[k].append(_median_us(sessions[k], x1, repeats))
    us = {k: float(np.median(v)) for k, v in per_round.items()}
    ratios = {k: [a / b for a, b in zip(per_round[k], per_round["relu"])] for k in ("float chain", "code chain", "gather")}
    return {"model": f"{manifest['model']}-{manifest.get('width')}", "images": len(x), "us": us, "nodes": nodes,
            "ratio": {k: float(np.median(v)) for k, v in ratios.items()},
            "range": {k: (min(v), max(v)) for k, v in ratios.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exports", nargs="+", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()}")
    print("| model | test images, logits identical | ReLU µs | float chain µs | code chain µs | gather µs | "
          "**LUT/ReLU float** (min..max) | **LUT/ReLU codes** (min..max) | **LUT/ReLU gather** (min..max) | "
          "optimized nodes relu/float/codes/gather |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for folder in args.exports:
            m = measure(folder, args.rounds, args.repeats, Path(tmp))
            f, c, g = m["range"]["float chain"], m["range"]["code chain"], m["range"]["gather"]
            print(f"| {m['model']} | {m['images']}, yes | {m['us']['relu']:.1f} | {m['us']['float chain']:.1f} | "
                  f"{m['us']['code chain']:.1f} | {m['us']['gather']:.1f} | "
                  f"{m['ratio']['float chain']:.2f} ({f[0]:.2f}..{f[1]:.2f}) | "
                  f"{m['ratio']['code chain']:.2f} ({c[0]:.2f}..{c[1]:.2f}) | {m['ratio']['gather']:.2f} ({g[0]:.2f}..{g[1]:.2f}) | "
                  f"{m['nodes']['relu']}/{m['nodes']['float chain']}/{m['nodes']['code chain']}/{m['nodes']['gather']} |",
                  flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
