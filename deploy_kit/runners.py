"""One runner per runtime, shared by `verify` and `bench`.

Every runner takes what every model in deploykit takes — `data.normalize(uint8 NHWC)`, float32
NCHW — and returns float32 logits (N × classes). Layout (NHWC for TFLite), int8 input
quantization and output dequantization are the runner's business, read from the model's own
tensor details, never from assumptions about the exporter.

For `verify --localize` every runner can also report the activation *codes* at each
approximated layer (`tap_codes`), in the teacher's code domain (q = round(x/s) + z), so a
runtime and the student can be compared layer by layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deploy_kit.errors import ConfigError, ExportError
from deploy_kit.fsutil import read_json, sha256_file
from deploy_kit.native_log import native_stderr_silenced

if TYPE_CHECKING:  # deploy_kit.lut imports torch; the ORT/LiteRT runners must not pay for it
    from deploy_kit.lut import ActivationQuant, LayerLUT

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = "deploykit-manifest/1"
DEFAULT_BATCH = 256


@dataclass(frozen=True)
class LayerCodes:
    """Codes entering and leaving one approximated layer's activation, NCHW (or N×features)."""

    before: np.ndarray | None
    after: np.ndarray


def to_codes(values: np.ndarray, quant: ActivationQuant) -> np.ndarray:
    """Float activations on (or near) the teacher's grid → integer codes."""
    return np.rint(np.asarray(values, np.float64) / quant.scale).astype(np.int64) + quant.zero_point


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _file_bytes(path: Path) -> int:
    return Path(path).stat().st_size


def _stack(seen: dict[str, list]) -> dict[str, LayerCodes]:
    """Per-batch (before, after) pairs → one LayerCodes per layer."""
    return {n: LayerCodes(np.concatenate([b for b, _ in v]), np.concatenate([a for _, a in v]))
            for n, v in seen.items() if v}


# ----------------------------------------------------------------------------- PyTorch

class _TorchRunner:
    """Runs a ZooModel in eval mode; `tap_codes` hooks the outputs of the model's taps."""

    batch_size = 512  # larger batches amortize torch's per-op overhead; memory stays modest

    def __init__(self, model, name: str, artifact: str, nbytes: int, layer_quant: dict[str, ActivationQuant]):
        self.model, self.name, self.artifact, self.bytes = model.eval(), name, artifact, nbytes
        self.layer_quant = layer_quant

    def predict(self, x: np.ndarray) -> np.ndarray:
        import torch

        outs = []
        with torch.inference_mode():
            for b in _batches(len(x), self.batch_size):
                outs.append(self.model(torch.from_numpy(np.ascontiguousarray(x[b], np.float32))).numpy())
        return np.concatenate(outs).astype(np.float32)

    def tap_codes(self, x: np.ndarray, layers: list[str]) -> dict[str, LayerCodes]:
        import torch

        seen: dict[str, list] = {n: [] for n in layers}
        taps = self.model.taps()
        hooks = [taps[n].register_forward_hook(
                     lambda m, i, o, n=n: seen[n].append((self._codes(n, i[0]), self._codes(n, o))))
                 for n in layers if n in taps]
        try:
            with torch.inference_mode():
                for b in _batches(len(x), self.batch_size):
                    self.model(torch.from_numpy(np.ascontiguousarray(x[b], np.float32)))
        finally:
            for h in hooks:
                h.remove()
        return _stack(seen)

    def _codes(self, layer: str, out) -> np.ndarray:
        return to_codes(out.numpy(), self.layer_quant[layer])


class TeacherRunner(_TorchRunner):
    """The frozen QAT teacher, `load_teacher(p).model`, evaluated in the runtimes' integer arithmetic
    (int32 bias, per-channel requantization; docs/RUNTIMES.md, Agreement): the accuracy reference."""

    def __init__(self, teacher):
        super().__init__(teacher.model, "pytorch-teacher", teacher.weights_path.name,
                         _file_bytes(teacher.weights_path), teacher.layer_quant)


