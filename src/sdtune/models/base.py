"""The model-family boundary: a loaded bundle of components, and the interface a family implements.

A family (SD1/2, SDXL, SD3, …) owns everything model-specific: which components it has (a
denoiser — UNet or transformer —, a VAE, any number of text encoders and tokenizers), how captions
become a conditioning object, how the denoiser is called, how latents are scaled and shifted, its
pipeline class, its noise objective (DDPM or rectified flow), its kohya key prefixes, its
partial-training presets and its default adapter targets. Techniques, checkpoints, records, the
cache and generation iterate over :attr:`ModelFamily.text_encoders` and
:attr:`ModelFamily.denoiser` and never spell a component's name.

Most of the work is generic and lives here: a family file declares its class attributes and
writes ``encode_prompt`` and ``predict`` (and ``image_conditioning`` where it has any).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from sdtune.errors import UserError
from sdtune.util.registry import Registry

if TYPE_CHECKING:
    from sdtune.config.sections import ModelConfig, TrainConfig

Conditioning = dict[str, torch.Tensor]  # batch-first tensors the denoiser takes besides latents
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


class ModelLoadError(UserError, RuntimeError):
    """The base model could not be loaded; the message says what was tried and how to fix it."""


@dataclass
class ModelBundle:
    """The loaded components of a text-to-image model, as the training loop uses them."""

    family: ModelFamily
    components: dict[str, torch.nn.Module]  # denoiser, "vae", and the family's text encoders present
    tokenizers: dict[str, Any]  # "tokenizer", "tokenizer_2", … (as the pipeline names them)
    noise_scheduler: Any  # the training schedule (DDPMScheduler, or the flow-matching scheduler)
    inference_scheduler: Any  # the scheduler the model ships for sampling
    source: str  # where it was loaded from (path or hub id)
    extras: dict[str, Any] = field(default_factory=dict)  # other pipeline parts (none trainable)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.components[self.family.denoiser]

    @property
    def vae(self) -> torch.nn.Module:
        return self.components["vae"]

    def text_encoder_names(self) -> list[str]:
        """The family's text encoders that this model has (SD3 may be loaded without T5)."""
        return [name for name in self.family.text_encoders if self.components.get(name) is not None]

    def trainable_names(self) -> list[str]:
        """Components a technique may train: the denoiser, then each text encoder."""
        return [self.family.denoiser, *self.text_encoder_names()]

    def replace(self, **components: torch.nn.Module) -> ModelBundle:
        return ModelBundle(
            self.family, {**self.components, **components}, self.tokenizers, self.noise_scheduler,
            self.inference_scheduler, self.source, self.extras,
        )


