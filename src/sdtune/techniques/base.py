"""The technique plug-in interface: which parameters train, how they are saved and loaded.

A technique never runs its own loop. The one loop in :mod:`sdtune.training.loop` asks it to ``prepare``
the model (freeze, inject adapters), trains whatever has ``requires_grad``, then asks it to
``save`` the result; ``load_into`` puts a saved result onto a base pipeline for generation. Its
options are a dataclass (:attr:`Technique.Options`), checked once by :meth:`Technique.validate_options`
when the experiment is resolved.

After training the loop checks that the technique trained what it claims
(:mod:`sdtune.training.trained_check`): the generic claims (every trainable tensor got a gradient and
moved, every frozen one stayed) are the loop's; each technique adds its own in
:meth:`Technique.trained_invariants`, judged on the :class:`TrainedEvidence` the loop observed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, ClassVar

import torch

from sdtune.config import ConfigError, build
from sdtune.errors import UserError
from sdtune.models import Model
from sdtune.records import CheckFailure
from sdtune.util.registry import Registry


class WeightsDoNotFit(UserError, RuntimeError):
    """A run's saved weights do not fit the pipeline they are loaded into (another base model)."""


@dataclass
class TechniqueOptions:
    """Options every technique accepts (besides overrides of ``train``)."""

    train_text_encoder: bool = False  # also train the text encoders (fully, or with an adapter)
    text_encoders: list[str] | None = None  # which ones; None = the family's usual (SD3: both CLIPs, not T5)
    text_encoder_learning_rate: float | None = None  # None = the technique's learning_rate


@dataclass(frozen=True)
class TrainedEvidence:
    """What the loop observed of a finished run, on which a technique's claims are judged."""

    trained: frozenset[str]  # the trainable tensors, <component>.<parameter>
    gradient: dict[str, bool] | None  # got a non-zero gradient at least once (None: not observable)
    moved: dict[str, bool]  # differs from its value at the start of the run
    rows: dict[str, tuple[tuple[bool | None, bool], ...]]  # per-row tensors: (gradient, moved) of each row
    layer_changes: dict[str, float]  # <component>.<module path> → ‖ΔW‖_F of each adapted layer (merged)
    unreachable: tuple[str, ...]  # the family's patterns of parameters no loss reaches

    def reachable(self, name: str) -> bool:
        """False for a tensor (or a layer's weight, given the layer's path) the conditioning never reaches."""
        return not any(fnmatchcase(name, p) or fnmatchcase(f"{name}.weight", p) for p in self.unreachable)

    def changed_components(self) -> set[str]:
        """Components with a trainable tensor that moved."""
        return {name.split(".", 1)[0] for name, moved in self.moved.items() if moved}