class StudentRunner(_TorchRunner):
    """The teacher — or the fine-tuned student's weights (`deploy_kit.student.load_student`) — with
    the LUT installed at each tap: what every export must reproduce."""

    def __init__(self, teacher, luts: dict[str, LayerLUT]):
        name = "pytorch-student (fine-tuned)" if "student" in teacher.meta else "pytorch-student"
        super().__init__(teacher.student(luts), name, f"{teacher.weights_path.name}+LUT",
                         _file_bytes(teacher.weights_path), teacher.layer_quant)


class Int8TeacherRunner(_TorchRunner):
    """The teacher converted to real INT8 kernels (`quant.convert_int8`, teacher's backend)."""

    def __init__(self, teacher, backend: str | None = None):
        from deploy_kit import quant

        backend = backend or teacher.meta.get("backend", "qnnpack")
        super().__init__(quant.convert_int8(teacher.model, backend), f"pytorch-int8 ({backend})",
                         teacher.weights_path.name, _file_bytes(teacher.weights_path), teacher.layer_quant)

    def _codes(self, layer: str, out) -> np.ndarray:
        # quantized tensors: report them in the teacher's code domain like the others
        return to_codes(out.dequantize().numpy(), self.layer_quant[layer])


# ----------------------------------------------------------------------------- onnxruntime

def lut_tensor_names(proto, layers: list[str]) -> dict[str, tuple[str, str]]:
    """Each layer's LUT (input, output) tensors in a rewritten ONNX graph: the `Less` nodes'
    data input, and the outermost `Where` (the one no other Where of that layer consumes).
    The exporter names these nodes `<layer>/lut/...` (exporters/onnx_graph.py)."""
    found = {}
    for layer in layers:
        prefix = f"{layer}/lut/"
        nodes = [n for n in proto.graph.node if n.name.startswith(prefix)]
        wheres = [n for n in nodes if n.op_type == "Where"]
        consumed = {i for n in wheres for i in n.input}
        finals = [o for n in wheres for o in n.output if o not in consumed]
        inputs = {n.input[0] for n in nodes if n.op_type == "Less"}
        if len(finals) == 1 and len(inputs) == 1:
            found[layer] = (inputs.pop(), finals[0])
    return found


def _ort_options(settings: dict, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    for key, value in (settings or {}).items():
        if key == "graph_optimization_level":
            opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, str(value))
        elif key in ("intra_op_num_threads", "inter_op_num_threads"):
            setattr(opts, key, int(value))
        else:
            opts.add_session_config_entry(str(key), str(value))
    if threads:
        opts.intra_op_num_threads = threads
    return opts


class OrtRunner:
    """onnxruntime (CPU) on a `.onnx` or ORT-format `.ort` file, with the session options the
    manifest records for it (e.g. `session.qdqisint8allowed`)."""

    def __init__(self, path: Path, name: str = "onnxruntime", session_options: dict | None = None,
                 threads: int | None = None, batch_size: int = DEFAULT_BATCH):
        import onnxruntime as ort

        self.path, self.name, self.artifact, self.bytes = Path(path), name, Path(path).name, _file_bytes(path)
        self.settings, self.threads = dict(session_options or {}), threads
        try:
            self.session = ort.InferenceSession(str(path), _ort_options(self.settings, threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidGraph errors
            raise ExportError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0][:200]}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        dynamic = not isinstance(inp.shape[0], int)
        self.batch_size = batch_size if dynamic else inp.shape[0]

    def predict(self, x: np.ndarray) -> np.ndarray:
        outs = [self.session.run(None, {self.input_name: np.ascontiguousarray(x[b], np.float32)})[0]
                for b in _batches(len(x), self.batch_size)]
        return np.concatenate(outs).astype(np.float32).reshape(len(x), -1)

    def tap_codes(self, x: np.ndarray, layers: list[str], layer_quant: dict[str, ActivationQuant]) -> dict[str, LayerCodes]:
        """Codes around each layer's LUT, read from an in-memory copy of the graph in which
        those tensors are extra graph outputs (so the optimizer keeps them)."""
        import onnx
        import onnxruntime as ort

        if self.path.suffix != ".onnx":
            raise ConfigError(f"{self.artifact}: layer codes can only be read from a .onnx graph, not {self.path.suffix}")
        proto = onnx.load(str(self.path))
        names = lut_tensor_names(proto, layers)
        wanted = [t for pair in names.values() for t in pair]
        for tensor in wanted:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
        session = ort.InferenceSession(proto.SerializeToString(), _ort_options(self.settings, self.threads),
                                       providers=["CPUExecutionProvider"])
        seen: dict[str, list] = {n: [] for n in names}
        for b in _batches(len(x), self.batch_size):
            values = iter(session.run(wanted, {self.input_name: np.ascontiguousarray(x[b], np.float32)}))
            for layer in names:
                before, after = next(values), next(values)
                seen[layer].append((to_codes(before, layer_quant[layer]), to_codes(after, layer_quant[layer])))
        return _stack(seen)


