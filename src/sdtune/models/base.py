"""The model-family boundary: :class:`Model`, a loaded text-to-image model of one family.

A family (SD1/2, SDXL, SD3, …) is one subclass in one file. Its class attributes are the family's
facts (which components it has — a denoiser, UNet or transformer, a VAE, any number of text
encoders and tokenizers —, its pipeline class, its objective, presets and adapter targets); its
instance holds the loaded components. It writes how captions become a conditioning object
(:meth:`Model.encode_prompt`) and how the denoiser is called (:meth:`Model.predict`). Techniques,
checkpoints, records, the cache and generation iterate over :attr:`Model.text_encoder_names` and
:attr:`Model.denoiser_name` and never spell a component's name. What other tools call the
components (kohya prefixes, single-file layout) lives in :mod:`sdtune.formats.families`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from sdtune.config import ModelConfig
from sdtune.diffusion import NoiseSchedule
from sdtune.models.files import load_errors, load_vae, read_model_json
from sdtune.util.registry import Registry

Conditioning = dict[str, torch.Tensor]  # batch-first tensors the denoiser takes besides latents
# text-encoder layers by role (CLIP: self_attn, mlp, embeddings; T5: SelfAttention, DenseReluDense, shared)
TEXT_ENCODER_KINDS = (
    ("self_attn", "self-attention"), ("SelfAttention", "self-attention"), ("mlp", "feed-forward"),
    ("DenseReluDense", "feed-forward"), ("embed", "embedding"), ("shared", "embedding"), ("projection", "projection"),
)


class Model:
    """A loaded model of one family. Subclasses fill in the class attributes and write
    :meth:`encode_prompt` and :meth:`predict` (and :meth:`image_conditioning` where they have any)."""

    family: ClassVar[str]  # the registered name: sd1, sd2, sdxl, sd3
    pipeline_class_name: ClassVar[str]  # the diffusers pipeline class
    denoiser_name: ClassVar[str]  # "unet" or "transformer": the component that is fine-tuned
    text_encoder_names: ClassVar[tuple[str, ...]]  # every text encoder of the family, in the pipeline's naming
    trained_text_encoders: ClassVar[tuple[str, ...]]  # those `train_text_encoder: true` trains
    objective: ClassVar[str]  # "ddpm" or "flow" (see sdtune.diffusion)
    default_resolution: ClassVar[int]
    partial_presets: ClassVar[dict[str, list[str]]] = {}  # preset → fnmatch patterns of denoiser parameters
    adapter_targets: ClassVar[dict[str, list[str]]] = {}  # component → default adapter target modules
    vae_in_fp32: ClassVar[bool] = False  # keep the VAE in fp32 under mixed precision (SDXL's VAE overflows in fp16)
    pipeline_extras: ClassVar[dict[str, Any]] = {}  # constructor arguments of non-trainable pipeline parts
    detects_pipelines: ClassVar[tuple[str, ...]] = ()  # model_index.json class names this family loads
    single_file_types: ClassVar[tuple[str, ...]] = ()  # diffusers' inferred single-file model types
    generation_kwargs: ClassVar[dict[str, Any]] = {}  # pipeline call arguments that match training (SD3: T5 length)
    swappable_blocks: ClassVar[str | None] = None  # the denoiser's ModuleList that train.block_swap may swap

    def __init__(
        self,
        components: dict[str, torch.nn.Module],
        tokenizers: dict[str, Any],
        noise_scheduler: Any,
        inference_scheduler: Any,
        source: str,
        extras: dict[str, Any] | None = None,
    ) -> None:
        self.components = components  # denoiser, "vae", and the family's text encoders present
        self.tokenizers = tokenizers  # "tokenizer", "tokenizer_2", … (as the pipeline names them)
        self.noise_scheduler = noise_scheduler  # the training schedule (DDPM, or flow matching)
        self.inference_scheduler = inference_scheduler  # the scheduler the model ships for sampling
        self.source = source  # where it was loaded from (path or hub id)
        self.extras = extras or {}  # other pipeline parts (none trainable)

    # -- components ----------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.components[self.denoiser_name]

    @property
    def vae(self) -> torch.nn.Module:
        return self.components["vae"]

    @property
    def loaded_text_encoders(self) -> list[str]:
        """The family's text encoders that this model has (SD3 may be loaded without T5)."""
        return [name for name in self.text_encoder_names if self.components.get(name) is not None]

    def trainable_names(self) -> list[str]:
        """Components a technique may train: the denoiser, then each text encoder."""
        return [self.denoiser_name, *self.loaded_text_encoders]

    def replace(self, **components: torch.nn.Module) -> Model:
        """The same model with some components swapped (prepared or gathered ones)."""
        return type(self)(
            {**self.components, **components}, self.tokenizers, self.noise_scheduler, self.inference_scheduler,
            self.source, self.extras,
        )

    # -- where a layer lives (the anatomy of a weight change, sdtune.anatomy) ----------------------
    @classmethod
    def layer_place(cls, component: str, path: str) -> tuple[str, str]:
        """(block, kind) of the weight layer at ``path`` in ``component``: where a change lives. A text
        encoder is one block (its name); the family names its denoiser's blocks and kinds
        (:meth:`denoiser_place`)."""
        if component == cls.denoiser_name:
            return cls.denoiser_place(path)
        kind = next((name for marker, name in TEXT_ENCODER_KINDS if marker in path), "other")
        return component, kind

    @classmethod
    def denoiser_place(cls, path: str) -> tuple[str, str]:
        """(block, kind) of a denoiser layer; the family's file says (UNet blocks, transformer depth)."""
        return cls.denoiser_name, "other"

    @classmethod
    def blocks_in_order(cls, blocks: list[str]) -> list[str]:
        """``blocks`` (names :meth:`layer_place` gave) in the order data flows through the model: the
        denoiser's from input to output, then the text encoders."""
        encoders = [name for name in cls.text_encoder_names if name in blocks]
        return [name for name in blocks if name not in encoders] + encoders

    def unreachable_parameters(self) -> list[str]:
        """fnmatch patterns (``<component>.<parameter>``) of parameters the family's conditioning never
        uses, so that no loss gives them a gradient (SDXL: CLIP-L's last layer, as it conditions on the
        penultimate one). A technique may wrap them, but they cannot train; the trained-what-it-claims
        check names them instead of failing on them."""
        return []

    # -- the family's own maths ------------------------------------------------------------------
    def encode_prompt(self, captions: list[str]) -> Conditioning:
        """Captions → the text conditioning (with gradients when a text encoder trains)."""
        raise NotImplementedError

    def image_conditioning(self, geometry: torch.Tensor) -> Conditioning:
        """Per-sample conditioning from the image geometry: rows of (original height, original width,
        crop top, crop left, target height, target width). Only SDXL uses it (micro-conditioning)."""
        return {}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior (mean, std) of pixels in [-1, 1], without gradients."""
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return posterior.mean, posterior.std

    # -- latents ---------------------------------------------------------------------------------
    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_shift(self) -> float:
        """SD3's VAE centres its latents: z' = (z − shift) · scale."""
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_downsampling(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pixel_stride(self) -> int:
        """The pixel multiple every image side must be: the VAE's downsampling × what the denoiser needs
        of a latent side (a UNet halves it once per down block but the last; a transformer patchifies)."""
        config = self.denoiser.config
        patch = int(config.get("patch_size") or 1)
        blocks = len(config.get("down_block_types") or ())
        return max(patch, 2 ** max(blocks - 1, 0)) * self.vae_downsampling

    def noise_schedule(self) -> NoiseSchedule:
        """The training schedule's facts, from which :func:`sdtune.diffusion.build_objective` builds the
        objective (the model knows its schedule, not the run's options)."""
        schedule = self.noise_scheduler.config
        if self.objective == "flow":
            return NoiseSchedule(int(schedule.num_train_timesteps), shift=float(schedule.get("shift", 1.0)))
        return NoiseSchedule(
            int(schedule.num_train_timesteps), alphas_cumprod=self.noise_scheduler.alphas_cumprod,
            prediction_type=schedule.prediction_type,
        )

    # -- pipelines -------------------------------------------------------------------------------
    @classmethod
    def pipeline_class(cls) -> Any:
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    def pipeline(self) -> Any:
        """A diffusers pipeline of this model's components (shared, not copied)."""
        parts = {**self.extras, **self.components, **self.tokenizers, "scheduler": self.inference_scheduler}
        pipeline_class = self.pipeline_class()
        accepted = set(pipeline_class._get_signature_keys(pipeline_class)[0])
        for name in self.text_encoder_names:  # optional encoders left out at load time
            parts.setdefault(name, None)
            parts.setdefault(name.replace("text_encoder", "tokenizer"), None)
        arguments = {k: v for k, v in {**self.pipeline_extras, **parts}.items() if k in accepted}
        return pipeline_class(**arguments)

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, config: ModelConfig, dtype: torch.dtype = torch.float32) -> Model:
        return cls.from_pipeline(cls.load_pipeline(config.path, dtype, config), config.path)

    @classmethod
    def from_pipeline(cls, pipe: Any, source: str) -> Model:
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        parts = pipe.components
        names = (cls.denoiser_name, "vae", *cls.text_encoder_names)
        components = {name: parts[name] for name in names if parts.get(name) is not None}
        tokenizers = {name: value for name, value in parts.items() if name.startswith("tokenizer") and value is not None}
        training_scheduler = FlowMatchEulerDiscreteScheduler if cls.objective == "flow" else DDPMScheduler
        extras = {k: v for k, v in parts.items() if k not in components and k not in tokenizers and k != "scheduler"}
        return cls(components, tokenizers, training_scheduler.from_config(pipe.scheduler.config), pipe.scheduler,
                   source, extras)

    @classmethod
    def load_pipeline(cls, path: str, dtype: torch.dtype = torch.float32, config: ModelConfig | None = None) -> Any:
        """The diffusers pipeline at ``path`` (a folder, hub id or single file), with the config's
        revision, variant, separate VAE and dropped text encoders."""
        options: dict[str, Any] = {k: v for k, v in cls.pipeline_extras.items() if v is None or isinstance(v, bool)}
        if dtype != torch.float32:  # fp32 is the default
            options["dtype"] = dtype
        options.update(cls.text_encoder_kwargs(path, config))
        if config is not None:
            options.update({k: v for k, v in (("revision", config.revision), ("variant", config.variant)) if v})
            if config.vae:
                options["vae"] = load_vae(config.vae, dtype)
        pipeline_class = cls.pipeline_class()
        with load_errors(path):
            if Path(path).expanduser().is_file():
                options.pop("variant", None)
                if config is not None and config.single_file_config:
                    options["config"] = config.single_file_config
                return pipeline_class.from_single_file(path, **options)
            return pipeline_class.from_pretrained(path, **options)

    @classmethod
    def matches_index(cls, model: str, revision: str | None = None) -> bool:
        """Tell apart families that share a pipeline class (SD1 and SD2) by their component configs."""
        return True

    @classmethod
    def text_encoder_kwargs(cls, path: str, config: ModelConfig | None) -> dict[str, Any]:
        """Pipeline loading arguments that drop optional text encoders (SD3: T5)."""
        return {}

    @classmethod
    def native_resolution(cls, config: ModelConfig) -> int:
        """The model's training resolution: its denoiser's sample size × the VAE's downsampling
        (512 for SD1.5, 768 for SD2.1, 1024 for SDXL and SD3); the family's default when unreadable."""
        if Path(config.path).expanduser().is_file():
            return cls.default_resolution
        denoiser = read_model_json(config.path, f"{cls.denoiser_name}/config.json", config.revision) or {}
        vae = read_model_json(config.path, "vae/config.json", config.revision) or {}
        if not denoiser.get("sample_size") or not vae.get("block_out_channels"):
            return cls.default_resolution
        return int(denoiser["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


FAMILIES: Registry[type[Model]] = Registry("model family")
