"""The comparison report, built only from ``DIR/records/*.json`` (``sdtune report DIR`` re-renders it).

Writes ``report.md`` (figures as files under ``report_files/``) and ``report.html`` (one
self-contained file: figures embedded as base64 PNGs, no scripts).
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sdtune.metrics.maths import bootstrap_ci

FILES_DIR = "report_files"
MB = 1e6


@dataclass
class Row:
    """One model of the comparison (the base model, or a technique over its training seeds)."""

    label: str
    kind: str
    status: str = "finished"
    error: str | None = None
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


def load_records(root: Path) -> tuple[list[dict], list[dict]]:
    folder = Path(root) / "records"
    if not folder.is_dir():
        raise FileNotFoundError(f"{root} has no records/ folder; run `sdtune compare` first")
    loaded = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    return [r for r in loaded if r.get("kind") == "train"], [r for r in loaded if r.get("kind") == "eval"]


def build_rows(train: list[dict], evals: list[dict]) -> list[Row]:
    rows: dict[str, Row] = {}
    for record in evals:
        if record["label"] == "base":
            rows.setdefault("base", Row("base", "base model")).evals.append(record)
    for record in train:
        name = record["technique"]["name"]
        row = rows.setdefault(name, Row(name, record["technique"]["kind"]))
        row.train.append(record)
        if record.get("status") != "finished":
            row.status, row.error = record.get("status", "failed"), record.get("error")
    for record in evals:
        if record["label"] != "base" and record["label"] in rows:
            rows[record["label"]].evals.append(record)
    order = ["base", *((train[0].get("config") or {}).get("techniques") or {} if train else {})]
    return sorted(rows.values(), key=lambda row: order.index(row.label) if row.label in order else len(order))


# ----------------------------------------------------------------------------------------------
# Numbers


def metric_names(rows: list[Row]) -> tuple[list[str], list[str]]:
    """(numeric metrics, share-valued metrics) that appear in any evaluation."""
    numeric, shares = [], []
    for row in rows:
        for record in row.evals:
            for name, entry in record["metrics"].items():
                value = entry.get("value")
                target = shares if isinstance(value, dict) else numeric
                if (value is not None or entry.get("skipped")) and name not in numeric + shares:
                    target.append(name)
    return numeric, shares


def metric_summary(row: Row, name: str) -> dict[str, Any] | None:
    """Mean and 95 % CI of a metric: bootstrap over training seeds, else the metric's own CI."""
    entries = [r["metrics"].get(name) for r in row.evals if name in r["metrics"]]
    values = [e["value"] for e in entries if e and isinstance(e.get("value"), (int, float))]
    if not values:
        skipped = next((e.get("skipped") for e in entries if e and e.get("skipped")), None)
        return {"skipped": skipped} if skipped else None
    if len(values) > 1:
        mean, low, high = bootstrap_ci(np.asarray(values, dtype=float))
        return {"value": mean, "low": low, "high": high, "n": len(values), "over": "training seeds"}
    details = entries[0].get("details") or {}
    low, high = details.get("ci_low"), details.get("ci_high")
    return {"value": values[0], "low": low, "high": high, "n": details.get("n"), "over": "images"}


def share_summary(row: Row, name: str) -> dict[str, float] | None:
    found = [r["metrics"][name]["value"] for r in row.evals if isinstance(r["metrics"].get(name, {}).get("value"), dict)]
    if not found:
        return None
    labels = list(found[0])
    return {label: float(np.mean([f.get(label, 0.0) for f in found])) for label in labels}


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def study_table(rows: list[Row]) -> list[dict[str, Any]]:
    """The study's table: sizes on disk, parameters, training and generation costs."""
    base_eval = next((r.evals[0] for r in rows if r.label == "base" and r.evals), None)
    base_sizes = (base_eval or {}).get("base_sizes") or {}
    base_params = (base_eval or {}).get("base_parameters") or {}
    table = []
    for row in rows:
        entry: dict[str, Any] = {"model": row.label, "kind": row.kind, "status": row.status}
        if row.label == "base":  # files on disk, else fp32 parameter bytes
            sizes = {part: base_sizes.get(part) or 4 * count for part, count in base_params.items()} or base_sizes
            entry.update(component_columns(sizes))
            entry["total_params"] = sum(base_params.values()) if base_params else None
        finished = [t for t in row.train if t.get("status") == "finished"]
        if finished:
            outputs = finished[0]["outputs"]
            entry.update(component_columns({part: value.get("bytes") for part, value in outputs.items()}))
            adapter = outputs.get("diffusers_lora") or outputs.get("adapter") or outputs.get("partial")
            entry["adapter"] = adapter["bytes"] if adapter else None
            params = finished[0]["parameters"]
            entry["trainable_params"] = params["trainable"]
            entry["total_params"] = sum(params["components"].values())
            entry["train_time_s"] = _mean([t["timing"]["train_time_s"] for t in finished])
            entry["s_per_step"] = _mean([t["timing"]["s_per_step"] for t in finished])
            entry["images_per_s"] = _mean([t["timing"]["images_per_s"] for t in finished])
            entry["peak_memory"] = _mean([t["memory"]["peak"]["bytes"] for t in finished])
            entry["memory_kind"] = finished[0]["memory"]["peak"]["kind"]
        if row.evals:
            entry["load_time_s"] = _mean([e["generation"]["load_time_s"] for e in row.evals])
            entry["s_per_image"] = _mean([e["generation"]["latency_s_mean"] for e in row.evals])
        table.append(entry)
    return table


