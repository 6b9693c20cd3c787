"""Silence the native libraries' console chatter around the calls that make it.

TensorFlow, its converter and LiteRT print INFO lines straight to file descriptor 2 from C++
("oneDNN custom operations are on", "fully_quantize: 0, …", "Created TensorFlow Lite XNNPACK
delegate") — past Python's logging and, in TF 2.21, past TF_CPP_MIN_LOG_LEVEL, which absl
ignores until it is initialized. They would bury deploykit's own progress and tables. What a
failing call printed is never what the user reads (every failure becomes one ExportError line),
so the capture is simply dropped; DEPLOYKIT_NATIVE_LOG=1 lets it through for debugging.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager

PASS_THROUGH_ENV = "DEPLOYKIT_NATIVE_LOG"


@contextmanager
def native_stderr_silenced():
    """Point fd 2 at a temp file for the block (Python's own sys.stderr writes included)."""
    if os.environ.get(PASS_THROUGH_ENV) == "1":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (an embedding host, a closed stream): nothing to silence
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
