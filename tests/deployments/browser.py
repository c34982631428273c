"""Headless Debian chromium driven over the DevTools protocol: open a page, click, read its text, screenshot."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--window-size=1400,1600",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]


def chromium_path() -> str | None:
    return shutil.which("chromium")


class Chromium:
    def __init__(self, binary: str):
        self.profile = Path(tempfile.mkdtemp(prefix="edgeq-chromium-"))
        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not open its DevTools port (exit {self.proc.poll()})")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        from websockets.sync.client import connect

        self.ws = connect(page["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024)
        self._ids = itertools.count(1)

    def send(self, method: str, **params):
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, expression: str):
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return res.get("result", {}).get("value")

    def goto(self, url: str) -> None:
        self.send("Page.enable")
        self.send("Page.navigate", url=url)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def scroll_to_bottom(self) -> None:
        """Scroll the page and every scrolling container to its end: the UI renders some lists (a run's task-run
        artifacts) only once they come into view."""
        self.evaluate("(() => { window.scrollTo(0, document.body.scrollHeight);"
                      " for (const e of document.querySelectorAll('body *')) {"
                      "   if (e.scrollHeight > e.clientHeight && ['auto', 'scroll'].includes(getComputedStyle(e).overflowY))"
                      "     e.scrollTop = e.scrollHeight; } })()")

    def wait_for_text(self, needles: list[str], timeout: float = 60, scroll: bool = False) -> str:
        """The page's text once it shows every needle, whitespace aside (scrolling to the end while waiting, if
        asked)."""
        deadline = time.monotonic() + timeout
        text = ""
        wanted = [" ".join(n.split()) for n in needles]
        while time.monotonic() < deadline:
            if scroll:
                self.scroll_to_bottom()
            text = self.text()
            shown = " ".join(text.split())
            if all(n in shown for n in wanted):
                return text
            time.sleep(0.5)
        raise AssertionError(f"page never showed {needles}; it shows:\n{text[:3000]}")

    def click_text(self, label: str) -> bool:
        """Click the innermost visible element whose text is exactly `label` (a tab, button or link)."""
        return bool(self.evaluate(
            "(() => { const el = [...document.querySelectorAll('body *')]"
            f".filter(e => e.innerText && e.innerText.trim() === {json.dumps(label)} && e.offsetParent !== null)"
            ".pop(); if (!el) return false; el.click(); return true; })()"))

    def horizontal_overflow(self) -> list[dict]:
        """What scrolls sideways on the page: the page itself, or an element whose content is wider than its box and
        may scroll (the UI's tables do). Empty when everything is readable without horizontal scrolling."""
        return self.evaluate(
            "(() => { const root = document.scrollingElement;"
            " const wide = e => e.scrollWidth > e.clientWidth + 1;"
            " const out = root && wide(root) ? [{tag: 'page', scroll: root.scrollWidth, width: root.clientWidth}] : [];"
            " for (const e of document.querySelectorAll('body *')) {"
            "   if (wide(e) && ['auto', 'scroll'].includes(getComputedStyle(e).overflowX))"
            "     out.push({tag: e.tagName, cls: String(e.className).slice(0, 60), scroll: e.scrollWidth,"
            "               width: e.clientWidth}); }"
            " return out; })()") or []

    def dialog_images(self, timeout: float = 15) -> list[dict]:
        """The images inside the open dialog (a modal form): source (start) and natural width, 0 while not decoded
        or broken. Waits until one has decoded, or `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            images = self.evaluate("[...document.querySelectorAll('[role=dialog] img')]"
                                   ".map(i => ({src: i.src.slice(0, 64), width: i.naturalWidth}))") or []
            if any(i["width"] for i in images) or time.monotonic() > deadline:
                return images
            time.sleep(0.5)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)
