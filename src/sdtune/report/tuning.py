"""The report of ``sdtune tune``, built only from records (``sdtune report DIR`` re-renders it): the
selection (``tuning.json``, every trial with its score) and the two comparisons of final runs
(``finals/shared``, ``finals/tuned``).

The two tables side by side (each technique at the shared learning rate and at its tuned one, means
and 95 % CIs over the training seeds), a generated sentence for every ranking change, the budget,
the edge-of-range notes, the selection table, quality vs cost (with the tuning cost itself), and
the figures of :mod:`.tuning_plots` (sensitivity curves, fidelity vs drift).
"""

from __future__ import annotations

import html
from pathlib import Path

from sdtune.report import tuning_plots
from sdtune.report.format import (
    STYLE,
    embedded_png,
    html_table,
    markdown_table,
    metric_cell,
    number,
    rate,
    size,
)
from sdtune.report.summary import BASE, final_validation_loss, metric_names, study_table
from sdtune.report.tuning_summary import (
    VALIDATION_LOSS,
    Study,
    arm_values,
    budget_sentence,
    edge_notes,
    load_study,
    measure,
    ranking_sentences,
    ranks,
)
from sdtune.util import atomic

FILES_DIR = "report_files"
ARMS = {"shared": "At the shared learning rate", "tuned": "At each technique's tuned learning rate"}


# ------------------------------------------------------------------------------------------------
# Tables


def selection_table(study: Study) -> tuple[list[str], list[list[str]]]:
    tuning = study.selection.tuning
    header = ["Technique", "Learning rate", "Status", "Steps", f"{tuning['select_by']} (validation split)", "Chosen"]
    body = []
    for name, entry in study.selection.techniques.items():
        for trial in entry["trials"]:
            status = f"stopped at step {trial['stopped_at']} (asha)" if trial.get("stopped_at") else trial["status"]
            chosen = "✓" + (f" (at the {entry['at_edge']} edge)" if entry.get("at_edge") else "") \
                if trial["learning_rate"] == entry.get("chosen_learning_rate") else ""
            body.append([name, rate(trial["learning_rate"]), status, str(trial.get("steps") or 0),
                         number(trial.get("score"), 4), chosen])
    return header, body


def arm_table(study: Study, arm: str) -> tuple[list[str], list[list[str]]]:
    """One arm's table: each model's rate, rank and measures (mean [95 % CI] over seeds)."""
    rows = study.arms.get(arm, [])
    numeric, _ = metric_names(rows)
    validation = any(final_validation_loss(row) for row in rows)
    measures = [*numeric, *([VALIDATION_LOSS] if validation else [])]
    rank = ranks(arm_values(study, arm), study.selection.tuning["rank_direction"])
    header = ["Model", "Learning rate", "Rank", *measures]
    start = next((e["start_validation_loss"] for e in study.selection.techniques.values() if e.get("start_validation_loss")), None)
    body = []
    for row in rows:
        cells = [metric_cell(measure(row, m)) for m in measures]
        if row.label == BASE and validation and start is not None:  # every run's step 0: the base model's loss
            cells[-1] = number(start)
        body.append([row.label, "—" if row.label == BASE else rate(study.rate(arm, row.label)),
                     str(rank[row.label]) if row.label in rank else "—", *cells])
    return header, body


def cost_table(study: Study) -> tuple[list[str], list[list[str]]]:
    """Quality vs cost: what each technique trains and writes, its speed and memory (tuned final runs),
    and what tuning it cost (trial-steps and wall time of all its trials)."""
    rank_by = study.selection.tuning["rank_by"]
    costs = {entry["model"]: entry for entry in study_table(study.arms.get("tuned", []))}
    tuned = {row.label: row for row in study.arms.get("tuned", [])}
    header = ["Technique", "Trainable params", "Weights on disk", "Peak memory", "s/step", "Trial-steps",
              "Tuning wall time (s)", f"{rank_by} (tuned)"]
    body = []
    for name, entry in study.selection.techniques.items():
        cost = costs.get(name, {})
        written = cost.get("adapter") or sum(cost.get(part) or 0 for part in ("denoiser", "vae", "text_encoders")) or None
        body.append([
            name, number(cost.get("trainable_params")), size(written), size(cost.get("peak_memory")),
            number(cost.get("s_per_step")), str(entry.get("trial_steps")), number(entry.get("trial_wall_time_s")),
            metric_cell(measure(tuned[name], rank_by)) if name in tuned else "—",
        ])
    return header, body


