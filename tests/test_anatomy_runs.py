"""The anatomy of runs and of files people bring (integration/e2e tier): every finished run records it;
``sdtune anatomy`` computes it for a run folder and for a kohya/LyCORIS file, and both agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sdtune import records, weight_anatomy
from sdtune.experiment import load_experiment
from sdtune.training import train_technique

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FILES = {  # technique → (options, its community file)
    "lora": ({"kind": "lora", "rank": 4, "alpha": 8}, "pytorch_lora_weights_kohya.safetensors"),
    "dora": ({"kind": "dora", "rank": 2, "alpha": 4}, "community_weights.safetensors"),
    "loha": ({"kind": "loha", "rank": 2, "alpha": 2}, "community_weights.safetensors"),
    "lokr": ({"kind": "lokr", "rank": 2, "alpha": 2}, "community_weights.safetensors"),
}


def _by_layer(anatomy: dict) -> dict[str, float]:
    return {layer["name"]: layer["frobenius"] for layer in anatomy["layers"]}


@pytest.mark.parametrize("kind", ["lora", pytest.param("dora", marks=pytest.mark.slow),
                                  pytest.param("loha", marks=pytest.mark.slow), pytest.param("lokr", marks=pytest.mark.slow)])
def test_a_community_file_has_the_anatomy_of_its_run(kind, write_experiment, tiny_model, tmp_path):
    """The file's ΔW, computed from its kohya/LyCORIS tensors alone, equals peft's merged ΔW of the run."""
    options, file_name = FILES[kind]
    result = train_technique(load_experiment(write_experiment(techniques={kind: options}, max_train_steps=2)), kind,
                             progress=False)
    record, path = weight_anatomy(result.run_dir / file_name, base=str(tiny_model), out=tmp_path / "file.json",
                                  progress=False)
    assert record.technique == kind and path.exists()
    from_file, from_run = _by_layer(record.anatomy), _by_layer(result.record["anatomy"])
    assert from_file.keys() == from_run.keys() and from_run
    assert all(from_file[name] == pytest.approx(from_run[name], rel=1e-4, abs=1e-9) for name in from_run)
    file_ranks = {layer["name"]: layer["numerical_rank"] for layer in record.anatomy["layers"]}
    assert file_ranks == {layer["name"]: layer["numerical_rank"] for layer in result.record["anatomy"]["layers"]}


def test_a_weights_file_without_its_base_model_is_one_line(tmp_path, capsys):
    from sdtune.cli import main

    lonely = tmp_path / "some_lora.safetensors"
    lonely.write_bytes(b"")
    assert main(["anatomy", str(lonely)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"sdtune: error: {lonely}: a weights file needs its base model; add --base MODEL (a folder, hub id or file)"
    ]


@pytest.mark.slow  # (a fresh `sdtune` process)
def test_sdtune_anatomy_of_a_run_folder(write_experiment, tmp_path):
    path = write_experiment(techniques={"full": {"kind": "full", "use_ema": True, "ema_decay": 0.9}}, max_train_steps=2)
    run = train_technique(load_experiment(path), "full", progress=False)
    result = subprocess.run([sys.executable, "-m", "sdtune", "anatomy", str(run.run_dir)], capture_output=True,
                            text=True, env=ENV)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"{run.run_dir} (full, sd1): ") and "intruder dimensions" in lines[0]
    assert lines[1].startswith("where: ") and lines[-1].endswith(str(run.run_dir / "anatomy.json"))
    written = records.read_record_file(run.run_dir / "anatomy.json")
    assert isinstance(written, records.AnatomyRecord)
    # the saved (EMA) weights against the base, as the run recorded them at its end
    assert _by_layer(written.anatomy) == pytest.approx(_by_layer(run.record["anatomy"]), rel=1e-6)
    assert "EMA" in written.anatomy["weights"]
    assert json.loads((run.run_dir / "record.json").read_text())["checks"]["trained"]["passed"]
