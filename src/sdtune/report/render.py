"""The comparison report, built only from ``DIR/records/*.json`` (``sdtune report DIR`` re-renders it).

Writes ``report.md`` (figures as files under ``report_files/``) and ``report.html`` (one
self-contained file: figures embedded as base64 PNGs, no scripts).
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from sdtune.records import TUNING_FILE, EvalRecord, TrainRecord, load_records
from sdtune.report import change_plots, plots
from sdtune.report.answer import answer
from sdtune.report.changes import change_points, check_failures, check_status, largest, summaries
from sdtune.report.format import metric_cell, number, size
from sdtune.report.summary import (
    Row,
    build_rows,
    final_validation_loss,
    metric_names,
    metric_summary,
    share_summary,
    study_table,
)
from sdtune.report.tuning import render_tuning_report
from sdtune.util import atomic
from sdtune.util.paths import check_writable_folder

FILES_DIR = "report_files"


STUDY_COLUMNS = [
    ("Model", lambda e: e["model"]), ("Kind", lambda e: e["kind"]), ("Status", lambda e: e["status"]),
    ("Denoiser", lambda e: size(e.get("denoiser"))), ("VAE", lambda e: size(e.get("vae"))),
    ("Text encoders", lambda e: size(e.get("text_encoders"))), ("Adapter/weights", lambda e: size(e.get("adapter"))),
    ("Trainable params", lambda e: number(e.get("trainable_params"))), ("Total params", lambda e: number(e.get("total_params"))),
    ("Train time (s)", lambda e: number(e.get("train_time_s"))), ("s/step", lambda e: number(e.get("s_per_step"))),
    ("img/s (train)", lambda e: number(e.get("images_per_s"))), ("Peak memory", lambda e: size(e.get("peak_memory"))),
    ("Load time (s)", lambda e: number(e.get("load_time_s"))), ("s/image", lambda e: number(e.get("s_per_image"))),
]


def tables(rows: list[Row]) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) of every table of the report."""
    study = study_table(rows)
    result = [(
        "Sizes, parameters, training and generation",
        [c for c, _ in STUDY_COLUMNS],
        [[fmt(e) for _, fmt in STUDY_COLUMNS] for e in study],
        "Sizes are bytes on disk of what each technique saves (adapters: the diffusers LoRA file, or "
        "the peft file); “—” means shared with the base model. Peak memory: CUDA max allocated, or "
        "the process's peak RSS on CPU; each technique trains in its own process, so each peak is its "
        "own. Train time and s/step are device-synchronised and include first-use encodes. Generation: adapters fused; warm-up excluded. The base row's sizes "
        "are its weight files, or 4 bytes per parameter when the model is not on disk here.",
    )]
    numeric, shares = metric_names(rows)
    validation = any(final_validation_loss(row) for row in rows)
    if numeric or validation:
        header = ["Model", *numeric, *(["validation loss"] if validation else [])]
        body = [
            [row.label, *(metric_cell(metric_summary(row, m)) for m in numeric),
             *([metric_cell(final_validation_loss(row))] if validation else [])]
            for row in rows
        ]
        skipped = {m: s["skipped"] for row in rows for m in numeric if (s := metric_summary(row, m)) and "skipped" in s}
        note = "Mean [95 % bootstrap CI] over training seeds (several) or over images (one seed)."
        if validation:
            note += (" Validation loss: the denoising loss on the held-out images at fixed timesteps and"
                     " noise, at the last step.")
        if skipped:
            note += " Skipped: " + "; ".join(f"{m}: {reason}" for m, reason in skipped.items())
        result.append(("Quality metrics", header, body, note))
    for name in shares:
        labels = next((list(s) for row in rows if (s := share_summary(row, name))), [])
        body = [[row.label, *(f"{100 * s.get(label, 0):.0f} %" if (s := share_summary(row, name)) else "—"
                              for label in labels)] for row in rows]
        result.append((f"{name} (share of images)", ["Model", *labels], body, ""))
    failed = [row for row in rows if row.status != "finished" and row.label != "base"]
    if failed:
        result.append(("Failed techniques", ["Model", "Status", "Error"],
                       [[row.label, row.status, row.error or ""] for row in failed], ""))
    return result