# ------------------------------------------------------------------------------------------------
# Pages


def render_tuning_report(root: str | Path) -> Path:
    """Write ``report.md`` and ``report.html`` (self-contained) of a tuning output folder from its
    records alone; return the HTML's path."""
    study = load_study(root)
    folder = study.root / FILES_DIR
    folder.mkdir(exist_ok=True)
    figures = tuning_plots.all_figures(study, folder)
    sections = _sections(study)
    atomic.write_text(study.root / "report.md", _markdown(study, sections, figures))
    return atomic.write_text(study.root / "report.html", _html(study, sections, figures))


def _sections(study: Study) -> list[tuple[str, list[str], list[tuple[str, list[str], list[list[str]]]]]]:
    """(title, paragraphs, [(caption, header, body)]) of the report, in order."""
    sentences = ranking_sentences(study) or ["The final runs are not evaluated yet: no ranking to compare."]
    both = [(f"{ARMS[arm]}", *arm_table(study, arm)) for arm in ARMS if arm in study.arms]
    note = ("Mean [95 % bootstrap CI] over the training seeds; validation loss: the denoising loss on the held-out "
            "images at fixed timesteps and noise, at the last step. With few seeds, ranks whose CIs overlap are ties "
            "in all but name.")
    return [
        ("The two tables", [*sentences, note], both),
        ("Budget", [budget_sentence(study.selection), *edge_notes(study.selection)], []),
        ("Selection (validation split only)", [], [("", *selection_table(study))]),
        ("Quality vs cost", ["Trainable parameters, weights written, peak memory and seconds per step are the tuned "
                             "final runs' (each in its own process); trial-steps and wall time are the tuning cost: "
                             "every trial of the technique."], [("", *cost_table(study))]),
    ]


def _markdown(study: Study, sections: list, figures: list[tuple[str, Path]]) -> str:
    lines = [f"# sdtune tune: {study.selection.experiment}", ""]
    for title, paragraphs, tables in sections:
        lines += [f"## {title}", ""]
        for paragraph in paragraphs:
            lines += [paragraph, ""]
        for caption, header, body in tables:
            lines += ([f"### {caption}", ""] if caption else []) + markdown_table(header, body) + [""]
    for title, path in figures:
        lines += [f"## {title}", "", f"![{title}]({path.relative_to(study.root)})", ""]
    lines += ["## The final runs' own reports", ""]
    lines += [f"- {arm}: [{entry['root']}/report.html]({entry['root']}/report.html)" for arm, entry in study.selection.finals.items()]
    return "\n".join(lines) + "\n"


def _html(study: Study, sections: list, figures: list[tuple[str, Path]]) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>sdtune tune: {esc(study.selection.experiment)}</title><style>{STYLE}</style></head><body>",
        f"<h1>sdtune tune: {esc(study.selection.experiment)}</h1>",
    ]
    for title, paragraphs, tables in sections:
        parts.append(f"<h2>{esc(title)}</h2>")
        parts += [f"<p>{esc(paragraph)}</p>" for paragraph in paragraphs]
        parts.append("<div class='side'>" + "".join(
            f"<div>{f'<h3>{esc(caption)}</h3>' if caption else ''}{html_table(header, body)}</div>"
            for caption, header, body in tables) + "</div>")
    for title, path in figures:
        parts.append(f"<h2>{esc(title)}</h2>{embedded_png(path, title)}")
    parts.append("<h2>The final runs' own reports</h2><ul>" + "".join(
        f"<li>{esc(arm)}: <a href='{esc(entry['root'])}/report.html'>{esc(entry['root'])}/report.html</a></li>"
        for arm, entry in study.selection.finals.items()) + "</ul></body></html>")
    return "\n".join(parts)


def tuning_summary(root: str | Path) -> str:
    """The selection, both tables (rate, rank and the ranking measure) and the ranking changes, as text."""
    study = load_study(root)
    lines = [budget_sentence(study.selection), *edge_notes(study.selection), ""]
    for arm, title in ARMS.items():
        if arm not in study.arms:
            continue
        header, body = arm_table(study, arm)
        keep = [0, 1, 2] + [i for i, h in enumerate(header) if h == study.selection.tuning["rank_by"]]
        header, body = [header[i] for i in keep], [[row[i] for i in keep] for row in body]
        widths = [max(len(str(x)) for x in column) for column in zip(header, *body)]
        lines.append(title)
        lines += ["  " + "  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [header, *body]]
        lines.append("")
    return "\n".join([*lines, *ranking_sentences(study)])
