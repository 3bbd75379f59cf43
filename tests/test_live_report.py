"""The live report: run statuses from run folders, the page, and the page in a real headless
Chromium (driven over the DevTools protocol on a pipe) while a job runs: it shows a record added
mid-run after its own reload, and stops reloading when the job ends, with no console errors."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from sdtune import records
from sdtune.report.live import LiveReport, RunStatus, render_live, run_status

# ----------------------------------------------------------------------------------------------
# Run folders → statuses (unit)


def finished_record(name: str, steps: int = 10) -> records.TrainRecord:
    """A finished train record with every field the report's tables read (numbers made up)."""
    return records.TrainRecord(
        status="finished", technique={"name": name, "kind": name}, seeds={"train": 0},
        config={"name": "live", "techniques": {"full": {}, "lora": {}}}, steps={"done": steps, "max": steps},
        timing={"train_time_s": 12.5, "s_per_step": 1.25, "images_per_s": 3.2},
        memory={"peak": {"bytes": 123_000_000, "kind": "cpu_peak_rss"}},
        outputs={"adapter": {"bytes": 110_000}}, parameters={"trainable": 4096, "components": {"unet": 1_490_000}},
    )


def test_run_status_reads_each_stage_of_a_run_folder(tmp_path):
    run = tmp_path / "lora"
    assert run_status("lora", run) == RunStatus("lora", "queued")
    run.mkdir()
    records.write_progress(run, records.RunProgress(40, 100, "running"))
    assert run_status("lora", run) == RunStatus("lora", "running", 40, 100)
    assert run_status("lora", run).describe() == "running at step 40 of 100"
    records.write_progress(run, records.RunProgress(60, 100, "interrupted"))
    interrupted = run_status("lora", run)
    assert interrupted.state == "failed" and "interrupted at step 60" in interrupted.error
    # a crash leaves the parent's error.log: its first line is the reason, a bare traceback's last line
    (run / "error.log").write_text("Traceback (most recent call last):\n  File 'x', line 1\nRuntimeError: CUDA out of memory\n")
    assert run_status("lora", run) == RunStatus("lora", "failed", error="RuntimeError: CUDA out of memory")
    (run / "error.log").write_text("lora: rank must be positive\n\nTraceback (most recent call last):\n  ...\n")
    assert run_status("lora", run).describe() == "failed: lora: rank must be positive"
    records.write_record(run / records.RECORD_FILE, finished_record("lora", 100))
    assert run_status("lora", run) == RunStatus("lora", "finished", 100, 100)


def test_live_page_is_self_contained_and_stops_refreshing_when_done(tmp_path):
    statuses = [RunStatus("full", "finished", 10, 10), RunStatus("lora", "running", 4, 10),
                RunStatus("dora", "failed", error="dora: <bad> option"), RunStatus("loha", "queued")]
    running = render_live(tmp_path, statuses, done=False, refresh_s=2).read_text()
    assert "<meta http-equiv='refresh' content='2'>" in running
    assert "running at step 4 of 10" in running and "failed: dora: &lt;bad&gt; option" in running
    assert "<script" not in running and "http://" not in running and "https://" not in running
    finished = render_live(tmp_path, statuses, done=True).read_text()
    assert "http-equiv='refresh'" not in finished and "The job has ended" in finished
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left beside it
    with pytest.raises(ValueError, match="'paused' is not one of"):
        render_live(tmp_path, [RunStatus("x", "paused")], done=False)


def test_live_report_thread_renders_while_the_caller_blocks_and_is_joined(tmp_path):
    seen = []
    with LiveReport(tmp_path, lambda: [RunStatus("lora", "running", len(seen), 10)], poll_s=0.05) as live:
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:  # the thread re-renders on its own
            text = (tmp_path / "report.html").read_text()
            if f"step {len(seen)} of" in text:
                seen.append(text)
            time.sleep(0.02)
    assert len(seen) == 2 and not live._thread.is_alive()
    assert "http-equiv='refresh'" not in (tmp_path / "report.html").read_text()


# ----------------------------------------------------------------------------------------------
# In a real browser (e2e): headless Chromium over the DevTools protocol


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
    if browser is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium)")
    return browser


RUNS_TEXT = "document.getElementById('runs').innerText"


def test_live_report_in_chromium_shows_a_record_added_mid_run(tmp_path):
    """A job mid-run: full finished (its record written), lora running with in-training images.
    Chromium opens the page; lora's record is added; the page's own reload shows it, in the runs and
    in the tables; the job ends and the page stops reloading. No console message at any point."""
    browser = find_chromium()
    root = tmp_path / "job"
    records.write_record(root / "records" / "train-full-seed0.json", finished_record("full"))
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
            records.write_record(lora / records.RECORD_FILE, finished_record("lora"))
            records.write_record(root / "records" / "train-lora-seed0.json", finished_record("lora"))
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
