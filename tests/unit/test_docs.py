"""The docs hold what the code does: every experiment-file key is documented, every page is in the site."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from sdtune.config import DataConfig, DreamBoothConfig, EvaluationConfig, ModelConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "evaluation": EvaluationConfig,
            "dreambooth": DreamBoothConfig}


def _documented_keys(section: str) -> list[str]:
    """The backticked keys in the first column of the tables under ``## <section>``."""
    text = (ROOT / "docs" / "experiment-file.md").read_text()
    match = re.search(rf"^## {re.escape(section)}\s*$(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"docs/experiment-file.md has no '## {section}' section"
    return re.findall(r"^\|\s*`([A-Za-z0-9_]+)`", match.group(1), re.M)


@pytest.mark.parametrize("section", SECTIONS)
def test_every_key_of_every_section_is_documented_once(section):
    fields = [f.name for f in dataclasses.fields(SECTIONS[section])]
    documented = _documented_keys(section)
    assert sorted(set(fields) - set(documented)) == [], "undocumented keys"
    assert sorted(set(documented) - set(fields)) == [], "documented keys the code does not have"
    assert len(documented) == len(set(documented)), "a key documented twice"


def test_every_docs_page_is_in_the_site_and_every_link_target_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))
    listed = set()

    def walk(node):
        if isinstance(node, str):
            listed.add(node)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config["nav"])
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert pages <= listed, sorted(pages - listed)
    for link in re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text()):
        assert (ROOT / link).exists(), link
