"""The experiment files shipped inside the package (``sdtune/configs/``): every install has them, an
editable checkout and a wheel alike, so ``sdtune train pokemon-paper.yaml`` works from any folder."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SHIPPED_PREFIX = "configs"  # `configs/NAME.yaml`, as the files' own comments and the docs spell them


def shipped_folder() -> Path:
    """The folder of the shipped experiment files (and the prompt files they name)."""
    return Path(str(resources.files("sdtune") / "configs"))


def shipped_configs() -> list[Path]:
    """Every shipped experiment file, sorted by name."""
    return sorted(shipped_folder().rglob("*.yaml"))


def shipped_config(given: str | Path) -> Path | None:
    """The shipped experiment file ``given`` names (``NAME``, ``NAME.yaml`` or ``configs/NAME.yaml``),
    or None when it names none."""
    parts = Path(given).parts
    if len(parts) == 2 and parts[0] == SHIPPED_PREFIX:
        parts = parts[1:]
    if len(parts) != 1:
        return None
    name = parts[0] if parts[0].endswith((".yaml", ".yml")) else f"{parts[0]}.yaml"
    candidate = shipped_folder() / name
    return candidate if candidate.is_file() else None
