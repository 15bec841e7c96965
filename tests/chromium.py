"""Open a page in headless Chromium and report what a reader's browser would complain about.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
commands in on fd 3, answers and events out on fd 4, each message JSON ended by a NUL),
so no port, no websocket library and no log scraping are involved. What is collected:
console errors and assertion failures (``Runtime.consoleAPICalled``), uncaught
exceptions (``Runtime.exceptionThrown``), the browser's own error log entries (a
resource that failed to load: ``Log.entryAdded``), failed requests
(``Network.loadingFailed``), every URL requested, and each image's state once the
page's load event fired; and a screenshot.

Debian's package is ``chromium`` (``apt-get install -y chromium``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = (
    "headless Chromium is needed to check report.html: on Debian/Ubuntu run "
    "`apt-get install -y chromium` (CI: in .ci/run's install step), or set $CHROMIUM to "
    "a Chromium or Chrome binary"
)


def find_chromium() -> str | None:
    """The browser to use: ``$CHROMIUM``, else the first of :data:`CANDIDATES` on PATH."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return shutil.which(explicit) or (explicit if os.access(explicit, os.X_OK) else None)
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


@dataclass
class PageCheck:
    """What loading one page produced."""

    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    title: str = ""
    screenshot: bytes = b""

    @property
    def problems(self) -> list[str]:
        return self.console_errors + self.exceptions + self.log_errors + self.failed_requests


class _Pipe:
    """One DevTools connection over the pipe pair; events are kept as they arrive."""

    def __init__(self, send_fd: int, recv_fd: int, proc: subprocess.Popen[bytes]) -> None:
        self._send = send_fd
        self._recv = recv_fd
        self._proc = proc
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read_one(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._recv], [], [], min(left, 0.5))
            if not ready:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"Chromium exited with {self._proc.returncode}")
                continue
            chunk = os.read(self._recv, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        msg: dict[str, Any] = json.loads(raw)
        return msg

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout: float = 20.0,
    ) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._send, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            got = self._read_one(deadline)
            if got.get("id") == self._next_id:
                if "error" in got:
                    raise RuntimeError(f"{method}: {got['error']}")
                result: dict[str, Any] = got.get("result", {})
                return result
            if "method" in got:
                self.events.append(got)

    def wait_event(self, method: str, timeout: float) -> dict[str, Any]:
        for ev in self.events:
            if ev["method"] == method:
                return ev
        deadline = time.monotonic() + timeout
        while True:
            got = self._read_one(deadline)
            if "method" in got:
                self.events.append(got)
                if got["method"] == method:
                    return got

    def drain(self, seconds: float) -> None:
        """Collect the events that arrive in the next ``seconds`` (late console output)."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                got = self._read_one(deadline)
                if "method" in got:
                    self.events.append(got)
        except TimeoutError:
            return


_IMAGES_JS = (
    "JSON.stringify(Array.from(document.images).map(i => ({src: i.currentSrc || i.src, "
    "complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})))"
)


def load_page(url: str, *, timeout: float = 30.0, width: int = 1400) -> PageCheck:
    """Load ``url`` in a fresh headless Chromium; what it complained about, and a screenshot.

    Raises FileNotFoundError (with the install hint) when there is no Chromium.
    """
    chrome = find_chromium()
    if chrome is None:
        raise FileNotFoundError(INSTALL_HINT)
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    args = [
        chrome,
        "--headless=new",
        "--disable-gpu",
        "--no-sandbox",  # CI and this check run as root, where the sandbox will not start
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--remote-debugging-pipe",
        f"--user-data-dir={profile}",
        f"--window-size={width},1000",
        "about:blank",
    ]
    # Chromium reads DevTools commands from fd 3 and writes to fd 4: bash puts our pipe
    # ends there (dash takes single-digit fds only), then becomes Chromium.
    script = f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}'
    proc = subprocess.Popen(
        ["bash", "-c", script, "bash", *args],
        pass_fds=(to_chrome_r, from_chrome_w),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    pipe = _Pipe(to_chrome_w, from_chrome_r, proc)
    check = PageCheck()
    try:
        target = pipe.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)
        session = pipe.call(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            pipe.call(f"{domain}.enable", session=session)
        pipe.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        pipe.call("Page.navigate", {"url": url}, session=session)
        pipe.wait_event("Page.loadEventFired", timeout)
        pipe.drain(0.5)
        value = pipe.call(
            "Runtime.evaluate", {"expression": _IMAGES_JS, "returnByValue": True}, session=session
        )["result"]["value"]
        check.images = json.loads(value)
        check.title = pipe.call(
            "Runtime.evaluate",
            {"expression": "document.title", "returnByValue": True},
            session=session,
        )["result"]["value"]
        shot = pipe.call(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True},
            session=session,
        )
        check.screenshot = base64.b64decode(shot["data"])
        with contextlib.suppress(RuntimeError, TimeoutError):  # it goes away either way
            pipe.call("Browser.close", timeout=5)
    finally:
        if proc.poll() is None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        os.close(to_chrome_w)
        os.close(from_chrome_r)
        shutil.rmtree(profile, ignore_errors=True)
    for ev in pipe.events:
        method, params = ev["method"], ev.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            check.console_errors.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            check.exceptions.append(str(details.get("exception", {}).get("description", details)))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            check.log_errors.append(
                f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}"
            )
        elif method == "Network.loadingFailed":
            check.failed_requests.append(f"{params.get('errorText')} ({params.get('requestId')})")
        elif method == "Network.requestWillBeSent":
            check.requested.append(params["request"]["url"])
    return check
