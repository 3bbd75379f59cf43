"""Local paths versus hub ids in an experiment file."""

from __future__ import annotations

from pathlib import Path


def looks_like_local_path(text: str) -> bool:
    """True for strings that can only mean a local path (not a hub id like 'org/name')."""
    return (
        text.startswith(("/", "./", "../", "~"))
        or text.endswith((".safetensors", ".ckpt", ".parquet", ".jsonl", ".json", ".csv"))
        or text.count("/") > 1
        or Path(text).expanduser().exists()
    )


def resolve_local(text: str, base_dir: Path) -> str:
    """Relative local paths in an experiment file are relative to the file; hub ids stay as they are."""
    candidate = Path(text).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    relative_to_file = base_dir / candidate
    if relative_to_file.exists() or (looks_like_local_path(text) and not candidate.exists()):
        return str(relative_to_file.resolve()) if relative_to_file.exists() else str(relative_to_file)
    return str(candidate.resolve()) if candidate.exists() else text
