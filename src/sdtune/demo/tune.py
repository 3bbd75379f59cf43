"""``sdtune demo --tune``: the fair comparison in miniature, on a CPU.

Every demo technique is tuned on the demo's validation split (24 held-out style images) over the same
grid of learning rates with the same budget (trials of the same steps and samples), then trained at
its chosen rate and at one shared rate over two seeds; the report puts both tables side by side and
states every ranking change. Then the same study is selected again with asha (Ray Tune's
ASHAScheduler, when Ray is installed) and the two are compared: does asha choose the same rates, and
at what fraction of the grid's trial-steps?

asha replays the grid's trials (``asha/trials`` is a link to ``trials``): a trial stopped at a rung and
resumed equals one never stopped (tested), so the decisions asha makes on these recorded validation
losses are the ones it makes training them, and the trial-steps it counts are the ones it would train.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sdtune.demo.run import DemoSettings, demo_experiment
from sdtune.util import atomic

SHARED_LEARNING_RATE = 3.0e-4  # one rate for every technique (the study's confound), a point of full's grid
# Five rates per technique (the budget), placed where each kind of technique can be best at 36 steps:
# the adapters and cross-attention from 1e-3 to 1e-1, full fine-tuning from 3e-5 to 3e-3. Measured
# (docs/demo.md): over 3e-5 … 3e-3 for all, five of the six chose the top rate; over 3e-4 … 3e-2, the
# four adapters still did (rank-4 adapters trained for 36 steps want large rates). A range that holds
# the best rate inside it is what the selection, and asha's savings, need.
LEARNING_RATES = (1.0e-3, 3.0e-3, 1.0e-2, 3.0e-2, 1.0e-1)
FULL_LEARNING_RATES = (3.0e-5, 1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3)


@dataclass(frozen=True)
class TuneSettings:
    """How big the tuning demo is. ``quick`` is for tests."""

    steps: int = 36  # every trial and every final run (so a final at a trial's rate and seed is that trial)
    grace_steps: int = 4  # validation loss every 4 steps; asha's rungs at 4, 12, 36 (η = 3)
    reduction_factor: int = 3
    learning_rates: tuple[float, ...] = LEARNING_RATES
    # a technique's own range (same number of rates): ((name, rates), ...)
    technique_learning_rates: tuple[tuple[str, tuple[float, ...]], ...] = (("full", FULL_LEARNING_RATES),)
    seeds: tuple[int, ...] = (0, 1)
    num_images: int = 240
    batch_size: int = 4
    gradient_accumulation_steps: int = 4
    in_domain_prompts: int = 6
    held_out_prompts: int = 4
    seeds_per_prompt: int = 2
    num_inference_steps: int = 25
    validation_images: int = 24
    max_concurrent: int = 2  # two runs at a time, one thread each (2 cores)
    techniques: tuple[str, ...] = DemoSettings.techniques  # the plain demo's six (not its quantised extras)


QUICK = TuneSettings(
    steps=2, grace_steps=1, learning_rates=(1.0e-4, 3.0e-4, 1.0e-2), num_images=16, batch_size=2,
    gradient_accumulation_steps=1, in_domain_prompts=2, held_out_prompts=1, seeds_per_prompt=1, num_inference_steps=3,
    validation_images=4, max_concurrent=1, techniques=("full", "lora"), technique_learning_rates=(),
)


def tune_experiment(output_dir: Path, settings: TuneSettings, scheduler: str = "grid") -> Path:
    """The demo's data and experiment with a ``tuning:`` section; returns the experiment file's path."""
    base = DemoSettings(
        num_images=settings.num_images, max_train_steps=settings.steps, batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps, in_domain_prompts=settings.in_domain_prompts,
        held_out_prompts=settings.held_out_prompts, seeds_per_prompt=settings.seeds_per_prompt,
        num_inference_steps=settings.num_inference_steps, validation_images=settings.validation_images,
        every_steps=None, techniques=settings.techniques,
    )
    path = demo_experiment(output_dir, base)
    raw = yaml.safe_load(path.read_text())
    raw["name"] = "demo-tune"
    raw["train"]["learning_rate"] = SHARED_LEARNING_RATE
    own_rates = dict(settings.technique_learning_rates)
    for name, entry in raw["techniques"].items():
        entry.pop("learning_rate", None)  # the trials and both arms set every technique's rate
        if name in own_rates:
            entry["tuning"] = {"learning_rate": list(own_rates[name])}
    raw["tuning"] = {
        "learning_rate": list(settings.learning_rates), "steps": settings.steps, "seeds": list(settings.seeds),
        "scheduler": scheduler, "grace_steps": settings.grace_steps, "reduction_factor": settings.reduction_factor,
        # learning the style (share of images in the full style) vs forgetting (held-out prompts still drawn right)
        "pareto": ["judge_full_style", "judge_heldout_accuracy"],
    }
    header = "# Written by `sdtune demo --tune`; rerun with `sdtune tune experiment.yaml`.\n"
    atomic.write_text(path, header + yaml.safe_dump(raw, sort_keys=False))
    return path


def run_demo_tune(output_dir: str | Path = "demo-tune-output", quick: bool = False, progress: bool = True) -> Path:
    """Tune every demo technique (grid), train the final runs, write the report; then select again with
    asha on Ray and compare; returns the report's path."""
    import sdtune

    settings = QUICK if quick else TuneSettings()
    output = Path(output_dir).resolve()
    path = tune_experiment(output, settings)
    report = sdtune.tune(sdtune.load_experiment(path), max_concurrent=settings.max_concurrent, progress=progress)
    comparison = grid_vs_asha(output, settings, progress)
    if comparison:
        print(comparison)
    return report


