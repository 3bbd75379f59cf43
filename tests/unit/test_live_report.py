"""The live report: run statuses read from run folders, the page, and the thread that re-renders it
(the page in a real browser: tests/e2e/test_live_report_chromium.py)."""

from __future__ import annotations

import time

import pytest

from sdtune import records
from sdtune.report.live import LiveReport, RunStatus, render_live, run_status
from sdtune.testing import finished_train_record


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
    records.write_record(run / records.RECORD_FILE, finished_train_record("lora", 100))
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


def test_a_failed_starts_progress_file_does_not_block_the_next_start(tmp_path):
    """A start that failed before its first checkpoint in a folder it did not make (compare's retry)
    leaves progress.json beside the logs and error.log: the next start trains from step 0."""
    from sdtune.preflight import RunExistsError
    from sdtune.training.run_dir import claim_run_dir

    run = tmp_path / "lora"
    records.write_progress(run, records.RunProgress(5, 100, "running"))
    (run / "error.log").write_text("lora: out of memory\n")
    (run / "logs").mkdir()
    assert claim_run_dir(run, None, False) is False  # claimed: not refused, not new
    (run / "unet_adapter.safetensors").write_bytes(b"weights")  # real work is still protected
    with pytest.raises(RunExistsError, match="is not empty"):
        claim_run_dir(run, None, False)


def test_tunes_live_page_shows_each_running_trial_at_its_step(tmp_path):
    """`sdtune tune`'s statuses: queued, then a started trial at the step its folder reports (re-read
    by the page's thread while it trains), then its outcome; the last page stops reloading."""
    from dataclasses import asdict

    from sdtune.tuning.jobs import Job
    from sdtune.tuning.study import LiveStatus

    def job(rate: str) -> Job:
        return Job(f"lora/lr-{rate}", {}, "lora", str(tmp_path / "trials" / "lora" / f"lr-{rate}"), str(tmp_path), 0, 1)

    first, second = job("1e-04"), job("1e-03")
    with LiveStatus(tmp_path) as live:
        live.queued([first, second])
        assert "<td>lora/lr-1e-04</td><td>queued</td>" in (tmp_path / "report.html").read_text()
        live.event(first, "started", None)
        assert live.current()[0] == RunStatus("lora/lr-1e-04", "running")  # no progress written yet
        first.run_dir.mkdir(parents=True)
        records.write_progress(first.run_dir, records.RunProgress(7, 36, "running"))
        assert live.current()[0] == RunStatus("lora/lr-1e-04", "running", 7, 36)
        live.report.render(done=False)  # what the page's thread does every few seconds
        page = (tmp_path / "report.html").read_text()
        assert "running at step 7 of 36" in page and "http-equiv='refresh'" in page
        live.event(first, "ended", asdict(finished_train_record("lora", 36)))
        assert live.current()[0] == RunStatus("lora/lr-1e-04", "finished", 36, 36)
    page = (tmp_path / "report.html").read_text()
    assert "http-equiv='refresh'" not in page and "<td>lora/lr-1e-03</td><td>queued</td>" in page
