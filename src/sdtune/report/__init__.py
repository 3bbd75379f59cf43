"""The comparison report, built only from records: numbers (:mod:`.summary`), figures (:mod:`.plots`),
Markdown and self-contained HTML (:mod:`.render`), and the terminal table (:mod:`.terminal`); the
tuning report of ``sdtune tune`` (:mod:`.tuning_summary`, :mod:`.tuning_plots`, :mod:`.tuning`)."""

from sdtune.report.render import render_report, tables
from sdtune.report.terminal import summary_table
from sdtune.report.tuning import render_tuning_report, tuning_summary

__all__ = ["render_report", "render_tuning_report", "summary_table", "tables", "tuning_summary"]
