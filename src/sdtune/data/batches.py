"""What each micro-batch holds (a pure function of its position), and a DataLoader that decodes
the images a micro-batch needs ahead of time, on worker processes.

A micro-batch's samples, flips, crops and dropped captions depend only on (seed, global sample
position) — never on the process or worker that computes them — so a resumed run, another
technique, or a run on another number of processes sees the same data in the same order.
Workers decode only the images the training step will need as pixels: every image on the uncached
path (random crops, text-encoder training), and with a latent cache only the first use of each
(image, flip) pair that is not cached yet. Their output is the same whichever worker made it.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdtune.data.buckets import BucketOrder
from sdtune.data.dataset import TrainingSet, augmentation, stream_samples


@dataclass(frozen=True)
class Layout:
    """What the data order depends on (a resumed run must match the parts that change it)."""

    seed: int
    num_samples: int
    batch_size: int  # per process, per micro-step
    accumulation: int
    num_processes: int
    process_index: int
    random_flip: bool
    center_crop: bool
    caption_dropout: float
    order: BucketOrder | None = None  # aspect-ratio buckets: one bucket a global step (sdtune.data.buckets)
    slot_images: tuple[int, ...] | None = None  # with repeats: slot → image (None: slot = image)

    def plan(self, global_micro: int) -> MicroBatch:
        """This process's share of micro-step ``global_micro`` (= step × accumulation + micro)."""
        start = (global_micro * self.num_processes + self.process_index) * self.batch_size
        if self.order is None:
            slots, epochs = stream_samples(self.seed, self.num_samples, start, self.batch_size)
        else:
            slots, epochs = self.order.slots(start, self.batch_size)
        flips, crops, dropped = [], [], []
        for slot, epoch in zip(slots.tolist(), epochs.tolist()):
            choice = augmentation(self.seed, epoch, slot)
            flips.append(choice.flip and self.random_flip)
            crops.append(None if self.center_crop else choice.crop)
            dropped.append(choice.caption_draw < self.caption_dropout)
        positions = list(range(start, start + self.batch_size))
        images = slots.tolist() if self.slot_images is None else [self.slot_images[s] for s in slots.tolist()]
        return MicroBatch(global_micro, positions, images, flips, crops, dropped, slots.tolist(), epochs.tolist())

    def steps_for_epochs(self, num_epochs: float) -> int:
        """Optimizer steps of ``num_epochs`` epochs (a bucketed epoch rounds each bucket up to whole steps)."""
        step_size = self.batch_size * self.accumulation * self.num_processes
        if self.order is not None:
            return math.ceil(num_epochs * self.order.steps_per_epoch)
        return math.ceil(num_epochs * self.num_samples / step_size)


@dataclass(frozen=True)
class MicroBatch:
    global_micro: int
    positions: list[int]  # global positions in the sample stream (the same on any number of processes)
    indices: list[int]  # rows of the training set
    flips: list[bool]
    crops: list[tuple[float, float] | None]  # random-crop position, None = centre
    dropped: list[bool]  # caption replaced by ""
    slots: list[int]  # the samples' slots in an epoch (= indices without repeats)
    epochs: list[int]


def latent_masks(training_set: TrainingSet, batch: MicroBatch, latents: torch.Tensor) -> torch.Tensor | None:
    """The loss masks of a micro-batch on the latent grid, (batch, 1, h, w): each image's mask with its
    crop and flip, area-averaged down to the latents (a latent pixel half masked-in counts half); ones
    for an image without a mask; None when the data set has no masks."""
    if not training_set.masks:
        return None
    masks, latent_size = [], tuple(latents.shape[-2:])
    for index, flip, crop in zip(batch.indices, batch.flips, batch.crops):
        mask = training_set.mask(index, flip, crop)
        if mask is None:
            masks.append(torch.ones(1, *latent_size))
        else:
            masks.append(torch.nn.functional.interpolate(mask[None], size=latent_size, mode="area")[0])
    return torch.stack(masks).to(latents.device)


def pixel_needs(
    layout: Layout, start: int, count: int, is_cached: Callable[[int, bool], bool] | None
) -> list[list[int]]:
    """For each of ``count`` micro-batches from ``start``: the positions whose pixels the step needs.

    Without a cache (``is_cached`` None) that is every position; with one, the first use of each
    (image, flip) pair that was not cached when the run started.
    """
    needs, seen = [], set()
    for global_micro in range(start, start + count):
        batch = layout.plan(global_micro)
        if is_cached is None:
            needs.append(list(range(len(batch.indices))))
            continue
        positions = []
        for position, pair in enumerate(zip(batch.indices, batch.flips)):
            if pair not in seen and not is_cached(*pair):
                positions.append(position)
            seen.add(pair)
        needs.append(positions)
    return needs


class PixelBatches(torch.utils.data.Dataset):
    """Item k: the decoded, transformed images that micro-batch ``start + k`` needs."""

    def __init__(self, training_set: TrainingSet, layout: Layout, start: int, needs: list[list[int]]) -> None:
        self.training_set, self.layout, self.start, self.needs = training_set, layout, start, needs

    def __len__(self) -> int:
        return len(self.needs)

    def __getitem__(self, k: int) -> dict[str, object]:
        batch = self.layout.plan(self.start + k)
        positions = self.needs[k]
        pixels = [
            self.training_set.pixels(batch.indices[p], batch.flips[p], batch.crops[p]) for p in positions
        ]
        return {
            "global_micro": batch.global_micro,
            "positions": positions,
            "pixels": torch.stack(pixels) if pixels else torch.empty(0),
        }


def pixel_loader(dataset: PixelBatches, num_workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """The micro-batches' pixels in order, decoded ``num_workers`` at a time ahead of the step."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # items are whole micro-batches already
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
        worker_init_fn=_ignore_interrupt if num_workers else None,
        persistent_workers=False,
    )


def _ignore_interrupt(worker_id: int) -> None:
    """Ctrl-C is the training process's to handle (checkpoint, then stop); workers must not die of it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
