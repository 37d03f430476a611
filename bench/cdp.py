"""Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`):
navigate, wait for what the page shows, click like a user, capture PNGs. Standard library only
(no websocket client, no browser download): the browser is Debian's `chromium` package.

    with Chromium(size=(1800, 1000)) as browser:
        browser.navigate("http://127.0.0.1:5000/#/experiments/1/runs")
        browser.wait_for("document.body.innerText.includes('matching runs')")
        browser.evaluate("document.querySelector('button').click()")
        browser.screenshot(Path("page.png"))

Used by bench/mlflow_ui.py. The browser gets a fresh profile and no network beyond what the page
asks of 127.0.0.1 (no sync, component updates, QUIC); its whole process group is killed on exit.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--hide-scrollbars", "--mute-audio"]


class BrowserError(RuntimeError):
    """The browser is missing, died, or a page never showed what was waited for."""


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    raise BrowserError("no headless browser found (chromium): install it with `apt-get install chromium` "
                       "(Debian/Ubuntu) and run again")


class Chromium:
    def __init__(self, size: tuple[int, int] = (1600, 1000), timeout_s: float = 60.0):
        self.size, self.timeout_s = size, timeout_s
        self.proc: subprocess.Popen | None = None
        self._next_id = 0
        self._buf = b""
        self.session: str | None = None

    # ---------------------------------------------------------------- process
    def start(self) -> "Chromium":
        self.profile = tempfile.mkdtemp(prefix="cdp-chromium-")
        to_chrome_r, self._w = os.pipe()      # we write commands, chromium reads them on fd 3
        self._r, from_chrome_w = os.pipe()    # chromium writes replies on fd 4

        def child_fds():  # runs in the child before exec: the protocol wants exactly fds 3 and 4
            a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        log = open(Path(self.profile) / "chromium.log", "wb")
        self.proc = subprocess.Popen(
            [find_chromium(), *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
             f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=child_fds,
            pass_fds=(3, 4), start_new_session=True)   # own process group: renderers, zygote, GPU process
        log.close()
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
            self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                     session=False)["sessionId"]
            self.call("Page.enable")
            self.resize(*self.size)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        for fd in ("_r", "_w"):
            if getattr(self, fd, None) is not None:
                try:
                    os.close(getattr(self, fd))
                except OSError:
                    pass
                setattr(self, fd, None)
        if getattr(self, "profile", None):
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None

    def __enter__(self) -> "Chromium":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- protocol
    def _read_message(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.time()
            if left <= 0 or self.proc is None or self.proc.poll() is not None:
                raise BrowserError("chromium stopped answering" + ("" if left > 0 else " (timeout)"))
            ready, _, _ = select.select([self._r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise BrowserError("chromium closed the DevTools pipe")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        """Send one command and return its result (events that arrive meanwhile are dropped)."""
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + self.timeout_s
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    # ---------------------------------------------------------------- page
    def resize(self, width: int, height: int) -> None:
        """The page's viewport in CSS px (a taller one shows a long page in one capture)."""
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                         "deviceScaleFactor": 1, "mobile": False})

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression in the page (promises awaited)."""
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                           "awaitPromise": True})
        if "exceptionDetails" in r:
            raise BrowserError(f"page script failed: {r['exceptionDetails'].get('text')} in {expression[:200]}")
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float | None = None, what: str = "") -> object:
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.time() + (timeout_s or self.timeout_s)
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"  # mid-load: no body yet
        while time.time() < deadline:
            value = self.evaluate(guarded)
            if value:
                return value
            time.sleep(0.25)
        raise BrowserError(f"the page never showed {what or expression[:200]} "
                           f"(waited {timeout_s or self.timeout_s:.0f} s)")

    def click(self, element: str, what: str = "") -> None:
        """Click the middle of the element a JavaScript expression returns, as a mouse would
        (press and release at its coordinates; React handlers see real pointer events)."""
        box = self.wait_for(f"(() => {{ const e = ({element}); if (!e) return null; e.scrollIntoView({{block: 'center'}}); "
                            f"const r = e.getBoundingClientRect(); return r.width ? [r.x + r.width / 2, r.y + r.height / 2] : null; }})()",
                            what=what or element[:120])
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left",
                                                   "clickCount": 1})

    def type_text(self, text: str) -> None:
        """Type into the focused element (an IME-style insert: input events fire as for a user)."""
        self.call("Input.insertText", {"text": text})

    def press(self, key: str, code: str | None = None, key_code: int = 0) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", {"type": kind, "key": key, "code": code or key,
                                                 "windowsVirtualKeyCode": key_code})

    def screenshot(self, png: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(base64.b64decode(data))
        return png