def component_columns(sizes: dict[str, int | None]) -> dict[str, int | None]:
    """Bytes per component grouped as the study's table shows them: the denoiser (UNet or
    transformer), the VAE, and all text encoders together (None where nothing was written)."""

    def total(names: list[str]) -> int | None:
        values = [sizes[name] for name in names if sizes.get(name) is not None]
        return sum(values) if values else None

    return {
        "denoiser": total([n for n in sizes if n in ("unet", "transformer")]),
        "vae": total(["vae"]),
        "text_encoders": total([n for n in sizes if n.startswith("text_encoder")]),
    }


# ----------------------------------------------------------------------------------------------
# Formatting


def _size(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value / MB:.2f} MB" if value >= 1e4 else f"{value / 1e3:.1f} kB"


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.2f} M"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.1f} k"
    return f"{value:.{digits}g}"


def _metric_cell(summary: dict | None) -> str:
    if not summary:
        return "—"
    if "skipped" in summary:
        return "skipped"
    text = _number(summary["value"])
    if summary.get("low") is not None and summary.get("high") is not None and summary["high"] > summary["low"]:
        text += f" [{_number(summary['low'])}, {_number(summary['high'])}]"
    return text


STUDY_COLUMNS = [
    ("Model", lambda e: e["model"]), ("Kind", lambda e: e["kind"]), ("Status", lambda e: e["status"]),
    ("Denoiser", lambda e: _size(e.get("denoiser"))), ("VAE", lambda e: _size(e.get("vae"))),
    ("Text encoders", lambda e: _size(e.get("text_encoders"))), ("Adapter/weights", lambda e: _size(e.get("adapter"))),
    ("Trainable params", lambda e: _number(e.get("trainable_params"))), ("Total params", lambda e: _number(e.get("total_params"))),
    ("Train time (s)", lambda e: _number(e.get("train_time_s"))), ("s/step", lambda e: _number(e.get("s_per_step"))),
    ("img/s (train)", lambda e: _number(e.get("images_per_s"))), ("Peak memory", lambda e: _size(e.get("peak_memory"))),
    ("Load time (s)", lambda e: _number(e.get("load_time_s"))), ("s/image", lambda e: _number(e.get("s_per_image"))),
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
    if numeric:
        header = ["Model", *numeric]
        body = [[row.label, *(_metric_cell(metric_summary(row, m)) for m in numeric)] for row in rows]
        skipped = {m: s["skipped"] for row in rows for m in numeric if (s := metric_summary(row, m)) and "skipped" in s}
        note = "Mean [95 % bootstrap CI] over training seeds (several) or over images (one seed)."
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
    """Render ``report.md`` and ``report.html`` in ``root`` from its records; return the HTML path."""
    from sdtune import plots

    root = Path(root)
    train, evals = load_records(root)
    rows = build_rows(train, evals)
    figures_dir = root / FILES_DIR
    figures_dir.mkdir(exist_ok=True)
    figures = plots.all_figures(rows, root, figures_dir)
    context = _context(train, evals)
    all_tables = tables(rows)
    (root / "report.md").write_text(_markdown(all_tables, figures, context, root))
    html_path = root / "report.html"
    html_path.write_text(_html(all_tables, figures, context))
    return html_path


def _context(train: list[dict], evals: list[dict]) -> dict[str, Any]:
    source = next((r for r in train if r.get("status") == "finished"), None) or (evals[0] if evals else {})
    return {
        "experiment": source.get("experiment") or (source.get("config") or {}).get("name"),
        # the date of the newest record, not of rendering: re-rendering gives the same report
        "date": max((r.get("finished_at") or r.get("created_at") or "" for r in [*train, *evals]), default=None),
        "versions": source.get("versions") or (evals[0].get("versions") if evals else None),
        "git_commit": source.get("git_commit"),
        "device": source.get("device") or (evals[0]["generation"]["device"] if evals else None),
        "evaluation": {k: v for k, v in (evals[0]["generation"].items() if evals else []) if k not in ("latencies_s",)},
        "config": source.get("config"),
        "training_seeds": sorted({r["seeds"]["train"] for r in train if r.get("seeds")}),
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
