"""Process state for sharded batch jobs under `accelerate launch` (spec E: Scale out)."""

from __future__ import annotations


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
    return PartialState(cpu=cpu)
