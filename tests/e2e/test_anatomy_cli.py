"""``sdtune anatomy`` as a command: a run folder's anatomy, printed and written, equals the one the run
recorded at its end; a bad flag is argparse's usage line, no traceback (the one-line errors of bad
sources: tests/e2e/test_preflight.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sdtune import records
from sdtune.cli import main
from sdtune.experiment import load_experiment
from sdtune.training import train_technique

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _by_layer(anatomy: dict) -> dict[str, float]:
    return {layer["name"]: layer["frobenius"] for layer in anatomy["layers"]}


@pytest.mark.parametrize("argv", [["anatomy"], ["anatomy", "run", "--bases", "x"]])
def test_a_bad_flag_is_a_usage_error_without_traceback(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(("sdtune anatomy: error: ", "sdtune: error: "))


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
