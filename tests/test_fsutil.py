"""Atomic writes: complete or absent, and readable like any other file the user writes."""

from __future__ import annotations

import os
import stat

import pytest

from deploy_kit.errors import OutputExistsError
from deploy_kit.fsutil import atomic_dir, atomic_path, write_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_atomic_files_and_folders_get_umask_permissions_not_mkstemp_ones(tmp_path, umask_022):
    write_json(tmp_path / "a.json", {"x": 1})
    with atomic_dir(tmp_path / "exports") as tmp:
        (tmp / "model.bin").write_bytes(b"\0")
    assert _mode(tmp_path / "a.json") == 0o644
    assert _mode(tmp_path / "exports") == 0o755


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("conversion failed")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "exports") as tmp:
            (tmp / "model.onnx").write_bytes(b"\0")
            raise RuntimeError("conversion failed")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_force(tmp_path):
    (tmp_path / "exports").mkdir()
    with pytest.raises(OutputExistsError, match="pass --force"):
        with atomic_dir(tmp_path / "exports"):
            pass
