"""`TrainConfig.deterministic` (spec E: Training loop): deterministic kernels during `train()`,
the previous torch settings back afterwards (also after a failing run), the same CPU losses as
without it, the switch recorded, and the option of each trainer reaching the loop's config."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from diffalign.cli import build_parser
from diffalign.engine.io import read_json
from diffalign.engine.train import TrainConfig, deterministic_algorithms, train
from train_worker import RegressionTask


def _settings() -> tuple[bool, bool, bool, bool]:
    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )


@pytest.fixture
def restore_torch_settings():
    """Put the process-wide torch flags back whatever a test did to them."""
    before = _settings()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]


class RecordingTask(RegressionTask):
    """Records the torch determinism flags seen inside each training step; calls `put_` with
    repeated indices, an op that has no deterministic implementation (on the CPU too)."""

    def __init__(self, nondeterministic_op: bool = False, **kw):
        super().__init__(**kw)
        self.flags: list[tuple[bool, bool, bool, bool]] = []
        self.nondeterministic_op = nondeterministic_op

    def training_step(self, batch, step, ctx):
        self.flags.append(_settings())
        if self.nondeterministic_op:
            torch.zeros(3).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))
        return super().training_step(batch, step, ctx)


def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), tracker="none", progress=False, log_every=1, max_steps=4)
    base.update(kw)
    return TrainConfig(**base)


def test_switch_on_inside_training_and_restored_after(tmp_path, restore_torch_settings):
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False
    torch.backends.cudnn.benchmark = True  # a user's choice the run must give back
    task = RecordingTask(nondeterministic_op=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(task, _cfg(tmp_path / "on", deterministic=True))
    assert task.flags and all(f == (True, True, True, False) for f in task.flags)
    # warn_only: the op without a deterministic kernel names itself instead of stopping the run
    assert any(
        "put_ does not have a deterministic implementation" in str(w.message) for w in caught
    )
    assert _settings() == (False, False, False, True)

    plain = RecordingTask()
    train(plain, _cfg(tmp_path / "off"))
    assert plain.flags and all(f == (False, False, False, True) for f in plain.flags)


def test_settings_restored_after_a_failing_run(tmp_path, restore_torch_settings):
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False
    torch.backends.cudnn.benchmark = True
    task = RecordingTask(crash_at=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(task, _cfg(tmp_path / "crash", deterministic=True))
    assert len(task.flags) == 3 and task.flags[-1] == (True, True, True, False)
    assert _settings() == (False, False, False, True)


def test_a_strict_mode_set_by_the_caller_comes_back(tmp_path, restore_torch_settings):
    torch.use_deterministic_algorithms(True)  # strict (not warn-only), set outside the loop
    with deterministic_algorithms(True):
        assert _settings()[:2] == (True, True)
    assert _settings()[:2] == (True, False)
    with deterministic_algorithms(False):  # off: the caller's settings are left alone
        assert _settings()[:2] == (True, False)


def test_cpu_losses_and_weights_equal_a_run_without_it(tmp_path, restore_torch_settings):
    runs = {}
    for name, flag in (("plain", False), ("det", True)):
        task = RegressionTask(init_seed=3)
        result = train(task, _cfg(tmp_path / name, deterministic=flag, ema_decay=0.9))
        runs[name] = (
            [(e["step"], e["loss"]) for e in result.history if "loss" in e],
            {k: v.clone() for k, v in task.net.state_dict().items()},
        )
    (loss_a, w_a), (loss_b, w_b) = runs["plain"], runs["det"]
    assert len(loss_a) == 4 and loss_a == loss_b
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_recorded_in_run_config_and_summary(tmp_path, monkeypatch, restore_torch_settings):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    train(RegressionTask(), _cfg(tmp_path / "on", deterministic=True, max_steps=1))
    assert read_json(tmp_path / "on/run_config.json")["train"]["deterministic"] is True
    assert read_json(tmp_path / "on/summary.json")["config"]["deterministic"] is True
    state = read_json(tmp_path / "on/checkpoints/checkpoint-1/state.json")
    assert state["config"]["deterministic"] is True
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # stays: cuBLAS keeps it
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's value is kept
    train(RegressionTask(), _cfg(tmp_path / "off", max_steps=1))
    assert read_json(tmp_path / "off/run_config.json")["train"]["deterministic"] is False
    with deterministic_algorithms(True):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


# ---- each trainer's option reaches the loop's TrainConfig ---------------------------------------


def test_repa_key_and_option(tmp_path):
    from diffalign.repa.config import config_differences, load_config
    from diffalign.repa.train import loop_config

    args = build_parser().parse_args(["repa", "train", "--deterministic", "true"])
    overrides = {k[5:]: v for k, v in vars(args).items() if k.startswith("cfg__")}
    cfg = load_config(None, {**overrides, "data_dir": str(tmp_path)})
    assert cfg.deterministic is True and loop_config(cfg, None, False).deterministic is True
    assert loop_config(load_config(None, {"data_dir": "x"}), None, False).deterministic is False
    yaml = tmp_path / "c.yaml"
    yaml.write_text("data_dir: x\ndeterministic: true\n")
    assert load_config(yaml).deterministic is True
    # a checkpoint from before the key existed, or with the switch flipped, still resumes
    assert config_differences({"lr": 1e-4}, {"lr": 1e-4, "deterministic": True}) == []


def test_fill_key_and_option(tmp_path):
    from diffalign.fill.config import load_config, resume_free_keys
    from diffalign.fill.train import train_config

    for argv, want in ((["--deterministic"], True), (["--deterministic", "false"], False)):
        args = build_parser().parse_args(["fill", "train", "--data", str(tmp_path), *argv])
        overrides = {k: v for k, v in vars(args).items() if k in ("data", "deterministic")}
        cfg = load_config(None, overrides)
        assert cfg.deterministic is want and train_config(cfg).deterministic is want
    assert train_config(load_config(None, {"data": "x"})).deterministic is False
    assert "deterministic" in resume_free_keys({}, {})


@pytest.mark.parametrize("verb, prefix", [("sft", ""), ("em", "train_")])
def test_noise_option(verb, prefix):
    from diffalign.noise.cli_data import _sft_kwargs

    base = ["noise", verb, "--manifest-path" if verb == "sft" else "--data-root", "x"]
    assert _sft_kwargs(build_parser().parse_args([*base, "--deterministic"]), prefix)[
        "deterministic"
    ]
    assert not _sft_kwargs(build_parser().parse_args(base), prefix)["deterministic"]
