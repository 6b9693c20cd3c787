"""Shared fixtures. Keep them small: the whole default run must stay within a few minutes."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def lenet_teacher(tmp_path_factory):
    """A tiny LeNet5/digits QAT teacher, trained once per test session; returns its run folder."""
    from deploy_kit.train import TrainConfig, train_teacher

    out = tmp_path_factory.mktemp("lenet_teacher")
    train_teacher(TrainConfig(epochs=3, qat_epochs=1, max_train=400), out)
    return out
