"""Drive examples/web in headless Chromium: serve the page, an exports folder and test images on
localhost, open `index.html?batch=…`, and return the JSON the page posts back. Shared by
runtime_tests/test_web_example.py and benchmarks/web_latency.py.

The page posts its result to this server: `--dump-dom` fires at the load event, before the async
model load and inference finish, and `--virtual-time-budget` would both cut them short and fake
the page's timings."""

from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import subprocess
import threading
from pathlib import Path

from conftest import CHROMIUM_FLAGS  # the repository root's, which pytest and the benchmark put on sys.path

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "examples" / "web"
NODE_MODULES = WEB / "node_modules"
REPORT_PATH = "/__report"



def missing_packages() -> str | None:
    """Why the page cannot run (its npm packages are absent), or None."""
    needed = [NODE_MODULES / "onnxruntime-web/dist/ort.wasm.min.mjs", NODE_MODULES / "onnxruntime-web/dist/ort-wasm-simd-threaded.wasm",
              NODE_MODULES / "@litertjs/core/dist/index.js", NODE_MODULES / "@litertjs/wasm-utils/dist/index.js"]
    absent = [str(p.relative_to(WEB)) for p in needed if not p.is_file()]
    if absent:
        return (f"examples/web lacks {absent[0]}: run `npm ci --prefix examples/web` "
                "(needs npm and the npm registry)")
    return None


class _Site(http.server.SimpleHTTPRequestHandler):
    """examples/web at /, an exports folder at /exports/, test images at /images/; the page's
    POST to REPORT_PATH is handed to `on_report`."""

    def __init__(self, *args, mounts: dict[str, Path], on_report, requested: list[str], **kwargs):
        self.mounts, self.on_report, self.requested = mounts, on_report, requested
        super().__init__(*args, directory=str(WEB), **kwargs)

    def translate_path(self, path: str) -> str:
        self.requested.append(path)
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


def run_page(chromium: str, exports: Path, images: list[Path], profile: Path, target: str = "onnx",
             requested: list[str] | None = None, timeout: float = 120) -> dict:
    """Serve the page, open it in headless Chromium with `?batch=`, return what the page posts
    (and append each path the browser asked the server for to `requested`)."""
    posted, done = {}, threading.Event()
    mounts = {"/exports/": exports, "/images/": images[0].parent}
    handler = functools.partial(_Site, mounts=mounts, on_report=lambda r: (posted.update(r), done.set()),
                                requested=requested if requested is not None else [])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    batch = ",".join(f"images/{p.name}" for p in images)
    url = f"http://127.0.0.1:{server.server_address[1]}/index.html?target={target}&report={REPORT_PATH}&batch={batch}"
    browser = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        if not done.wait(timeout):
            raise TimeoutError(f"the page posted no result within {timeout:g} s: {url[:200]}")
    finally:
        os.killpg(browser.pid, signal.SIGTERM)  # the browser and the renderers it started, nothing else
        browser.wait(30)
        server.shutdown()
        server.server_close()
    return posted