# ----------------------------------------------------------------------------- TFLite / LiteRT

def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail["quantization"]
    dtype = np.dtype(detail["dtype"])
    if not np.issubdtype(dtype, np.integer):
        return x.astype(dtype)
    if scale == 0:
        raise ExportError(f"TFLite input {detail['name']!r} is {dtype.name} but carries no quantization scale")
    info = np.iinfo(dtype)
    return np.clip(np.rint(x / scale) + zero, info.min, info.max).astype(dtype)


def _dequantize(q: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail["quantization"]
    if not np.issubdtype(np.dtype(detail["dtype"]), np.integer) or scale == 0:
        return q.astype(np.float32)
    return (np.float32(scale) * (q.astype(np.float32) - np.float32(zero))).astype(np.float32)


def _to_nhwc(x: np.ndarray) -> np.ndarray:
    """TFLite tensors are NHWC; our inputs are NCHW."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if x.ndim == 4 else x


def tflite_lut_tensors(interpreter, layers: list[str]) -> dict[str, tuple[int, int]]:
    """Each layer's LUT (input, output) tensor indices in a loaded TFLite interpreter; the
    exporter owns the graph's wiring, so it answers (exporters/tflite.py: lut_tensors)."""
    from exporters.tflite import lut_tensors

    found = {}
    for layer in layers:
        try:
            found[layer] = lut_tensors(interpreter, layer)
        except ExportError:
            continue  # reported as "not found" for that layer
    return found


class LiteRTRunner:
    """A `.tflite` file in LiteRT (`ai_edge_litert.interpreter.Interpreter`). Batches by resizing
    the input when the model's batch dimension is dynamic, otherwise loops at its fixed batch."""

    module = "ai_edge_litert.interpreter"

    def __init__(self, path: Path, name: str = "litert", threads: int | None = None,
                 batch_size: int = DEFAULT_BATCH, preserve_all_tensors: bool = False, default_delegates: bool = True):
        import importlib

        module = importlib.import_module(self.module)
        self.path, self.name, self.artifact, self.bytes = Path(path), name, Path(path).name, _file_bytes(path)
        options = {"num_threads": threads, "experimental_preserve_all_tensors": preserve_all_tensors}
        if not default_delegates:
            # builtin kernels only: without XNNPACK, which LiteRT applies by default and which
            # does not take LESS/SELECT_V2, so a LUT graph runs split between it and the builtins
            options["experimental_op_resolver_type"] = module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            self.interpreter = module.Interpreter(model_path=str(path), **options)
        except (ValueError, RuntimeError) as exc:
            raise ExportError(f"{name} cannot load {path}: {str(exc).splitlines()[0][:200]}") from None
        self.threads, self.default_delegates = threads, default_delegates
        detail = self.interpreter.get_input_details()[0]
        self.input_index = detail["index"]
        self.base_shape = list(detail["shape"])
        dynamic = int(detail.get("shape_signature", detail["shape"])[0]) == -1
        self.batch_size = batch_size if dynamic else int(self.base_shape[0])
        self._allocated_batch = None

    def _ensure_batch(self, n: int) -> None:
        if self._allocated_batch != n:
            if n != self.base_shape[0] or self._allocated_batch is not None:
                self.interpreter.resize_tensor_input(self.input_index, [n, *self.base_shape[1:]], strict=True)
            with native_stderr_silenced():  # LiteRT applies XNNPACK here and says so on fd 2
                self.interpreter.allocate_tensors()
            self._allocated_batch = n

    def _invoke(self, x: np.ndarray) -> None:
        self._ensure_batch(len(x))
        detail = self.interpreter.get_input_details()[0]
        self.interpreter.set_tensor(self.input_index, _quantize(_to_nhwc(x), detail))
        self.interpreter.invoke()

    def _output(self) -> np.ndarray:
        detail = self.interpreter.get_output_details()[0]
        return _dequantize(self.interpreter.get_tensor(detail["index"]), detail)

    def predict(self, x: np.ndarray) -> np.ndarray:
        outs = []
        for b in _batches(len(x), self.batch_size):
            self._invoke(x[b])
            outs.append(self._output().reshape(b.stop - b.start, -1))
        return np.concatenate(outs).astype(np.float32)

    def tap_codes(self, x: np.ndarray, layers: list[str], layer_quant: dict[str, ActivationQuant]) -> dict[str, LayerCodes]:
        """Codes around each layer's LUT, from a second interpreter that keeps every
        intermediate tensor (`experimental_preserve_all_tensors`)."""
        probe = type(self)(self.path, self.name, threads=self.threads, batch_size=self.batch_size,
                           preserve_all_tensors=True, default_delegates=self.default_delegates)
        probe._ensure_batch(min(probe.batch_size, len(x)))
        indices = tflite_lut_tensors(probe.interpreter, layers)
        details = {t["index"]: t for t in probe.interpreter.get_tensor_details()}
        seen: dict[str, list] = {n: [] for n in indices}
        def codes(idx: int, quant: ActivationQuant) -> np.ndarray:
            v = _dequantize(probe.interpreter.get_tensor(idx), details[idx])
            return to_codes(v.transpose(0, 3, 1, 2) if v.ndim == 4 else v, quant)  # NHWC → NCHW

        for b in _batches(len(x), probe.batch_size):
            probe._invoke(x[b])
            for layer, (before, after) in indices.items():
                seen[layer].append((codes(before, layer_quant[layer]), codes(after, layer_quant[layer])))
        return _stack(seen)


class TFLiteRuntimeRunner(LiteRTRunner):
    """The same `.tflite` in `tflite_runtime`, the interpreter many embedded Linux images ship.
    Optional (`pip install -e '.[tflite-runtime]'`, which also pins numpy < 2: its last release,
    2.14, is built against numpy 1.x). `make_runner` wraps it in an `IsolatedRunner`."""

    module = "tflite_runtime.interpreter"

    def __init__(self, path: Path, name: str = "tflite_runtime", **kwargs):
        super().__init__(path, name, **kwargs)


def tflite_runtime_status() -> tuple[bool, str | None]:
    """(usable, why not): installed, and its numpy ABI matches. Checked from package metadata,
    without importing it here (see IsolatedRunner for why it never loads in this process)."""
    import importlib.util
    from importlib import metadata

    if importlib.util.find_spec("tflite_runtime") is None:
        return False, None
    version, numpy_major = metadata.version("tflite-runtime"), int(np.__version__.split(".")[0])
    if tuple(int(p) for p in version.split(".")[:2]) < (2, 15) and numpy_major >= 2:
        return False, (f"tflite-runtime {version} is installed but built for numpy 1.x, and numpy {np.__version__} "
                       "is loaded: its rows are skipped (install with `pip install -e '.[tflite-runtime]'`, "
                       "which pins numpy < 2)")
    return True, None


def tflite_runtime_available() -> bool:
    return tflite_runtime_status()[0]


class IsolatedRunner:
    """A runner in a Python process of its own (`python -m deploy_kit.runners JOB_JSON`), with
    arrays passed through a temporary .npz.

    Why: tflite_runtime and TensorFlow/LiteRT carry the same TFLite C++ symbols, and the copy
    loaded first wins. After TensorFlow is imported (`deploykit demo` exports, then verifies, in
    one process) tflite_runtime 2.14 cannot read a model ('vector::reserve'); alone in a fresh
    process it runs as on a device. `predict_seconds` is the worker's own time, so images/s
    does not count the process start."""

    def __init__(self, art: "Artifact", exports_dir: Path, runtime: str, label: str, threads: int | None,
                 batch_size: int):
        self.job = {"entry": art.entry, "exports": str(exports_dir), "runtime": runtime, "label": label,
                    "threads": threads, "batch_size": batch_size}
        self.name, self.artifact, self.bytes = label, art.path.name, _file_bytes(art.path)
        self.predict_seconds: float | None = None

    def _run(self, arrays: dict[str, np.ndarray], **job) -> dict[str, np.ndarray]:
        import json
        import subprocess
        import sys
        import tempfile

        with tempfile.TemporaryDirectory(prefix="deploykit-runner-") as tmp:
            np.savez(Path(tmp) / "in.npz", **arrays)
            done = subprocess.run([sys.executable, "-m", "deploy_kit.runners", json.dumps({**self.job, **job, "dir": tmp})],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()] or ["no output"]
                raise ExportError(f"{self.name} failed on {self.artifact}: {lines[-1][:300]}")
            with np.load(Path(tmp) / "out.npz", allow_pickle=False) as out:
                return dict(out)

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = self._run({"x": x}, op="predict")
        self.predict_seconds = float(out["seconds"])
        return out["logits"]

    def tap_codes(self, x: np.ndarray, layers: list[str], layer_quant: dict[str, ActivationQuant]) -> dict[str, LayerCodes]:
        out = self._run({"x": x}, op="tap_codes", layers=layers,
                        layer_quant={n: q.to_dict() for n, q in layer_quant.items() if n in layers})
        return {n: LayerCodes(out[f"{n}/before"], out[f"{n}/after"]) for n in layers if f"{n}/after" in out}


def _worker(job_json: str) -> None:
    """The other end of IsolatedRunner: the in-process runner, on the job's arrays."""
    import json
    import time

    job = json.loads(job_json)
    folder = Path(job["dir"])
    art = artifacts({"artifacts": [job["entry"]]}, Path(job["exports"]))[0]
    runner = _in_process_runner(art, job["runtime"], job["label"], job["threads"], job["batch_size"])
    with np.load(folder / "in.npz", allow_pickle=False) as arrays:
        x = arrays["x"]
    if job["op"] == "predict":
        start = time.perf_counter()
        logits = runner.predict(x)
        np.savez(folder / "out.npz", logits=logits, seconds=np.float64(time.perf_counter() - start))
        return
    from deploy_kit.lut import ActivationQuant  # (imports torch: only for --localize)

    quant = {n: ActivationQuant.from_dict(d) for n, d in job["layer_quant"].items()}
    codes = runner.tap_codes(x, job["layers"], quant)
    np.savez(folder / "out.npz", **{f"{n}/{k}": getattr(c, k) for n, c in codes.items() for k in ("before", "after")})


# ----------------------------------------------------------------------------- manifest → runners

@dataclass(frozen=True)
class Artifact:
    """One manifest entry, resolved against the exports folder."""

    target: str
    variant: str
    path: Path
    runtime: str
    sha256: str
    bytes: int
    entry: dict

    @property
    def relpath(self) -> str:
        return self.entry["path"]


def load_manifest(exports_dir: Path) -> dict:
    """manifest.json, sealed and typed: its own digest (`content_sha256`) is checked first, so an
    edited code, hash or path is refused before any value is used; then deploy_kit/schema.py's
    `Manifest` types every key (paths relative and inside the exports folder)."""
    from deploy_kit.schema import Manifest, parse
    from exporters.manifest import content_digest

    path = Path(exports_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ConfigError(f"{path}: no manifest; pass the folder written by `deploykit export` (it holds {MANIFEST_NAME})")
    fix = "; re-run `deploykit export --force`"
    manifest = read_json(path, ConfigError, fix=fix)
    if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise ConfigError(f"{path}: expected schema {MANIFEST_SCHEMA}, found {found!r}")
    recorded = manifest.get("content_sha256")
    if not isinstance(recorded, str):
        raise ConfigError(f"{path}: no content_sha256 (exported before manifests were sealed, or removed){fix}")
    if content_digest(manifest) != recorded:
        raise ExportError(f"{path}: its content does not match its content_sha256 {recorded[:12]}…; the manifest was "
                          f"edited after export{fix}")
    parse(manifest, Manifest, str(path), ConfigError, fix)
    return manifest


def _confined(exports_dir: Path, rel: str, what: str) -> Path:
    """`rel` resolved inside the exports folder; a symlink or path leading out of it is refused."""
    folder = Path(exports_dir).resolve()
    path = (folder / rel).resolve()
    if not path.is_relative_to(folder):
        raise ConfigError(f"{MANIFEST_NAME}: {what} {rel!r} leads outside {exports_dir}; every exported file "
                          "lives in the exports folder — re-run `deploykit export --force`")
    return Path(exports_dir) / rel


def artifacts(manifest: dict, exports_dir: Path) -> list[Artifact]:
    from deploy_kit.schema import Artifact as ArtifactSchema, parse

    out = []
    for i, e in enumerate(manifest["artifacts"]):
        a = parse(e, ArtifactSchema, f"{MANIFEST_NAME}: artifact #{i}", ConfigError)
        path = _confined(exports_dir, a.path, f"artifact #{i} path")
        out.append(Artifact(a.target, a.variant, path, a.runtime, a.sha256, a.bytes, e))
    return out


def _check_file(path: Path, sha256: str, what: str) -> None:
    if not path.is_file():
        raise ExportError(f"{path}: missing; the manifest lists it ({what}) — re-run `deploykit export`")
    digest = sha256_file(path)
    if digest != sha256:
        raise ExportError(f"{path}: sha256 {digest[:12]}… does not match the manifest's {sha256[:12]}…; "
                          "the file changed after export — re-run `deploykit export --force`")


def check_hashes(items: list[Artifact]) -> None:
    """Every artifact must be the file the exporter wrote: a changed file is an error."""
    for a in items:
        _check_file(a.path, a.sha256, f"{a.target}/{a.variant}")


def check_exports(manifest: dict, exports_dir: Path) -> list[Artifact]:
    """Everything the manifest vouches for, before anything runs: every file of the exports folder
    (the operator configs too), each artifact, and the result.json and teacher.json it was
    exported from (their sha256). Returns the artifacts."""
    for i, f in enumerate(manifest["files"]):
        _check_file(_confined(exports_dir, f["path"], f"files #{i} path"), f["sha256"], "files")
    items = artifacts(manifest, exports_dir)
    check_hashes(items)
    for key in ("result", "teacher"):
        ref = manifest[key]
        sha = ref["sha256"] if key == "result" else ref["sidecar_sha256"]
        _check_source(Path(exports_dir) / ref["path"], sha, key)
    _check_layers(manifest, exports_dir)
    return items


def _check_layers(manifest: dict, exports_dir: Path) -> None:
    """The codes the manifest records (what verify's student uses) must be the result.json's."""
    from deploy_kit.result import load_result

    result = load_result(Path(exports_dir) / manifest["result"]["path"])
    recorded = {n: lut.to_json() for n, lut in result.layers.items()}
    exported = {n: {k: e[k] for k in next(iter(recorded.values()))} for n, e in manifest["layers"].items()}
    if recorded != exported:
        raise ExportError(f"{MANIFEST_NAME}: its LUT codes differ from {manifest['result']['path']}'s; the exports "
                          "were not made from this result.json — re-run `deploykit export --force`")


def _check_source(path: Path, sha256: str, key: str) -> None:
    name = {"result": "result.json", "teacher": "teacher.json"}[key]
    if path.name != name and not (key == "result" and path.suffix == ".json"):
        raise ConfigError(f"{MANIFEST_NAME}: {key}.path {path.name!r} is not a {name}; re-run `deploykit export --force`")
    if not path.is_file() or sha256_file(path) != sha256:
        raise ExportError(f"{path}: missing or changed since export (its sha256 is not the manifest's "
                          f"{key}.sha256); the exports no longer match their {name} — re-run `deploykit export --force`")


def runtimes_for(artifact: Artifact) -> list[str]:
    """The runtimes that load this artifact: the manifest's, plus tflite_runtime for a .tflite
    file when it is installed."""
    names = [artifact.runtime]
    if artifact.runtime == "litert" and tflite_runtime_available():
        names.append("tflite_runtime")
    return names


def make_runner(entry: dict | Artifact, exports_dir: Path, runtime: str | None = None, threads: int | None = None,
                batch_size: int = DEFAULT_BATCH, isolate: bool = True):
    """A runner for one manifest artifact entry (or a resolved `Artifact`). tflite_runtime runs in
    a process of its own (`IsolatedRunner`) unless `isolate=False` — for a caller that already
    is a fresh process holding only that runtime (bench's workers)."""
    art = entry if isinstance(entry, Artifact) else artifacts({"artifacts": [entry]}, exports_dir)[0]
    runtime = runtime or art.runtime
    label = runtime if art.target in ("onnx", "tflite") else f"{runtime} ({art.target})"
    if runtime == "tflite_runtime" and isolate:
        return IsolatedRunner(art, Path(exports_dir), runtime, label, threads, batch_size)
    return _in_process_runner(art, runtime, label, threads, batch_size)


def _in_process_runner(art: Artifact, runtime: str, label: str, threads: int | None, batch_size: int):
    if runtime == "onnxruntime":
        return OrtRunner(art.path, label, art.entry.get("session_options"), threads, batch_size)
    if runtime == "litert":
        return LiteRTRunner(art.path, label, threads, batch_size)
    if runtime == "litert-builtin":
        return LiteRTRunner(art.path, "litert (no XNNPACK)", threads, batch_size, default_delegates=False)
    if runtime == "tflite_runtime":
        return TFLiteRuntimeRunner(art.path, label, threads=threads, batch_size=batch_size)
    raise ConfigError(f"{art.relpath}: unknown runtime {runtime!r}; deploykit runs onnxruntime, litert, litert-builtin, tflite_runtime")


def manifest_luts(manifest: dict) -> tuple[dict[str, LayerLUT], dict[str, ActivationQuant]]:
    """The LUT codes and quantization recorded in the manifest (validated like result.json)."""
    from deploy_kit.result import parse_result

    parsed = parse_result({"model": manifest.get("model", "?"), "layers": manifest.get("layers")}, MANIFEST_NAME)
    return parsed.layers, parsed.quant


def load_manifest_teacher(manifest: dict, exports_dir: Path):
    """The teacher the manifest was exported from, checked against its recorded sha256."""
    from deploy_kit.teacher import load_teacher

    ref = manifest["teacher"]
    teacher = load_teacher(Path(exports_dir) / ref["path"], expect_model=manifest.get("model"))
    if ref.get("sha256") and ref["sha256"] != teacher.sha256:
        raise ConfigError(f"{MANIFEST_NAME}: exported from teacher sha256 {ref['sha256'][:12]}…, but "
                          f"{teacher.weights_path} is {teacher.sha256[:12]}…; pass the matching teacher or re-export")
    return teacher


def load_manifest_student(manifest: dict, exports_dir: Path, teacher):
    """The weights the LUT artifacts were exported with: the fine-tuned student the manifest
    records (checked against its sha256s and its teacher), else the teacher itself."""
    from deploy_kit.errors import CheckpointError
    from deploy_kit.result import load_result
    from deploy_kit.student import load_student

    ref = manifest.get("student")
    if ref is None:
        return teacher
    if not isinstance(ref, dict) or not isinstance(ref.get("path"), str):
        raise ConfigError(f"{MANIFEST_NAME}: \"student\" must be an object with a \"path\"; re-run `deploykit export`")
    result_ref = manifest.get("result") or {}
    if not isinstance(result_ref.get("path"), str):
        raise ConfigError(f"{MANIFEST_NAME}: a fine-tuned student needs its result.json recorded; re-run `deploykit export`")
    result_path = Path(exports_dir) / result_ref["path"]
    if result_ref.get("sha256") and (not result_path.is_file() or sha256_file(result_path) != result_ref["sha256"]):
        raise ConfigError(f"{MANIFEST_NAME}: {result_path} is missing or changed since export (sha256); "
                          "re-run `deploykit export --force`")
    student = load_student(load_result(result_path), teacher)
    if student is None or student.sha256 != ref.get("weights_sha256"):
        raise CheckpointError(f"{MANIFEST_NAME}: the student weights differ from those exported; re-run `deploykit export --force`")
    return student


if __name__ == "__main__":
    import sys

    try:
        _worker(sys.argv[1])
    except (ConfigError, ExportError) as exc:  # the message is the caller's error line
        sys.exit(str(exc))
