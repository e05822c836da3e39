"""Latent-matched SFT, direct SFT, the preserve loss and the EM loop (spec N, toy branch)."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from diffalign.noise.toy.assignment import assign
from diffalign.noise.toy.data import load_dataset
from diffalign.noise.toy.em_loop import em
from diffalign.noise.toy.finetune import direct_sft, sft
from diffalign.noise.toy.losses import per_item_reconstruction, preserve_loss
from diffalign.noise.toy.models import ToyModelConfig, build_model, load_model, save_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    g = build_model(ToyModelConfig.for_dataset("generator", "digits"))
    save_model(g, root / "base")
    data = load_dataset("digits", "train").subset(range(32))
    assign(root / "base", root / "asg", data=data, assign_steps=5, write_plots=False)
    return root, data


def _drift(gen_path, base_path, n=256) -> float:
    """Mean squared change of the outputs on fresh random noise (fixed seed) vs the base."""
    g, _ = load_model(gen_path)
    b, _ = load_model(base_path)
    gen = torch.Generator().manual_seed(99)
    z = torch.randn((n, 4, 4, 4), generator=gen)
    y = torch.arange(n) % 10
    with torch.no_grad():
        return float((g(z, y) - b(z, y)).pow(2).mean())


def test_losses_against_hand_computation():
    out = torch.tensor([[[[1.0, -1.0]]], [[[0.0, 0.5]]]])
    tgt = torch.tensor([[[[0.0, 0.0]]], [[[0.0, 0.0]]]])
    assert torch.allclose(per_item_reconstruction(out, tgt), torch.tensor([1.0, 0.125]))
    assert torch.allclose(
        per_item_reconstruction(out, tgt, l1_weight=0.5), torch.tensor([1.5, 0.25])
    )
    assert float(preserve_loss(out, tgt)) == pytest.approx((1 + 1 + 0 + 0.25) / 4)


def test_preserve_loss_keeps_random_noise_outputs(setup):
    root, _ = setup
    common = dict(max_steps=40, lr=2e-3, batch_size=16, progress=False, seed=0)
    sft(root / "base", root / "asg", root / "no_pres", preserve_weight=0.0, **common)
    sft(root / "base", root / "asg", root / "pres", preserve_weight=4.0, **common)
    free = _drift(root / "no_pres", root / "base")
    kept = _drift(root / "pres", root / "base")
    assert free > 0
    assert kept < 0.5 * free, (kept, free)


def test_matched_fits_its_noises_and_direct_runs(setup):
    root, data = setup
    r = sft(root / "base", root / "asg", root / "m", max_steps=30, lr=2e-3, progress=False)
    d = direct_sft(
        root / "base", root / "d", manifest_path=root / "asg", max_steps=30, lr=2e-3,
        progress=False,
    )  # fmt: skip
    assert r["steps"] == 30 and d["steps"] == 30
    hist = [h["recon"] for h in r["history"] if "recon" in h]
    assert hist[-1] < hist[0]
    info = json.loads((root / "d" / "run_config.json").read_text())
    assert info["task"]["method"] == "direct" and info["task"]["items"] == 32
    # the exported generator loads back as a digits generator
    load_model(r["generator"], "generator", "digits")


def test_sft_refuses_existing_run_and_wrong_dataset(setup, capsys):
    root, _ = setup
    sft(root / "base", root / "asg", root / "again", max_steps=2, progress=False)
    with pytest.raises(DiffalignError, match="already holds a training run"):
        sft(root / "base", root / "asg", root / "again", max_steps=2, progress=False)
    rc = main(
        [
            "noise", "toy", "sft", "--generator-ckpt", str(root / "base"), "--manifest-path",
            str(root / "asg"), "--dataset", "cifar10", "--output-dir", str(root / "x"),
        ]
    )  # fmt: skip
    assert rc == 2 and "trained on 'digits'" in capsys.readouterr().err


def test_em_cycles(setup, capsys):
    root, data = setup
    s = em(
        root / "base", root / "em", data=data.subset(range(16)), num_cycles=2, assign_steps=3,
        max_steps=3, progress=False, write_plots=False,
    )  # fmt: skip
    assert [c["cycle"] for c in s["cycles"]] == [0, 1]
    for k in (0, 1):
        assert (root / "em" / f"cycle-{k:03d}" / "assign" / "manifest.jsonl").is_file()
        assert (root / "em" / f"cycle-{k:03d}" / "sft" / "checkpoint-final").is_dir()
        # SPEC E: TensorBoard is the loop's default tracker, the toy M-step's too (was none)
        assert list((root / "em" / f"cycle-{k:03d}" / "sft" / "logs").rglob("*tfevents*"))
    # cycle 1 started from cycle 0's checkpoint
    cfg = json.loads((root / "em" / "cycle-001" / "assign" / "assign_config.json").read_text())
    assert "cycle-000" in cfg["generator"]
    # new M-steps start without the loop's "--resume latest: no checkpoint" notice (as noise em)
    assert "no checkpoint under" not in capsys.readouterr().out
    # a re-run resumes: finished cycles are kept
    s2 = em(
        root / "base", root / "em", data=data.subset(range(16)), num_cycles=2, assign_steps=3,
        max_steps=3, progress=False, write_plots=False,
    )  # fmt: skip
    assert s2["final_generator"] == s["final_generator"]


def _cycle_tensors(folder, k):
    from diffalign.engine.io import load_tensors

    files = sorted((folder / f"cycle-{k:03d}" / "assign" / "samples").glob("*/noise.safetensors"))
    return [load_tensors(f)[0] for f in files]


def test_em_draws_fresh_base_noise_each_cycle_and_resumes_exactly(setup, tmp_path, monkeypatch):
    """Cycle k's E-step draws its base noises with seed + 1000 k (`noise em`'s `cycle_seed`; old
    code reused cycle 0's); a run killed in cycle 1's E-step resumes to the same files."""
    import diffalign.noise.toy.assignment as toy_assignment
    from diffalign.engine.io import load_tensors
    from diffalign.noise.assign import base_noise

    root, data = setup
    kw = dict(data=data.subset(range(6)), num_cycles=2, assign_steps=2, max_steps=2, seed=3)
    kw.update(progress=False, write_plots=False)
    straight = em(root / "base", tmp_path / "straight", **kw)
    c0, c1 = _cycle_tensors(tmp_path / "straight", 0), _cycle_tensors(tmp_path / "straight", 1)
    assert len(c0) == len(c1) == 6
    for i, (a, b) in enumerate(zip(c0, c1)):
        assert not torch.equal(a["base_noise"], b["base_noise"])
        shape = tuple(a["base_noise"].shape)
        assert torch.equal(a["base_noise"], base_noise([i], shape, 3)[0])  # cycle 0: seed
        assert torch.equal(b["base_noise"], base_noise([i], shape, 1003)[0])  # 3 + 1000 x 1
    cfg = json.loads((tmp_path / "straight/cycle-001/assign/assign_config.json").read_text())
    assert cfg["seed"] == 1003

    real = toy_assignment._finish_item

    def killed(output_dir, writer, item, *args):
        if "cycle-001" in str(output_dir) and item == 4:
            raise KeyboardInterrupt  # a kill in the middle of cycle 1's E-step
        return real(output_dir, writer, item, *args)

    monkeypatch.setattr(toy_assignment, "_finish_item", killed)
    with pytest.raises(KeyboardInterrupt):
        em(root / "base", tmp_path / "resumed", **kw)
    assert len(_cycle_tensors(tmp_path / "resumed", 1)) == 4
    monkeypatch.undo()
    resumed = em(root / "base", tmp_path / "resumed", **kw)
    for a, b in zip(c1, _cycle_tensors(tmp_path / "resumed", 1), strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)
    final = [load_tensors(s["final_generator"])[0] for s in (straight, resumed)]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][key], final[1][key]) for key in final[0])


def test_em_refuses_a_seed_that_a_later_cycle_would_overflow(setup, tmp_path):
    root, data = setup
    with pytest.raises(DiffalignError, match="got 9223372036854775000 with 2 cycles"):
        em(root / "base", tmp_path / "em", data=data, num_cycles=2, seed=2**63 - 808)
    assert not (tmp_path / "em" / "cycle-000").exists()
