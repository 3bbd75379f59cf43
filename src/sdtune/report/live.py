"""The live report: ``report.html`` re-rendered while a comparison (or a tuning job) runs.

One self-contained page (no scripts, no external resources), rewritten atomically, so that a
browser never reads half of it: each run's status (queued / running at step N of M / finished /
failed with its one-line reason), the tables of the records written so far (the final report's
tables, :func:`sdtune.report.render.tables`), and the latest images each run generated while it
trained (``RUN/evaluation/step-N/``). While the job runs the page reloads itself every few seconds
(a meta refresh); the page written when the job ends has none, so the refreshing stops.

Where the statuses come from: :func:`run_status` reads a run folder (its record, the error a failed
run left, the ``progress.json`` the training loop writes at its sync points); :class:`LiveReport`
re-renders from a background thread while the caller blocks on its training processes.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sdtune import records
from sdtune.report.render import tables
from sdtune.report.summary import build_rows
from sdtune.util import atomic

log = logging.getLogger(__name__)

REFRESH_S = 5  # the page's reload interval while the job runs (whole seconds: a meta refresh's unit)
POLL_S = 3.0  # how often LiveReport looks at the run folders
ERROR_FILE = "error.log"  # what `sdtune compare` leaves in the folder of a technique that failed
IMAGES_PER_RUN = 8  # in-training images shown per run (its latest evaluated step)
RUNS_WITH_IMAGES = 12  # the most recently evaluated runs shown
THUMBNAIL_PX = 128  # longest side of an embedded image (64 px demo images stay as they are)
STATES = ("queued", "running", "finished", "failed")


@dataclass(frozen=True)
class RunStatus:
    """Where one run of a job stands, as the live page shows it."""

    label: str  # "lora", or for tune "lora/lr-1e-04"
    state: str  # queued | running | finished | failed
    step: int | None = None
    max_steps: int | None = None
    error: str | None = None  # the one-line reason when failed

    def describe(self) -> str:
        """'running at step 40 of 100', 'failed: <reason>', …"""
        if self.state == "failed":
            return f"failed: {self.error}" if self.error else "failed"
        if self.state == "running" and self.step is not None:
            return f"running at step {self.step}" + (f" of {self.max_steps}" if self.max_steps else "")
        return "running (starting)" if self.state == "running" else self.state


def run_status(label: str, run_dir: Path) -> RunStatus:
    """A run folder's status: its record when it has one (finished, or failed), the error a failed
    run left (``error.log``), else the training loop's ``progress.json``, else queued."""
    run_dir = Path(run_dir)
    try:
        record = records.read_record(run_dir)
    except records.RecordError as error:
        return RunStatus(label, "failed", error=str(error))
    steps = (record or {}).get("steps") or {}
    if record is not None and record["status"] == "finished":
        return RunStatus(label, "finished", steps.get("done"), steps.get("max"))
    if record is not None and record["status"] == "failed":
        return RunStatus(label, "failed", steps.get("done"), steps.get("max"), _one_line(record.get("error") or ""))
    if (run_dir / ERROR_FILE).is_file():
        return RunStatus(label, "failed", error=_one_line((run_dir / ERROR_FILE).read_text(errors="replace")))
    progress = records.read_progress(run_dir)
    if progress is None:
        return RunStatus(label, "queued")
    if progress.state == "interrupted":
        reason = f"interrupted at step {progress.step} (checkpointed; rerun the same command to resume)"
        return RunStatus(label, "failed", progress.step, progress.max_steps, reason)
    state = "finished" if progress.state == "finished" else "running"
    return RunStatus(label, state, progress.step, progress.max_steps)


def running_status(label: str, run_dir: Path) -> RunStatus:
    """A run known to train now: its folder's step, or plain running while its folder says nothing
    newer (no progress written yet, or a stale state from an earlier attempt)."""
    found = run_status(label, run_dir)
    return found if found.state == "running" and found.step is not None else RunStatus(label, "running")


