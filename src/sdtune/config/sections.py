"""The experiment file's sections: frozen dataclasses, each field declared once, checked on load.

An experiment file has these sections: ``model``, ``data``, ``train`` (shared by every technique),
``techniques`` (name → kind, technique options and per-technique overrides of ``train``),
``evaluation`` (used by ``sdtune compare``), ``dreambooth`` and ``tuning`` (used by ``sdtune tune``,
:mod:`sdtune.config.tuning`). The checks here need nothing but the
values themselves; what needs the registries (the model family, a technique kind's options, metric
names) is checked by :func:`sdtune.experiment.resolve`. Every error is one line naming the key, the
value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sdtune.config.paths import looks_like_local_path
from sdtune.config.schema import ConfigError
from sdtune.config.schema import fail as _fail
from sdtune.config.schema import positive as _positive
from sdtune.config.split import parse_validation
from sdtune.config.tuning import TuningConfig

# --------------------------------------------------------------------------------------------
# Sections


QUANTIZATION_INSTALL = "pip install 'sdtune[quantization]'"


@dataclass(frozen=True)
class QuantizeConfig:
    """Which frozen components load quantised (QLoRA-style, bitsandbytes; see docs/quantization.md): their
    linear layers as NF4 (4-bit NormalFloat) or int8 (LLM.int8()) layers that nothing trains."""

    denoiser: Literal["nf4", "int8"] | None = None  # the UNet or transformer; None = full precision
    text_encoders: Literal["nf4", "int8"] | None = None  # every text encoder of the family; None = full precision

    @property
    def active(self) -> bool:
        return self.denoiser is not None or self.text_encoders is not None


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to fine-tune."""

    path: str  # hub id, local diffusers folder, or a single .safetensors/.ckpt file
    family: str = "auto"  # a registered model family (sd1, sd2, sdxl, sd3); auto = detect from the model
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" weight files of a hub repo
    single_file_config: str | None = None  # diffusers folder/hub id with the configs of a single file
    vae: str | None = None  # a separately distributed VAE (folder, hub id or file), e.g. SDXL's fp16 fix
    text_encoder_3: bool = True  # SD3: false drops T5-XXL (zeros in its place, as the pipeline does)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)  # frozen components loaded quantised

    def validate(self) -> None:
        if not self.path:
            _fail("model", self.path, "a hub id, a local diffusers folder or a .safetensors file")
        if looks_like_local_path(self.path) and not Path(self.path).expanduser().exists():
            raise ConfigError(
                f"model: {self.path!r} does not exist; give an existing diffusers folder, a single "
                ".safetensors/.ckpt file, or a hub id like 'stable-diffusion-v1-5/stable-diffusion-v1-5'"
            )
        if self.vae and looks_like_local_path(self.vae) and not Path(self.vae).expanduser().exists():
            raise ConfigError(f"model.vae: {self.vae!r} does not exist; give a VAE folder, a hub id or a .safetensors file")
        config = self.single_file_config
        if config and looks_like_local_path(config) and not Path(config).expanduser().exists():
            raise ConfigError(
                f"model.single_file_config: {config!r} does not exist; give the diffusers folder or hub id whose "
                "configs describe the single file"
            )


