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
from sdtune.report import plots
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
    atomic.write_text(root / "report.md", _markdown(all_tables, figures, context, root))
    html_path = root / "report.html"
    atomic.write_text(html_path, _html(all_tables, figures, context))
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


def _markdown(all_tables: list, figures: list[tuple[str, Path]], context: dict, root: Path) -> str:
    lines = [f"# sdtune comparison: {context['experiment']}", ""]
    for title, header, body, note in all_tables:
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
        lines += ["", note, ""] if note else [""]
    for title, path in figures:
        lines += [f"## {title}", "", f"![{title}]({path.relative_to(root)})", ""]
    lines += ["## Everything this comparison depends on", "", "```yaml", _context_yaml(context), "```", ""]
    return "\n".join(lines)


def _context_yaml(context: dict) -> str:
    return yaml.safe_dump(json.loads(json.dumps(context, default=str)), sort_keys=False, width=100)


def _html(all_tables: list, figures: list[tuple[str, Path]], context: dict) -> str:
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
    for title, path in figures:
        encoded = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h2>{esc(title)}</h2><img alt='{esc(title)}' src='data:image/png;base64,{encoded}'>")
    parts.append(f"<h2>Everything this comparison depends on</h2><pre>{esc(_context_yaml(context))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
