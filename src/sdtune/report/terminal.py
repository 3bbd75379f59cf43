"""The comparison as a short plain-text table for the terminal (from the records, like the report)."""

from __future__ import annotations

from pathlib import Path

from sdtune.records import TUNING_FILE, load_records
from sdtune.report.render import tables
from sdtune.report.summary import build_rows
from sdtune.report.tuning import tuning_summary


def summary_table(root: Path) -> str:
    """A short plain-text table of the comparison (or of a tuning study: both tables and the ranking
    changes) for the terminal."""
    if (Path(root) / TUNING_FILE).exists():
        return tuning_summary(root)
    rows = build_rows(*load_records(root))
    lines = []
    for title, header, body, _ in tables(rows):
        if title.startswith("Sizes"):
            keep = [header.index(c) for c in ("Model", "Status", "Adapter/weights", "s/step", "s/image")]
            header, body = [header[i] for i in keep], [[row[i] for i in keep] for row in body]
        widths = [max(len(str(x)) for x in column) for column in zip(header, *body)]
        lines.append(title)
        lines += ["  " + "  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [header, *body]]
        lines.append("")
    return "\n".join(lines)