@dataclass(frozen=True)
class DataConfig:
    """The captioned images and how they become training tensors."""

    source: str  # hub dataset id, imagefolder, or a .parquet/.jsonl/.json/.csv file
    split: str = "train"
    revision: str | None = None
    image_column: str | None = None  # auto-detected when absent
    caption_column: str | None = None  # auto-detected when absent
    resolution: int | None = None  # None = the model's native resolution (512 SD1.5, 768 SD2.1, 1024 SDXL/SD3)
    center_crop: bool = False  # false = random crop
    random_flip: bool = False
    max_samples: int | None = None  # use only the first N rows (quick experiments)
    on_bad_image: Literal["skip", "error"] = "skip"
    cache: Literal["auto", "memory", "disk", "off"] = "auto"
    cache_memory_limit_gb: float = 4.0  # auto: above this estimate the cache goes to disk
    num_workers: int | None = None  # image-decoding worker processes; None = auto (0 on ≤ 2 cores, else up to 8)
    instance_prompt: str | None = None  # DreamBooth: the caption of every image (the dataset's own are not read)
    # issue #14 (sdtune.data.buckets, sdtune.data.layouts): buckets, repeats, caption handling, masks, streaming
    buckets: Literal["auto"] | list[list[int]] | None = None  # aspect-ratio buckets: auto or [[width, height], …]
    bucket_max_aspect: float = 2.0  # auto buckets: the longest side at most this × the shortest
    repeats: int = 1  # every image this many times an epoch (× a kohya folder's N)
    shuffle_captions: bool = False  # shuffle comma-separated tags per (seed, epoch, sample)
    keep_tokens: int = 0  # with shuffle_captions: this many leading tags stay in front
    caption_prefix: str = ""  # prepended to every caption as written (a trigger word: "sks, ")
    caption_suffix: str = ""  # appended as written
    mask_column: str | None = None  # a column of loss-mask images (white = trained); else *_mask.png files
    streaming: bool = False  # stream a hub dataset (webdataset .tar shards always stream); needs max_samples
    # held-out images never trained on: a fraction (0.1), {fraction, seed}, or a source ({source, split})
    validation: float | str | dict[str, Any] | None = None

    def validate(self) -> None:
        validate_data_extras(self)
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            _fail("data.resolution", self.resolution, "a positive multiple of 8 (the VAE downsamples by 8)")
        _positive("data.max_samples", self.max_samples, allow_none=True)
        if self.num_workers is not None and self.num_workers < 0:
            _fail("data.num_workers", self.num_workers, "0 (decode in the training process) or more, or null for auto")
        if self.cache_memory_limit_gb <= 0:
            _fail("data.cache_memory_limit_gb", self.cache_memory_limit_gb, "a positive number of GB")
        if looks_like_local_path(self.source) and not Path(self.source).expanduser().exists():
            raise ConfigError(
                f"data.source: {self.source!r} does not exist; give an imagefolder, a "
                ".parquet/.jsonl/.csv file, or a hub dataset id like 'reach-vb/pokemon-blip-captions'"
            )
        if self.instance_prompt is not None and self.caption_column is not None:
            raise ConfigError(
                "data.instance_prompt: given with data.caption_column; the instance prompt replaces every caption, "
                "so remove one of them"
            )
        if self.instance_prompt is not None and not self.instance_prompt.strip():
            _fail("data.instance_prompt", self.instance_prompt, "a caption such as 'a photo of <my-toy> toy'")
        split = parse_validation(self.validation)
        if split is not None and split.source is not None and looks_like_local_path(split.source):
            if not Path(split.source).expanduser().exists():
                raise ConfigError(
                    f"data.validation: {split.source!r} does not exist; give an imagefolder, a .parquet/.jsonl/.csv "
                    "file or a hub dataset id of validation images, or a fraction of data.source such as 0.1"
                )
        if self.cache in ("memory", "disk") and not self.center_crop:
            raise ConfigError(
                f"data.cache: {self.cache!r} needs data.center_crop: true (random crops change every "
                "epoch, so latents cannot be cached); set data.cache: off or auto"
            )


