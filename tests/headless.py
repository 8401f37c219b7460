"""Open a report in headless Chromium and see what a reader would: console messages, script errors,
network requests, and values computed in the page. Used by the report tests
(``tests/test_report_browser.py``) and the benchmark (``benchmarks/bench_report.py``, which puts
``tests/`` on its path); not part of the memprof package.

Chromium is driven over the Chrome DevTools Protocol (CDP) through ``websocket-client`` (a test
dependency, imported lazily). Chromium picks its own debugging port (``--remote-debugging-port=0``)
and says which on stderr ("DevTools listening on ws://..."), so parallel test runs never collide.
Nothing here sleeps: start-up waits on Chromium's stderr, a page's readiness on a promise the page
resolves itself (a MutationObserver), both through blocking reads with a deadline.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--remote-debugging-port=0",
)
_LISTENING = re.compile(r"DevTools listening on ws://[^:/]+:(\d+)/")
# Resolves once the ready expression holds: checked now, then on every DOM change, until the page's
# own timer rejects it. Runtime.evaluate(awaitPromise) answers when it settles: no polling.
_READY_PROMISE = """new Promise((resolve, reject) => {
  const ready = () => { try { return !!(%(expr)s); } catch (e) { return false; } };
  if (ready()) { resolve(true); return; }
  const observer = new MutationObserver(() => {
    if (ready()) { observer.disconnect(); clearTimeout(timer); resolve(true); }
  });
  observer.observe(document, {attributes: true, childList: true, subtree: true, characterData: true});
  const timer = setTimeout(() => { observer.disconnect(); reject(new Error("not ready")); }, %(ms)d);
})"""


@dataclass
class PageLog:
    """What happened while a page was open."""

    console: list[dict[str, Any]] = field(default_factory=list)  # {"type": "log"|"error"|..., "text"}
    exceptions: list[str] = field(default_factory=list)  # uncaught script errors
    log_entries: list[dict[str, Any]] = field(default_factory=list)  # browser log (CSP, network, ...)
    requests: list[str] = field(default_factory=list)  # every URL the page requested

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser errors/warnings, as text."""
        out = [f"console.{m['type']}: {m['text']}" for m in self.console if m["type"] in ("error", "assert", "warning")]
        out += [f"uncaught: {e}" for e in self.exceptions]
        out += [f"{e.get('source')} {e.get('level')}: {e.get('text')}" for e in self.log_entries
                if e.get("level") in ("error", "warning")]
        return out


class Chromium:
    """A headless Chromium with one page, driven over CDP. Use as a context manager."""

    def __init__(self, executable: str, timeout_s: float = 60.0):
        self.executable = executable
        self.timeout_s = timeout_s
        self._profile = Path(tempfile.mkdtemp(prefix="memprof-chromium-"))
        self._proc: subprocess.Popen | None = None
        self._ws: Any = None
        self._next_id = 0
        self._loads = 0  # Page.loadEventFired events seen
        self.log = PageLog()

    def __enter__(self) -> Chromium:
        import websocket  # test dependency: websocket-client

        self._proc = subprocess.Popen(
            [self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace",
        )
        port = self._debugging_port()
        if port is None:
            self.__exit__(None, None, None)
            raise RuntimeError(f"{self.executable} did not start its DevTools endpoint within {self.timeout_s:.0f} s")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            targets = json.load(resp)
        page = next(t for t in targets if t.get("type") == "page")
        # suppress_origin: Chromium refuses DevTools websockets that send an unknown Origin
        self._ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=self.timeout_s,
                                               suppress_origin=True)
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        return self

    def _debugging_port(self) -> int | None:
        """The port Chromium announces on stderr; None if it exits or stays silent past the deadline.
        A thread reads stderr to its end (a full pipe would block Chromium); the caller waits on an event."""
        found: list[int] = []
        announced = threading.Event()

        def read_stderr(stream: Any) -> None:
            for line in stream:
                m = _LISTENING.search(line)
                if m and not found:
                    found.append(int(m.group(1)))
                    announced.set()
            announced.set()  # end of stream: Chromium exited

        assert self._proc is not None and self._proc.stderr is not None
        threading.Thread(target=read_stderr, args=(self._proc.stderr,), daemon=True).start()
        announced.wait(self.timeout_s)
        return found[0] if found else None

    def __exit__(self, *exc: Any) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        shutil.rmtree(self._profile, ignore_errors=True)

    # -- protocol ------------------------------------------------------------------------------

    def _record(self, msg: dict[str, Any]) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            self.log.console.append({"type": p.get("type"), "text": text})
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.log.exceptions.append(str((d.get("exception") or {}).get("description") or d.get("text")))
        elif method == "Log.entryAdded":
            self.log.log_entries.append(p.get("entry", {}))
        elif method == "Network.requestWillBeSent":
            self.log.requests.append(p.get("request", {}).get("url", ""))
        elif method == "Page.loadEventFired":
            self._loads += 1

    def _receive(self) -> dict[str, Any]:
        msg = json.loads(self._ws.recv())
        self._record(msg)
        return msg

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self._next_id += 1
        my_id = self._next_id
        self._ws.send(json.dumps({"id": my_id, "method": method, "params": params or {}}))
        while True:
            msg = self._receive()
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"CDP {method} failed: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        """The JSON value of ``expression`` evaluated in the page."""
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": await_promise})
        if "exceptionDetails" in res:
            raise RuntimeError(f"page raised evaluating {expression!r}: {res['exceptionDetails'].get('text')}")
        return res.get("result", {}).get("value")

    # -- pages ---------------------------------------------------------------------------------

    def open(self, path: str | Path, ready_expression: str = "document.body && document.body.hasAttribute('data-charts-drawn')") -> float:
        """Load ``path`` and wait until ``ready_expression`` is true (it is re-checked on every DOM
        change, so it must become true with one, as the default does); returns seconds taken."""
        self.log = PageLog()
        start = time.monotonic()
        loads = self._loads
        self.call("Page.navigate", {"url": Path(path).resolve().as_uri()})
        try:
            while self._loads == loads:  # blocking reads until the new document's load event
                self._receive()
            left_ms = max(1, int(1000 * (self.timeout_s - (time.monotonic() - start))))
            self.evaluate(_READY_PROMISE % {"expr": ready_expression, "ms": left_ms}, await_promise=True)
        except Exception as e:  # the page's timer, or the socket's own timeout
            why = f"{ready_expression} stayed false" if "not ready" in str(e) else f"{type(e).__name__}: {e}"
            raise TimeoutError(f"{path} was not ready within {self.timeout_s} s ({why}): {self.log.errors()}") from e
        return time.monotonic() - start
