"""What the denoiser is fed: :class:`InputPipeline` turns a micro-step's position into latents,
conditioning, per-sample generators and loss masks, one call per micro-batch.

It owns every encoder cache of a run: the lazily filled posterior/text cache of the training samples
(:mod:`sdtune.data.cache`), an in-memory one of DreamBooth's class images, the conditioning of fixed
captions (the empty caption of dropped ones, the class prompt), and the loader that decodes on worker
processes the images a step needs (:mod:`sdtune.data.batches`). Everything random in a micro-batch is
drawn from generators seeded by (seed, the sample's global position), so a resumed run, another
technique or another number of processes sees the same inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdtune import diffusion
from sdtune.data import cache as cache_lib
from sdtune.data.batches import Layout, MicroBatch, PixelBatches, latent_masks, pixel_loader, pixel_needs
from sdtune.data.dataset import TrainingSet, transform_image
from sdtune.experiment import Experiment
from sdtune.models import Conditioning, Model
from sdtune.training.prior import PriorSamples, class_image_path
from sdtune.util.device import synchronize
from sdtune.util.seeding import derive_seed


@dataclass
class MicroInputs:
    """One micro-batch as the loss takes it (this process's share)."""

    batch: MicroBatch
    latents: torch.Tensor  # fp32: the noising maths stays exact; autocast feeds the denoiser
    conditioning: Conditioning
    generators: list[torch.Generator]  # one per sample (class samples after the instance ones)
    mask: torch.Tensor | None  # loss masks on the latent grid, or None without masks
    num_instance: int | None  # with class samples: the first this many are the subject's


class InputPipeline:
    """The inputs of every micro-step of one run (see the module docstring)."""

    def __init__(
        self, model: Model, training_set: TrainingSet, layout: Layout, cache: cache_lib.LatentCache | None,
        prior: PriorSamples | None, device: torch.device, weight_dtype: torch.dtype, train_text_encoder: bool,
        seed: int, process_index: int, parking: torch.device | None = None,
    ) -> None:
        self.model, self.training_set, self.layout, self.cache, self.prior = model, training_set, layout, cache, prior
        self.device, self.weight_dtype, self.train_text_encoder = device, weight_dtype, train_text_encoder
        self.seed, self.process_index = seed, process_index
        self.class_cache = cache_lib.LatentCache(key="class-images", caches_texts=False) if prior else None
        self.encode_time_s = 0.0  # first-use encodes inside the loop (device-synchronised)
        self.encoded_images = 0
        self._fixed_captions: dict[str, Conditioning] = {}  # caption → its frozen encoders' conditioning
        self._pixels: Iterator[dict[str, Any]] | None = None
        self.parking = parking  # train.free_encoders: where the encoders go once every input is encoded
        self.parked: list[str] = []  # the components parked there

    # -- the loader ----------------------------------------------------------------------------------
    def start(
        self, first_step: int, max_steps: int, accumulation: int, num_workers: int | None, num_processes: int,
        progress: bool = False,
    ) -> None:
        """Decode the micro-batches' images from ``first_step`` on, ahead of the step (workers: None =
        auto, decoding beside training pays only with cores to spare). With ``parking`` every input is
        encoded first and the encoders no step needs leave the device (:meth:`encode_ahead`)."""
        start, count = first_step * accumulation, (max_steps - first_step) * accumulation
        if self.parking is not None:  # (its time counts as setup: the step clock starts after)
            self.encode_ahead(start, count, progress)
            self.parked = self.leaving_encoders()
            for name in self.parked:
                self.model.components[name].to(self.parking)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # (the caching allocator would keep their blocks otherwise)
        needs = pixel_needs(self.layout, start, count, None if self.cache is None else self.cache.has_posterior)
        if num_workers is None:
            per_process = (os.cpu_count() or 1) // num_processes
            num_workers = 0 if per_process <= 2 else min(8, per_process - 1)
        if not any(needs):
            num_workers = 0  # everything is cached already
        dataset = PixelBatches(self.training_set, self.layout, start, needs)
        self._pixels = iter(pixel_loader(dataset, num_workers, pin_memory=self.device.type == "cuda"))

    # -- train.free_encoders: every input encoded first, then the encoders leave the device -----------
    def encode_ahead(self, first_micro: int, count: int, progress: bool) -> None:
        """Encode now, in the order the run would, everything micro-steps [first_micro, first_micro +
        count) of this process use: each (image, flip) pair's posterior, each caption's conditioning
        (when captions are cached), the empty caption of dropped ones, DreamBooth's class images and
        class prompt. The loop then finds every input in the cache and never calls an encoder."""
        from tqdm.auto import tqdm

        pairs, indices = {}, {}  # (dicts: first-use order, no repeats)
        for global_micro in range(first_micro, first_micro + count):
            batch = self.layout.plan(global_micro)
            pairs.update(dict.fromkeys(zip(batch.indices, batch.flips)))
            indices.update(dict.fromkeys(batch.indices))
        for index, flip in tqdm(pairs, desc="encode ahead", unit="image", disable=not progress):
            self._posterior(self.cache, index, flip, lambda i, flip=flip: self.training_set.pixels(i, flip, None))
        if self.cache.caches_texts:
            for index in indices:
                self._cached_text(index)
            self.fixed_caption("")
        if self.prior is not None:
            for index in range(self.prior.num_images):
                self._posterior(self.class_cache, index, False, self._class_pixels)
            if not self.train_text_encoder:
                self.fixed_caption(self.prior.class_prompt)

    def leaving_encoders(self) -> list[str]:
        """The encoders no step needs once :meth:`encode_ahead` ran: the VAE, and the frozen text
        encoders when captions are cached (not with a trained text encoder, whose conditioning is
        computed every step through all of them, nor with shuffled captions, new every epoch)."""
        texts = list(self.model.loaded_text_encoders) if self.cache.caches_texts else []
        return ["vae", *texts]

    # -- one micro-batch -------------------------------------------------------------------------
    def micro_batch(self, global_micro: int) -> MicroInputs:
        """This process's share of micro-step ``global_micro`` (= step × accumulation + micro)."""
        batch = self.layout.plan(global_micro)
        generators = self._generators(batch)
        latents, conditioning = self._instance_inputs(batch, next(self._pixels), generators)
        mask = latent_masks(self.training_set, batch, latents)  # None without loss masks
        num_instance = None
        if self.prior is not None:  # DreamBooth: as many class samples, after the instance ones
            num_instance = len(batch.indices)
            latents, conditioning, generators = self._with_class_samples(batch, latents, conditioning, generators)
        return MicroInputs(batch, latents, conditioning, generators, mask, num_instance)

    def _generators(self, batch: MicroBatch) -> list[torch.Generator]:
        """A generator per sample, seeded from (seed, the sample's global position): the sample's latent,
        noise and timestep are the same whatever process or micro-step it lands in, so 1 process with
        batch 2B, 2 processes with B, and 1 process with B × 2 accumulation draw the same. Module
        dropout (peft's ``lora_dropout``) uses torch's global generator, seeded here per (seed,
        micro-step, process): replayed exactly on resume, but not the same across process counts."""
        torch.manual_seed(derive_seed(self.seed, batch.global_micro, self.process_index, 1))
        return [torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, position)) for position in batch.positions]

    def _instance_inputs(
        self, batch: MicroBatch, pixels: dict[str, Any], generators: list[torch.Generator]
    ) -> tuple[torch.Tensor, Conditioning]:
        """Latents and conditioning of the training samples; ``pixels`` is the loader's item: the
        decoded images of the positions that are not cached."""
        if pixels["global_micro"] != batch.global_micro:
            raise RuntimeError(f"input pipeline out of step: got micro-batch {pixels['global_micro']}, expected {batch.global_micro}")
        model, device = self.model, self.device
        decoded = dict(zip(pixels["positions"], pixels["pixels"]))
        if self.cache is None:
            mean, std = model.encode_images(pixels["pixels"].to(device, non_blocking=True))
        else:
            posteriors = []
            for position, (index, flip) in enumerate(zip(batch.indices, batch.flips)):
                # decoded by the loader; or, only on a miss (planned as cached, but another run's disk cache
                # lacks it), here
                pixels = decoded[position] if position in decoded else (
                    lambda _, index=index, flip=flip: self.training_set.pixels(index, flip, None)
                )
                posteriors.append(self._posterior(self.cache, index, flip, pixels))
            mean, std = (torch.stack(parts).to(device, non_blocking=True) for parts in zip(*posteriors))
        latents = diffusion.sample_latents(mean.float(), std.float(), model.latent_scale, generators, model.latent_shift)
        if self.cache is not None and self.cache.caches_texts:
            rows = [self._cached_text(index) for index in batch.indices]
            conditioning = {k: torch.stack([r[k] for r in rows]).to(device, self.weight_dtype) for k in rows[0]}
            for row, drop in enumerate(batch.dropped):
                if drop:
                    for name, empty in self.fixed_caption("").items():
                        conditioning[name][row] = empty.to(conditioning[name].dtype)
        else:
            captions = [
                "" if drop else self.training_set.caption(i, self.seed, epoch, slot)
                for i, drop, epoch, slot in zip(batch.indices, batch.dropped, batch.epochs, batch.slots)
            ]
            with contextlib.nullcontext() if self.train_text_encoder else torch.no_grad():
                conditioning = model.encode_prompt(captions)
        geometry = [self.training_set.geometry(i, f, c) for i, f, c in zip(batch.indices, batch.flips, batch.crops)]
        conditioning.update(model.image_conditioning(torch.tensor(geometry, dtype=self.weight_dtype).to(device)))
        return latents, conditioning

    def _with_class_samples(
        self, batch: MicroBatch, latents: torch.Tensor, conditioning: Conditioning, generators: list
    ) -> tuple[torch.Tensor, Conditioning, list]:
        """The micro-batch with one class sample after the instance samples for each of its positions."""
        prior, model, device = self.prior, self.model, latents.device
        count = len(batch.positions)
        indices, class_generators = prior.plan(batch.positions, device)
        posteriors = [self._posterior(self.class_cache, index, False, self._class_pixels) for index in indices]
        mean, std = (torch.stack(parts).to(device) for parts in zip(*posteriors))
        class_latents = diffusion.sample_latents(mean, std, model.latent_scale, class_generators, model.latent_shift)
        if self.train_text_encoder:  # through the training text encoders, with gradients
            class_conditioning = model.encode_prompt([prior.class_prompt] * count)
        else:
            class_conditioning = {k: v[None].expand(count, *v.shape) for k, v in self.fixed_caption(prior.class_prompt).items()}
        side = prior.resolution
        geometry = torch.tensor([[side, side, 0, 0, side, side]] * count)
        class_conditioning.update(model.image_conditioning(geometry.to(device, self.weight_dtype)))
        merged = {
            name: torch.cat([value, class_conditioning[name].to(value.device, value.dtype)]) for name, value in conditioning.items()
        }
        return torch.cat([latents, class_latents]), merged, [*generators, *class_generators]

    def _class_pixels(self, index: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(class_image_path(self.prior.folder, index)) as image:
            return transform_image(image.convert("RGB"), self.prior.resolution, None, False)

    # -- encoders, each output computed once ------------------------------------------------------------
    def _posterior(self, cache: cache_lib.LatentCache, index: int, flip: bool, pixels: Any) -> cache_lib.Posterior:
        """The cached (mean, std) of an (image, flip) pair, encoded alone on its first use, so its bits
        never depend on which samples it was encoded with. ``pixels``: the decoded image, or a function
        of the index that decodes it (called only on a miss)."""
        found = cache.posterior(index, flip)
        if found is not None:
            return found
        image = pixels(index) if callable(pixels) else pixels
        with self._encode_timer():
            mean, std = self.model.encode_images(image[None].to(self.device))
        cache.encoded_images += 1
        return cache.put_posterior(index, flip, mean[0], std[0])  # (no read back of what was just written)

    def _cached_text(self, index: int) -> Conditioning:
        """The cached text conditioning of a sample's caption, encoded alone on its first use."""
        found = self.cache.text(index)
        if found is None:
            with self._encode_timer(), torch.no_grad():
                encoded = self.model.encode_prompt([self.training_set.captions[index]])
            self.cache.encoded_texts += 1
            found = self.cache.put_text(index, {name: value[0] for name, value in encoded.items()})
        return found

    def fixed_caption(self, caption: str) -> Conditioning:
        """The frozen text encoders' conditioning of one caption (one sample, no batch axis), computed once."""
        if caption not in self._fixed_captions:
            with torch.no_grad():
                encoded = self.model.encode_prompt([caption])
            self._fixed_captions[caption] = {name: value[0] for name, value in encoded.items()}
        return self._fixed_captions[caption]

    @contextlib.contextmanager
    def _encode_timer(self):
        """Time a first-use encode on the device clock (so steady-state step time can leave it out)."""
        synchronize(self.device)
        started = time.perf_counter()
        yield
        synchronize(self.device)
        self.encode_time_s += time.perf_counter() - started


def open_latent_cache(
    experiment: Experiment, model: Model, training_set: TrainingSet, weight_dtype: torch.dtype, train_text_encoder: bool,
    output_root: Path,
) -> cache_lib.LatentCache | None:
    """The lazily filled cache of posteriors (and text conditioning when no text encoder trains), or
    None on the uncached path (random crops change every epoch; ``cache: off``). Its key holds
    everything its content depends on: the model, the data section, the rows, the dtype and, when it
    caches text conditioning, the captions as the text encoders see them (after the technique's
    transform, so techniques that transform captions differently never share text entries).

    ``auto`` shares a disk cache between the techniques of an experiment (each trains in its own
    process) and keeps a single technique's cache in memory unless it would exceed the limit."""
    data = experiment.data
    mode = data.cache
    if mode == "off" or (mode == "auto" and not data.center_crop):
        return None
    caches_texts = not train_text_encoder and not data.shuffle_captions  # (shuffled: a new caption each epoch)
    if mode == "auto":
        text_numel = 0
        if caches_texts:  # from the real shapes (SD3's T5 states dwarf SD1's CLIP states)
            with torch.no_grad():
                text_numel = sum(t[0].numel() for t in model.encode_prompt(["probe"]).values())
        variants = 2 if data.random_flip else 1
        latent_side = data.resolution // model.vae_downsampling
        latent_numel = model.latent_channels * latent_side**2
        estimate = cache_lib.estimate_bytes(len(training_set), latent_numel, variants, text_numel)
        shared = len(experiment.techniques) > 1
        mode = "disk" if shared or estimate > data.cache_memory_limit_gb * 1e9 else "memory"
    described = {
        "model": dataclasses.asdict(experiment.model),
        "data": {k: v for k, v in dataclasses.asdict(data).items() if k not in ("cache", "num_workers")},
        "texts": caches_texts,
        "dtype": str(weight_dtype),
        "rows": training_set.indices,
    }
    if caches_texts:  # the captions as encoded: the technique's transform applied (textual inversion's
        described["captions"] = cache_lib.cache_key({"captions": training_set.captions})  # spelled-out vectors)
    return cache_lib.open_cache(cache_lib.cache_key(described), mode, output_root / ".cache", caches_texts, described)
