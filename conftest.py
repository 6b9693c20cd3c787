"""Shared fixtures of tests/ and runtime_tests/ (this file sits at the root so both see it).
Keep them small: the whole default run must stay within a few minutes. Say in each docstring
what a fixture returns."""

from __future__ import annotations

import os
import shutil
import subprocess
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
    exports for `targets` (TFLite LUTs lowered per `lut_form` and with `io` edges, defaults:
    ExportConfig's); returns the exports folder."""
    from deploy_kit.export import ExportConfig, export
    from deploy_kit.fsutil import write_json
    from deploy_kit.teacher import load_teacher

    def make(name: str, targets: tuple[str, ...], lut_form: str | None = None, io: str | None = None) -> Path:
        run = tmp_path_factory.mktemp(name)
        for f in lenet_teacher.iterdir():
            shutil.copy(f, run / f.name)
        teacher = load_teacher(run)
        write_json(run / "result.json", {"model": teacher.arch, "layers": {n: dict(LUT_CODES) for n in teacher.layer_quant},
                                         "teacher": {"path": ".", "sha256": teacher.sha256}})
        options = {k: v for k, v in (("lut_form", lut_form), ("io", io)) if v}
        export(ExportConfig(result_path=run / "result.json", targets=targets, **options))
        return run / "exports"

    return make


@pytest.fixture(scope="session")
def digit_pngs(tmp_path_factory) -> tuple[list[Path], "np.ndarray"]:
    """The first 8 digits test images, as grayscale PNG files and as the uint8 NHWC array they hold."""
    from PIL import Image

    from deploy_kit.data import load_dataset

    pixels = load_dataset("digits").split("test").images[:8]
    folder = tmp_path_factory.mktemp("digit_pngs")
    paths = []
    for i, image in enumerate(pixels):
        paths.append(folder / f"digit_{i}.png")
        Image.fromarray(image[..., 0], mode="L").save(paths[-1])
    return paths, pixels


# Headless Chromium on this closed network: without the background-networking flags it keeps
# trying to reach Google's hosts.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a Chromium binary (installed with apt when missing and possible), else skip."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        apt = shutil.which("apt-get")
        if apt:
            subprocess.run([apt, "install", "-y", "chromium"], capture_output=True, timeout=600)
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed and `apt-get install -y chromium` was not possible")
    return path
