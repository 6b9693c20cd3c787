"""The CLI's shared conventions: usage mistakes get the same one-line error as every other bad input."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from deploy_kit.cli import main


@pytest.mark.parametrize("args, expected", [
    (["train", "--model", "resnet50", "--out", "x"], "Invalid value for '--model': 'resnet50' is not one of"),
    (["train"], "Missing option '--out'"),
    (["trian"], "No such command 'trian'. Did you mean 'train'?"),
    (["export", "--config", "r.json", "--target", "coreml"], "Invalid value for '--target'"),
])
def test_usage_errors_are_one_line_with_where_to_look(args, expected):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0] and "--help`)" in lines[0]
    assert "Usage:" not in result.stderr and "Traceback" not in result.stderr


def test_no_command_shows_the_pipeline_help():
    result = CliRunner().invoke(main, [])
    assert result.exit_code == 2 and "deploykit demo" in result.stderr
