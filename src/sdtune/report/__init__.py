"""The comparison report, built only from records: numbers (:mod:`.summary`), figures (:mod:`.plots`),
Markdown and self-contained HTML (:mod:`.render`), and the terminal table (:mod:`.terminal`)."""

from sdtune.report.render import render_report, tables
from sdtune.report.terminal import summary_table

__all__ = ["render_report", "summary_table", "tables"]
