"""Process state for sharded batch jobs under `accelerate launch` (spec E: Scale out)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")

# The world-size variables of torchrun and the MPI launchers (accelerate's own list).
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_notice_printed = False


def check_device(device: str | None) -> str | None:
    """`device` if torch knows it and it is available here, else one DiffalignError line."""
    if device is None:
        return None
    import torch

    from diffalign.engine.errors import DiffalignError

    text = str(device).strip()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise DiffalignError(
            f"--device: unknown device '{device}' (use cpu, cuda, cuda:N or mps)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DiffalignError(f"--device {text}: no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DiffalignError(
                f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DiffalignError(f"--device {text}: MPS is not available")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise DiffalignError(f"--device {text}: unsupported device type (use cpu, cuda or mps)")
    return text


def rank_batches(items: Sequence[T], batch_size: int, rank: int, world: int) -> list[list[T]]:
    """The batches rank `rank` of `world` computes: `items` cut into fixed batches (`batch_size`
    at a time, in order), and of those the batches rank, rank + world, ... Every item runs in
    the batch it has in a 1-process run, so batched numerics do not depend on the number of
    processes (nor does a resume with another number)."""
    batches = [list(items[k : k + batch_size]) for k in range(0, len(items), batch_size)]
    return batches[rank::world]


def process_state(device: str | None = None):
    """accelerate's `PartialState` (rank, world size, device, barriers) for a sharded job.

    Without CUDA, or when `device` is a CPU, the state is created with `cpu=True`, so processes
    started by `accelerate launch --multi_gpu --num_processes N` on a CPU machine form a gloo
    group (accelerate 1.x's `--cpu` flag alone starts a single process unless mpirun is used).
    """
    import torch
    from accelerate import PartialState

    check_device(device)
    cpu = not torch.cuda.is_available() or str(device or "").startswith("cpu")
    state = PartialState(cpu=cpu)
    notice_single_process(state.num_processes)
    return state


def single_process_notice(env: Mapping[str, str], num_processes: int) -> str | None:
    """The notice for a process that `accelerate launch` was asked to start beside others but
    started alone, else None.

    accelerate 1.x starts several processes only through torchrun (`--multi_gpu`, or GPUs
    found) or mpirun; otherwise its simple launcher runs the command once and the run goes on
    as one process. That launcher sets MASTER_ADDR/MASTER_PORT only when it was asked for more
    than one process (or machine), and every accelerate launcher sets
    ACCELERATE_MIXED_PRECISION; torchrun and mpirun set a world size. So a launched process
    with a master address, no world size and a 1-process state was asked for more. The number
    asked for is not passed on, so the notice cannot name it.
    """
    if num_processes != 1 or "ACCELERATE_MIXED_PRECISION" not in env:
        return None
    if not env.get("MASTER_ADDR") or any(env.get(k) for k in _WORLD_SIZE_VARS):
        return None
    return (
        "diffalign: notice: `accelerate launch` was asked for several processes but started "
        "this one alone, which does all the work (accelerate starts several only with "
        "--multi_gpu; without GPUs: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
        "--num_processes N)"
    )


def notice_single_process(num_processes: int) -> None:
    """Print `single_process_notice` once per process (stderr), when it applies."""
    global _notice_printed
    line = single_process_notice(os.environ, num_processes)
    if line and not _notice_printed:
        _notice_printed = True
        print(line, file=sys.stderr, flush=True)
