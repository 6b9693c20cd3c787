"""One runner per runtime, shared by `verify` and `bench`: this module only runs models.

Which runtimes exist, which artifacts each loads, and which must run in a process of their own
is the runtime table (exporters/registry.py: RUNTIMES); reading and checking the manifest is
exporters/manifest.py's job. Every runner follows one protocol (`Runner`) and takes what every model in deploykit takes — `data.normalize(uint8 NHWC)`, float32
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
from typing import TYPE_CHECKING, Protocol

import numpy as np

from deploy_kit.errors import ConfigError, ExportError
from deploy_kit.native_log import native_stderr_silenced
from exporters.manifest import Artifact, artifacts
from exporters.registry import VERIFY, runtime as runtime_spec, runtimes_loading

if TYPE_CHECKING:  # deploy_kit.lut imports torch; the ORT/LiteRT runners must not pay for it
    from deploy_kit.lut import ActivationQuant, LayerLUT

DEFAULT_BATCH = 256


@dataclass(frozen=True)
class LayerCodes:
    """Codes entering and leaving one approximated layer's activation, NCHW (or N×features)."""

    before: np.ndarray | None
    after: np.ndarray


def to_codes(values: np.ndarray, quant: ActivationQuant) -> np.ndarray:
    """Float activations on (or near) the teacher's grid → integer codes."""
    return np.rint(np.asarray(values, np.float64) / quant.scale).astype(np.int64) + quant.zero_point


class Runner(Protocol):
    """What verify and bench call. `name` labels the row, `artifact` is the file's name, `bytes`
    its size. `tap_codes` returns, for each of `layers` it can find, the codes entering and
    leaving that layer's LUT in the teacher's code domain (`layer_quant`)."""

    name: str
    artifact: str
    bytes: int

    def predict(self, x: np.ndarray) -> np.ndarray: ...

    def tap_codes(self, x: np.ndarray, layers: list[str],
                  layer_quant: dict[str, ActivationQuant]) -> dict[str, LayerCodes]: ...


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

    def __init__(self, model, name: str, artifact: str, nbytes: int):
        self.model, self.name, self.artifact, self.bytes = model.eval(), name, artifact, nbytes

    def predict(self, x: np.ndarray) -> np.ndarray:
        import torch

        outs = []
        with torch.inference_mode():
            for b in _batches(len(x), self.batch_size):
                outs.append(self.model(torch.from_numpy(np.ascontiguousarray(x[b], np.float32))).numpy())
        return np.concatenate(outs).astype(np.float32)

    def tap_codes(self, x: np.ndarray, layers: list[str],
                  layer_quant: dict[str, ActivationQuant]) -> dict[str, LayerCodes]:
        import torch

        seen: dict[str, list] = {n: [] for n in layers}
        taps = self.model.taps()
        hooks = [taps[n].register_forward_hook(
                     lambda m, i, o, n=n: seen[n].append((self._codes(i[0], layer_quant[n]),
                                                          self._codes(o, layer_quant[n]))))
                 for n in layers if n in taps]
        try:
            with torch.inference_mode():
                for b in _batches(len(x), self.batch_size):
                    self.model(torch.from_numpy(np.ascontiguousarray(x[b], np.float32)))
        finally:
            for h in hooks:
                h.remove()
        return _stack(seen)

    def _codes(self, out, quant: ActivationQuant) -> np.ndarray:
        return to_codes(out.numpy(), quant)


class TeacherRunner(_TorchRunner):
    """The frozen QAT teacher, `load_teacher(p).model`, evaluated in the runtimes' integer arithmetic
    (int32 bias, per-channel requantization; docs/RUNTIMES.md, Agreement): the accuracy reference."""

    def __init__(self, teacher):
        super().__init__(teacher.model, "pytorch-teacher", teacher.weights_path.name,
                         _file_bytes(teacher.weights_path))


class StudentRunner(_TorchRunner):
    """The teacher — or the fine-tuned student's weights (`deploy_kit.student.load_student`) — with
    the LUT installed at each tap: what every export must reproduce."""

    def __init__(self, teacher, luts: dict[str, LayerLUT]):
        name = "pytorch-student (fine-tuned)" if "student" in teacher.meta else "pytorch-student"
        super().__init__(teacher.student(luts), name, f"{teacher.weights_path.name}+LUT",
                         _file_bytes(teacher.weights_path))


