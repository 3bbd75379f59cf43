"""One model → its images at the fixed prompts × seeds → metrics → one eval record.

:func:`evaluate_model` generates with a pipeline (the base model, or a finished run's) and
:func:`evaluate_images` measures images already generated (those a run wrote at
``evaluation.every_steps`` while it trained); both write ``records/eval-….json`` through
:mod:`sdtune.records`. :mod:`sdtune.comparison` only decides what to train and what to evaluate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdtune import records
from sdtune.config import ConfigError
from sdtune.data import heldout
from sdtune.data.dataset import transform_image
from sdtune.experiment import EvaluationPlan, Experiment
from sdtune.generation import load_base_pipeline, load_run_pipeline
from sdtune.models.sampling import denoiser_of, generate_images, image_name, save_images, set_scheduler
from sdtune.util.device import default_device

RECORDS_DIR = "records"
IMAGES_DIR = "images"
BASE_LABEL = "base"


class Encoders:
    """The metric encoders (CLIP, DINOv2, …), each loaded once for every evaluated model; an encoder
    that cannot be had is reported once, in one line, and its metrics are skipped everywhere."""

    def __init__(self, experiment: Experiment, overrides: dict[str, Callable[[], Any]] | None = None) -> None:
        from sdtune.metrics import ENCODERS

        evaluation = experiment.evaluation
        # every encoder whose model the experiment names (evaluation.<encoder>_model)
        models = {
            name: getattr(evaluation, f"{name}_model") for name in ENCODERS if hasattr(evaluation, f"{name}_model")
        }
        device = str(default_device())
        self.factories = {
            name: (lambda name=name: ENCODERS[name](models[name], device, 32)) for name in models
        } | dict(overrides or {})
        self.loaded: dict[str, Any] = {}
        self.errors: dict[str, str] = {}

    def loader(self, name: str) -> Callable[[], Any]:
        def load() -> Any:
            from sdtune.metrics import MetricUnavailable

            if name in self.errors:
                raise MetricUnavailable(self.errors[name])
            if name not in self.loaded:
                try:
                    self.loaded[name] = self.factories[name]()
                except MetricUnavailable as error:
                    self.errors[name] = str(error)
                    print(f"{name} metrics skipped: {error}")
                    raise
            return self.loaded[name]

        return load

    def loaders(self) -> dict[str, Callable[[], Any]]:
        return {name: self.loader(name) for name in self.factories}


@dataclass
class References:
    """The real images the metrics compare with: held-out validation images when the experiment
    has ``data.validation``, else training images (``set`` says which)."""

    images: list[Image.Image] = field(default_factory=list)
    set: str = "training"

    def describe(self) -> dict[str, Any]:
        return {"set": self.set, "count": len(self.images)}


def reference_images(experiment: Experiment) -> References:
    """Up to ``evaluation.max_reference_images`` real images, centre-cropped to the evaluation
    resolution: the validation split's (never trained on) when there is one, else the training images."""
    found, which = heldout.reference_images(experiment.data, experiment.validation, experiment.evaluation.max_reference_images)
    images = []
    for item in found:
        pixels = transform_image(item.image, experiment.eval_resolution, None, False)
        array = ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype("uint8")
        images.append(Image.fromarray(array))
    return References(images, which)


@dataclass
class Target:
    """What one eval record is about: the base model, or a technique's run (one training seed),
    finished (``final``) or at one evaluated step of its training; ``step`` is the optimizer step
    the weights are from (the last one for a finished run; None for the base model)."""

    label: str
    run: dict[str, Any] | None = None  # the train record (None: the base model)
    train_seed: int | None = None
    step: int | None = None
    final: bool = True

    @property
    def name(self) -> str:
        seed = "" if self.train_seed is None else f"-seed{self.train_seed}"
        step = "" if self.final else f"-step{self.step}"
        return f"{self.label}{seed}{step}"


@dataclass
class Evaluation:
    """Everything shared by the models of one comparison."""

    experiment: Experiment
    root: Path
    references: References
    encoders: Encoders
    progress: bool = True
    base_images: list[Image.Image] | None = None  # the base model's, in plan order (for preservation, drift)


def evaluate_model(evaluation: Evaluation, target: Target, state: Any) -> records.EvalRecord | None:
    """Generate the plan's images with one model — each process its share of prompts × seeds —,
    measure them on the main process and write ``records/eval-<target>.json`` (None elsewhere)."""
    from accelerate.utils import gather_object

    experiment, settings = evaluation.experiment, evaluation.experiment.evaluation
    folder = evaluation.root / IMAGES_DIR / target.name
    started = time.perf_counter()
    pipe = _pipeline(experiment, target, state.device)
    set_scheduler(pipe, settings.scheduler)
    load_time = time.perf_counter() - started
    pairs = experiment.plan.pairs()
    mine = list(range(state.process_index, len(pairs), state.num_processes))
    share = generate_images(
        pipe, [], [], settings.num_inference_steps, settings.guidance_scale, experiment.eval_resolution,
        evaluation.progress and state.is_main_process, pairs=[pairs[i] for i in mine],
    )
    save_images(share, folder, mine)
    latencies = dict(gather_object(list(zip(mine, share.latencies_s))))  # every process's, in one place
    if not state.is_main_process:
        return None
    paths = [folder / image_name(i, p, s) for i, (p, s) in enumerate(pairs)]
    generation = {
        "load_time_s": load_time,
        "latency_s_mean": sum(latencies.values()) / len(latencies),
        "latencies_s": [latencies[i] for i in range(len(pairs))],
        "num_inference_steps": settings.num_inference_steps,
        "guidance_scale": settings.guidance_scale,
        "scheduler": type(pipe.scheduler).__name__,
        "resolution": experiment.eval_resolution,
        "fused": target.run is not None,
        "processes": state.num_processes,
        "dtype": str(denoiser_of(pipe).dtype),
        "device": records.device_description(state.device),
        "cpu_offload": settings.cpu_offload,
    }
    base = target.run is None
    sizes = {
        "base_sizes": pipeline_sizes(experiment.model.path, experiment.model.variant) if base else None,
        "base_parameters": pipeline_parameters(pipe) if base else None,
    }
    del pipe
    return evaluate_images(evaluation, target, paths, generation, **sizes)


