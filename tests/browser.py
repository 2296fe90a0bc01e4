"""Headless Chromium driven through the DevTools protocol over a pipe, for tests that
need a real browser (the serving playground's JavaScript: fetch, streams, the DOM).

    with Browser() as b:
        b.open("http://127.0.0.1:8000/")
        b.type_text("#prompt", "ROMEO:", clear=True)
        b.click("#generate")
        b.wait_for("document.body.dataset.state === 'done'")
        text = b.evaluate("document.querySelector('#output').textContent")

Why a pipe: with ``--remote-debugging-pipe`` Chromium reads protocol commands from its
fd 3 and writes replies and events to its fd 4, each a JSON message ended by a NUL byte.
That needs only the standard library: no websocket client, no open debugging port another
process could attach to, and no port to pick. Protocol reference:
https://chromedevtools.github.io/devtools-protocol/

One page, one thread: a command is written, then messages are read until its reply
arrives; the events read on the way are kept in :attr:`Browser.events` (page loads, the
page's console and uncaught exceptions, which :meth:`Browser.wait_for` reports on timeout).
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time

__all__ = ["Browser", "BrowserError", "find_chromium"]


class BrowserError(RuntimeError):
    """Chromium is missing, died, or answered a command with an error."""


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


class Browser:
    """A headless Chromium for the duration of a ``with`` block (killed on exit, its
    temporary profile removed), with one page opened by :meth:`open`."""

    def __init__(self, executable: str | None = None, timeout: float = 30.0,
                 window: tuple[int, int] = (1280, 900)):
        self.executable = executable or find_chromium()
        if not self.executable:
            raise BrowserError("Chromium not found on PATH (Debian: apt-get install chromium)")
        self.timeout = timeout  # default bound for one command's reply
        self.window = window
        self.events: list[dict] = []
        self._proc: subprocess.Popen | None = None
        self._session: str | None = None
        self._next_id = 0
        self._buffer = b""

    # ------------------------------------------------------------------ process

    def __enter__(self) -> Browser:
        self._profile = tempfile.mkdtemp(prefix="gptcore-chromium-")
        self._log = tempfile.TemporaryFile()  # a file, not a pipe: Chromium's chatter never blocks it
        cmd_r, self._cmd_w = os.pipe()  # we write commands, Chromium reads them on its fd 3
        self._reply_r, reply_w = os.pipe()  # Chromium writes on its fd 4, we read

        def child_fds() -> None:
            # Runs in the child between fork and exec: put the pipe ends on exactly fds 3
            # and 4. dup2 leaves them inheritable; every other descriptor Python opened is
            # close-on-exec (PEP 446), so close_fds=False leaks nothing else.
            # (pass_fds cannot do this: it keeps fd numbers, it does not move them.)
            # Close-on-exec copies above 9 first: either end may itself be fd 3 or 4.
            r, w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (cmd_r, reply_w))
            os.dup2(r, 3)
            os.dup2(w, 4)

        args = [self.executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                # No first-run UI, no update/metrics/safe-browsing traffic: tests stay offline.
                "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
                "--disable-extensions", f"--window-size={self.window[0]},{self.window[1]}",
                f"--user-data-dir={self._profile}", "--remote-debugging-pipe", "about:blank"]
        try:
            # Own session: the renderer and GPU helper processes die with it in close().
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                          preexec_fn=child_fds, close_fds=False, start_new_session=True)
        except OSError as exc:
            self._cleanup()
            raise BrowserError(f"cannot start {self.executable}: {exc}") from exc
        finally:
            os.close(cmd_r)
            os.close(reply_w)
        try:
            self.send("Browser.getVersion")  # fails fast if Chromium did not come up
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill Chromium and every process it started; remove its profile."""
        if self._proc is not None:
            # Browser.close first: Chromium then reaps its own helper processes, which would
            # otherwise linger as zombies until PID 1 reaps them (slowly, in some containers).
            # SIGKILL to the whole group after, for a browser that hangs or left anything behind.
            if self._proc.poll() is None:
                try:
                    self.send("Browser.close", timeout=5)
                    self._proc.wait(timeout=5)
                except (BrowserError, subprocess.TimeoutExpired):
                    pass
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if self._proc.poll() is None:
                self._proc.wait(timeout=30)
        self._cleanup()
        self._proc = self._session = None

    def _cleanup(self) -> None:
        for fd in ("_cmd_w", "_reply_r"):
            if getattr(self, fd, None) is not None:
                os.close(getattr(self, fd))
                setattr(self, fd, None)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if getattr(self, "_profile", None):
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    def _died(self, what: str) -> BrowserError:
        if self._proc.poll() is None:  # the pipe broke first; the exit status follows
            self._proc.wait(timeout=5)
        self._log.seek(0)
        tail = self._log.read().decode(errors="replace")[-2000:]
        return BrowserError(f"Chromium {what} (exit status {self._proc.returncode}); its output:\n{tail}")

    # ------------------------------------------------------------------ protocol

    def send(self, method: str, params: dict | None = None, *, session: bool = False,
             timeout: float | None = None) -> dict:
        """Send one protocol command (to the open page when ``session``) and return its
        result; a protocol error raises :class:`BrowserError`."""
        if self._proc is None:
            raise BrowserError("the browser is not running: use `with Browser() as b:`")
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            if self._session is None:
                raise BrowserError("no page open: call open(url) first")
            msg["sessionId"] = self._session
        data = json.dumps(msg).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._cmd_w, data):]
        except BrokenPipeError:
            raise self._died("closed its end of the pipe") from None
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read(deadline)
            if reply is None:
                raise BrowserError(f"no reply to {method} within {timeout or self.timeout:g} s")
            if reply.get("id") == msg["id"]:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')} {reply['error'].get('data', '')}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def _read(self, deadline: float) -> dict | None:
        """The next message from Chromium, or None at ``deadline``."""
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._reply_r], [], [], left)[0]:
                return None
            chunk = os.read(self._reply_r, 1 << 16)
            if not chunk:
                raise self._died("exited")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _pump(self, seconds: float) -> None:
        """Read events for ``seconds`` (replies to nothing are only possible events)."""
        deadline = time.monotonic() + seconds
        while (msg := self._read(deadline)) is not None:
            if "method" in msg:
                self.events.append(msg)

    # ------------------------------------------------------------------ page

    def open(self, url: str, timeout: float | None = None) -> None:
        """Open ``url`` in a new tab and wait for its load event; later calls act on it."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Page.enable", "Runtime.enable"):
            self.send(method, session=True)
        # A headless tab is not focused; without this, focus() and typed text can go nowhere.
        self.send("Emulation.setFocusEmulationEnabled", {"enabled": True}, session=True)
        self.events.clear()
        nav = self.send("Page.navigate", {"url": url}, session=True)
        if nav.get("errorText"):
            raise BrowserError(f"cannot open {url}: {nav['errorText']}")
        deadline = time.monotonic() + (timeout or self.timeout)
        while not any(e["method"] == "Page.loadEventFired" for e in self.events):
            if time.monotonic() > deadline:
                raise BrowserError(f"{url} did not finish loading within {timeout or self.timeout:g} s")
            self._pump(0.1)

    def evaluate(self, js: str, timeout: float | None = None):
        """The value of the JavaScript expression ``js`` in the page (a promise is awaited);
        an exception thrown by it raises :class:`BrowserError` with its message."""
        result = self.send("Runtime.evaluate", {"expression": js, "returnByValue": True, "awaitPromise": True},
                           session=True, timeout=timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript error in {js!r}: {text}")
        return result["result"].get("value")

    def _element(self, selector: str, action: str):
        """Run ``action`` (JS with ``el`` bound to the element) on ``selector``'s element."""
        return self.evaluate(f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
                             f" if (!el) throw new Error('no element matches ' + {json.dumps(selector)});"
                             f" {action} }})()")

    def type_text(self, selector: str, text: str, clear: bool = False) -> None:
        """Focus ``selector``'s element and type ``text`` into it as keyboard input would
        (input events fire); ``clear`` empties the field first."""
        self._element(selector, ("el.value = ''; el.dispatchEvent(new Event('input', {bubbles: true}));"
                                 if clear else "") + " el.focus();")
        self.send("Input.insertText", {"text": text}, session=True)

    def click(self, selector: str) -> None:
        """Click the middle of ``selector``'s element with real mouse events, so a disabled
        or covered element behaves as it would for a user."""
        x, y = self._element(selector, "el.scrollIntoView({block: 'center'});"
                                       " const r = el.getBoundingClientRect();"
                                       " return [r.x + r.width / 2, r.y + r.height / 2];")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
                      session=True)

    def wait_for(self, js_predicate: str, timeout: float = 30.0, interval: float = 0.05):
        """Poll the JavaScript expression until it is truthy; its value. On timeout raises
        TimeoutError with the page's console output and uncaught exceptions."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(js_predicate)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{js_predicate!r} still {value!r} after {timeout:g} s; "
                                   f"page console: {self.console() or 'empty'}")
            self._pump(interval)

    def console(self) -> list[str]:
        """The page's console messages and uncaught exceptions so far, as text."""
        lines = []
        for e in self.events:
            if e["method"] == "Runtime.consoleAPICalled":
                args = " ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"])
                lines.append(f"console.{e['params']['type']}: {args}")
            elif e["method"] == "Runtime.exceptionThrown":
                d = e["params"]["exceptionDetails"]
                lines.append(f"uncaught: {d.get('exception', {}).get('description') or d.get('text')}")
        return lines
