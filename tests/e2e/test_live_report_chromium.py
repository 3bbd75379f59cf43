"""The live report in a real headless Chromium (driven over the DevTools protocol on a pipe) while
a job runs: it shows a record added mid-run after its own reload, and stops reloading when the job
ends, with no console errors. (Statuses and the page alone: tests/unit/test_live_report.py.)"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

from PIL import Image

from sdtune import records
from sdtune.report.live import LiveReport, RunStatus, run_status
from sdtune.testing import finished_train_record


class Chromium:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (fd 3: commands in, fd 4: replies
    and events out, each a JSON message ended by a NUL byte): one page, its events collected."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-pipe"]

    def __init__(self, browser: str, profile: Path) -> None:
        to_browser, self._commands = os.pipe()
        self._replies, from_browser = os.pipe()

        def as_fds_3_and_4() -> None:  # in the child, before exec: its ends become fds 3 and 4
            commands_in, replies_out = fcntl.fcntl(to_browser, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser, fcntl.F_DUPFD, 10)
            os.dup2(commands_in, 3)
            os.dup2(replies_out, 4)

        self.process = subprocess.Popen(
            [browser, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"], pass_fds=(3, 4),
            preexec_fn=as_fds_3_and_4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next_id, self.events = b"", 0, []
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)

    def call(self, method: str, session: bool = False, timeout: float = 30, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply is None:
                raise TimeoutError(f"no reply to {method}")
            if reply.get("id") == self._next_id:
                assert "error" not in reply, reply
                return reply["result"]

    def wait_for(self, method: str, timeout: float) -> dict | None:
        """The next event ``method`` of the page (None when none comes within ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while (message := self._receive(deadline)) is not None:
            if message.get("method") == method:
                return message
        return None

    def text(self, expression: str):
        return self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)["result"].get("value")

    def _receive(self, deadline: float) -> dict | None:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._replies], [], [], remaining)[0]:
                return None
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message = json.loads(raw)
        if "method" in message:
            self.events.append(message)
        return message

    def problems(self) -> list[dict]:
        """Console errors and warnings, uncaught exceptions, and browser log errors (failed loads…)."""
        found = []
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.exceptionThrown":
                found.append(params)
            elif event["method"] == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
                found.append(params)
            elif event["method"] == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                found.append(params["entry"])
        return found

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._replies)


def find_chromium() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    # (a missing browser fails the test: .ci/run installs Debian's chromium; `apt-get install chromium`)
    assert browser is not None, "no Chromium on this machine: `apt-get install chromium` (as .ci/run does)"
    return browser


RUNS_TEXT = "document.getElementById('runs').innerText"


def test_live_report_in_chromium_shows_a_record_added_mid_run(tmp_path):
    """A job mid-run: full finished (its record written), lora running with in-training images.
    Chromium opens the page; lora's record is added; the page's own reload shows it, in the runs and
    in the tables; the job ends and the page stops reloading. No console message at any point."""
    browser = find_chromium()
    root = tmp_path / "job"
    records.write_record(root / "records" / "train-full-seed0.json", finished_train_record("full"))
    lora = root / "lora"
    records.write_progress(lora, records.RunProgress(4, 10, "running"))
    step = lora / "evaluation" / "step-000002"
    step.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 40, 40)).save(step / "000-a-red-circle-seed0.png")
    Image.new("RGB", (512, 512), (40, 40, 200)).save(step / "001-a-blue-square-seed0.png")  # shown as a thumbnail

    def statuses() -> list[RunStatus]:
        return [RunStatus("full", "finished", 10, 10), run_status("lora", lora)]

    chromium = Chromium(browser, tmp_path / "profile")
    try:
        with LiveReport(root, statuses, poll_s=0.2, refresh_s=1):
            chromium.call("Page.navigate", session=True, url=(root / "report.html").as_uri())
            assert chromium.wait_for("Page.loadEventFired", timeout=30)
            assert "running at step 4 of 10" in chromium.text(RUNS_TEXT)
            assert chromium.text("document.title").startswith("sdtune (running)")
            decoded = "[...document.images].filter(i => i.complete && i.naturalWidth > 0).map(i => i.naturalWidth)"
            assert sorted(chromium.text(decoded)) == [64, 128]
            tables = chromium.text("[...document.querySelectorAll('h2')].map(h => h.innerText)")
            assert "Sizes, parameters, training and generation" in tables
            assert "lora" not in chromium.text("document.querySelectorAll('table')[1].innerText")
            # the record arrives; the page shows it after its own reload (no one reloads it for it)
            records.write_record(lora / records.RECORD_FILE, finished_train_record("lora"))
            records.write_record(root / "records" / "train-lora-seed0.json", finished_train_record("lora"))
            deadline = time.monotonic() + 20
            while "lora\tfinished" not in (chromium.text(RUNS_TEXT) or "") and time.monotonic() < deadline:
                chromium.wait_for("Page.loadEventFired", timeout=2)
            assert "lora\tfinished" in chromium.text(RUNS_TEXT)
            assert "lora" in chromium.text("document.querySelectorAll('table')[1].innerText")
        # the job ended: the last page has no refresh, and no reload follows
        deadline = time.monotonic() + 10
        while not chromium.text("document.title").startswith("sdtune (finished)") and time.monotonic() < deadline:
            chromium.wait_for("Page.loadEventFired", timeout=2)
        assert chromium.text("document.title").startswith("sdtune (finished)")
        assert chromium.text("document.querySelector('meta[http-equiv=refresh]')") is None
        assert chromium.wait_for("Page.loadEventFired", timeout=2.5) is None
        assert chromium.problems() == []
    finally:
        chromium.close()
