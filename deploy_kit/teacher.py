"""The teacher checkpoint: QAT weights in safetensors plus a JSON sidecar that makes it
self-describing (architecture, labels, preprocessing, per-layer activation quantization).

Loading never unpickles: safetensors holds only tensors, the sidecar is JSON.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deploy_kit import quant
from deploy_kit.data import Normalization
from deploy_kit.errors import CheckpointError
from deploy_kit.fsutil import atomic_path, read_json, sha256_file, write_json
from deploy_kit.lut import ActivationQuant, LayerLUT, LUTActivation
from deploy_kit.models import CHANGED_IN, ZOO_VERSION, ZooModel, build_model

FORMAT = "deploykit-teacher/1"
WEIGHTS_NAME, SIDECAR_NAME = "teacher.safetensors", "teacher.json"


@dataclass
class Teacher:
    """A loaded teacher: the frozen QAT model in eval mode, evaluated in the integer runtimes' arithmetic."""

    model: ZooModel
    meta: dict
    weights_path: Path

    @property
    def arch(self) -> str:
        return self.meta["model"]

    @property
    def layer_quant(self) -> dict[str, ActivationQuant]:
        return {n: ActivationQuant.from_dict(d) for n, d in self.meta["layers"].items()}

    @property
    def norm(self) -> Normalization:
        n = self.meta["normalization"]
        return Normalization(tuple(n["mean"]), tuple(n["std"]))

    @property
    def sha256(self) -> str:
        return self.meta["weights_sha256"]

    def student(self, luts: dict[str, LayerLUT]) -> ZooModel:
        """A copy of the teacher with the LUT installed at each named tap."""
        model = copy.deepcopy(self.model)
        install_luts(model, luts, self.layer_quant)
        return model


def install_luts(model: ZooModel, luts: dict[str, LayerLUT], layer_quant: dict[str, ActivationQuant],
                 straight_through: bool = False) -> None:
    """Set (or clear, for layers not in `luts`) the LUT at every tap of `model`, in place."""
    for name, tap in model.taps().items():
        tap.fn = LUTActivation(luts[name], layer_quant[name], straight_through) if name in luts else None


def state_dict_for_save(model: ZooModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def save_teacher(model: ZooModel, meta: dict, out_dir: Path) -> Path:
    """Write weights then sidecar, each atomically; the sidecar records the weights' sha256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_NAME
    with atomic_path(weights) as tmp:
        save_file(state_dict_for_save(model), str(tmp))
    meta = {"format": FORMAT, "zoo": ZOO_VERSION, **meta, "weights": WEIGHTS_NAME, "weights_sha256": sha256_file(weights)}
    write_json(out_dir / SIDECAR_NAME, meta)
    return out_dir / SIDECAR_NAME


def _resolve(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / SIDECAR_NAME
    elif path.suffix == ".safetensors":
        path = path.with_name(SIDECAR_NAME)
    if not path.is_file():
        raise CheckpointError(f"no teacher at {path}; pass the run folder written by `deploykit train` "
                              f"(it holds {SIDECAR_NAME} and {WEIGHTS_NAME})")
    return path


def read_sidecar(sidecar: Path) -> dict:
    """teacher.json, validated (deploy_kit/schema.py: TeacherSidecar): every key the code uses has
    its type and range, and `weights` names a file in the sidecar's own folder."""
    from deploy_kit.schema import TeacherSidecar, parse

    fix = "; re-run `deploykit train`"
    obj = read_json(sidecar, CheckpointError, fix=fix)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{sidecar}: expected a {FORMAT} sidecar, found format={found!r}")
    parse(obj, TeacherSidecar, str(sidecar), CheckpointError, fix)
    return obj


def load_teacher(path: Path, expect_model: str | None = None) -> Teacher:
    """Load a teacher from its run folder, sidecar or weights file; checks format, hash, model."""
    sidecar = _resolve(path)
    meta = read_sidecar(sidecar)
    if expect_model and meta["model"] != expect_model:
        raise CheckpointError(f"{sidecar}: the teacher is a {meta['model']}, but {expect_model} was asked for; "
                              "pass the checkpoint of the same model")
    weights = sidecar.with_name(meta.get("weights", WEIGHTS_NAME))
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the sidecar {sidecar} needs it")
    if sha256_file(weights) != meta.get("weights_sha256"):
        raise CheckpointError(f"{weights} does not match the sha256 in {sidecar}; the file changed or is corrupt — re-run `deploykit train`")
    return Teacher(load_qat_weights(meta, weights), meta, weights)


def _zoo_version_error(weights: Path, meta: dict) -> CheckpointError | None:
    """Why weights that do not fit were refused, when the sidecar predates a change of its model.
    (Sidecars without `zoo` whose weights fit — trained after the change — load as usual.)"""
    written, (needed, what) = meta.get("zoo", 1), CHANGED_IN.get(meta["model"], (1, ""))
    if written >= needed:
        return None
    return CheckpointError(f"{weights}: this {meta['model']} was trained with zoo version {written}, and the zoo's "
                           f"{meta['model']} changed in version {needed} ({what}, as in the research system); its "
                           f"weights do not fit — re-run `deploykit train`")


def load_qat_weights(meta: dict, weights: Path) -> ZooModel:
    """The frozen QAT model of `meta`'s architecture with `weights` (a teacher's or a fine-tuned
    student's safetensors), in eval and the runtime arithmetic."""
    ranges = quant.CodeRanges.from_dict(meta.get("quantization"))
    model = quant.qat_model(build_model(meta["model"], tuple(meta["input_shape"]), len(meta["classes"]), meta["width"],
                                        channels=meta.get("channels")), ranges)  # a pruned teacher's counts
    try:
        state = load_file(str(weights))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        if isinstance(exc, RuntimeError) and (why := _zoo_version_error(weights, meta)):
            raise why from None
        first = str(exc).strip().splitlines()[0][:200]
        raise CheckpointError(f"{weights} does not fit a {meta['model']} (width {meta['width']}): {first}") from None
    quant.disable_observers(model)
    return model.eval()
