"""Process state for sharded batch jobs under `accelerate launch` (spec E: Scale out)."""

from __future__ import annotations


def process_state(device: str | None = None):
    """accelerate's `PartialState` (rank, world size, device, barriers) for a sharded job.

    Without CUDA, or when `device` is a CPU, the state is created with `cpu=True`, so processes
    started by `accelerate launch --multi_gpu --num_processes N` on a CPU machine form a gloo
    group (accelerate 1.x's `--cpu` flag alone starts a single process unless mpirun is used).
    """
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or str(device or "").startswith("cpu")
    return PartialState(cpu=cpu)
