"""The anatomy of runs and of files people bring: every finished run records it; ``sdtune anatomy``'s
library call computes it for a kohya/LyCORIS file, and both agree (the command: tests/e2e/test_anatomy_cli.py)."""

from __future__ import annotations

import pytest

from sdtune import weight_anatomy
from sdtune.experiment import load_experiment
from sdtune.training import train_technique

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
    result = train_technique(load_experiment(write_experiment(techniques={kind: options}, max_train_steps=2, batch_size=1,
                                                                      gradient_accumulation_steps=1)), kind,
                             progress=False)
    record, path = weight_anatomy(result.run_dir / file_name, base=str(tiny_model), out=tmp_path / "file.json",
                                  progress=False)
    assert record.technique == kind and path.exists()
    from_file, from_run = _by_layer(record.anatomy), _by_layer(result.record["anatomy"])
    assert from_file.keys() == from_run.keys() and from_run
    assert all(from_file[name] == pytest.approx(from_run[name], rel=1e-4, abs=1e-9) for name in from_run)
    file_ranks = {layer["name"]: layer["numerical_rank"] for layer in record.anatomy["layers"]}
    assert file_ranks == {layer["name"]: layer["numerical_rank"] for layer in result.record["anatomy"]["layers"]}