def validate_data_extras(data: DataConfig) -> None:
    """The keys of bucketing, layouts, captions and masks (issue #14)."""
    if isinstance(data.buckets, list):
        if not data.buckets:
            _fail("data.buckets", data.buckets, "auto, or a non-empty list of [width, height] pairs")
        for pair in data.buckets:
            if len(pair) != 2 or any(side <= 0 or side % 8 for side in pair):
                _fail("data.buckets", pair, "a [width, height] pair of positive multiples of 8")
            if data.resolution is not None and pair[0] * pair[1] > data.resolution**2:
                _fail("data.buckets", pair, f"a bucket of at most data.resolution² = {data.resolution}² pixels")
    if data.bucket_max_aspect < 1:
        _fail("data.bucket_max_aspect", data.bucket_max_aspect, "a ratio ≥ 1, e.g. 2.0")
    _positive("data.repeats", data.repeats)
    if data.keep_tokens < 0:
        _fail("data.keep_tokens", data.keep_tokens, "0 or more leading tags")
    if data.keep_tokens and not data.shuffle_captions:
        raise ConfigError("data.keep_tokens: applies with data.shuffle_captions: true; set that, or remove keep_tokens")
    if data.streaming and data.max_samples is None:
        raise ConfigError(
            "data.streaming: a stream has no known length and the data order needs one; set data.max_samples "
            "(the first N samples are cached on disk as they stream)"
        )


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters shared by every technique unless a technique overrides them."""

    batch_size: int = 1  # per device, per micro-step
    gradient_accumulation_steps: int = 1
    max_train_steps: int | None = None  # optimizer steps; or give num_epochs
    num_epochs: float | None = None
    learning_rate: float = 1e-5
    scale_lr: bool = False  # multiply lr by total batch size (diffusers' --scale_lr)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    checkpointing_steps: int | None = 500  # null = only the Ctrl-C checkpoint
    checkpoints_total_limit: int | None = 2  # keep the last N checkpoints; null = keep all
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; null = no clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"] = "adamw"  # 8-bit, paged: bitsandbytes
    use_ema: bool = False
    ema_decay: float = 0.9999  # with diffusers' warm-up: min(decay, (1 + step) / (10 + step))
    snr_gamma: float | None = None  # min-SNR weighting (Hang et al. 2023); 5.0 is their default
    noise_offset: float = 0.0  # Guttenberg 2023; ~0.05 helps very dark/bright images
    caption_dropout: float = 0.0  # share of captions replaced by "" (trains classifier-free guidance)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = None  # DDPM; None = the scheduler's
    # rectified flow (SD3) only; None = the defaults filled in at load (logit_normal 0/1, mode 1.29, none)
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] | None = None
    logit_mean: float | None = None
    logit_std: float | None = None
    mode_scale: float | None = None
    flow_weighting: Literal["none", "sigma_sqrt", "cosmap"] | None = None
    gradient_checkpointing: bool = False
    # memory savers (docs/memory.md), each measured in docs/benchmarks.md
    optimizer_offload: bool = False  # CUDA: optimizer states and step on the CPU (torchao's CPUOffloadOptimizer)
    fused_backward: bool = False  # each tensor steps as soon as its gradient is ready (no accumulation, no clipping)
    free_encoders: bool = False  # CUDA: encode every sample first, then the VAE and frozen text encoders leave the GPU
    block_swap: int = 0  # CUDA: this many transformer blocks' frozen weights wait on the CPU, moved in for their use
    channels_last: bool = False  # NHWC memory format for the denoiser (UNets; see the README's measurements)
    compile: bool = False  # torch.compile the denoiser (minutes of compilation first; pays on long GPU runs)
    allow_tf32: bool = True  # TF32 matmuls on Ampere+ GPUs; no effect on CPU
    keep_freed_cpu_memory: bool = True  # CPU, sdtune's own training processes: malloc keeps freed blocks (sdtune.util.allocator)
    log_every: int = 10  # synchronise the device, read back and log the losses every N steps (every step's loss is recorded)
    prior_preservation: bool = False  # DreamBooth (Ruiz et al. 2023): add class images; needs a `dreambooth:` section
    prior_loss_weight: float = 1.0  # λ of loss = instance loss + λ × prior loss (1.0 in the paper and diffusers)

    def validate(self) -> None:
        _positive("train.batch_size", self.batch_size)
        _positive("train.gradient_accumulation_steps", self.gradient_accumulation_steps)
        _positive("train.max_train_steps", self.max_train_steps, allow_none=True)
        if self.num_epochs is not None and self.num_epochs <= 0:
            _fail("train.num_epochs", self.num_epochs, "a positive number")
        if self.max_train_steps is None and self.num_epochs is None:
            raise ConfigError("train: give max_train_steps or num_epochs (how long to train)")
        if self.max_train_steps is not None and self.num_epochs is not None:
            raise ConfigError("train: give max_train_steps or num_epochs, not both (set the other to null)")
        if self.lr_warmup_steps > 0 and self.lr_scheduler == "constant":
            raise ConfigError(
                "train.lr_warmup_steps: 'constant' ignores warm-up; use lr_scheduler: constant_with_warmup"
            )
        validate_savers(self)
        if self.learning_rate <= 0:
            _fail("train.learning_rate", self.learning_rate, "a positive number such as 1.0e-5")
        if self.lr_warmup_steps < 0:
            _fail("train.lr_warmup_steps", self.lr_warmup_steps, "0 or more")
        _positive("train.checkpointing_steps", self.checkpointing_steps, allow_none=True)
        _positive("train.checkpoints_total_limit", self.checkpoints_total_limit, allow_none=True)
        _positive("train.log_every", self.log_every)
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            _fail("train.max_grad_norm", self.max_grad_norm, "a positive number, or null for no clipping")
        if not 0.0 <= self.ema_decay < 1.0:
            _fail("train.ema_decay", self.ema_decay, "a number in [0, 1), e.g. 0.9999")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            _fail("train.snr_gamma", self.snr_gamma, "a positive number (5.0 in the paper) or null")
        if not 0.0 <= self.caption_dropout < 1.0:
            _fail("train.caption_dropout", self.caption_dropout, "a share in [0, 1), e.g. 0.1")
        if self.noise_offset < 0:
            _fail("train.noise_offset", self.noise_offset, "0 or a small positive number like 0.05")
        if self.prior_loss_weight <= 0:
            _fail("train.prior_loss_weight", self.prior_loss_weight, "a positive number (1.0 in the paper)")
        if self.logit_std is not None and self.logit_std <= 0:
            _fail("train.logit_std", self.logit_std, "a positive number (1.0 in the SD3 paper)")


RENAMED_TRAIN_KEYS = {  # a key of an older sdtune → how to write it now (refused with this spelling)
    "use_8bit_adam": "optimizer: adamw8bit (for true; remove the key for false)",
}


def validate_savers(train: TrainConfig) -> None:
    """The memory savers' combinations that need nothing but the train section (the device-dependent
    checks are made when a run starts: :func:`sdtune.training.savers.check_device`)."""
    if train.block_swap < 0:
        _fail("train.block_swap", train.block_swap, "0 (off) or a number of transformer blocks")
    if train.optimizer_offload and train.optimizer.startswith("paged_"):
        raise ConfigError(
            f"train.optimizer_offload: the states of {train.optimizer!r} are paged to the CPU already; "
            "use optimizer: adamw or adamw8bit with the offload"
        )
    if train.fused_backward:
        _check_fused_backward(train)


def _check_fused_backward(train: TrainConfig) -> None:
    why = "train.fused_backward: each tensor steps as soon as its gradient is ready, so "
    if train.gradient_accumulation_steps > 1:
        raise ConfigError(why + "gradients cannot accumulate; set gradient_accumulation_steps: 1 (raise batch_size)")
    if train.max_grad_norm is not None:
        raise ConfigError(why + "the global gradient norm is never known; set max_grad_norm: null (no clipping)")
    if train.mixed_precision == "fp16":
        raise ConfigError(why + "fp16's loss scaling cannot unscale them first; use mixed_precision: bf16 or no")
    if train.optimizer_offload:
        raise ConfigError(why + "it cannot be combined with optimizer_offload (which steps on the CPU); choose one")




@dataclass(frozen=True)
class TechniqueEntry:
    """One entry of ``techniques`` as written: a kind, its options (checked by the kind's plug-in in
    :func:`sdtune.experiment.resolve`), and overrides of ``train`` (checked here)."""

    name: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    # this technique's `quantize:` as written: keys of QuantizeConfig (checked) that replace model.quantize's
    quantize: dict[str, Any] = field(default_factory=dict)
    tuning: dict[str, Any] | None = None  # its own learning-rate range for `sdtune tune` (checked on load)


@dataclass(frozen=True)
class EvaluationConfig:
    """Fixed prompts × seeds for generation and quality metrics (``sdtune compare``)."""

    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None  # one prompt a line; a line starting with '!' is out-of-domain
    out_of_domain_prompts: list[str] = field(default_factory=list)  # for base-model preservation
    seeds_per_prompt: int = 2
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    scheduler: str | None = None  # a diffusers scheduler class name; None = the model's own
    resolution: int | None = None  # None = data.resolution
    metrics: list[str] | None = None  # None = every registered metric
    clip_model: str = "openai/clip-vit-base-patch32"  # hub id or local folder for CLIP metrics
    style_labels: list[str] = field(default_factory=lambda: ["realistic", "semi-cartoon", "cartoon"])
    max_reference_images: int = 200  # real images (validation, else training) the metrics compare with
    dino_model: str = "facebook/dinov2-small"  # hub id or local folder for DINO and drift
    pickscore_model: str = "yuvalkirstain/PickScore_v1"  # for the opt-in pickscore metric
    hpsv2_model: str = "adams-story/HPSv2-hf"  # opt-in hpsv2: a transformers-format HPS v2 CLIP
    imagereward_model: str = "ImageReward-v1.0"  # opt-in imagereward: a package name, folder or .pt file
    metric_plugins: list[str] = field(default_factory=list)  # modules that register more metrics
    cpu_offload: bool = False  # CUDA: each model of the pipeline on the GPU only for its forward (diffusers)
    every_steps: int | None = None  # also evaluate (images, metrics, validation loss) every N steps
    seeds_per_prompt_during_training: int | None = None  # images at every_steps: the first N seeds; None = all
    validation_every_steps: int | None = None  # also compute the validation loss alone (no images) every N steps
    validation_timesteps: int = 4  # fixed timesteps of the validation loss
    full_precision_base: bool = False  # runs trained on a quantised base are sampled on the full-precision one

    def validate(self) -> None:
        _positive("evaluation.seeds_per_prompt", self.seeds_per_prompt)
        _positive("evaluation.num_inference_steps", self.num_inference_steps)
        _positive("evaluation.max_reference_images", self.max_reference_images)
        _positive("evaluation.every_steps", self.every_steps, allow_none=True)
        _positive("evaluation.validation_every_steps", self.validation_every_steps, allow_none=True)
        _positive("evaluation.validation_timesteps", self.validation_timesteps)
        _positive("evaluation.seeds_per_prompt_during_training", self.seeds_per_prompt_during_training, allow_none=True)
        if (self.seeds_per_prompt_during_training or 0) > self.seeds_per_prompt:
            _fail("evaluation.seeds_per_prompt_during_training", self.seeds_per_prompt_during_training,
                  f"at most evaluation.seeds_per_prompt ({self.seeds_per_prompt}), or null for all of them")
        if self.guidance_scale < 0:
            _fail("evaluation.guidance_scale", self.guidance_scale, "0 or more (7.5 is usual)")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            _fail("evaluation.resolution", self.resolution, "a positive multiple of 8")
        if self.prompts_file and not Path(self.prompts_file).expanduser().is_file():
            raise ConfigError(
                f"evaluation.prompts_file: {self.prompts_file!r} is not a file; give a text file with one prompt a line"
            )
        if self.scheduler is not None:
            import diffusers

            if not hasattr(getattr(diffusers, self.scheduler, None), "from_config") or "Scheduler" not in self.scheduler:
                _fail("evaluation.scheduler", self.scheduler, "a diffusers scheduler class, e.g. DDIMScheduler")


@dataclass(frozen=True)
class DreamBoothConfig:
    """DreamBooth's class images (Ruiz et al. 2023, §3.3), shared by every technique of the experiment
    that sets ``prior_preservation: true``: generated once by the base model, cached, reused."""

    class_prompt: str  # what the subject is an instance of, without its identifier: "a photo of a toy"
    num_class_images: int = 100  # diffusers' train_dreambooth default (the paper: 200 × the steps it ran)
    class_inference_steps: int = 50  # sampling steps of the base model for each class image
    class_guidance_scale: float = 7.5
    class_seed: int = 0  # image i is sampled from seed (class_seed, i): the same images for every technique

    def validate(self) -> None:
        if not self.class_prompt.strip():
            _fail("dreambooth.class_prompt", self.class_prompt, "a prompt such as 'a photo of a toy'")
        _positive("dreambooth.num_class_images", self.num_class_images)
        _positive("dreambooth.class_inference_steps", self.class_inference_steps)
        if self.class_guidance_scale < 0:
            _fail("dreambooth.class_guidance_scale", self.class_guidance_scale, "0 or more (7.5 is usual)")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment file, its values checked; relative paths resolved against its folder."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    techniques: dict[str, TechniqueEntry]
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    dreambooth: DreamBoothConfig | None = None  # class images for techniques with prior_preservation
    tuning: TuningConfig | None = None  # each technique's learning rate tuned on validation (`sdtune tune`)
    name: str = "experiment"
    output_dir: str | None = None  # default: ./runs/<name>
    source_path: str | None = None  # the file it was loaded from
    base_dir: str | None = None  # the folder relative paths were resolved against
