"""Shared fixtures. Keep them small: the whole default run must stay within a few minutes.
Others add theirs here too; say in each docstring what it returns."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

LENET_TEACHER_CONFIG = dict(model="lenet5", data="digits", epochs=3, qat_epochs=1, max_train=400, seed=0)


@pytest.fixture(scope="session", autouse=True)
def deploykit_cache(tmp_path_factory) -> Path:
    """Decoded-dataset cache in a session temp folder, so tests never read or fill ~/.cache."""
    cache = tmp_path_factory.mktemp("deploykit-cache")
    old = os.environ.get("DEPLOYKIT_CACHE")
    os.environ["DEPLOYKIT_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("DEPLOYKIT_CACHE", None)
    else:
        os.environ["DEPLOYKIT_CACHE"] = old


@pytest.fixture(scope="session")
def lenet_teacher(tmp_path_factory, deploykit_cache) -> Path:
    """A tiny LeNet5/digits QAT teacher, trained once per test session (a few seconds); returns its
    run folder (teacher.safetensors + teacher.json). Read-only: copy it before changing files."""
    from deploy_kit.train import TrainConfig, train_teacher

    out = tmp_path_factory.mktemp("lenet_teacher")
    train_teacher(TrainConfig(**LENET_TEACHER_CONFIG), out)
    return out


LUT_CODES = {"t1_code": 2, "v1_code": 5, "t2_code": 9, "v2_code": 14, "tmax_code": 24}


@pytest.fixture(scope="session")
def export_lenet_run(lenet_teacher, tmp_path_factory):
    """Factory: a copy of the session teacher with a result.json (LUT_CODES at every layer) and its
    exports for `targets`; returns the exports folder."""
    import shutil

    from deploy_kit.export import ExportConfig, export
    from deploy_kit.fsutil import write_json
    from deploy_kit.teacher import load_teacher

    def make(name: str, targets: tuple[str, ...]) -> Path:
        run = tmp_path_factory.mktemp(name)
        for f in lenet_teacher.iterdir():
            shutil.copy(f, run / f.name)
        teacher = load_teacher(run)
        write_json(run / "result.json", {"model": teacher.arch, "layers": {n: dict(LUT_CODES) for n in teacher.layer_quant},
                                         "teacher": {"path": ".", "sha256": teacher.sha256}})
        export(ExportConfig(result_path=run / "result.json", targets=targets))
        return run / "exports"

    return make
