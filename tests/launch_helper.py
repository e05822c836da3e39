"""Run a command under `accelerate launch` with 2 CPU processes (the sharded paths' tests).

accelerate 1.x's `--cpu --num_processes 2` starts ONE process unless mpirun is set up;
`--multi_gpu` starts 2 through torchrun, and without CUDA (ACCELERATE_USE_CPU, or our
`process_state` on a CPU machine) they form a gloo group.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence


def free_port() -> int:
    """A free local port, so 2-process tests running at the same time do not clash."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Failures of the process group itself (a port taken between our probe and torchrun's bind, a
# gloo connection dropped on a loaded machine), not of the code under test: retried once.
_TRANSIENT = (
    "EADDRINUSE",
    "Address already in use",
    "DistNetworkError",
    "Connection reset by peer",
    "Connection closed by peer",
    "gloo::EnforceNotMet",
    "terminate called without an active exception",  # gloo threads, should the exit path miss one
)


def launch_two_cpu_processes(
    target: Sequence[str], env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`target` is what follows the launcher: `["-m", "diffalign.cli", ...]` or a script path."""
    full_env = {**os.environ, **(env or {})}
    full_env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    full_env.setdefault("DIFFALIGN_NO_PROGRESS", "1")
    for attempt in range(2):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
        cmd += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
        cmd += ["--dynamo_backend", "no", "--main_process_port", str(free_port()), *target]
        proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
        transient = any(sign in proc.stderr for sign in _TRANSIENT)
        if proc.returncode == 0 or not transient or attempt:
            return proc
        sys.stderr.write(
            f"2-process launch hit a process-group failure, retrying once:\n{proc.stderr[-1500:]}\n"
        )
    return proc
