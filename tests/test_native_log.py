"""Native libraries' fd-2 chatter is silenced where deploykit calls them, and only there."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_fd2_writes_inside_the_block_are_dropped_and_outside_kept():
    code = """
        import os
        from deploy_kit.native_log import native_stderr_silenced
        os.write(2, b"before\\n")
        with native_stderr_silenced():
            os.write(2, b"native chatter\\n")
        os.write(2, b"after\\n")
    """
    assert _run(code).stderr.split() == ["before", "after"]
    assert "native chatter" in _run(code, DEPLOYKIT_NATIVE_LOG="1").stderr


def test_litert_runner_prints_nothing_of_its_own(export_lenet_run):
    exports = export_lenet_run("native_log", ("tflite",))
    result = _run(f"""
        import json, numpy as np
        from pathlib import Path
        from deploy_kit import runners as rn
        exports = Path({str(exports)!r})
        manifest = json.loads((exports / "manifest.json").read_text())
        entry = next(a for a in manifest["artifacts"] if a["target"] == "tflite" and a["variant"] == "lut")
        runner = rn.make_runner(entry, exports)
        print(runner.predict(np.zeros((2, 1, 32, 32), np.float32)).shape)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(2, 10)"
    assert "XNNPACK" not in result.stderr and result.stderr.strip() == "", result.stderr
