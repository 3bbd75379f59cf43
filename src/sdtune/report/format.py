"""How the reports write numbers, tables and pages: sizes, numbers with their CIs, learning rates,
Markdown and HTML tables, and the pages' style (shared by the comparison and the tuning report)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

MB = 1e6
STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
    "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
    "img{max-width:100%;image-rendering:pixelated}pre{background:#f7f7f7;padding:1em;overflow:auto}"
    ".note{color:#555;font-size:90%}.side{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}"
)


def size(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value / MB:.2f} MB" if value >= 1e4 else f"{value / 1e3:.1f} kB"


def number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.2f} M"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.1f} k"
    return f"{value:.{digits}g}"


def metric_cell(summary: dict | None) -> str:
    """A metric's mean with its 95 % CI when there is one: ``0.412 [0.398, 0.431]``."""
    if not summary:
        return "—"
    if "skipped" in summary:
        return "skipped"
    text = number(summary["value"])
    if summary.get("low") is not None and summary.get("high") is not None and summary["high"] > summary["low"]:
        text += f" [{number(summary['low'])}, {number(summary['high'])}]"
    return text


def rate(value: float | None) -> str:
    """A learning rate as a sentence writes it: 1e-4, 3e-3, 5.62e-5."""
    if value is None:
        return "—"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]


def html_table(header: list[str], body: list[list[str]]) -> str:
    esc = html.escape
    rows = ["<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in body]
    return "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" + "".join(rows) + "</table>"


def embedded_png(path: Path, title: str) -> str:
    """An <img> with the PNG inside the page (one self-contained file)."""
    encoded = base64.b64encode(path.read_bytes()).decode()
    return f"<img alt='{html.escape(title)}' src='data:image/png;base64,{encoded}'>"