class Int8TeacherRunner(_TorchRunner):
    """The teacher converted to real INT8 kernels (`quant.convert_int8`, teacher's backend)."""

    def __init__(self, teacher, backend: str | None = None):
        from deploy_kit import quant

        backend = backend or teacher.meta.get("backend", "qnnpack")
        super().__init__(quant.convert_int8(teacher.model, backend), f"pytorch-int8 ({backend})",
                         teacher.weights_path.name, _file_bytes(teacher.weights_path))

    def _codes(self, out, quant: ActivationQuant) -> np.ndarray:
        # quantized tensors: report them in the teacher's code domain like the others
        return to_codes(out.dequantize().numpy(), quant)


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

    @classmethod
    def for_artifact(cls, art: Artifact, name: str, threads: int | None, batch_size: int, **options) -> OrtRunner:
        """With the session options the exporter recorded for this file (exporters/ort.py), and
        the runtime table's own on top (`options`: session settings, as `_ort_options` reads them)."""
        return cls(art.path, name, {**art.entry.get("session_options", {}), **options}, threads, batch_size)

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

    @classmethod
    def for_artifact(cls, art: Artifact, name: str, threads: int | None, batch_size: int,
                     **options) -> LiteRTRunner:
        return cls(art.path, name, threads, batch_size, **options)

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
    2.14, is built against numpy 1.x). The runtime table marks it isolated: `make_runner` wraps it
    in an `IsolatedRunner`."""

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


# ----------------------------------------------------------------------------- a runner in a process of its own

class IsolatedRunner:
    """Any runner in a fresh Python process (deploy_kit/worker.py), for a runtime the table marks
    `isolated`: arrays travel through a temporary .npz. `predict_seconds` is the worker's own
    time, so images/s does not count the process start."""

    def __init__(self, art: Artifact, exports_dir: Path, runtime: str, label: str, threads: int | None,
                 batch_size: int):
        self.job = {"entry": art.entry, "exports": str(exports_dir), "runtime": runtime, "threads": threads,
                    "batch_size": batch_size}
        self.name, self.artifact, self.bytes = label, art.path.name, _file_bytes(art.path)
        self.predict_seconds: float | None = None

    def _run(self, op: str, x: np.ndarray, **job) -> tuple[dict, dict[str, np.ndarray]]:
        from deploy_kit import worker

        return worker.call({**self.job, **job, "op": op}, {"x": x}, failure=f"{self.name} failed on {self.artifact}")

    def predict(self, x: np.ndarray) -> np.ndarray:
        meta, out = self._run("predict", x)
        self.predict_seconds = meta["seconds"]
        return out["logits"]

    def tap_codes(self, x: np.ndarray, layers: list[str],
                  layer_quant: dict[str, ActivationQuant]) -> dict[str, LayerCodes]:
        _, out = self._run("tap_codes", x, layers=layers,
                           layer_quant={n: q.to_dict() for n, q in layer_quant.items() if n in layers})
        return {n: LayerCodes(out[f"{n}/before"], out[f"{n}/after"]) for n in layers if f"{n}/after" in out}


# ----------------------------------------------------------------------------- the runtime table → runners

def runtimes_for(art: Artifact, use: str = VERIFY) -> list[str]:
    """The usable runtimes that run this artifact for `use` (verify or bench), the one the
    manifest records first."""
    runtime_spec(art.runtime, f"{art.relpath}: ")
    names = [r.name for r in runtimes_loading(art.target, use)]
    return sorted(names, key=lambda n: n != art.runtime)


def make_runner(entry: dict | Artifact, exports_dir: Path, runtime: str | None = None, threads: int | None = None,
                batch_size: int = DEFAULT_BATCH, isolate: bool = True) -> Runner:
    """A runner for one manifest artifact entry (or a resolved `Artifact`) in `runtime` (default:
    the manifest's). A runtime the table marks isolated runs in a process of its own unless
    `isolate=False` — for a caller that already is that fresh process (deploy_kit/worker.py)."""
    art = entry if isinstance(entry, Artifact) else artifacts({"artifacts": [entry]}, exports_dir)[0]
    spec = runtime_spec(runtime or art.runtime, f"{art.relpath}: ")
    if art.target not in spec.loads:
        raise ConfigError(f"{art.relpath}: runtime {spec.name} does not load {art.target} artifacts; it loads "
                          f"{', '.join(spec.loads)}")
    label = spec.label or spec.name
    if art.target != spec.loads[0]:  # "onnxruntime (ort)": the same runtime on its second kind of file
        label = f"{label} ({art.target})"
    if spec.isolated and isolate:
        return IsolatedRunner(art, Path(exports_dir), spec.name, label, threads, batch_size)
    return spec.runner_class().for_artifact(art, label, threads, batch_size, **dict(spec.options))