class Technique:
    """Base class of techniques; subclasses register themselves in :data:`TECHNIQUES`."""

    kind: ClassVar[str]
    Options: ClassVar[type] = TechniqueOptions
    saves_frozen_parts: ClassVar[bool] = False  # True when save() writes frozen weights too
    prior_preservation_refused: ClassVar[str] = ""  # why DreamBooth's prior loss cannot apply ("" = it can)
    single_file_refused: ClassVar[str] = ""  # why `export --single-file` does not apply ("" = it does)
    path_options: ClassVar[tuple[str, ...]] = ()  # options that name files (resolved against the experiment file)

    def __init__(self, options: Any) -> None:
        """``options``: the checked options dataclass (or its fields as a mapping, as records keep them)."""
        self.options = options if isinstance(options, self.Options) else self.Options(**options)

    # -- configuration --------------------------------------------------------------------------
    @classmethod
    def validate_options(cls, raw: dict[str, Any], where: str) -> Any:
        """Check a technique entry's own keys; return the options dataclass."""
        return build(cls.Options, raw, where)

    @classmethod
    def file_options(cls, options: Any) -> dict[str, Any]:
        """Checked options written back as an experiment file's keys (the inverse of validate_options)."""
        return dataclasses.asdict(options)

    @classmethod
    def check_family(cls, options: Any, family: type[Model], where: str) -> None:
        """Options that depend on the model family, checked when the experiment is resolved."""
        for name in options.text_encoders or []:
            if name not in family.text_encoder_names:
                raise ConfigError(
                    f"{where}.text_encoders: {name!r} is not a text encoder of {family.family}; it has: "
                    f"{', '.join(family.text_encoder_names)}"
                )

    # -- training ---------------------------------------------------------------------------------
    def prepare(self, model: Model) -> None:
        """Freeze everything, then make trainable what this technique trains."""
        for module in model.components.values():
            module.requires_grad_(False)
        self.make_trainable(model)

    def text_encoders_to_train(self, model: Model) -> list[str]:
        """The text encoders this technique trains (none unless ``train_text_encoder``)."""
        if not self.options.train_text_encoder:
            return []
        return loaded_text_encoders(model, self.options.text_encoders or list(model.trained_text_encoders))

    def make_trainable(self, model: Model) -> None:
        raise NotImplementedError

    def check_captions(self, captions: list[str]) -> None:
        """Refuse a training set this technique cannot learn from (textual inversion: no caption names
        its placeholder); ``captions`` as written, prefix and suffix included."""

    def transform_caption(self, caption: str) -> str:
        """A caption as the text encoders see it in training (textual inversion spells out its
        placeholder's vectors); unchanged for most techniques. Applied to the caption as it is
        finally built (after ``data.shuffle_captions``, prefix and suffix), and to validation captions."""
        return caption

    def parameter_groups(self, parameters: dict[str, torch.nn.Parameter], learning_rate: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups of ``parameters`` (named ``<component>.<parameter>``), all at
        ``learning_rate`` unless the technique says otherwise (LoRA+: the B matrices higher)."""
        return [{"params": list(parameters.values()), "lr": learning_rate}] if parameters else []

    # -- what it claims (the trained-what-it-claims check, sdtune.training.trained_check) ---------------
    def claimed_components(self, model: Model) -> list[str]:
        """The components this technique changes: the denoiser, and the text encoders it trains."""
        return [model.denoiser_name, *self.text_encoders_to_train(model)]

    def per_row_parameters(self) -> tuple[str, ...]:
        """fnmatch patterns (``<component>.<parameter>``) of tensors each of whose rows is a claim of its
        own (textual inversion: one vector per row); the loop watches their rows' gradients."""
        return ()

    def trained_invariants(self, model: Model, evidence: TrainedEvidence) -> list[CheckFailure]:
        """This technique's own claims, judged on what the loop observed (``model``: as trained, EMA
        weights in). Base: it changed exactly the components it claims to train."""
        claimed = set(self.claimed_components(model))
        changed = evidence.changed_components()
        failures = [
            CheckFailure("component", name, f"the technique trains the {name}, but none of its tensors moved")
            for name in sorted(claimed - changed)
        ]
        failures += [
            CheckFailure("component", name, f"tensors of the {name} moved, which the technique does not train")
            for name in sorted(changed - claimed)
        ]
        return failures

    # -- outputs ----------------------------------------------------------------------------------
    def save(self, model: Model, out_dir: Path) -> dict[str, list[str]]:
        """Write the trained result to ``out_dir``; return component → files written (relative)."""
        raise NotImplementedError

    @classmethod
    def load_into(cls, pipe: Any, run_dir: Path, options: dict[str, Any]) -> Any:
        """Apply a saved result to ``pipe`` (a base pipeline) and return the pipeline to sample from."""
        raise NotImplementedError

    @classmethod
    def restore(cls, model: Model, run_dir: Path, options: dict[str, Any]) -> Model:
        """The run's trained state on ``model`` (a fresh base model), as training left it: adapters
        injected and not merged (``sdtune anatomy`` compares it with the base). Default: what
        :meth:`load_into` does to the model's pipeline, whose components are the model's own."""
        pipe = cls.load_into(model.pipeline(), run_dir, options)
        return type(model).from_pipeline(pipe, model.source)

    @classmethod
    def own_pipeline(cls, run_dir: Path) -> bool:
        """True when the run folder is itself a complete pipeline (no base model needed)."""
        return False

    @classmethod
    def merge(cls, pipe: Any) -> Any:
        """Fold a loaded result into the plain weights of ``pipe`` (for ``export --merged``)."""
        return pipe


TECHNIQUES: Registry[type[Technique]] = Registry("technique")


def loaded_text_encoders(model: Model, names: list[str]) -> list[str]:
    """``names`` (the ``text_encoders`` option, or a default), each checked to be loaded in ``model``."""
    missing = [name for name in names if name not in model.loaded_text_encoders]
    if missing:
        raise ConfigError(
            f"text_encoders: {missing[0]!r} is not loaded (model.text_encoder_3: false?); loaded: "
            f"{', '.join(model.loaded_text_encoders)}"
        )
    return names


def trainable_named_parameters(model: Model) -> dict[str, torch.nn.Parameter]:
    """Every parameter with requires_grad, named ``<component>.<parameter>`` (``unet.…``,
    ``transformer.…``, ``text_encoder_2.…``)."""
    named = {}
    for prefix in model.trainable_names():
        for name, parameter in model.components[prefix].named_parameters():
            if parameter.requires_grad:
                named[f"{prefix}.{name}"] = parameter
    return named


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def files_under(out_dir: Path, paths: list[Path]) -> list[str]:
    """Paths relative to out_dir, expanding folders to the files they hold."""
    result = []
    for path in paths:
        if path.is_dir():
            result += sorted(str(p.relative_to(out_dir)) for p in path.rglob("*") if p.is_file())
        elif path.exists():
            result.append(str(path.relative_to(out_dir)))
    return result


def reject_unknown(raw: dict[str, Any], allowed: set[str], where: str, what: str) -> None:
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: not an option of {what}; allowed: {', '.join(sorted(allowed))}")
