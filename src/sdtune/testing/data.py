"""Tiny captioned datasets, experiment files and records for tests and benchmarks, built in code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from sdtune import records

WORDS = ["a", "red", "green", "blue", "square", "circle", "small", "large", "yoda"]
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}


def make_imagefolder(folder: Path, count: int = 8, size: int = 40, seed: int = 0) -> Path:
    """Coloured squares and circles on white, with captions, as a 🤗 imagefolder."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        colour = list(COLOURS)[i % len(COLOURS)]
        shape = ("square", "circle")[(i // len(COLOURS)) % 2]
        pixels = np.full((size, size + 8, 3), 245, dtype=np.uint8)  # not square: exercises the crop
        yy, xx = np.mgrid[:size, : size + 8]
        cx, cy = rng.integers(14, size - 6), rng.integers(14, size - 14)
        mask = (abs(xx - cx) < 9) & (abs(yy - cy) < 9) if shape == "square" else (xx - cx) ** 2 + (yy - cy) ** 2 < 81
        pixels[mask] = COLOURS[colour]
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": f"a {colour} {shape}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def experiment_dict(model: Path, data: Path, **train) -> dict:
    return {
        "name": "tiny",
        "model": str(model),
        "data": {"source": str(data), "resolution": 32, "center_crop": True, "random_flip": True},
        "train": {
            "batch_size": 2,
            "gradient_accumulation_steps": 2,
            "max_train_steps": 3,
            "learning_rate": 1.0e-3,
            "checkpointing_steps": None,
            **train,
        },
        "techniques": {
            "full": {"kind": "full", "use_ema": True, "ema_decay": 0.9, "lr_scheduler": "constant"},
            "lora": {"kind": "lora", "rank": 4, "alpha": 8, "lr_scheduler": "cosine"},
        },
    }


def finished_train_record(name: str, steps: int = 10) -> records.TrainRecord:
    """A finished train record of technique ``name`` with every field the report's tables read
    (the numbers are made up)."""
    return records.TrainRecord(
        status="finished", technique={"name": name, "kind": name}, seeds={"train": 0},
        config={"name": "live", "techniques": {"full": {}, "lora": {}}}, steps={"done": steps, "max": steps},
        timing={"train_time_s": 12.5, "s_per_step": 1.25, "images_per_s": 3.2},
        memory={"peak": {"bytes": 123_000_000, "kind": "cpu_peak_rss"}},
        outputs={"adapter": {"bytes": 110_000}}, parameters={"trainable": 4096, "components": {"unet": 1_490_000}},
    )
