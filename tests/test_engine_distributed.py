"""`engine.distributed`: the notice for an `accelerate launch` asked for several processes that
started one (accelerate 1.x without --multi_gpu on a machine without GPUs)."""

from __future__ import annotations

import os
import subprocess
import sys

from diffalign.engine.distributed import rank_batches, single_process_notice

SIMPLE = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "False"}


def test_notice_only_for_a_launch_asked_for_more_processes_than_it_started():
    asked_two = {**SIMPLE, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    line = single_process_notice(asked_two, 1)
    assert line is not None and "\n" not in line and "--multi_gpu" in line
    assert single_process_notice(SIMPLE, 1) is None  # asked for one
    assert single_process_notice(asked_two, 2) is None  # got them
    assert single_process_notice({"MASTER_ADDR": "127.0.0.1"}, 1) is None  # not accelerate's
    torchrun = {**asked_two, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    assert single_process_notice(torchrun, 1) is None
    assert single_process_notice({**asked_two, "OMPI_COMM_WORLD_SIZE": "2"}, 1) is None


def test_rank_batches_are_the_one_process_batches():
    one = rank_batches(range(7), 3, 0, 1)
    assert one == [[0, 1, 2], [3, 4, 5], [6]]
    for world in (2, 3, 4):
        parts = [rank_batches(range(7), 3, r, world) for r in range(world)]
        assert sorted(b for part in parts for b in part) == one
        assert parts[0][0] == [0, 1, 2] and all(len(p) <= len(parts[0]) for p in parts)
    assert rank_batches([], 3, 1, 2) == []


def _launch(tmp_path, n: str) -> subprocess.CompletedProcess:
    script = tmp_path / "state.py"
    script.write_text(
        "from diffalign.engine.distributed import process_state\n"
        "process_state()\nprocess_state()\nprint('ran')\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", n]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return subprocess.run([*cmd, str(script)], env=env, capture_output=True, text=True, timeout=120)


def test_accelerate_launch_without_multi_gpu_prints_the_notice_once(tmp_path):
    two = _launch(tmp_path, "2")
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("ran") == 1  # accelerate started one process
    assert two.stderr.count("diffalign: notice:") == 1 and "--multi_gpu" in two.stderr