def _pipeline(experiment: Experiment, target: Target, device: torch.device) -> Any:
    """The target's pipeline on ``device``; with ``evaluation.cpu_offload`` on the CPU, each model
    moved to the GPU only for its forward (diffusers' ``enable_model_cpu_offload``)."""
    offload = experiment.evaluation.cpu_offload
    if offload and device.type != "cuda":
        raise ConfigError(
            f"evaluation.cpu_offload: true needs a CUDA GPU (it moves each model to the GPU only for its forward); "
            f"remove it on this {device.type} machine"
        )
    where = torch.device("cpu") if offload else device
    if target.run is None:
        pipe = load_base_pipeline(experiment.model).to(where)
    else:
        pipe, _ = load_run_pipeline(target.run["run_dir"], fuse=True, device=where)
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    return pipe


def evaluate_images(
    evaluation: Evaluation, target: Target, paths: list[Path], generation: dict[str, Any] | None = None,
    plan: EvaluationPlan | None = None, **extra: Any,
) -> records.EvalRecord:
    """Measure the images at ``paths`` (the prompts × seeds of ``plan``, by default the experiment's,
    in order) and write the eval record. The base model's images it is compared with are those of
    the same prompts and seeds."""
    from sdtune.metrics import MetricContext, compute_all, default_metric_names

    experiment, settings = evaluation.experiment, evaluation.experiment.evaluation
    plan = plan or experiment.plan
    pairs = plan.pairs()
    images = [Image.open(path).convert("RGB") for path in paths]
    in_domain = plan.pair_in_domain()
    base_images = evaluation.base_images
    if target.run is None or base_images is None:
        base_images = None
    elif plan != experiment.plan:
        base_images = [base_images[i] for i in plan.positions_in(experiment.plan)]
    context = MetricContext(
        images=images, prompts=[p for p, _ in pairs], seeds=[s for _, s in pairs],
        training_images=evaluation.references.images, in_domain=in_domain,
        base_images=base_images,
        style_labels=list(settings.style_labels), clip_model=settings.clip_model, dino_model=settings.dino_model,
        pickscore_model=settings.pickscore_model, hpsv2_model=settings.hpsv2_model,
        imagereward_model=settings.imagereward_model, loaders=evaluation.encoders.loaders(),
        reference_set=evaluation.references.set,
    )
    metrics = compute_all(context, settings.metrics or default_metric_names())
    run = target.run
    record = records.EvalRecord(
        label=target.label,
        metrics=metrics,
        images=[
            {"path": str(path.relative_to(evaluation.root)), "prompt": prompt, "seed": seed, "in_domain": domain}
            for path, (prompt, seed), domain in zip(paths, pairs, in_domain)
        ],
        config=run["config"] if run else experiment.to_dict(),  # the config the evaluated run used
        technique=run["technique"] if run else None,
        train_seed=target.train_seed,
        step=target.step,
        train_record=None if run is None else f"train-{target.label}-seed{target.train_seed}.json",
        model=experiment.model.path,
        generation=generation,
        references=evaluation.references.describe(),
        versions=records.package_versions(),
        git_commit=records.git_commit(),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    )
    records.write_record(evaluation.root / RECORDS_DIR / f"eval-{target.name}.json", record)
    if run is None:
        evaluation.base_images = images
    return record


def evaluate_training_steps(evaluation: Evaluation, run: dict[str, Any]) -> list[records.EvalRecord]:
    """Measure the images a run generated at ``evaluation.every_steps`` while it trained (the
    experiment's ``training_plan``: its prompts × the first seeds)."""
    evaluated = []
    plan = evaluation.experiment.training_plan
    for entry in run.get("evaluation") or []:
        if not entry.get("images"):
            continue
        folder = Path(run["run_dir"]) / entry["images"]
        paths = [folder / image_name(i, p, s) for i, (p, s) in enumerate(plan.pairs())]
        if not all(path.exists() for path in paths):
            continue  # generated for other prompts × seeds (the experiment changed since)
        target = Target(run["technique"]["name"], run, run["seeds"]["train"], entry["step"], final=False)
        evaluated.append(evaluate_images(evaluation, target, paths, entry.get("generation"), plan))
    return evaluated


def pipeline_sizes(path: str, variant: str | None = None) -> dict[str, int] | None:
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


def pipeline_parameters(pipe: Any) -> dict[str, int]:
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }


__all__ = [
    "BASE_LABEL", "Encoders", "Evaluation", "References", "Target",
    "evaluate_images", "evaluate_model", "evaluate_training_steps", "reference_images",
]
