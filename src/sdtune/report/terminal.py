"""The comparison as a short plain-text table for the terminal (from the records, like the report)."""

from __future__ import annotations

from pathlib import Path

from sdtune.records import load_records
from sdtune.report.render import tables
from sdtune.report.summary import build_rows


def summary_table(root: Path) -> str:
    """A short plain-text table of the comparison for the terminal."""
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
