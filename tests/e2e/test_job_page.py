"""The job page in a real browser: headless Chromium driven over the Chrome DevTools
protocol (a websocket, no Playwright, nothing downloaded), against the session's real
service. A user pastes a key, submits a checkpoint, watches it succeed, reads the report.

Set ATTNONLY_JOB_PAGE_SCREENSHOT=/some/file.png to keep a copy of the screenshot."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import httpx
import pytest

FAST = {"calibration": {"tokens": 64, "seq_len": 16}, "greedy_tokens": 4}
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome")) if p), None)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium executable (Debian: apt-get install chromium) to drive the job page with")


class Page:
    """One browser tab over CDP: send commands, keep the events that arrive meanwhile."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, timeout: float = 30, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def js(self, expression: str, context_id: int | None = None):
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        if context_id is not None:
            params["contextId"] = context_id
        result = self.send("Runtime.evaluate", **params)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float, what: str, context_id: int | None = None):
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression, context_id)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; page says: {self.text()[:2000]}\n"
                                     f"console: {self.console()}")
            time.sleep(0.2)

    def type_into(self, selector: str, text: str) -> None:
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", text=text)

    def text(self) -> str:
        return self.js("document.body.innerText") or ""

    def console(self) -> list[str]:
        out = []
        for e in self.events:
            if e["method"] == "Log.entryAdded":
                out.append(f"{e['params']['entry']['level']}: {e['params']['entry']['text']}")
            elif e["method"] == "Runtime.exceptionThrown":
                out.append(f"exception: {e['params']['exceptionDetails'].get('exception', {}).get('description')}")
            elif e["method"] == "Runtime.consoleAPICalled":
                out.append(f"console.{e['params']['type']}: {e['params']['args']}")
        return out


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium with a fresh profile; yields the first tab as a Page."""
    from websockets.sync.client import connect

    profile = tmp_path / "profile"
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
         "--disable-background-networking", "--disable-component-update", "--hide-scrollbars",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1200,1400",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Chromium did not start (exit status {proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        tab = next(t for t in targets if t["type"] == "page")
        with connect(tab["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
            page = Page(ws)
            for domain in ("Page", "Runtime", "Log"):
                page.send(f"{domain}.enable")
            yield page
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def png_pixels(data: bytes) -> tuple[int, int, set]:
    """(width, height, distinct pixel values) of an 8-bit RGB or RGBA PNG, non-interlaced."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    bpp = 3 if color == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    prev, pixels, i = bytearray(stride), set(), 0
    for _ in range(height):
        kind, line = raw[i], bytearray(raw[i + 1:i + 1 + stride])
        i += 1 + stride
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], (prev[x - bpp] if x >= bpp else 0)
            if kind == 1:
                line[x] = (line[x] + a) & 255
            elif kind == 2:
                line[x] = (line[x] + b) & 255
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        if len(pixels) < 4096:
            pixels.update(bytes(line[x:x + bpp]) for x in range(0, stride, bpp * 7))
        prev = line
    return width, height, pixels


def test_page_is_served_without_a_key_under_a_strict_csp(service):
    for path in ("/", "/jobs/some-job-id"):
        resp = httpx.get(service.url + path, timeout=10)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
        csp = resp.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "'unsafe-inline'" not in csp
        assert service.settings.public_s3_endpoint.rstrip("/") in csp  # the presigned URLs' host
        assert "<script src=\"/pages/app.js\"" in resp.text and "http" not in resp.text.split("<body>")[0]
    assert httpx.get(service.url + "/pages/app.js", timeout=10).headers["content-type"].startswith("text/javascript")
    assert httpx.get(service.url + "/pages/nope.js", timeout=10).status_code == 404


def test_submit_watch_and_read_the_report_in_a_browser(service, keys, checkpoints, browser, tmp_path):
    page = browser
    page.send("Page.navigate", url=service.url + "/")
    page.wait("document.readyState === 'complete' && !!document.getElementById('key-form')", 20, "the page")
    assert "Enter your API key" in page.text()

    # The key, as a user pastes it: kept for the tab, never in the URL.
    page.type_into("#key", keys.plain["alice"])
    page.js("document.getElementById('key-save').click()")
    page.wait("document.getElementById('key-status').textContent.includes('key set')", 10, "the key")
    assert page.js("sessionStorage.getItem('attnonly.apiKey')") == keys.plain["alice"]

    # Submit the tiny GPT-2 with quick checks; the page moves to /jobs/{id} and polls it.
    page.type_into("#source", checkpoints.base + "gpt2/")
    page.js("document.querySelector('#submit-form details').open = true")
    page.type_into("#options", json.dumps(FAST))
    page.js("document.getElementById('submit').click()")
    job_id = page.wait("location.pathname.startsWith('/jobs/') && location.pathname.slice(6)", 15, "the job's page")
    state = page.wait(
        "['succeeded','failed','cancelled'].find(s => document.getElementById('detail-state').textContent === s)",
        90, "the job to finish")
    assert state == "succeeded", (state, page.text(), service.logs())
    job = service.client().get(f"/v1/jobs/{job_id}").raise_for_status().json()
    assert job["state"] == "succeeded" and job["options"]["greedy_tokens"] == 4
    # The list shows it too, and the artifacts are offered for download.
    page.wait(f"!!document.querySelector('#jobs tr[data-id=\"{job_id}\"] .state.succeeded')", 10, "the list row")
    names = page.js("[...document.querySelectorAll('[data-artifact]')].map(b => b.dataset.artifact)")
    assert {"config.json", "model.safetensors", "report.json", "report.html"} <= set(names)

    # The report: fetched with the key, followed to its presigned S3 URL, shown in a frame.
    page.js("document.getElementById('open-report').click()")
    src = page.wait("!document.getElementById('report').hidden && document.getElementById('report').src", 15,
                    "the report frame")
    assert src.startswith(service.settings.public_s3_endpoint), src

    def report_text():
        tree = page.send("Page.getFrameTree")["frameTree"]
        frames = [c["frame"] for c in tree.get("childFrames", [])]
        frame = next((f for f in frames if f["url"].startswith(service.settings.public_s3_endpoint)), None)
        if frame is None:
            return ""
        world = page.send("Page.createIsolatedWorld", frameId=frame["id"])["executionContextId"]
        return page.js("document.readyState === 'complete' ? document.body.innerText : ''", world) or ""

    deadline = time.monotonic() + 15
    while "PASSED" not in (text := report_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "PASSED" in text and "attention-only" in text, text[:2000]

    # A download link resolves to the artifact itself (fetched here as the page would).
    url = page.js(f"presignedUrl('/v1/jobs/{job_id}/artifacts/config.json')")
    config = httpx.get(url, timeout=10).raise_for_status().json()
    assert config["model_type"] == "gpt2"

    problems = [line for line in page.console() if "error" in line.lower() or "Content Security Policy" in line]
    assert not problems, problems  # no CSP violations, no failed loads, no script errors

    page.js("window.scrollTo(0, 0)")
    time.sleep(0.3)
    png = __import__("base64").b64decode(page.send("Page.captureScreenshot", format="png")["data"])
    shot = tmp_path / "job-page.png"
    shot.write_bytes(png)
    if os.environ.get("ATTNONLY_JOB_PAGE_SCREENSHOT"):
        Path(os.environ["ATTNONLY_JOB_PAGE_SCREENSHOT"]).write_bytes(png)
    width, height, pixels = png_pixels(png)
    assert len(png) > 20_000 and width >= 800 and height >= 600, (len(png), width, height)
    assert len(pixels) >= 16, f"a nearly blank screenshot: {len(pixels)} distinct pixel values"
