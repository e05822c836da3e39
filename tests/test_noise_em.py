"""The EM loop on a one-step diffusion generator (spec N; seed 001 step 4): cycle folders, the
next cycle starting from the last checkpoint, resume at cycle granularity."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.cli import main
from noise_data_helpers import model_args, write_pairs

ARGS = ["--num-cycles", "2", "--assign-steps", "1", "--train-max-steps", "1"]
ARGS += ["--train-batch-size", "2", "--tracker", "none", "--no-plots", "--num-intermediates", "0"]


@pytest.fixture(scope="module")
def sdxl(tiny_model_dir):
    return tiny_model_dir("sdxl")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_em_cycles_chain_and_resume(sdxl, tmp_path, lora):
    data = write_pairs(tmp_path / "data", n=2)
    work = tmp_path / "em"
    argv = ["noise", "em", "--data-root", str(data), "--work-dir", str(work), *ARGS]
    argv += model_args(sdxl) + (["--lora-rank", "2"] if lora else [])
    assert main(argv) == 0
    s = json.loads((work / "summary.json").read_text())
    assert [c["cycle"] for c in s["cycles"]] == [0, 1]
    for k in range(2):
        cdir = work / f"cycle-{k:03d}"
        assert (cdir / "dataset" / "manifest.jsonl").is_file()
        assert (cdir / "sft" / "checkpoint-final").is_dir()
        assert s["cycles"][k]["e_step"]["finished"] == 2
    # cycle 1 assigned with cycle 0's model and trained from it
    cfg1 = json.loads((work / "cycle-001" / "dataset" / "dataset_config.json").read_text())
    # (recorded by identity: resolved path and hashes, engine.identity)
    assert cfg1["model"]["model"]["path"] == str(
        (work / "cycle-000/sft/checkpoint-final").resolve()
    )
    assert s["final_model"] == str(work / "cycle-001" / "sft" / "checkpoint-final")
    if lora:
        assert (work / "cycle-001/sft/checkpoint-final/pytorch_lora_weights.safetensors").is_file()
    else:
        assert (work / "cycle-001/sft/checkpoint-final/model_index.json").is_file()
    # each E-step draws fresh base noise: cycle k's seed is seed + 1000 k (the seed's EM)
    from diffalign.engine.io import load_tensors
    from diffalign.noise.assign import base_noise

    eps = []
    for k in range(2):
        noise_file = next(
            (work / f"cycle-{k:03d}" / "dataset" / "samples").glob("000000_*/*.safet*")
        )
        t, meta = load_tensors(noise_file)
        ref = base_noise([0], t["base_noise"].shape, 1000 * k)[0]  # --seed 0
        assert torch.equal(t["base_noise"], ref), k
        eps.append(t["base_noise"])
    assert not torch.equal(eps[0], eps[1])
    cfg0 = json.loads((work / "cycle-000" / "sft" / "run_config.json").read_text())
    assert cfg0["task"]["weight_decay"] == 1e-4  # the seed's default
    # a re-run keeps the finished cycles
    assert main(argv) == 0
    s2 = json.loads((work / "summary.json").read_text())
    assert s2["final_model"] == s["final_model"]
    assert all(c["m_step_steps"] is None for c in s2["cycles"])  # reused, not retrained


@pytest.mark.slow  # 2 processes under accelerate launch
def test_em_two_processes(sdxl, tmp_path):
    from launch_helper import launch_two_cpu_processes

    data = write_pairs(tmp_path / "data", n=2)
    work = tmp_path / "em"
    argv = ["-m", "diffalign.cli", "noise", "em", "--data-root", str(data), "--work-dir"]
    argv += [str(work), *ARGS, *model_args(sdxl), "--lora-rank", "2"]
    r = launch_two_cpu_processes(argv)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((work / "summary.json").read_text())
    assert [c["e_step"]["finished"] for c in s["cycles"]] == [2, 2]
    assert (work / "cycle-001/sft/checkpoint-final/pytorch_lora_weights.safetensors").is_file()


def test_em_reads_and_hashes_the_pairs_once_before_loading(tmp_path, monkeypatch):
    """The refusal of other settings before loading checked each cycle's E-step dataset with
    its own read and hash of pairs.jsonl (num_cycles of each before any model loaded): once."""
    import diffalign.noise.dataset as dataset
    from diffalign.noise.em import em

    data = write_pairs(tmp_path / "data", n=2)
    work = tmp_path / "em"
    for k in range(3):
        (work / f"cycle-{k:03d}" / "dataset").mkdir(parents=True)
    calls = {"read_pairs": 0, "file_sha256": 0}
    for name in calls:
        real = getattr(dataset, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(dataset, name, counted)
    seen = {}

    def load(model, first):
        seen.update(calls)
        raise KeyboardInterrupt  # the first model load: stop there

    with pytest.raises(KeyboardInterrupt):
        em("m", data, work, num_cycles=3, load=load, progress=False,
           assign_kwargs={"settings": dataset.AssignSettings(steps=1)}, sft_kwargs={})  # fmt: skip
    assert seen == {"read_pairs": 1, "file_sha256": 1}