def _one_line(text: str, limit: int = 300) -> str:
    """An error's one line: its first line, or a traceback's last (the exception and its message)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "no reason recorded"
    line = lines[-1] if lines[0].startswith("Traceback (most recent call last)") else lines[0]
    return line[:limit] + ("…" if len(line) > limit else "")


def render_live(
    root: Path, statuses: list[RunStatus], done: bool, phase: str | None = None, refresh_s: int = REFRESH_S
) -> Path:
    """Write ``root/report.html`` atomically: the statuses, the tables of the records in
    ``root/records`` so far and the latest in-training images; it reloads itself every ``refresh_s``
    seconds unless ``done``. ``phase``: one line on what the job is doing (e.g. evaluating)."""
    root = Path(root)
    for status in statuses:
        if status.state not in STATES:
            raise ValueError(f"{status.label}: state {status.state!r} is not one of {', '.join(STATES)}")
    page = _page(root, statuses, done, phase, refresh_s)
    return atomic.write_text(root / "report.html", page)


def _page(root: Path, statuses: list[RunStatus], done: bool, phase: str | None, refresh_s: int) -> str:
    esc = html.escape
    state = "finished" if done else "running"
    head = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<link rel='icon' href='data:,'>",  # no favicon request (nothing outside this file)
        *([f"<meta http-equiv='refresh' content='{int(refresh_s)}'>"] if not done else []),
        f"<title>sdtune ({state}): {esc(root.name)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
        "#runs td{text-align:left}.queued{color:#777}.running{color:#0550ae}.finished{color:#1a7f37}.failed{color:#cf222e}"
        "figure{display:inline-block;margin:4px;text-align:center;font-size:75%}"
        "figure img{width:96px;image-rendering:pixelated}.note{color:#555;font-size:90%}</style></head><body>",
    ]
    counts = {s: sum(status.state == s for status in statuses) for s in STATES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    body = [
        f"<h1>sdtune ({state}): {esc(root.name)}</h1>",
        f"<p id='job' class='{state}'>"
        + ("The job has ended; the final report replaces this page when it is written."
           if done else f"Running; this page reloads every {int(refresh_s)} s.")
        + (f" {esc(summary)}." if summary else "") + "</p>",
        *([f"<p id='phase'>{esc(phase)}</p>"] if phase else []),
        "<h2>Runs</h2><table id='runs'><tr><th>Run</th><th>State</th><th>Progress</th></tr>",
        *(_status_row(status) for status in statuses),
        "</table>",
        *_tables(root),
        *_images(root),
        "</body></html>",
    ]
    return "\n".join(head + body)


def _status_row(status: RunStatus) -> str:
    esc = html.escape
    bar = ""
    if status.step is not None and status.max_steps:
        bar = f"<progress value='{status.step}' max='{status.max_steps}'></progress> {status.step}/{status.max_steps}"
    return (f"<tr class='{status.state}'><td>{esc(status.label)}</td><td>{esc(status.describe())}</td>"
            f"<td>{bar}</td></tr>")


def _tables(root: Path) -> list[str]:
    """The final report's tables, from the records written so far (none yet: nothing)."""
    esc = html.escape
    if not (root / "records").is_dir():
        return []
    try:
        train, evals = records.load_records(root)
    except records.RecordError as error:  # a record from elsewhere: say so, keep the page
        return [f"<p class='note'>The tables wait for readable records: {esc(str(error))}</p>"]
    if not train and not evals:
        return []
    parts = []
    for title, header, body, note in tables(build_rows(train, evals)):
        parts.append(f"<h2>{esc(title)}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in body]
        parts.append("</table>" + (f"<p class='note'>{esc(note)}</p>" if note else ""))
    return parts


def _images(root: Path) -> list[str]:
    """The latest evaluated step's images of each run that generated some while training."""
    esc = html.escape
    latest: dict[Path, Path] = {}
    for folder in root.glob("**/evaluation/step-*"):
        run_dir = folder.parent.parent
        if folder.is_dir() and (run_dir not in latest or folder.name > latest[run_dir].name):
            latest[run_dir] = folder
    newest = sorted(latest.values(), key=_changed_ns, reverse=True)[:RUNS_WITH_IMAGES]
    parts = []
    for folder in newest:
        images = sorted(folder.glob("*.png"))[:IMAGES_PER_RUN]
        if not images:
            continue
        run = folder.parent.parent.relative_to(root).as_posix()
        step = int(folder.name.removeprefix("step-"))
        parts.append(f"<h3>{esc(run)} at step {step}</h3><div class='samples'>")
        for path in images:
            data = _thumbnail(str(path), _changed_ns(path), path.stat().st_size if path.exists() else 0)
            if data:
                caption = path.stem.split("-", 1)[-1]
                parts.append(f"<figure><img alt='{esc(caption)}' src='data:image/png;base64,{data}'>"
                             f"<figcaption>{esc(caption)}</figcaption></figure>")
        parts.append("</div>")
    return ["<h2>Latest images during training</h2>", *parts] if parts else []


def _changed_ns(path: Path) -> int:
    """A file's change time in ns; 0 when it went away meanwhile (a run folder started over)."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


@functools.lru_cache(maxsize=512)
def _thumbnail(path: str, mtime_ns: int, size: int) -> str | None:
    """A PNG, at most THUMBNAIL_PX on its longest side, base64-encoded (cached by path, time, size:
    the page is re-rendered every few seconds from the same files)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if max(image.size) <= THUMBNAIL_PX:
                return base64.b64encode(Path(path).read_bytes()).decode()
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
    except (OSError, UnidentifiedImageError):  # removed or replaced since it was listed
        return None
    return base64.b64encode(buffer.getvalue()).decode()


class LiveReport:
    """Re-render the live page from a background thread every ``poll_s`` seconds while the caller
    blocks (on a training process, on an evaluation); use it as a context manager, which starts the
    thread and, on the way out, stops and joins it and writes the last live page (``done``: no
    more reloading). ``statuses`` and ``phase`` are called from that thread: they must only read.

    The caller then writes the final report over it (:func:`sdtune.report.render.render_report`).
    A failure to render is logged once and stops the live page, never the job."""

    def __init__(
        self, root: Path, statuses: Callable[[], list[RunStatus]], phase: Callable[[], str | None] = lambda: None,
        poll_s: float = POLL_S, refresh_s: int = REFRESH_S,
    ) -> None:
        self.root, self.statuses, self.phase = Path(root), statuses, phase
        self.poll_s, self.refresh_s = poll_s, refresh_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdtune-live-report", daemon=True)
        self._last: str | None = None
        self._rendering = threading.Lock()  # the caller's thread and the poller's: one page at a time
        self.failed = False

    def __enter__(self) -> LiveReport:
        self.render(done=False)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.render(done=True)

    def render(self, done: bool) -> None:
        """Write the page now (unless an earlier render failed); skipped when nothing changed."""
        with self._rendering:
            if self.failed:
                return
            try:
                statuses, phase = self.statuses(), self.phase()
                key = repr((statuses, phase, done, self._records_state()))
                if key != self._last:
                    render_live(self.root, statuses, done, phase, self.refresh_s)
                    self._last = key
            except Exception:  # a bug of ours in a side show: keep its traceback in the log, keep the job
                self.failed = True
                log.exception("the live report could not be rendered; it stops here (the final report is unaffected)")

    def _records_state(self) -> list[tuple[str, int]]:
        """What the page's tables and images depend on, cheaply: file names and change times."""
        return [(str(path), _changed_ns(path)) for path in self._watched()]

    def _watched(self) -> Iterator[Path]:
        yield from sorted((self.root / "records").glob("*.json"))
        yield from sorted(self.root.glob("**/evaluation/step-*/*.png"))

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.render(done=False)
