"""A wheel install (``pip install .``, not ``-e``) ships the configs and the demo assets, and the
command line finds them from any folder (slow tier: it builds a wheel and a fresh virtual environment)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(command, **options):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **options)
    assert result.returncode == 0, f"{command}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_a_wheel_install_ships_the_configs_and_the_demo_assets(tmp_path):
    # the wheel, built from a copy of the files git tracks or would (the checkout gets no build/ or egg-info)
    source = tmp_path / "source"
    for name in _run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT).stdout.splitlines():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source)])
    wheel = next((tmp_path / "dist").glob("sdtune-*.whl"))
    # a fresh environment with the wheel alone; its dependencies are this environment's packages
    # (a path in a .pth file: this environment's own .pth files, e.g. an editable sdtune, stay inactive)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    elsewhere = tmp_path / "elsewhere"  # no configs/ folder, no checkout
    elsewhere.mkdir()
    environment = {**os.environ, "PYTHONPATH": ""}
    sdtune = str(venv / "bin" / "sdtune")
    assert "compare" in _run([sdtune, "--help"], cwd=elsewhere, env=environment).stdout
    plan = _run([sdtune, "compare", "pokemon-paper.yaml", "--plan", "--output", str(tmp_path / "out")], cwd=elsewhere, env=environment)
    assert "technique: lora" in plan.stdout and "technique: full" in plan.stdout  # its prompts file was found too
    where = _run([str(python), "-c", "import sdtune.demo.run as demo; from sdtune.config.shipped import shipped_configs; "
                  "print(demo.__file__); print(demo.base_model_path()); print(len(shipped_configs()))"],
                 cwd=elsewhere, env=environment).stdout.split()
    assert Path(where[0]).is_relative_to(venv) and Path(where[1]).is_relative_to(venv)
    assert (Path(where[1]) / "unet" / "diffusion_pytorch_model.safetensors").is_file() and where[2] == str(len(list((ROOT / "src" / "sdtune" / "configs").rglob("*.yaml"))))
