"""The audit report in a real browser: headless Chromium, network off, driven over the DevTools protocol.

Chromium is started with ``--remote-debugging-pipe`` (DevTools messages as NUL-terminated JSON on file
descriptors 3 and 4), so the client below needs nothing beyond the standard library. The page is the
report of a real demo-sized run (``tests/support/demo_run.py``, shared with test_report.py), whose
training folder holds an image with the id ``<script>alert(1)</script>.png``.

A screenshot of the rendered page is saved under pytest's temporary folder and copied to
``tests/artifacts/`` (or ``$MEMWATCH_TEST_ARTIFACTS``); the test prints where.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from support.demo_run import PLANTED_ID

from memwatch.views.report import write_pdf, write_report
from memwatch.views.report.pdf import browser_flags

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(),
    reason=f"{CHROMIUM} is missing: install the Debian package 'chromium' (apt-get install -y chromium) "
    "to run the browser tests of the report",
)
TIMEOUT_S = 60.0  # a DevTools answer or the page load; generous for 2 busy cores
ARTIFACTS = Path(os.environ.get("MEMWATCH_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))
# Network off twice over: DevTools' offline emulation, and no name resolves and no proxy answers.
NO_NETWORK_FLAGS = (
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
)


class DevTools:
    """A minimal DevTools-protocol client over Chromium's ``--remote-debugging-pipe``."""

    def __init__(self, profile: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_fds() -> None:
            # In the child: the pipe ends become fds 3 (commands) and 4 (replies). Copies first, so
            # neither end is overwritten if it already is 3 or 4. Every other descriptor of this process
            # is close-on-exec (PEP 446), hence close_fds=False (it would close 3 and 4 after this).
            a, b = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(a, 3)
            os.dup2(b, 4)
            for fd in (3, 4):  # dup2(fd, fd) keeps close-on-exec, so set it explicitly
                os.set_inheritable(fd, True)

        cmd = [CHROMIUM, *browser_flags(profile), *NO_NETWORK_FLAGS, "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(
            cmd, close_fds=False, preexec_fn=wire_fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send a command and wait for its answer (events that arrive meanwhile are kept)."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        reply = self._read_until(lambda m: m.get("id") == self._next_id)
        if "error" in reply:
            raise RuntimeError(f"DevTools {method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str) -> dict[str, Any]:
        """Wait for an event (or return one already received)."""
        for e in self.events:
            if e.get("method") == method:
                return e
        return self._read_until(lambda m: m.get("method") == method)

    def _read_until(self, done: Any) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                msg = json.loads(raw)
                if "method" in msg:
                    self.events.append(msg)
                if done(msg):
                    return msg
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError(f"no DevTools answer within {TIMEOUT_S} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk

    def close(self) -> None:
        try:
            os.write(self._to_browser, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._to_browser)
            os.close(self._from_browser)


@pytest.fixture(scope="module")
def report_files(demo_run: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run = demo_run
    out = tmp_path_factory.mktemp("browser-report")
    paths = write_report(run["run_dir"], out / "report.html", json_out=out / "report.json").paths
    return {**run, **paths, "out": out}


@pytest.fixture
def browser(tmp_path: Path):
    client = DevTools(tmp_path / "profile")
    yield client
    client.close()


def _evaluate(client: DevTools, session: str, expression: str) -> Any:
    result = client.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
    assert "exceptionDetails" not in result, result
    return result["result"]["value"]


def test_report_renders_offline_without_requests_or_scripts(report_files: dict[str, Any], browser: DevTools) -> None:
    page_url = Path(report_files["html"]).resolve().as_uri()
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Network", "Log", "Runtime"):
        browser.send(f"{domain}.enable", {}, session)
    browser.send(
        "Network.emulateNetworkConditions",
        {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        session,
    )
    browser.send(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        session,
    )
    browser.events.clear()
    browser.send("Page.navigate", {"url": page_url}, session)
    browser.wait_event("Page.loadEventFired")

    state = _evaluate(
        browser,
        session,
        """(() => {
            const imgs = Array.from(document.images);
            return {
              verdict: document.querySelector('#summary .badge').textContent,
              plots: imgs.filter(i => i.classList.contains('plot') && i.complete && i.naturalWidth > 0).length,
              pixels: imgs.filter(i => i.classList.contains('px') && i.complete && i.naturalWidth > 0).length,
              broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length,
              scripts: document.scripts.length,
              text: document.body.innerText,
              csp: document.querySelector('meta[http-equiv="Content-Security-Policy"]').content,
            };
        })()""",
    )
    report = json.loads(Path(report_files["json"]).read_text(encoding="utf-8"))
    with_pixels = sum(1 for s in report["evidence"]["samples"] if s["image"])
    thumbs = sum(1 for t in report["evidence"]["training_images"] if t["thumbnail"])
    has_thumb = {t["id"] for t in report["evidence"]["training_images"] if t["thumbnail"]}
    at_risk = report["evidence"]["at_risk_images"]  # each row: the training image and its closest sample
    at_risk_pixels = sum(1 for r in at_risk if r["image"]) + sum(1 for r in at_risk if r["training_id"] in has_thumb)

    assert state["verdict"] == report["verdict"]["overall"]["verdict"] == "memorizing"
    assert state["plots"] == 4  # the headline chart, the grid, the per-seed and the per-image heatmaps, decoded
    assert at_risk and at_risk[0]["at_risk"] == 1 and at_risk[0]["image"]  # the closest sample of the first one
    assert with_pixels > 0 and state["pixels"] == with_pixels + thumbs + at_risk_pixels  # every image decoded
    assert state["broken"] == 0
    # The planted file name is shown as text, and nothing ran: no script element, no dialog.
    assert PLANTED_ID in state["text"]
    assert state["scripts"] == 0
    assert "default-src 'none'" in state["csp"]
    methods = [e["method"] for e in browser.events]
    assert "Page.javascriptDialogOpening" not in methods
    # No request left the page: the only request is the page itself (inline data: images fetch nothing).
    requests = [e["params"]["request"]["url"] for e in browser.events if e["method"] == "Network.requestWillBeSent"]
    assert [u for u in requests if not u.startswith("data:")] == [page_url]
    # No Content-Security-Policy violation either (an injected script or fetch would log one).
    violations = [
        e for e in browser.events if e["method"] == "Log.entryAdded" and e["params"]["entry"]["source"] == "violation"
    ]
    security = [
        e for e in browser.events if e["method"] == "Log.entryAdded" and e["params"]["entry"]["source"] == "security"
    ]
    assert violations == [] and security == []

    height = _evaluate(browser, session, "document.documentElement.scrollHeight")
    shot = browser.send(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1280, "height": min(height, 8000), "scale": 1},
        },
        session,
    )
    png = report_files["out"] / "report-screenshot.png"
    png.write_bytes(base64.b64decode(shot["data"]))
    assert png.read_bytes().startswith(b"\x89PNG")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    copy = ARTIFACTS / "report-screenshot.png"
    shutil.copyfile(png, copy)
    print(f"\nreport screenshot: {copy} (and {png})")


def test_pdf_is_printed_by_headless_chromium(report_files: dict[str, Any]) -> None:
    pdf = write_pdf(report_files["html"], Path(report_files["out"]) / "report.pdf")
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-") and b"%%EOF" in data[-1024:]
    assert len(data) > 10_000  # pages with text and images, not an empty document