class ModelFamily:
    """How one family of models is loaded and fed. Subclasses fill in the class attributes and
    write :meth:`encode_prompt` and :meth:`predict`."""

    name: ClassVar[str]
    pipeline_class_name: ClassVar[str]  # the diffusers pipeline class
    denoiser: ClassVar[str]  # "unet" or "transformer": the component that is fine-tuned
    text_encoders: ClassVar[tuple[str, ...]]  # every text encoder, in the pipeline's naming
    trained_text_encoders: ClassVar[tuple[str, ...]]  # those `train_text_encoder: true` trains
    objective: ClassVar[str]  # "ddpm" or "flow" (see sdtune.diffusion)
    default_resolution: ClassVar[int]
    kohya_prefixes: ClassVar[dict[str, str] | None] = None  # component → kohya key prefix; None: no kohya file
    partial_presets: ClassVar[dict[str, list[str]]] = {}  # preset → fnmatch patterns of denoiser parameters
    adapter_targets: ClassVar[dict[str, list[str]]] = {}  # component → default adapter target modules
    vae_in_fp32: ClassVar[bool] = False  # keep the VAE in fp32 under mixed precision (SDXL's VAE overflows in fp16)
    pipeline_extras: ClassVar[dict[str, Any]] = {}  # constructor arguments of non-trainable pipeline parts
    detects_pipelines: ClassVar[tuple[str, ...]] = ()  # model_index.json class names this family loads
    single_file_types: ClassVar[tuple[str, ...]] = ()  # diffusers' inferred single-file model types
    generation_kwargs: ClassVar[dict[str, Any]] = {}  # pipeline call arguments that match training (SD3: T5 length)
    # export facts (sdtune.formats.single_file, sdtune.formats.community):
    single_file_layout: ClassVar[dict[str, tuple[str, str]]] = {}  # component → (original key prefix, layout)
    community_prefixes: ClassVar[dict[str, str]] = {}  # component → key prefix of kohya/LyCORIS adapter files
    embedding_keys: ClassVar[dict[str, str]] = {}  # text encoder → its key in A1111/ComfyUI embedding files
    modelspec_architecture: ClassVar[str] = ""  # the ModelSpec (kohya, A1111) name of the base architecture
    kohya_base_model_version: ClassVar[str] = ""  # kohya's ss_base_model_version ("sd_v1", "sdxl_base_v1-0")
    kohya_trainer_names_unet: ClassVar[str] = "diffusers"  # how kohya sd-scripts' own trainer names the
    # denoiser's layers, and so sdtune's community files: "diffusers" (SD1/2), "sgm" (SDXL: input_blocks_…), "none"

    # -- the family's own maths ---------------------------------------------------------------------
    def encode_prompt(self, bundle: ModelBundle, captions: list[str]) -> Conditioning:
        """Captions → the text conditioning (with gradients when a text encoder trains)."""
        raise NotImplementedError

    def image_conditioning(self, geometry: torch.Tensor) -> Conditioning:
        """Per-sample conditioning from the image geometry: rows of (original height, original width,
        crop top, crop left, target height, target width). Only SDXL uses it (micro-conditioning)."""
        return {}

    def predict(
        self, bundle: ModelBundle, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def matches_index(cls, model: str, revision: str | None = None) -> bool:
        """Tell apart families that share a pipeline class (SD1 and SD2) by their component configs."""
        return True

    def text_encoder_kwargs(self, path: str, config: ModelConfig | None) -> dict[str, Any]:
        """Pipeline loading arguments that drop optional text encoders (SD3: T5)."""
        return {}

    # -- generic: latents ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, bundle: ModelBundle, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior (mean, std) of pixels in [-1, 1], without gradients."""
        posterior = bundle.vae.encode(pixels.to(bundle.vae.dtype)).latent_dist
        return posterior.mean, posterior.std

    def native_resolution(self, config: ModelConfig) -> int:
        """The model's training resolution: its denoiser's sample size × the VAE's downsampling
        (512 for SD1.5, 768 for SD2.1, 1024 for SDXL and SD3); the family's default when unreadable."""
        if Path(config.path).expanduser().is_file():
            return self.default_resolution
        denoiser = read_model_json(config.path, f"{self.denoiser}/config.json", config.revision) or {}
        vae = read_model_json(config.path, "vae/config.json", config.revision) or {}
        if not denoiser.get("sample_size") or not vae.get("block_out_channels"):
            return self.default_resolution
        return int(denoiser["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)

    def latent_scale(self, bundle: ModelBundle) -> float:
        return float(bundle.vae.config.scaling_factor)

    def latent_shift(self, bundle: ModelBundle) -> float:
        """SD3's VAE centres its latents: z' = (z − shift) · scale."""
        return float(getattr(bundle.vae.config, "shift_factor", None) or 0.0)

    def latent_channels(self, bundle: ModelBundle) -> int:
        return int(bundle.vae.config.latent_channels)

    def vae_downsampling(self, bundle: ModelBundle) -> int:
        return 2 ** (len(bundle.vae.config.block_out_channels) - 1)

    # -- generic: the training objective ---------------------------------------------------------
    def training_objective(self, bundle: ModelBundle, config: TrainConfig) -> Any:
        """The objective of :mod:`sdtune.diffusion` with this model's schedule and the run's options."""
        from sdtune import diffusion

        schedule = bundle.noise_scheduler.config
        if self.objective == "flow":
            return diffusion.FlowMatchingObjective(
                num_train_timesteps=int(schedule.num_train_timesteps),
                shift=float(schedule.get("shift", 1.0)),
                sampling=config.timestep_sampling or "logit_normal",
                logit_mean=config.logit_mean,
                logit_std=config.logit_std,
                mode_scale=config.mode_scale,
                weighting=config.flow_weighting or "none",
            )
        return diffusion.DDPMObjective(
            alphas_cumprod=bundle.noise_scheduler.alphas_cumprod,
            prediction_type=config.prediction_type or schedule.prediction_type,
            snr_gamma=config.snr_gamma,
        )

    # -- generic: loading and pipelines ----------------------------------------------------------
    def pipeline_class(self) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def detects(self, config: ModelConfig) -> bool:
        """True when this family loads the model (``family: auto``); reads model_index.json."""
        return detect_family_name(config) == self.name

    def load(self, config: ModelConfig, dtype: torch.dtype = torch.float32) -> ModelBundle:
        pipe = self.load_pipeline(config.path, dtype, config)
        return self.bundle_from_pipeline(pipe, config.path)

    def bundle_from_pipeline(self, pipe: Any, source: str) -> ModelBundle:
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        parts = pipe.components
        components = {name: parts[name] for name in (self.denoiser, "vae", *self.text_encoders) if parts.get(name) is not None}
        tokenizers = {name: value for name, value in parts.items() if name.startswith("tokenizer") and value is not None}
        training_scheduler = FlowMatchEulerDiscreteScheduler if self.objective == "flow" else DDPMScheduler
        return ModelBundle(
            family=self,
            components=components,
            tokenizers=tokenizers,
            noise_scheduler=training_scheduler.from_config(pipe.scheduler.config),
            inference_scheduler=pipe.scheduler,
            source=source,
            extras={k: v for k, v in parts.items() if k not in components and k not in tokenizers and k != "scheduler"},
        )

    def build_pipeline(self, bundle: ModelBundle) -> Any:
        parts = {**bundle.extras, **bundle.components, **bundle.tokenizers, "scheduler": bundle.inference_scheduler}
        accepted = set(self.pipeline_class()._get_signature_keys(self.pipeline_class())[0])
        for name in self.text_encoders:  # optional encoders left out at load time
            parts.setdefault(name, None)
            parts.setdefault(name.replace("text_encoder", "tokenizer"), None)
        arguments = {k: v for k, v in {**self.pipeline_extras, **parts}.items() if k in accepted}
        return self.pipeline_class()(**arguments)

    def load_pipeline(self, path: str, dtype: torch.dtype = torch.float32, config: ModelConfig | None = None) -> Any:
        """The diffusers pipeline at ``path`` (a folder, hub id or single file), with the config's
        revision, variant, separate VAE and dropped text encoders."""
        options: dict[str, Any] = {k: v for k, v in self.pipeline_extras.items() if v is None or isinstance(v, bool)}
        if dtype != torch.float32:  # (the keyword was renamed across diffusers versions; fp32 is the default)
            options["torch_dtype"] = dtype
        options.update(self.text_encoder_kwargs(path, config))
        if config is not None:
            options.update({k: v for k, v in (("revision", config.revision), ("variant", config.variant)) if v})
            if config.vae:
                options["vae"] = load_vae(config.vae, dtype)
        pipeline_class = self.pipeline_class()
        with load_errors(path):
            if Path(path).expanduser().is_file():
                options.pop("variant", None)
                if config is not None and config.single_file_config:
                    options["config"] = config.single_file_config
                return pipeline_class.from_single_file(path, **options)
            return pipeline_class.from_pretrained(path, **options)


def load_vae(path: str, dtype: torch.dtype) -> Any:
    """A separately distributed VAE (e.g. the fp16-fixed SDXL VAE): a folder, hub id or single file."""
    from diffusers import AutoencoderKL

    with load_errors(path):
        if Path(path).expanduser().is_file():
            return AutoencoderKL.from_single_file(path)
        folder = Path(path).expanduser()
        subfolder = "vae" if (folder / "vae" / "config.json").exists() else None
        return AutoencoderKL.from_pretrained(path, subfolder=subfolder)


FAMILIES: Registry[type[ModelFamily]] = Registry("model family")


def family_for(config: ModelConfig) -> ModelFamily:
    """The family named in the config, or the one detected from the model (``family: auto``)."""
    if config.family != "auto":
        return FAMILIES.get(config.family)()
    return FAMILIES.get(detect_family_name(config))()


def detect_family_name(config: ModelConfig) -> str:
    """The registered family of a model, from its model_index.json (folder, hub id) or, for a
    single file, its config folder or the checkpoint's keys; a clear error when it cannot tell."""
    path = Path(config.path).expanduser()
    if path.is_file():
        if config.single_file_config:
            return _family_of_index(_read_index(config.single_file_config), config.single_file_config)
        return _family_of_single_file(path)
    return _family_of_index(_read_index(config.path, config.revision), config.path, config.revision)


def read_model_json(path: str, file: str, revision: str | None = None) -> dict[str, Any] | None:
    """A JSON file of a local pipeline folder or hub repo (None when it cannot be read)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return json.loads((folder / file).read_text()) if (folder / file).exists() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, file, revision=revision)).read_text())
    except Exception:
        return None


def _read_index(path: str, revision: str | None = None) -> dict[str, Any]:
    index = read_model_json(path, "model_index.json", revision)
    if index is None and Path(path).expanduser().is_dir():
        raise ModelLoadError(f"model {path!r}: no model_index.json; give a diffusers pipeline folder")
    if index is None:
        raise ModelLoadError(
            f"model {path!r}: cannot read its model_index.json (offline, or not a pipeline repo), so its "
            f"family cannot be detected; set model.family to one of: {', '.join(FAMILIES.names())}"
        )
    return index


def _family_of_index(index: dict[str, Any], where: str, revision: str | None = None) -> str:
    pipeline = index.get("_class_name")
    for name in FAMILIES:
        family = FAMILIES.get(name)
        if pipeline in family.detects_pipelines and family.matches_index(where, revision):
            return name
    raise ModelLoadError(
        f"model {where!r} is a {pipeline}, which no registered family trains; set model.family to one of: "
        f"{', '.join(FAMILIES.names())}"
    )


def _family_of_single_file(path: Path) -> str:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if path.suffix != ".safetensors":
        raise ModelLoadError(
            f"model {str(path)!r}: the family of a .ckpt file is not detected; set model.family "
            f"({', '.join(FAMILIES.names())}) or model.single_file_config"
        )
    try:
        model_type = infer_diffusers_model_type(_LazySafetensors(path))
    except Exception as error:
        raise ModelLoadError(f"model {str(path)!r}: not a readable checkpoint ({error}); set model.family") from None
    for name in FAMILIES:
        if model_type in FAMILIES.get(name).single_file_types:
            return name
    raise ModelLoadError(
        f"model {str(path)!r} looks like a {model_type!r} checkpoint, which no registered family trains; set "
        f"model.family to one of: {', '.join(FAMILIES.names())}"
    )


class _LazySafetensors(Mapping):
    """A safetensors file as a mapping that reads a tensor only when asked (for key-based detection)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class load_errors:
    """Turn the many exceptions of hub/local loading into one clear line."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or not isinstance(exc, (OSError, ValueError, EnvironmentError, KeyError)):
            return False
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        local = Path(self.path).expanduser().exists()
        fix = (
            "check that the folder is a diffusers pipeline (model_index.json and one folder per component)"
            if local
            else "the hub may be unreachable: download the model and give its local folder, or a single "
            ".safetensors file with model.single_file_config"
        )
        raise ModelLoadError(f"could not load model {self.path!r}: {first_line[:300]}; {fix}") from exc
