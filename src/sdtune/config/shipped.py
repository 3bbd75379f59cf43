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
    """The shipped experiment file ``given`` names — a path below the configs folder, with or without
    the ``configs/`` prefix and the ``.yaml`` suffix (``cards/sdxl-lora-12gb``), or a bare name that
    one shipped file has (``sdxl-lora-12gb``) — or None when it names none."""
    parts = Path(given).parts
    if parts and parts[0] == SHIPPED_PREFIX:
        parts = parts[1:]
    if not parts or ".." in parts or Path(given).is_absolute():
        return None
    relative = Path(*parts)
    if relative.suffix not in (".yaml", ".yml"):
        relative = relative.with_name(relative.name + ".yaml")
    candidate = shipped_folder() / relative
    if candidate.is_file():
        return candidate
    named = [path for path in shipped_configs() if path.name == relative.name] if len(parts) == 1 else []
    return named[0] if len(named) == 1 else None
