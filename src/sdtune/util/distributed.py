"""Several processes (torchrun / accelerate launch) on GPUs (NCCL) or CPUs (gloo).

accelerate forms a CPU process group only when asked for the CPU (``cpu=True``); without that,
processes started by torchrun on a machine without a GPU each believe they are alone and train
the same run side by side. Here the CPU is asked for whenever no accelerator is there (or
``ACCELERATE_USE_CPU`` is set), and a launch whose processes did not join one group is an error.
"""

from __future__ import annotations

import os
from typing import Any

from sdtune.errors import UserError
from sdtune.util.device import on_cpu

LAUNCHER_WORLD_SIZE = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


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



def process_state() -> Any:
    """accelerate's process state, joined into one group with the other launched processes."""
    from accelerate import PartialState

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
