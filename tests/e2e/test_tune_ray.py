"""`sdtune tune --engine ray` on a local 2-CPU Ray: the grid makes the same choices with the same scores as the
local engine, asha stops the worst trials at its rungs and replays its decisions on a rerun; Ray is always
shut down and leaves no process behind."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import ray  # the dev extra installs it (pip install -e '.[dev]'); users: pip install 'sdtune[ray]'
import yaml

from sdtune import records
from sdtune.experiment import load_experiment
from sdtune.tuning import tune

RAY_PROCESSES = ("raylet", "gcs_server")


def _ray_processes() -> list[str]:
    found = []
    for name in RAY_PROCESSES:
        result = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True)
        found += [f"{name} {pid}" for pid in result.stdout.split()]
    return found


@pytest.fixture
def local_ray():
    """A local Ray with 2 CPUs, shut down after the test; no raylet or gcs_server may be left."""
    assert not _ray_processes(), "a Ray is already running on this machine"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        deadline = time.monotonic() + 30
        while _ray_processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _ray_processes()


@pytest.fixture
def ray_experiment(write_experiment):
    def write(techniques: dict | None = None, **tuning) -> Path:
        path = write_experiment(techniques, data={"validation": 0.25}, max_train_steps=2)
        raw = yaml.safe_load(path.read_text())
        raw["tuning"] = {"learning_rate": [1.0e-9, 1.0e-3, 1.0e-2], "steps": 2, **tuning}
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


def _scores(root: Path) -> dict:
    selection = records.load_tuning(root)
    return {
        name: (entry["chosen_learning_rate"], [(t["learning_rate"], t["status"], t["score"], t["steps"]) for t in entry["trials"]])
        for name, entry in selection.techniques.items()
    }


@pytest.mark.slow
def test_grid_on_ray_makes_the_same_choices_as_local(ray_experiment, local_ray, tmp_path):
    experiment = load_experiment(ray_experiment())
    tune(experiment, output_dir=tmp_path / "local", progress=False, finals=False)
    tune(experiment, output_dir=tmp_path / "ray", engine="ray", progress=False, finals=False)
    assert records.load_tuning(tmp_path / "ray").engine == "ray"
    local, on_ray = _scores(tmp_path / "local"), _scores(tmp_path / "ray")
    assert on_ray == local  # the same rates chosen, from the same validation losses, bit for bit
    assert all(chosen != 1.0e-9 for chosen, _ in local.values())
    assert local_ray.is_initialized()  # a Ray it did not start is left running for its owner


@pytest.mark.slow
def test_asha_stops_the_worst_at_a_rung_and_replays_on_a_rerun(ray_experiment, local_ray, tmp_path):
    techniques = {"lora": {"kind": "lora", "rank": 4, "alpha": 8, "lr_scheduler": "constant"}}
    experiment = load_experiment(ray_experiment(techniques, scheduler="asha", steps=4, grace_steps=1, reduction_factor=2))
    root = tmp_path / "asha"
    tune(experiment, output_dir=root, engine="ray", progress=False, finals=False)
    selection = records.load_tuning(root)
    lora = selection.techniques["lora"]
    trials = {t["learning_rate"]: t for t in lora["trials"]}
    # middle-out: 1e-3 runs to the end first; 1e-2 beats it at every rung; 1e-9 loses at the first rung
    assert trials[1.0e-9]["status"] == "stopped" and trials[1.0e-9]["stopped_at"] == 1
    assert trials[1.0e-2]["complete"] and lora["chosen_learning_rate"] == 1.0e-2
    assert lora["trial_steps"] == 4 + 4 + 1 < 3 * 4
    run = root / "trials" / "lora" / "lr-1e-09" / "lora"
    assert (run / "checkpoints").exists() and records.read_record(run)["status"] == "interrupted"  # resumable at its rung
    before = {p: p.read_text() for p in root.rglob("record.json")}
    tune(experiment, output_dir=root, engine="ray", progress=False, finals=False)  # replays: trains nothing
    assert {p: p.read_text() for p in root.rglob("record.json")} == before
    assert records.load_tuning(root).techniques["lora"]["trials"] == lora["trials"]


@pytest.mark.slow
def test_the_ray_it_starts_is_shut_down_and_a_blind_node_is_one_line(tmp_path, monkeypatch):
    """Without a running Ray and without --address, the engine starts one (here: 2 CPUs), checks that
    every node sees the output folder, and shuts it down on close; no Ray process is left."""
    from sdtune.tuning import ray_engine

    assert not ray.is_initialized()
    start = ray.init  # (the engine starts Ray on all the machine's CPUs; a test keeps it to 2)
    monkeypatch.setattr(ray, "init", lambda **options: start(num_cpus=2, **options))
    engine = ray_engine.RayEngine(tmp_path / "out", max_concurrent=1)
    try:
        assert engine.started and ray.is_initialized() and engine.threads() >= 1
        assert not list((tmp_path / "out").glob(".sdtune-storage-check-*"))  # the marker is removed
        monkeypatch.setattr(ray_engine, "_sees", lambda path: False)  # a node that does not mount the folder
        with pytest.raises(ray_engine.SharedStorageError, match="is not visible from Ray node .* put the output folder on storage every node mounts"):
            ray_engine.check_shared_storage(ray, tmp_path / "out")
    finally:
        engine.close()
    assert not ray.is_initialized()
    deadline = time.monotonic() + 30
    while _ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes()
