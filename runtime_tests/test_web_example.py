"""examples/web in a real headless Chromium: the page loads an export through onnxruntime-web
(wasm), classifies real digits PNG files via its `?batch=` test hook and must agree with
onnxruntime-python on the same images; a tampered model must be refused.

The page posts its JSON result back to the test's own localhost server: `--dump-dom` fires at the
load event, before the async model load and inference finish, and `--virtual-time-budget` would
both cut them short and fake the page's timings."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from deploy_kit.runners import load_manifest, make_runner
from deploy_kit.teacher import load_teacher

from conftest import CHROMIUM_FLAGS

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "examples" / "web"
ORT_WEB = WEB / "node_modules" / "onnxruntime-web" / "dist"
REPORT_PATH = "/__report"

pytestmark = pytest.mark.skipif(
    not all((ORT_WEB / f).is_file() for f in ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.wasm")),
    reason="examples/web/node_modules is absent: run `npm ci --prefix examples/web` (needs npm and the npm registry)")


@pytest.fixture(scope="module")
def exports(export_lenet_run) -> Path:
    return export_lenet_run("web_example", ("onnx", "ort"))


class _Site(http.server.SimpleHTTPRequestHandler):
    """examples/web at /, an exports folder at /exports/, test images at /images/; the page's
    POST to REPORT_PATH is handed to `on_report`."""

    def __init__(self, *args, mounts: dict[str, Path], on_report, **kwargs):
        self.mounts, self.on_report = mounts, on_report
        super().__init__(*args, directory=str(WEB), **kwargs)

    def translate_path(self, path: str) -> str:
        for prefix, folder in self.mounts.items():
            if path.startswith(prefix):
                return str(folder / path[len(prefix):].split("?")[0])
        return super().translate_path(path)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204)
        self.end_headers()
        if self.path == REPORT_PATH:
            self.on_report(json.loads(body))

    def log_message(self, *args):
        pass


def run_page(chromium: str, exports: Path, images: list[Path], profile: Path, target: str = "onnx") -> dict:
    """Serve the page, open it in headless Chromium with `?batch=`, return what the page posts."""
    posted, done = {}, threading.Event()
    mounts = {"/exports/": exports, "/images/": images[0].parent}
    handler = functools.partial(_Site, mounts=mounts, on_report=lambda r: (posted.update(r), done.set()))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    batch = ",".join(f"images/{p.name}" for p in images)
    url = f"http://127.0.0.1:{server.server_address[1]}/index.html?target={target}&report={REPORT_PATH}&batch={batch}"
    browser = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert done.wait(120), "the page posted no result within 120 s"
    finally:
        os.killpg(browser.pid, signal.SIGTERM)  # the browser and the renderers it started, nothing else
        browser.wait(30)
        server.shutdown()
        server.server_close()
    return posted


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_page_agrees_with_onnxruntime_python(exports, digit_pngs, chromium, tmp_path, target):
    paths, pixels = digit_pngs
    page = run_page(chromium, exports, paths, tmp_path / "profile", target)
    assert "error" not in page, page.get("error")

    manifest = load_manifest(exports)
    entry = next(a for a in manifest["artifacts"] if a["target"] == target and a["variant"] == "lut")
    assert page["model"] == entry["path"] and page["backend"] == "wasm"
    from deploy_kit.data import normalize

    logits = make_runner(entry, exports).predict(normalize(pixels, load_teacher(exports.parent).norm))
    web = np.asarray([r["logits"] for r in page["results"]], np.float32)
    assert [r["image"] for r in page["results"]] == [f"images/{p.name}" for p in paths]
    assert [r["top"][0]["index"] for r in page["results"]] == logits.argmax(1).tolist()
    assert [r["top"][0]["label"] for r in page["results"]] == [manifest["classes"][i] for i in logits.argmax(1)]
    # the same int8 graph in wasm: logits are the same grid values up to float rounding
    np.testing.assert_allclose(web, logits, atol=1e-4)


def test_page_refuses_a_tampered_model(exports, digit_pngs, chromium, tmp_path):
    copy = shutil.copytree(exports, tmp_path / "exports")
    model = copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    page = run_page(chromium, copy, digit_pngs[0][:1], tmp_path / "profile")
    assert "sha256 mismatch" in page["error"] and "model.onnx" in page["error"]
