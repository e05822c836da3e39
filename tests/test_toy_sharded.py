"""`assign` sharded over 2 CPU processes under `accelerate launch` (spec N: Shards across
processes): same items, same noises as one process."""

from __future__ import annotations

import json

import torch

from diffalign.engine.io import load_tensors, read_jsonl
from diffalign.noise.toy.assignment import assign
from diffalign.noise.toy.models import ToyModelConfig, build_model, save_model
from launch_helper import launch_two_cpu_processes


def test_assign_two_processes_matches_one(tmp_path):
    torch.manual_seed(0)
    save_model(build_model(ToyModelConfig.for_dataset("generator", "digits")), tmp_path / "g")
    args = ["--max-items", "10", "--assign-steps", "4", "--batch-size", "3"]
    target = ["-m", "diffalign.cli", "noise", "toy", "assign", "--generator-ckpt"]
    target += [str(tmp_path / "g"), "--output-dir", str(tmp_path / "two"), *args]
    proc = launch_two_cpu_processes(target, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = read_jsonl(tmp_path / "two" / "manifest.jsonl")
    assert [r["id"] for r in two] == list(range(10))
    assert not list((tmp_path / "two").glob("*.rank-*.jsonl"))  # parts merged by rank 0
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2

    assign(tmp_path / "g", tmp_path / "one", max_items=10, assign_steps=4, batch_size=3,
           write_plots=False)  # fmt: skip
    for r in two:
        a, _ = load_tensors(tmp_path / "two" / r["noise_file"])
        b, _ = load_tensors(tmp_path / "one" / r["noise_file"])
        assert torch.equal(a["base_noise"], b["base_noise"])
        assert torch.equal(a["noise"], b["noise"]), r["id"]  # the 1-process batches: same bytes
