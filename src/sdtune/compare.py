"""``sdtune compare``: train every technique, generate the same images, measure, write the report.

Everything measured lands in ``DIR/records/*.json`` (one per training run, one per evaluated
model); :func:`sdtune.report.render_report` builds the report from those files alone.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from sdtune import records
from sdtune.config import Experiment
from sdtune.distributed import launch_rank, launched_processes, process_state
from sdtune.errors import UserError
from sdtune.generate import (
    GenerationResult,
    default_device,
    denoiser_of,
    generate_images,
    image_name,
    load_base_pipeline,
    load_run_pipeline,
    save_images,
    set_scheduler,
)
from sdtune.isolate import TechniqueFailed, train_in_fresh_process
from sdtune.train import output_root, train_technique

log = logging.getLogger(__name__)
RECORDS_DIR = "records"
IMAGES_DIR = "images"
BASE_LABEL = "base"


class ComparisonInterrupted(UserError, RuntimeError):
    """Ctrl-C during a comparison: the technique was checkpointed; rerunning resumes it."""


@dataclasses.dataclass
class EvaluationPlan:
    """The fixed prompts × seeds every model is sampled at."""

    prompts: list[str]
    in_domain: list[bool]
    seeds: list[int]

    @classmethod
    def from_experiment(cls, experiment: Experiment) -> EvaluationPlan:
        evaluation = experiment.evaluation
        prompts = list(evaluation.prompts)
        in_domain = [True] * len(prompts)
        if evaluation.prompts_file:
            for line in Path(evaluation.prompts_file).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    out_of_domain = line.startswith("!")
                    prompts.append(line[1:].strip() if out_of_domain else line)
                    in_domain.append(not out_of_domain)
        for prompt in evaluation.out_of_domain_prompts:
            prompts.append(prompt)
            in_domain.append(False)
        if not prompts:
            prompts, in_domain = list(DEFAULT_PROMPTS), list(DEFAULT_IN_DOMAIN)
        return cls(prompts, in_domain, list(range(evaluation.seeds_per_prompt)))


# The study's prompt plus a small default set: in the dataset's domain (Pokémon-like creatures) and
# outside it (to measure how much of the base model survives fine-tuning).
DEFAULT_PROMPTS = (
    "yoda", "a cute green dragon", "a blue bird with big eyes", "a fire monster",
    "a photo of a city street at night", "a bowl of fruit on a wooden table", "a portrait of an old man",
)
DEFAULT_IN_DOMAIN = (True, True, True, True, False, False, False)


def compare(
    experiment: Experiment,
    output_dir: str | Path | None = None,
    seeds: list[int] | None = None,
    only: str | None = None,
    progress: bool = True,
    clip_loader: Any = None,
    evaluate_only: bool = False,
) -> Path:
    """Train (or reuse) every technique per training seed, evaluate all models, render the report.

    With ``evaluate_only`` nothing trains: the finished runs found are evaluated (those trained
    elsewhere from :func:`plan`'s commands), and a run not found is a 'missing' row."""
    from sdtune.report import render_report

    root = output_root(experiment, output_dir)
    (root / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
    names = [only] if only else list(experiment.techniques)
    if only and only not in experiment.techniques:
        from sdtune.config import ConfigError

        raise ConfigError(f"--only {only!r} is not a technique of the experiment; it has: {', '.join(experiment.techniques)}")
    train_seeds = seeds or [experiment.train.seed]
    runs = []
    for seed in train_seeds:
        seeded = _with_seed(experiment, seed)
        out = root if seeds is None else root / f"seed-{seed}"
        for name in names:
            runs.append(_train_or_reuse(seeded, name, out, root, seed, progress, train=not evaluate_only))
            if runs[-1]["status"] == "interrupted":
                raise ComparisonInterrupted(
                    f"{name} was interrupted and checkpointed; run the same `sdtune compare` again to resume"
                )
    # evaluation: every launched process generates its share of the images; the main one measures
    state = process_state()
    plan = EvaluationPlan.from_experiment(experiment)
    scorer = _SharedClip(experiment, clip_loader)
    references = reference_images(experiment) if state.is_main_process else []
    base = _evaluate(experiment, plan, root, BASE_LABEL, None, None, references, None, scorer, progress, state)
    for run in runs:
        if run["status"] == "finished":
            _evaluate(experiment, plan, root, run["technique"]["name"], run, run["seeds"]["train"],
                      references, base, scorer, progress, state)
    if not state.is_main_process:
        return root / "report.html"
    return render_report(root)


def plan(
    experiment: Experiment, output_dir: str | Path | None = None, seeds: list[int] | None = None,
    only: str | None = None,
) -> list[dict[str, Any]]:
    """One independent ``sdtune train`` command per technique × training seed — what ``compare``
    would train — for a cluster scheduler to run anywhere; ``compare --evaluate-only`` then
    evaluates what finished. Each command carries the experiment as resolved here (a file under
    the output folder), so every machine trains exactly the same thing."""
    import yaml

    root = output_root(experiment, output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    experiment_file = root / "experiment.resolved.yaml"
    experiment_file.write_text(yaml.safe_dump(experiment.to_dict(), sort_keys=False))
    entries = []
    for seed in seeds or [experiment.train.seed]:
        out = root if seeds is None else root / f"seed-{seed}"
        for name in [only] if only else list(experiment.techniques):
            command = ["sdtune", "train", str(experiment_file), "--technique", name, "--output", str(out),
                       "--set", f"train.seed={seed}", "--resume"]
            entries.append({"technique": name, "seed": seed, "run_dir": str(out / name), "command": command})
    return entries


def default_metric_names() -> list[str]:
    """Every registered metric except the demo's judge metrics (meaningful for the demo only)."""
    from sdtune.metrics import METRICS

    return [name for name in METRICS.names() if METRICS.get(name).needs != "judge"]


def _with_seed(experiment: Experiment, seed: int) -> Experiment:
    return dataclasses.replace(experiment, train=dataclasses.replace(experiment.train, seed=seed))


def _train_or_reuse(
    experiment: Experiment, name: str, out: Path, root: Path, seed: int, progress: bool, train: bool = True
) -> dict:
    """Train one technique (in a fresh process) unless a finished record exists; a failure becomes a
    'failed' record that keeps the error, and the traceback when it was a bug."""
    run_dir = out / name
    record = records.read_record(run_dir)
    if not train and (record is None or record.get("status") != "finished"):
        record = {
            "kind": "train", "status": "missing", "error": f"no finished run in {run_dir} (--evaluate-only)",
            "technique": {"name": name, "kind": experiment.techniques[name].kind}, "seeds": {"train": seed},
            "config": experiment.to_dict(),
        }
    elif record is None or record.get("status") != "finished":
        try:
            # resume an interrupted run; otherwise the folder holds nothing finished (a failure's log)
            resumable = (run_dir / "checkpoints").exists()
            options = {"resume": True if resumable else None, "overwrite": not resumable, "progress": progress}
            if launched_processes() > 1:  # under a launcher: in the launched processes (see sdtune.train.train)
                record = _train_here(experiment, name, out, options)
            else:
                record = train_in_fresh_process(experiment, name, out, **options)
        except TechniqueFailed as error:  # one technique failing must not lose the others' results
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.log").write_text(error.details or f"{error}\n")
            kind = "error" if error.user_error else "crash (a bug in sdtune; traceback in error.log)"
            print(f"technique {name} (seed {seed}) failed: {error} [{kind}]")
            record = {
                "kind": "train", "status": "failed", "error": str(error)[:500], "traceback": error.details,
                "technique": {"name": name, "kind": experiment.techniques[name].kind},
                "seeds": {"train": seed}, "config": experiment.to_dict(),
            }
    record["run_dir"] = str(run_dir)
    if launch_rank() == 0:  # one writer under a launcher (every process reads the same record)
        records.write_json_atomic(root / RECORDS_DIR / f"train-{name}-seed{seed}.json", record)
    return record


def _train_here(experiment: Experiment, name: str, out: Path, options: dict) -> dict:
    """Train in this process; an exception becomes a TechniqueFailed like a child process's."""
    try:
        return train_technique(experiment, name, out, **options).record
    except UserError as error:
        raise TechniqueFailed(name, str(error), None, True) from error
    except Exception as error:
        raise TechniqueFailed(name, f"{type(error).__name__}: {error}", traceback.format_exc(), False) from error


class _SharedClip:
    """Loads the CLIP scorer once for all rows (or remembers why it could not)."""

    def __init__(self, experiment: Experiment, loader: Any) -> None:
        self.experiment, self.loader, self.scorer, self.error = experiment, loader, None, None

    def __call__(self) -> Any:
        from sdtune.metrics import ClipScorer, MetricUnavailable

        if self.error is not None:
            raise MetricUnavailable(self.error)
        if self.scorer is None:
            try:
                self.scorer = self.loader() if self.loader else ClipScorer.load(
                    self.experiment.evaluation.clip_model, device=str(default_device())
                )
            except MetricUnavailable as error:
                self.error = str(error)
                print(f"CLIP metrics skipped: {error}")
                raise
        return self.scorer


def reference_images(experiment: Experiment) -> list[Any]:
    """Up to ``evaluation.max_reference_images`` training images, centre-cropped to the resolution."""
    from PIL import Image

    from sdtune.data import decode_image, load_rows, transform_image

    dataset, image_column, _, base_dir = load_rows(experiment.data)
    images = []
    for row in range(min(len(dataset), experiment.evaluation.max_reference_images)):
        try:
            image = decode_image(dataset[row][image_column], base_dir)
        except Exception:
            continue  # unreadable: training skipped it too
        pixels = transform_image(image, _eval_resolution(experiment), None, False)
        array = ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype("uint8")
        images.append(Image.fromarray(array))
    return images


def _eval_resolution(experiment: Experiment) -> int:
    return experiment.evaluation.resolution or experiment.data.resolution


def _evaluate(
    experiment: Experiment,
    plan: EvaluationPlan,
    root: Path,
    label: str,
    run: dict | None,
    train_seed: int | None,
    references: list[Any],
    base: dict | None,
    scorer: _SharedClip,
    progress: bool,
    state: Any,
) -> dict | None:
    """Generate the plan's images with one model — each process its share of prompts × seeds —,
    measure them on the main process and write ``records/eval-….json`` (None on the others)."""
    from accelerate.utils import gather_object

    from sdtune.metrics import MetricContext, compute_all

    evaluation = experiment.evaluation
    suffix = "" if train_seed is None else f"-seed{train_seed}"
    record_path = root / RECORDS_DIR / f"eval-{label}{suffix}.json"
    folder = root / IMAGES_DIR / f"{label}{suffix}"
    started = time.perf_counter()
    if run is None:
        pipe = load_base_pipeline(experiment.model).to(state.device)
    else:
        pipe, _ = load_run_pipeline(run["run_dir"], fuse=True, device=state.device)
    set_scheduler(pipe, evaluation.scheduler)
    load_time = time.perf_counter() - started
    pairs = [(prompt, seed) for prompt in plan.prompts for seed in plan.seeds]
    mine = list(range(state.process_index, len(pairs), state.num_processes))
    share = generate_images(
        pipe, [], [], evaluation.num_inference_steps, evaluation.guidance_scale, _eval_resolution(experiment),
        progress and state.is_main_process, pairs=[pairs[i] for i in mine],
    )
    save_images(share, folder, mine)
    latencies = dict(gather_object(list(zip(mine, share.latencies_s))))  # every process's, in one place
    if not state.is_main_process:
        return None
    from PIL import Image

    result = GenerationResult(
        images=[Image.open(folder / image_name(i, p, s)).convert("RGB") for i, (p, s) in enumerate(pairs)],
        prompts=[p for p, _ in pairs], seeds=[s for _, s in pairs],
        paths=[folder / image_name(i, p, s) for i, (p, s) in enumerate(pairs)],
        latencies_s=[latencies[i] for i in range(len(pairs))],
    )
    in_domain = [plan.in_domain[plan.prompts.index(p)] for p in result.prompts]
    paths = result.paths
    entries = [
        {"path": str(path.relative_to(root)), "prompt": prompt, "seed": seed, "in_domain": domain}
        for path, prompt, seed, domain in zip(paths, result.prompts, result.seeds, in_domain)
    ]
    context = MetricContext(
        images=result.images, prompts=result.prompts, seeds=result.seeds, training_images=references,
        in_domain=in_domain, base_images=None if base is None else base["_images"],
        style_labels=list(evaluation.style_labels), clip_model=evaluation.clip_model, clip_loader=scorer,
    )
    metrics = compute_all(context, evaluation.metrics or default_metric_names())
    record = {
        "kind": "eval",
        "label": label,
        "technique": None if run is None else run["technique"],
        "train_seed": train_seed,
        "train_record": None if run is None else f"train-{label}-seed{train_seed}.json",
        "model": experiment.model.path,
        "images": entries,
        "generation": {
            "load_time_s": load_time,
            "latency_s_mean": sum(result.latencies_s) / len(result.latencies_s),
            "latencies_s": result.latencies_s,
            "num_inference_steps": evaluation.num_inference_steps,
            "guidance_scale": evaluation.guidance_scale,
            "scheduler": type(pipe.scheduler).__name__,
            "resolution": _eval_resolution(experiment),
            "fused": run is not None,
            "processes": state.num_processes,
            "dtype": str(denoiser_of(pipe).dtype),
            "device": records.device_description(pipe.device),
        },
        "base_sizes": _pipeline_sizes(experiment.model.path, experiment.model.variant) if run is None else None,
        "base_parameters": _pipeline_parameters(pipe) if run is None else None,
        "metrics": metrics,
        "versions": records.package_versions(),
        "git_commit": records.git_commit(),
        "config": experiment.to_dict(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    records.write_json_atomic(record_path, record)
    record["_images"] = result.images  # in memory only: the base row's images for preservation
    del pipe
    return record


def _pipeline_sizes(path: str, variant: str | None = None) -> dict[str, int] | None:
    """Bytes on disk of the weight files ``from_pretrained`` loads, per component (local models;
    a hub id is looked up in the local hub cache). Folders often hold several copies (fp16, non-EMA,
    .bin): only the file that would be loaded is counted."""
    folder = Path(path).expanduser()
    if folder.is_file():
        return {"checkpoint": folder.stat().st_size}
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, local_files_only=True))
        except Exception:
            return None  # not downloaded: the report shows parameters instead
    sizes = {}
    infix = f".{variant}" if variant else ""
    parts = [p.name for p in sorted(folder.iterdir()) if p.is_dir() and (p / "config.json").exists()]
    for part in parts:
        for stem in ("diffusion_pytorch_model", "model"):
            matches = [folder / part / f"{stem}{infix}{ext}" for ext in (".safetensors", ".bin")]
            shards = sorted((folder / part).glob(f"{stem}{infix}-*-of-*.safetensors"))
            found = [m for m in matches if m.exists()][:1] or shards
            if found:
                sizes[part] = sum(f.stat().st_size for f in found)
                break
    return sizes


def _pipeline_parameters(pipe: Any) -> dict[str, int]:
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }
