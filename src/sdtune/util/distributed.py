"""Several processes (torchrun / accelerate launch) on GPUs (NCCL) or CPUs (gloo).

accelerate forms a CPU process group only when asked for the CPU (``cpu=True``); without that,
processes started by torchrun on a machine without a GPU each believe they are alone and train
the same run side by side. Here the CPU is asked for whenever no accelerator is there (or
``ACCELERATE_USE_CPU`` is set), and a launch whose processes did not join one group is an error.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from sdtune.errors import UserError
from sdtune.util.device import on_cpu

LAUNCHER_WORLD_SIZE = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
SHARDING_VARIABLES = {"fsdp": "ACCELERATE_USE_FSDP", "deepspeed": "ACCELERATE_USE_DEEPSPEED"}  # set by `accelerate launch`


class DistributedSetupError(UserError, RuntimeError):
    """The processes were launched together but did not form one process group."""


def launched_processes() -> int:
    """How many processes the launcher started (1 when run directly)."""
    for name in LAUNCHER_WORLD_SIZE:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def launch_rank() -> int:
    """This process's rank as the launcher set it, readable before any process group exists."""
    return int(os.environ.get("RANK", os.environ.get("PMI_RANK", "0")) or 0)


def launch_command(processes: int | str = "N", launcher: str = "torchrun --nproc_per_node") -> str:
    """The command that launches this very ``sdtune`` command line on ``processes`` processes
    (``launcher``: torchrun's, or e.g. ``accelerate launch --config_file CONFIG --num_processes``)."""
    program = Path(sys.argv[0]) if sys.argv else Path()
    is_sdtune = program.name == "sdtune" or program.parent.name == "sdtune"  # the script, or python -m sdtune
    arguments = shlex.join(sys.argv[1:]) if is_sdtune else "…"
    return f"{launcher} {processes} -m sdtune {arguments}"


def check_launch_environment() -> None:
    """A world size set without the rest of a launch (a rank, and the rendezvous address the
    processes meet at) cannot form a group: one line with the launch command, before accelerate
    or torch fail with their own traceback."""
    launched = os.environ.get("WORLD_SIZE", "")
    if not launched.isdigit() or int(launched) <= 1:  # (MPI launchers name their ranks their own way)
        return
    missing = [name for name in ("RANK", "MASTER_ADDR") if not os.environ.get(name)]
    if missing:
        raise DistributedSetupError(
            f"WORLD_SIZE={launched} is set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not, "
            f"so the processes cannot meet; launch them with `{launch_command(launched)}` (or `accelerate launch "
            f"--num_processes {launched}`), or unset WORLD_SIZE to run in one process"
        )


def requested_sharding() -> str | None:
    """The sharding a launcher's accelerate config asks for ("fsdp", "deepspeed") or None."""
    for kind, name in SHARDING_VARIABLES.items():
        if os.environ.get(name, "").lower() in ("1", "true", "yes"):
            return kind
    return None


def process_state() -> Any:
    """accelerate's process state, joined into one group with the other launched processes."""
    from accelerate import PartialState

    check_launch_environment()
    state = PartialState(cpu=on_cpu())
    check_group(state.num_processes)
    return state


def check_group(num_processes: int) -> None:
    launched = launched_processes()
    if launched > 1 and num_processes != launched:
        raise DistributedSetupError(
            f"{launched} processes were launched but they formed a group of {num_processes}; on a machine "
            "without GPUs launch with `torchrun --nproc_per_node N -m sdtune …` or `accelerate launch "
            "--multi_gpu --num_processes N -m sdtune …` (ACCELERATE_USE_CPU=true forces the CPU)"
        )