CHANGES_TITLE = "What each technique changed"
CHANGES_COLUMNS = ["Model", "Check", "Matrices changed", "Relative ΔW", "Most change (blocks)", "Median effective rank",
                   "Numerical rank (max)", "Intruder dims (matrices)", "Anatomy time (s)"]


def changes_section(rows: list[Row], train: list[TrainRecord], evals: list[EvalRecord], folder: Path) -> dict[str, Any] | None:
    """The section's table, its generated paragraph, its figures and the failed claims (None: no run
    has an anatomy, e.g. records written before sdtune took it)."""
    found = summaries(rows)
    if not found:
        return None
    by_label = {row.label: row for row in rows}
    body = [[
        s["label"], check_status(by_label[s["label"]]), number(s["total"]["changed_layers"]),
        f"{100 * (s['total']['relative'] or 0):.3g} %",
        ", ".join(f"{name} {100 * share:.0f} %" for name, share in largest(s["blocks"])),
        f"{s['total']['effective_rank_median']:.2f}",
        f"{s['total']['numerical_rank_max']:.0f}" + ("" if s["rank_exact"] else "+"),
        f"{s['total']['intruders']:.0f} ({s['total']['layers_with_intruders']:.0f})", number(s["time_s"]),
    ] for s in found]
    method = found[0]["method"]
    note = (f"ΔW of every changed weight matrix: {method['delta']}. Relative ΔW: "
            f"{method['relative']}. Rank: {method['rank_tolerance']}; {method['spectrum']} (\"+\": a lower bound). "
            f"Effective rank: {method['effective_rank']}. Intruder dimensions: {method['intruders']['definition']}, "
            f"k = {method['intruders']['k']}, ε = {method['intruders']['epsilon']}. Check: did the technique train what "
            "it claims (docs/anatomy.md). Means over training seeds.")
    points = change_points(train, evals)
    figures = []
    for title, drawn in (
        ("Relative ΔW per block × technique (‖ΔW‖/‖W‖ over the block's weight matrices; log colour)",
         change_plots.block_heatmap(found, folder / "change_heatmap.png")),
        ("Effective rank and intruder dimensions per technique", change_plots.ranks_and_intruders(found, folder / "change_ranks.png")),
    ):
        if drawn:
            figures.append((title, drawn))
    scatter = change_plots.change_scatter(points, folder / "change_scatter.png")
    if scatter:
        figures.append((scatter[1], scatter[0]))
    return {"table": (CHANGES_TITLE, CHANGES_COLUMNS, body, note), "paragraph": answer(rows, points), "figures": figures,
            "failures": check_failures(rows)}


def render_report(root: str | Path) -> Path:
    """Render ``report.md`` and ``report.html`` in ``root`` from its records (a comparison's, or the
    tuning report of an ``sdtune tune`` folder); return the HTML path."""
    root = Path(root)
    if (root / TUNING_FILE).exists():
        return render_tuning_report(root)
    train, evals = load_records(root)
    check_writable_folder(root, "report")  # (before the figures are drawn)
    rows = build_rows(train, evals)
    figures_dir = root / FILES_DIR
    figures_dir.mkdir(exist_ok=True)
    figures = plots.all_figures(rows, root, figures_dir)
    context = _context(train, evals)
    all_tables = tables(rows)
    section = changes_section(rows, train, evals, figures_dir)
    atomic.write_text(root / "report.md", _markdown(all_tables, figures, context, root, section))
    html_path = root / "report.html"
    atomic.write_text(html_path, _html(all_tables, figures, context, section))  # over the live page
    return html_path


