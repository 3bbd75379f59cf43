"""What a run is: the settings that shape its numbers, written into every checkpoint and compared
when the run is resumed, so that a resumed run is the run it claims to be.

A :class:`RunFingerprint` holds the resolved technique (kind and every option, peft's included),
its own train settings (learning rate, schedule, seed, precision, EMA, objective…), the model
(path, detected family, revision, variant, VAE…), the data section and a digest of the training
rows as the text encoders see them (which images, their sizes and repeats, the captions after the
technique's transform), DreamBooth's class-image settings when they apply, the run's length and
total batch, and how it is spread over processes. :func:`compare` sorts the differences between a
checkpoint's fingerprint and the resumed run's into the refused ones and the ones that are safe to
change on resume (:data:`SAFE_ON_RESUME`, :data:`SAFE_AT_THE_SAME_TOTAL_BATCH`, and the run's
length under a schedule that does not depend on it); the safe ones are recorded in the train
record (``changed_on_resume``). See docs/resume.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sdtune.data.dataset import TrainingSet
from sdtune.experiment import Experiment

# Keys whose change on resume leaves every number the run computes as it was: what they change is
# when things are logged, saved or cached, or how images are decoded.
SAFE_ON_RESUME: dict[str, str] = {
    "train.log_every": "when losses are read back and logged (every step's loss is recorded either way)",
    "train.checkpointing_steps": "when checkpoints are written",
    "train.checkpoints_total_limit": "how many checkpoints are kept",
    "train.keep_freed_cpu_memory": "the CPU allocator's behaviour, not its results",
    "data.num_workers": "how many processes decode images (the same images, in the same order)",
    "data.cache": "where encoded latents are kept (the cached and uncached paths train the same numbers)",
    "data.cache_memory_limit_gb": "where an automatic cache is kept",
}
# Keys that may change on resume as long as the total batch (batch × accumulation × processes) is
# the same: every sample and its random draws follow its global position, so the same samples are
# seen with the same noise; only the order in which gradients are summed (and, with module
# dropout, its draws) depends on the split.
SAFE_AT_THE_SAME_TOTAL_BATCH: dict[str, str] = {
    "train.batch_size": "the per-process micro-batch",
    "train.gradient_accumulation_steps": "the micro-steps per optimizer step",
    "run.num_processes": "the number of processes",
    "run.sharding": "FSDP2 / DeepSpeed or whole weights per process (checkpoints hold whole tensors)",
}
# Learning-rate schedules whose value at a step does not depend on the run's length: with these
# (only) a resumed run may be given another max_train_steps and still equal a run started with it.
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")
_LENGTH_KEY = "run.max_steps"


@dataclass(frozen=True)
class RunFingerprint:
    """The settings that shape a run (see the module docstring). ``data_rows`` and the ``run_*``
    fields are known only once the run is set up (``data_rows`` None before)."""

    technique: dict[str, Any]  # kind and options as an experiment file writes them
    train: dict[str, Any]  # this technique's resolved train settings, its length left out (run_max_steps)
    model: dict[str, Any]  # the model section, family detected
    data: dict[str, Any]  # the data section
    dreambooth: dict[str, Any] | None  # the class images' settings, when this technique uses them
    data_rows: str | None = None  # digest of the training rows (see :func:`rows_digest`)
    run_max_steps: int | None = None  # optimizer steps (max_train_steps, or num_epochs resolved)
    run_total_batch: int | None = None  # batch × accumulation × processes
    run_num_processes: int | None = None
    run_sharding: str | None = None  # fsdp2 | deepspeed | None

    @classmethod
    def of_config(cls, experiment: Experiment, name: str) -> RunFingerprint:
        """What the experiment file says (checked before anything loads)."""
        item = experiment.techniques[name]
        train = dataclasses.asdict(item.train)
        for key in ("max_train_steps", "num_epochs"):  # the length is compared resolved (run_max_steps)
            train.pop(key)
        dreambooth = experiment.dreambooth if item.train.prior_preservation else None
        return cls(
            technique={"kind": item.kind, **item.plugin.file_options(item.options)},
            train=train,
            model=dataclasses.asdict(experiment.model),
            data=dataclasses.asdict(experiment.data),
            dreambooth=dataclasses.asdict(dreambooth) if dreambooth is not None else None,
        )

    @classmethod
    def of_run(
        cls, experiment: Experiment, name: str, training_set: TrainingSet, max_steps: int, total_batch: int,
        num_processes: int, sharding: str | None,
    ) -> RunFingerprint:
        """Everything, once the run is set up."""
        return dataclasses.replace(
            cls.of_config(experiment, name), data_rows=rows_digest(training_set), run_max_steps=max_steps,
            run_total_batch=total_batch, run_num_processes=num_processes, run_sharding=sharding,
        )

    def flat(self) -> dict[str, Any]:
        """``section.key`` → value (JSON values), as a checkpoint keeps it; unknown parts left out."""
        flat: dict[str, Any] = {}
        for section in ("technique", "train", "model", "data", "dreambooth"):
            for key, value in (getattr(self, section) or {}).items():
                flat[f"{section}.{key}"] = value
        if self.data_rows is not None:  # set up: the rest is known too
            flat["data.rows"] = self.data_rows
            for field in ("max_steps", "total_batch", "num_processes", "sharding"):
                flat[f"run.{field}"] = getattr(self, f"run_{field}")
        return json.loads(json.dumps(flat, default=str))  # tuples → lists, paths → strings: as read back


def rows_digest(training_set: TrainingSet) -> str:
    """A digest of the training rows: which dataset rows train, their sizes, repeats, masks and
    buckets, and each caption as the text encoders see it (prefix, suffix and the technique's
    transform applied). The image files' bytes are not read (a folder of thousands would be read
    again on every resume); an image replaced by another of the same size goes unnoticed."""
    described = {
        "rows": training_set.indices, "sizes": training_set.sizes, "repeats": training_set.repeats,
        "captions": training_set.captions, "raw_captions": training_set.raw_captions,
        "masks": [mask is not None for mask in training_set.masks], "buckets": training_set.buckets,
        "bucket_of": training_set.bucket_of,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Change:
    """One setting that differs between a checkpoint and the resumed run."""

    key: str
    before: Any
    after: Any
    why: str = ""  # refused: why; accepted: what it changes

    def describe(self) -> str:
        return f"{self.key} {_shown(self.before)} → {_shown(self.after)}" + (f" ({self.why})" if self.why else "")

    def as_record(self, step: int) -> dict[str, Any]:
        return {"step": step, "key": self.key, "before": self.before, "after": self.after}


def compare(saved: dict[str, Any], current: dict[str, Any], steps_done: int) -> tuple[list[Change], list[Change]]:
    """(refused, accepted) differences between a checkpoint's fingerprint (``saved``, flat) and the
    resumed run's (``current``, flat); a key either side does not know is not compared."""
    refused, accepted = [], []
    total_batch_kept = saved.get("run.total_batch") == current.get("run.total_batch") or "run.total_batch" not in current
    for key in sorted(set(saved) & set(current)):
        before, after = saved[key], current[key]
        if before == after:
            continue
        if key in SAFE_ON_RESUME:
            accepted.append(Change(key, before, after, SAFE_ON_RESUME[key]))
        elif key in SAFE_AT_THE_SAME_TOTAL_BATCH and total_batch_kept:
            accepted.append(Change(key, before, after, SAFE_AT_THE_SAME_TOTAL_BATCH[key]))
        elif key == _LENGTH_KEY:
            length_change(saved, current, steps_done, refused, accepted)
        else:
            refused.append(Change(key, before, after))
    return refused, accepted


def length_change(saved: dict[str, Any], current: dict[str, Any], steps_done: int, refused: list, accepted: list) -> None:
    """Another number of steps: honest only when the LR at every step does not depend on the run's
    length (a cosine or linear decay stretched mid-run would follow neither curve) and the steps
    already done fit in it."""
    before, after = saved[_LENGTH_KEY], current[_LENGTH_KEY]
    schedule = current.get("train.lr_scheduler")
    if after < steps_done:
        refused.append(Change(_LENGTH_KEY, before, after, f"the run has done {steps_done} steps already"))
    elif schedule not in LENGTH_FREE_SCHEDULES:
        refused.append(Change(
            _LENGTH_KEY, before, after,
            f"the {schedule} learning-rate schedule is laid out over the run's length, so the steps done "
            f"followed another curve; only {' or '.join(LENGTH_FREE_SCHEDULES)} runs may change it",
        ))
    else:
        accepted.append(Change(_LENGTH_KEY, before, after, f"the {schedule} schedule does not depend on the length"))


def _shown(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"
