"""Shared fixtures: a tiny random-weight SD pipeline and a tiny captioned imagefolder, built in code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from sdtune.testing.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_pipeline(folder, words=WORDS)
    return folder


FAMILY_BUILDERS = {  # a tiny random model of each family: (builder, keyword arguments)
    "sd1": ("build_tiny_pipeline", {}),
    "sd2": ("build_tiny_sd2_pipeline", {}),
    "sdxl": ("build_tiny_sdxl_pipeline", {}),
    "sd3": ("build_tiny_sd3_pipeline", {}),
    "sd3-no-t5": ("build_tiny_sd3_pipeline", {"with_t5": False}),
}


@pytest.fixture(scope="session")
def family_model(tmp_path_factory, tiny_model):
    """family name → the folder of a tiny random model of that family (built once per session)."""
    import sdtune.testing.tiny

    built = {"sd1": tiny_model}

    def get(family: str) -> Path:
        if family not in built:
            builder, kwargs = FAMILY_BUILDERS[family]
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            getattr(sdtune.testing.tiny, builder)(folder, words=WORDS, **kwargs)
            built[family] = folder
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("tiny-data"))


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


@pytest.fixture
def write_experiment(tmp_path, tiny_model, tiny_data):
    """Write an experiment YAML for the tiny model/data; keyword arguments update the train section."""

    def write(techniques: dict | None = None, data: dict | None = None, model=None, **train) -> Path:
        raw = experiment_dict(tiny_model, tiny_data, **train)
        if model is not None:
            raw["model"] = model if isinstance(model, dict) else str(model)
        if techniques is not None:
            raw["techniques"] = techniques
        raw["data"].update(data or {})
        raw["output_dir"] = str(tmp_path / "runs")
        path = tmp_path / "experiment.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from sdtune.testing.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), words=WORDS + ["realistic", "cartoon", "image"])


@pytest.fixture(scope="session")
def tiny_dino_dir(tmp_path_factory) -> Path:
    from sdtune.testing.tiny import build_tiny_dino

    return build_tiny_dino(tmp_path_factory.mktemp("tiny-dino"))