def grid_vs_asha(output: Path, settings: TuneSettings, progress: bool) -> str | None:
    """Select again with asha on the grid's trials; write and return the comparison (None without Ray)."""
    import sdtune

    if importlib.util.find_spec("ray") is None:
        print("grid vs asha: skipped, Ray is not installed (pip install 'sdtune[ray]')")
        return None
    folder = output / "asha"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "trials").exists():
        (folder / "trials").symlink_to(Path("..") / "trials", target_is_directory=True)
    asha_path = folder / "experiment.yaml"
    raw = sdtune.load_experiment(output / "experiment.yaml").to_dict()  # (as resolved: absolute paths)
    raw["tuning"]["scheduler"] = "asha"
    raw["output_dir"] = str(folder)
    atomic.write_text(asha_path, yaml.safe_dump(raw, sort_keys=False))
    sdtune.tune(sdtune.load_experiment(asha_path), engine="ray", finals=False, progress=progress)
    grid, asha = _selection(output), _selection(folder)
    summary = compare_selections(grid, asha)
    atomic.write_json(output / "grid-vs-asha.json", summary)
    return format_comparison(summary)


def _selection(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "tuning.json").read_text())


def compare_selections(grid: dict[str, Any], asha: dict[str, Any]) -> dict[str, Any]:
    """Per technique: each scheduler's chosen rate and trial-steps; in all: how many choices agree and
    asha's share of the grid's trial-steps."""
    techniques = {
        name: {
            "grid": entry["chosen_learning_rate"], "asha": asha["techniques"][name]["chosen_learning_rate"],
            "grid_trial_steps": entry["trial_steps"], "asha_trial_steps": asha["techniques"][name]["trial_steps"],
        }
        for name, entry in grid["techniques"].items() if name in asha["techniques"]
    }
    grid_steps = sum(t["grid_trial_steps"] for t in techniques.values())
    asha_steps = sum(t["asha_trial_steps"] for t in techniques.values())
    return {
        "techniques": techniques, "same_choices": sum(t["grid"] == t["asha"] for t in techniques.values()),
        "grid_trial_steps": grid_steps, "asha_trial_steps": asha_steps,
        "asha_fraction": asha_steps / grid_steps if grid_steps else None,
    }


def format_comparison(summary: dict[str, Any]) -> str:
    lines = ["grid vs asha (same trials, same validation losses):"]
    for name, entry in summary["techniques"].items():
        same = "same" if entry["grid"] == entry["asha"] else "differs"
        lines.append(f"  {name}: grid {_rate(entry['grid'])}, asha {_rate(entry['asha'])} ({same}); trial-steps "
                     f"{entry['grid_trial_steps']} vs {entry['asha_trial_steps']}")
    lines.append(
        f"  {summary['same_choices']} of {len(summary['techniques'])} choices the same, at "
        f"{100 * summary['asha_fraction']:.0f} % of the grid's trial-steps ({summary['asha_trial_steps']} of "
        f"{summary['grid_trial_steps']})"
    )
    return "\n".join(lines)


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.0e}".replace("e-0", "e-")
