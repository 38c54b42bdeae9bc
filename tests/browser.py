"""A headless Chromium driven over its DevTools protocol on a pipe (`--remote-debugging-pipe`), standard library only.

Why not `chromium --headless --dump-dom --virtual-time-budget=...`: virtual time runs ahead of the MLflow UI's
chart requests (measured on Chromium 156: a 60 s budget ended after 6 s of real time with none of a run's metric
charts drawn), so a check has to wait in real time until what it expects is on the page. A driver package
(selenium with chromium-driver, playwright) would do that for a new dependency; the few protocol commands below
(navigate, evaluate JavaScript, take a screenshot) are all we need. Protocol reference:
https://chromedevtools.github.io/devtools-protocol/ (messages are JSON, each ended by a NUL byte on the pipe).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

INSTALL_HINT = "apt-get install chromium (Debian's package; .ci/run installs it as root)"


class CommandError(RuntimeError):
    """Chromium answered a protocol command with an error (e.g. no page context to evaluate in, mid-navigation)."""


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """One headless Chromium with one page of `width` x `height` CSS pixels; use it as a context manager."""

    def __init__(self, executable: str, width: int = 1400, height: int = 1000, timeout: float = 60):
        self.timeout = timeout  # seconds, for one protocol command
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-")
        to_browser, self._to = os.pipe()  # the browser reads commands on its fd 3 ...
        self._from, from_browser = os.pipe()  # ... and writes replies and events on its fd 4

        def pipes_as_3_and_4():  # in the child; os.dup2's copies are inheritable, every other fd is close-on-exec
            high = os.dup2(to_browser, 1001), os.dup2(from_browser, 1002)  # either pipe end may be fd 3 or 4
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)
            os.close(high[0])
            os.close(high[1])

        self._process = subprocess.Popen(
            [executable, "--headless", "--remote-debugging-pipe", "--disable-gpu", "--no-first-run",
             "--no-default-browser-check", "--hide-scrollbars", f"--user-data-dir={self._profile.name}",
             f"--window-size={width},{height}",
             *(["--no-sandbox"] if os.geteuid() == 0 else []),  # Chromium's sandbox refuses to run as root
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=pipes_as_3_and_4, close_fds=False,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._id = 0
        try:
            target = self._command("Target.createTarget", {"url": "about:blank"})["targetId"]
            self._session = self._command("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.command("Emulation.setDeviceMetricsOverride",
                         {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        for fd in (self._to, self._from):
            try:
                os.close(fd)
            except OSError:
                pass
        self._profile.cleanup()

    # --- the protocol -------------------------------------------------------------------------------------------

    def command(self, method: str, params: dict | None = None) -> dict:
        """One command to the page; its result."""
        return self._command(method, params, self._session)

    def _command(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._next_message(deadline, method)
            if reply.get("id") == self._id:  # anything else is an event, which we do not follow
                if "error" in reply:
                    raise CommandError(f"chromium: {method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    def _next_message(self, deadline: float, method: str) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self._process.poll() is not None:
                raise RuntimeError(f"chromium: no answer to {method} (exit status {self._process.poll()})")
            if select.select([self._from], [], [], left)[0]:
                chunk = os.read(self._from, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed its pipe during {method}")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    # --- what the tests use ------------------------------------------------------------------------------------

    def open(self, url: str) -> None:
        self.command("Page.navigate", {"url": url})

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-able values only)."""
        result = self.command("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"chromium: {expression!r} threw: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def text(self) -> str:
        """The page's visible text (innerText: what a reader sees, line breaks included)."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, expression: str, what: str, timeout: float = 120) -> None:
        """Wait until the JavaScript `expression` is truthy; fail naming `what` and showing the page's text."""
        deadline = time.monotonic() + timeout
        while not self._true(expression):
            if time.monotonic() > deadline:
                raise AssertionError(f"after {timeout:g} s the page still lacks {what}; its text:\n{self.text()[:3000]}")
            time.sleep(0.5)

    def _true(self, expression: str) -> bool:
        try:
            return bool(self.evaluate(f"Boolean({expression})"))
        except CommandError:  # the page between two documents: no context to evaluate in, yet
            return False

    def wait_for_text(self, *texts: str, timeout: float = 120) -> None:
        checks = " && ".join(f"document.body.innerText.includes({json.dumps(text)})" for text in texts)
        self.wait_for(f"document.body && {checks}", f"the text {', '.join(map(repr, texts))}", timeout)

    def count(self, selector: str) -> int:
        return int(self.evaluate(f"document.querySelectorAll({json.dumps(selector)}).length"))

    def screenshot(self, path: Path) -> Path:
        data = self.command("Page.captureScreenshot", {"format": "png"})["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)