def _context(train: list[TrainRecord], evals: list[EvalRecord]) -> dict[str, Any]:
    finished = next((asdict(r) for r in train if r.status == "finished"), None)
    source = finished or (asdict(evals[0]) if evals else {})
    generation = next((e.generation for e in evals if e.generation), None) or {}
    return {
        "experiment": source.get("experiment") or (source.get("config") or {}).get("name"),
        # the date of the newest record, not of rendering: re-rendering gives the same report
        "date": max((getattr(r, "finished_at", None) or getattr(r, "created_at", None) or "" for r in [*train, *evals]), default=None),
        "versions": source.get("versions") or (evals[0].versions if evals else None),
        "git_commit": source.get("git_commit"),
        "device": source.get("device") or generation.get("device"),
        "evaluation": {k: v for k, v in generation.items() if k not in ("latencies_s",)},
        "references": next((e.references for e in evals if e.references), None),
        "config": source.get("config"),
        "training_seeds": sorted({r.seeds["train"] for r in train if r.seeds}),
    }


def _markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]


def _markdown(all_tables: list, figures: list[tuple[str, Path]], context: dict, root: Path, section: dict | None) -> str:
    lines = [f"# sdtune comparison: {context['experiment']}", ""]
    for title, header, body, note in all_tables:
        lines += [f"## {title}", "", *_markdown_table(header, body)]
        lines += ["", note, ""] if note else [""]
    for title, path in figures:
        lines += [f"## {title}", "", f"![{title}]({path.relative_to(root)})", ""]
    if section:
        title, header, body, note = section["table"]
        lines += [f"## {title}", "", *_markdown_table(header, body), "", note, "", section["paragraph"], ""]
        if section["failures"]:
            lines += ["### Did not train what it claims", "",
                      *_markdown_table(["Model", "Claim", "Where", "What"], section["failures"]), ""]
        for caption, path in section["figures"]:
            lines += [f"### {caption}", "", f"![{caption}]({path.relative_to(root)})", ""]
    lines += ["## Everything this comparison depends on", "", "```yaml", _context_yaml(context), "```", ""]
    return "\n".join(lines)


def _context_yaml(context: dict) -> str:
    return yaml.safe_dump(json.loads(json.dumps(context, default=str)), sort_keys=False, width=100)


def _html_table(header: list[str], body: list[list[str]]) -> str:
    esc = html.escape
    rows = "".join("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in body)
    return "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" + rows + "</table>"


def _html_image(caption: str, path: Path, level: int) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode()
    return f"<h{level}>{html.escape(caption)}</h{level}><img alt='{html.escape(caption)}' src='data:image/png;base64,{encoded}'>"


def _html_section(section: dict) -> list[str]:
    esc = html.escape
    title, header, body, note = section["table"]
    parts = [f"<h2>{esc(title)}</h2>", _html_table(header, body), f"<p class='note'>{esc(note)}</p>",
             f"<p>{esc(section['paragraph'])}</p>"]
    if section["failures"]:
        parts += ["<h3>Did not train what it claims</h3>", _html_table(["Model", "Claim", "Where", "What"], section["failures"])]
    return parts + [_html_image(caption, path, 3) for caption, path in section["figures"]]


def _html(all_tables: list, figures: list[tuple[str, Path]], context: dict, section: dict | None = None) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>sdtune comparison: {esc(str(context['experiment']))}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
        "img{max-width:100%;image-rendering:pixelated}pre{background:#f7f7f7;padding:1em;overflow:auto}"
        ".note{color:#555;font-size:90%}</style></head><body>",
        f"<h1>sdtune comparison: {esc(str(context['experiment']))}</h1>",
    ]
    for title, header, body, note in all_tables:
        parts.append(f"<h2>{esc(title)}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in body]
        parts.append("</table>" + (f"<p class='note'>{esc(note)}</p>" if note else ""))
    parts += [_html_image(title, path, 2) for title, path in figures]
    if section:
        parts += _html_section(section)
    parts.append(f"<h2>Everything this comparison depends on</h2><pre>{esc(_context_yaml(context))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
