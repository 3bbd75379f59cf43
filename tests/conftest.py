"""Shared fixtures: a tiny random-weight SD pipeline and a tiny captioned imagefolder, built in code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sdtune.testing import WORDS, experiment_dict, make_imagefolder  # noqa: E402  (after the offline switches)


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
