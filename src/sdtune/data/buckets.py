"""Aspect-ratio bucketing: bucket sizes, each image's bucket, and a data order of one bucket a step.

Bucket sizes follow NovelAI's scheme (2022, "NovelAI Improvements on Stable Diffusion", §aspect
ratio bucketing; kohya's ``make_bucket_resolutions``): for every width that is a multiple of the
model's pixel stride, the tallest height (also a multiple) whose area stays within resolution²,
kept if its aspect ratio is within the bound, and the same mirrored. Each image goes to the bucket
closest to its aspect ratio (in log space, so 2:1 and 1:2 are equally far from 1:1), is resized to
cover it and cropped minimally (centre or random, as ``data.center_crop`` says).

The order is a pure function of (seed, position): each epoch, every bucket's samples are shuffled
from (seed, epoch, bucket) and cut into chunks of one *global step* (batch × accumulation ×
processes), the last chunk filled up by wrapping around the bucket; the chunks of all buckets are
then shuffled from (seed, epoch). A step therefore holds one bucket on every micro-step and every
process, resuming anywhere recomputes the same chunks, and every technique sees the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sdtune.data.images import DataError

Bucket = tuple[int, int]  # (width, height) in pixels


def bucket_sizes(resolution: int, stride: int, max_aspect: float) -> list[Bucket]:
    """Every (width, height), multiples of ``stride``, with area ≤ resolution² and aspect ≤ max_aspect,
    each width with its tallest height; sorted by aspect ratio (width / height)."""
    area = resolution * resolution
    found: set[Bucket] = set()
    width = stride
    while width * stride <= area:
        height = (area // width) // stride * stride
        if height >= stride and max(width / height, height / width) <= max_aspect:
            found.add((width, height))
            found.add((height, width))
        width += stride
    if not found:
        raise DataError(f"data.buckets: no bucket of sides multiple of {stride} fits {resolution}²; raise data.resolution")
    return sorted(found, key=lambda b: (b[0] / b[1], b[0] * b[1]))


def check_buckets(buckets: list[Bucket], resolution: int, stride: int) -> None:
    """An explicit bucket list must suit the model: sides multiple of its stride, area ≤ resolution²."""
    for width, height in buckets:
        if width % stride or height % stride:
            raise DataError(
                f"data.buckets: [{width}, {height}] is not a multiple of {stride} px (this model's latent "
                f"stride × VAE factor); use sides divisible by {stride}"
            )
        if width * height > resolution * resolution:
            raise DataError(
                f"data.buckets: [{width}, {height}] has more pixels than data.resolution² ({resolution}²); "
                "shrink it or raise data.resolution"
            )


def assign_buckets(sizes: list[tuple[int, int]], buckets: list[Bucket]) -> list[int]:
    """For each image (width, height): the index of the bucket closest in log aspect ratio (ties: the
    first in ``buckets``)."""
    logs = np.log(np.array([w / h for w, h in buckets]))
    return [int(np.argmin(np.abs(logs - math.log(w / h)))) for w, h in sizes]


@dataclass
class BucketOrder:
    """The sample stream of a bucketed run: position → (slot, epoch), one bucket per global step."""

    seed: int
    members: list[list[int]]  # per bucket: the slots (samples, repeats counted) in it
    step_size: int  # samples per global step (batch × accumulation × processes)
    _tables: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def steps_per_epoch(self) -> int:
        return sum(math.ceil(len(m) / self.step_size) for m in self.members if m)

    def epoch_table(self, epoch: int) -> np.ndarray:
        """(steps_per_epoch, step_size) slots of one epoch, each row from one bucket."""
        if epoch not in self._tables:
            chunks = []
            for bucket, members in enumerate(self.members):
                if not members:
                    continue
                shuffled = np.asarray(members)[np.random.default_rng([self.seed, epoch, 2, bucket]).permutation(len(members))]
                count = math.ceil(len(members) / self.step_size)
                chunks.append(np.resize(shuffled, count * self.step_size).reshape(count, self.step_size))
            table = np.concatenate(chunks)
            table = table[np.random.default_rng([self.seed, epoch, 3]).permutation(len(table))]
            if len(self._tables) >= 4:  # a run asks for one epoch (two at a boundary) at a time
                self._tables.clear()
            self._tables[epoch] = table
        return self._tables[epoch]

    def slots(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Slots and epochs of positions [start, start+count)."""
        positions = np.arange(start, start + count)
        steps, columns = positions // self.step_size, positions % self.step_size
        epochs = steps // self.steps_per_epoch
        slots = np.array(
            [self.epoch_table(int(e))[s % self.steps_per_epoch, c] for e, s, c in zip(epochs, steps, columns)],
            dtype=np.int64,
        )
        return slots, epochs


def bucket_summary(buckets: list[Bucket], assigned: list[int], repeats: list[int]) -> list[dict[str, int]]:
    """The record's list: each used bucket's size, its images and its samples per epoch (repeats counted)."""
    images: dict[int, int] = {}
    samples: dict[int, int] = {}
    for bucket, repeat in zip(assigned, repeats):
        images[bucket] = images.get(bucket, 0) + 1
        samples[bucket] = samples.get(bucket, 0) + repeat
    return [
        {"width": buckets[b][0], "height": buckets[b][1], "images": images[b], "samples": samples[b]}
        for b in sorted(images)
    ]
