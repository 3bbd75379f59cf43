"""train --stop-after (asha's rungs): evaluated and checkpointed at the step, resumed to the same run."""

from __future__ import annotations

import pytest

from sdtune.experiment import load_experiment


@pytest.mark.slow  # (three tiny runs: ~35 s on 2 shared cores)
def test_stop_after_evaluates_there_and_resumes_to_the_same_run(write_experiment, tmp_path):
    """asha's rungs: a run stopped after a step is evaluated and checkpointed there; resumed, it is the same run."""
    from sdtune.training import CheckpointError, train_technique

    path = write_experiment({"lora": {"kind": "lora", "rank": 4, "alpha": 8}}, data={"validation": 0.25}, max_train_steps=3)
    first = train_technique(load_experiment(path, [f"output_dir={tmp_path / 'straight'}"]), "lora", progress=False)
    stopped = load_experiment(path, [f"output_dir={tmp_path / 'stopped'}"])
    half = train_technique(stopped, "lora", progress=False, stop_after=2)
    assert half.status == "interrupted" and half.record["steps"]["done"] == 2
    assert [entry["step"] for entry in half.record["evaluation"]] == [0, 2]  # the validation loss where it stopped
    assert (half.run_dir / "checkpoints" / "checkpoint-00000002").is_dir()
    with pytest.raises(CheckpointError, match="is already at step 2"):
        train_technique(stopped, "lora", progress=False, resume=True, stop_after=2)
    resumed = train_technique(stopped, "lora", progress=False, resume=True)
    assert resumed.status == "finished"
    assert [h["loss"] for h in resumed.record["loss_history"]] == [h["loss"] for h in first.record["loss_history"]]
    final = {e["step"]: e["validation_loss"] for e in first.record["evaluation"]}
    assert {e["step"]: e["validation_loss"] for e in resumed.record["evaluation"]} == {**final, 2: half.record["evaluation"][-1]["validation_loss"]}
