"""The shared training loop (spec E: Training loop) on tiny CPU tasks from tests/train_worker.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import diffalign.engine.checkpoints as checkpoints_mod
from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import load_pt, load_tensors, read_json
from diffalign.engine.train import (
    TrainConfig,
    lr_multiplier,
    train,
    trainable_state,
)
from launch_helper import launch_two_cpu_processes
from train_worker import GanTask, RegressionTask


def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), tracker="none", progress=False, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- pure helpers -------------------------------------------------------------------------------


def _hand_lr(s: int, kind: str, w: int, t: int) -> float:
    if s < w:
        return s / w
    frac = (s - w) / (t - w)
    return {"cosine": (1 + math.cos(math.pi * frac)) / 2, "linear": 1 - frac, "constant": 1.0}[kind]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_lr_multiplier_matches_hand_formula(kind):
    for s in range(0, 21):
        assert lr_multiplier(s, kind, 5, 20) == pytest.approx(_hand_lr(s, kind, 5, 20))
    assert lr_multiplier(0, "cosine", 0, 10) == 1.0
    assert lr_multiplier(10, "cosine", 0, 10) == pytest.approx(0.0)


def test_logged_lr_follows_the_schedule_per_group(tmp_path):
    task = RegressionTask(lr=0.1)
    res = train(task, _cfg(tmp_path, max_steps=12, warmup_ratio=0.25, lr_scheduler="cosine"))
    lrs = [e["lr"] for e in res.history if "lr" in e]
    # history entry at step s holds the lr after s scheduler steps
    assert lrs == pytest.approx([0.1 * _hand_lr(s, "cosine", 3, 12) for s in range(1, 13)])


# ---- the loop -----------------------------------------------------------------------------------


def test_loss_decreases_and_outputs(tmp_path):
    task = RegressionTask()
    res = train(
        task, _cfg(tmp_path, max_steps=40, ema_decay=0.9, lr_scheduler="constant", log_every=5)
    )
    losses = [e["loss"] for e in res.history if "loss" in e]
    assert losses[-1] < 0.5 * losses[0]
    assert res.step == 40
    for name in ("train_history.png", "train_summary.json", "run_config.json"):
        assert (tmp_path / name).is_file(), name
    summary = read_json(tmp_path / "train_summary.json")
    assert read_json(tmp_path / "summary.json") == summary
    assert summary["finished"] and summary["steps"] == 40 and summary["skipped_nonfinite"] == 0
    run_cfg = read_json(tmp_path / "run_config.json")
    assert run_cfg["task"] == {"hidden": 16} and run_cfg["train"]["max_steps"] == 40
    # final export holds the EMA weights and reloads into a fresh module
    assert res.final_dir == tmp_path / "checkpoint-final"
    tensors, _ = load_tensors(res.final_dir / "net.safetensors")
    fresh = RegressionTask(init_seed=99).net
    fresh.load_state_dict(tensors)
    ckpt = tmp_path / "checkpoints" / "checkpoint-40"
    ema, _ = load_tensors(ckpt / "ema.safetensors")
    torch.testing.assert_close(fresh[0].weight, ema["net.0.weight"])
    assert not torch.equal(fresh[0].weight, task.net[0].weight.cpu())  # live != EMA
    # every state file reads back with weights_only=True
    for f in ("optimizer-main.pt", "scheduler-main.pt", "rng.pt"):
        assert load_pt(ckpt / f)
    assert read_json(ckpt / "state.json")["step"] == 40


@pytest.mark.parametrize(
    "accum,ema,warm",
    [(1, None, False), (3, 0.8, True), (2, 0.9, False)],
    ids=["plain", "accum3-ema-warmup", "accum2-ema"],
)
def test_exact_resume_is_bit_identical(tmp_path, accum, ema, warm):
    # 40 samples / batch 8 = 5 batches per epoch: windows cross epoch ends unevenly
    kw = dict(
        max_steps=9,
        gradient_accumulation_steps=accum,
        ema_decay=ema,
        ema_warmup=warm,
        warmup_steps=2,
        checkpoint_every=4,
        keep_checkpoints=0,
        log_every=3,
    )
    straight = RegressionTask()
    res_a = train(straight, _cfg(tmp_path / "a", **kw))

    crashing = RegressionTask(crash_at=6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashing, _cfg(tmp_path / "b", **kw))
    assert [p.name for p in sorted((tmp_path / "b" / "checkpoints").iterdir())] == ["checkpoint-4"]
    resumed = RegressionTask(
        init_seed=5
    )  # different init: everything must come from the checkpoint
    res_b = train(resumed, _cfg(tmp_path / "b", resume="latest", **kw))

    _assert_identical(_weights(straight.net), _weights(resumed.net))
    assert res_a.history == res_b.history
    assert straight.seen[-len(resumed.seen) :] == resumed.seen  # same batches after the resume
    for name in ("net.safetensors",) + (("ema.safetensors",) if ema else ()):
        ta, _ = load_tensors(tmp_path / "a" / "checkpoints" / "checkpoint-9" / name)
        tb, _ = load_tensors(tmp_path / "b" / "checkpoints" / "checkpoint-9" / name)
        _assert_identical(ta, tb)
    fa, _ = load_tensors(tmp_path / "a" / "checkpoint-final" / "net.safetensors")
    fb, _ = load_tensors(tmp_path / "b" / "checkpoint-final" / "net.safetensors")
    _assert_identical(fa, fb)


def test_two_optimizer_gan_and_resume(tmp_path):
    kw = dict(max_steps=8, checkpoint_every=3, ema_decay=0.5, log_every=2, max_grad_norm=0.5)
    a = GanTask()
    g0, d0 = _weights(a.g), _weights(a.d)
    res = train(a, _cfg(tmp_path / "a", **kw))
    assert not torch.equal(a.g.weight.cpu(), g0["weight"].cpu()) and not torch.equal(
        a.d[0].weight.cpu(), d0["0.weight"].cpu()
    )
    last = res.history[-1]
    for key in ("loss_d", "loss_g", "lr/d", "lr/g", "grad_norm/d", "grad_norm/g"):
        assert key in last, key
    ckpt = tmp_path / "a" / "checkpoints" / "checkpoint-8"
    assert {p.name for p in ckpt.iterdir()} >= {
        "g.safetensors",
        "d.safetensors",
        "optimizer-d.pt",
        "optimizer-g.pt",
        "scheduler-d.pt",
        "scheduler-g.pt",
    }
    # exact resume with two optimizers: continue from checkpoint-6 in a copy of the run
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    b = GanTask(seed=3)
    train(b, _cfg(b_dir, resume=str(tmp_path / "a" / "checkpoints" / "checkpoint-6"), **kw))
    _assert_identical(_weights(a.g), _weights(b.g))
    _assert_identical(_weights(a.d), _weights(b.d))


def test_clipping_clips(tmp_path):
    norms: list[float] = []

    def hook(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    handle = register_optimizer_step_pre_hook(hook)
    try:
        res = train(RegressionTask(), _cfg(tmp_path, max_steps=5, max_grad_norm=0.05))
    finally:
        handle.remove()
    pre_clip = [e["grad_norm"] for e in res.history if not e.get("val")]
    assert len(norms) == 5 and min(pre_clip) > 0.05  # clipping was needed ...
    assert max(norms) == pytest.approx(0.05, rel=1e-4)  # ... and done
    # without clipping the optimizer sees the raw gradient
    norms.clear()
    handle = register_optimizer_step_pre_hook(hook)
    try:
        res = train(RegressionTask(), _cfg(tmp_path / "n", max_steps=3, max_grad_norm=None))
    finally:
        handle.remove()
    assert norms == pytest.approx(
        [e["grad_norm"] for e in res.history if not e.get("val")], rel=1e-5
    )


def test_ema_in_loop_matches_hand_ema_of_trajectory(tmp_path):
    traj: list[torch.Tensor] = []
    task = RegressionTask()
    init = task.net[0].weight.detach().clone()

    def post(opt, args, kwargs):
        traj.append(task.net[0].weight.detach().cpu().clone())

    handle = register_optimizer_step_post_hook(post)
    try:
        train(task, _cfg(tmp_path, max_steps=6, ema_decay=0.7, ema_warmup=True))
    finally:
        handle.remove()
    s = init.double()
    for step, p in enumerate(traj):
        d = min(0.7, (1 + step) / (10 + step))
        s = d * s + (1 - d) * p.double()
    final, _ = load_tensors(tmp_path / "checkpoint-final" / "net.safetensors")
    torch.testing.assert_close(final["0.weight"].double(), s, atol=1e-6, rtol=1e-6)


def test_validation_on_ema_weights_and_best_export(tmp_path):
    task = RegressionTask(with_val=True)
    res = train(
        task,
        _cfg(tmp_path, max_steps=6, ema_decay=0.9, validate_every=3, lr_scheduler="constant"),
    )
    vals = [e for e in res.history if e.get("val")]
    assert [e["step"] for e in vals] == [3, 6]
    assert all("val/loss" in e and e["val/extra"] == 1.0 for e in vals)
    assert [d.name for d in task.val_dirs] == ["step-0000003", "step-0000006"]
    assert (task.val_dirs[0] / "note.txt").is_file()
    # validation saw the EMA weights, not the live ones
    ema_final, _ = load_tensors(tmp_path / "checkpoint-final" / "net.safetensors")
    torch.testing.assert_close(task.val_weights[-1].cpu(), ema_final["0.weight"])
    assert not torch.equal(task.val_weights[-1].cpu(), task.net[0].weight.cpu())
    assert res.best_dir == tmp_path / "checkpoint-best"
    info = read_json(res.best_dir / "export_info.json")
    best = min(vals, key=lambda e: e["val/loss"])
    assert info["step"] == best["step"] and info["value"] == pytest.approx(best["val/loss"])


def test_validation_does_not_change_the_training_run(tmp_path):
    a, b = RegressionTask(with_val=True), RegressionTask(with_val=True)
    train(a, _cfg(tmp_path / "a", max_steps=6, validate_every=2))
    train(b, _cfg(tmp_path / "b", max_steps=6, validate_every=0))
    _assert_identical(_weights(a.net), _weights(b.net))
    assert len(a.val_dirs) == 3 and len(b.val_dirs) == 1


def test_epochs_and_epoch_exports(tmp_path):
    res = train(
        RegressionTask(),
        _cfg(tmp_path, epochs=2, gradient_accumulation_steps=2, export_every_epoch=True),
    )
    assert res.step == 6  # 5 batches per epoch, windows of 2 -> 3 steps per epoch
    assert (tmp_path / "checkpoint-epoch-001" / "net.safetensors").is_file()
    assert (tmp_path / "checkpoint-epoch-002" / "net.safetensors").is_file()


def test_keep_checkpoints_prunes(tmp_path):
    train(RegressionTask(), _cfg(tmp_path, max_steps=6, checkpoint_every=1, keep_checkpoints=2))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint-5", "checkpoint-6"]


def test_checkpoint_write_failure_keeps_previous(tmp_path, monkeypatch):
    real = checkpoints_mod.write_json

    def flaky(path, obj, **kw):
        if Path(path).name == "state.json" and obj["step"] == 4:
            raise OSError("disk full")
        return real(path, obj, **kw)

    monkeypatch.setattr(checkpoints_mod, "write_json", flaky)
    with pytest.raises(DiffalignError, match="checkpoint-4: disk full"):  # one line, path named
        train(RegressionTask(), _cfg(tmp_path, max_steps=6, checkpoint_every=2, keep_checkpoints=1))
    ckpts = tmp_path / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["checkpoint-2"]  # no half folder, no temp left
    state = read_json(ckpts / "checkpoint-2" / "state.json")
    assert state["step"] == 2
    monkeypatch.setattr(checkpoints_mod, "write_json", real)
    res = train(RegressionTask(), _cfg(tmp_path, max_steps=6, checkpoint_every=2, resume="latest"))
    assert res.step == 6


def test_nonfinite_steps_are_skipped(tmp_path):
    task = RegressionTask(nan_steps={2, 3})
    res = train(task, _cfg(tmp_path, max_steps=6))
    assert res.summary["skipped_nonfinite"] == 2
    assert all(torch.isfinite(p).all() for p in task.net.parameters())
    assert all(math.isfinite(e["loss"]) for e in res.history if "loss" in e)


def test_nonfinite_stops_after_consecutive_limit(tmp_path):
    task = RegressionTask(nan_steps=set(range(4, 100)))
    with pytest.raises(DiffalignError, match=r"loss is NaN/inf at step 7 \(3 consecutive"):
        train(task, _cfg(tmp_path, max_steps=20, checkpoint_every=2, max_nonfinite_steps=3))
    # the checkpoints written before are intact and finite
    state = read_json(tmp_path / "checkpoints" / "checkpoint-6" / "state.json")
    assert state["skipped_nonfinite"] == 2
    tensors, _ = load_tensors(tmp_path / "checkpoints" / "checkpoint-4" / "net.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_resume_from_other_config_is_one_line_error(tmp_path):
    train(RegressionTask(), _cfg(tmp_path / "a", max_steps=2))
    ckpt = tmp_path / "a" / "checkpoints" / "checkpoint-2"
    with pytest.raises(
        DiffalignError, match=r"'net.0.weight' has shape \[16, 4\] there, \[8, 4\] here"
    ):
        train(RegressionTask(hidden=8), _cfg(tmp_path / "b", max_steps=4, resume=str(ckpt)))
    with pytest.raises(DiffalignError, match="trainable modules"):
        train(GanTask(), _cfg(tmp_path / "c", max_steps=4, resume=str(ckpt)))
    with pytest.raises(DiffalignError, match="not found"):
        train(RegressionTask(), _cfg(tmp_path / "d", max_steps=4, resume=str(tmp_path / "nope")))


def test_refuses_to_clobber_a_finished_run(tmp_path):
    train(RegressionTask(), _cfg(tmp_path, max_steps=2))
    with pytest.raises(DiffalignError, match="already holds a training run"):
        train(RegressionTask(), _cfg(tmp_path, max_steps=2))
    res = train(RegressionTask(), _cfg(tmp_path, max_steps=3, overwrite=True))
    assert res.step == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-3"]
    # a longer horizon changes the cosine schedule of the steps already taken: refused (issue
    # 13); under a constant learning rate a finished run continues to a longer horizon
    with pytest.raises(DiffalignError, match=r"other settings \(loop.max_steps\)"):
        train(RegressionTask(), _cfg(tmp_path, max_steps=5, resume="latest"))
    train(RegressionTask(), _cfg(tmp_path, max_steps=3, lr_scheduler="constant", overwrite=True))
    res = train(
        RegressionTask(), _cfg(tmp_path, max_steps=5, lr_scheduler="constant", resume="latest")
    )
    assert res.step == 5


def test_resume_with_other_loop_or_task_settings_is_refused(tmp_path):
    """engine.identity on resume: a loop option that changes the weights (seed, clipping, EMA)
    or the task's identity is one line naming the keys; watching options are free."""
    train(RegressionTask(), _cfg(tmp_path, max_steps=2, lr_scheduler="constant"))
    for kw, key in (({"seed": 1}, "loop.seed"), ({"max_grad_norm": 0.5}, "loop.max_grad_norm")):
        cfg = _cfg(tmp_path, max_steps=3, lr_scheduler="constant", resume="latest", **kw)
        with pytest.raises(DiffalignError, match=rf"\({key}\); resume with the settings"):
            train(RegressionTask(), cfg)

    class OtherLr(RegressionTask):
        def identity(self):
            return {**super().identity(), "lr": 0.5}

    cfg = _cfg(tmp_path, max_steps=3, lr_scheduler="constant", resume="latest")
    with pytest.raises(DiffalignError, match=r"\(task.lr\)"):
        train(OtherLr(), cfg)
    cfg = _cfg(tmp_path, max_steps=3, lr_scheduler="constant", resume="latest", log_every=5)
    assert train(RegressionTask(), cfg).step == 3


def test_bad_config_errors(tmp_path):
    with pytest.raises(DiffalignError, match="max_steps or epochs"):
        train(RegressionTask(), _cfg(tmp_path))
    with pytest.raises(DiffalignError, match="mixed_precision"):
        train(RegressionTask(), _cfg(tmp_path, max_steps=1, mixed_precision="fp8"))
    with pytest.raises(DiffalignError, match="lr_scheduler"):
        train(RegressionTask(), _cfg(tmp_path, max_steps=1, lr_scheduler="step"))


def test_bf16_mixed_precision_on_cpu(tmp_path):
    task = RegressionTask()
    res = train(task, _cfg(tmp_path, max_steps=4, mixed_precision="bf16", ema_decay=0.9))
    assert res.step == 4 and all(math.isfinite(e["loss"]) for e in res.history if "loss" in e)
    assert task.net[0].weight.dtype == torch.float32  # fp32 master weights ...
    assert task.pred_dtypes == {torch.bfloat16}  # ... and bf16 autocast in training_step
    assert read_json(tmp_path / "train_summary.json")["mixed_precision"] == "bf16"


def test_fp16_path_runs_on_cpu(tmp_path):
    res = train(RegressionTask(), _cfg(tmp_path, max_steps=3, mixed_precision="fp16"))
    assert res.step == 3


def test_wandb_without_package_is_clear_error(tmp_path):
    pytest.importorskip("accelerate")
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed")
    except ImportError:
        pass
    with pytest.raises(DiffalignError, match="pip install wandb"):
        train(RegressionTask(), _cfg(tmp_path, max_steps=1, tracker="wandb"))


def test_tensorboard_tracker_writes_events(tmp_path):
    train(RegressionTask(), _cfg(tmp_path, max_steps=2, tracker="tensorboard", run_name="tb"))
    assert list((tmp_path / "logs" / "tb").glob("events.out.tfevents.*"))


def test_trainable_state_keeps_only_trainable_params_and_buffers():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    m[0].weight.requires_grad_(False)
    keys = set(trainable_state(m))
    assert "0.weight" not in keys and "0.bias" in keys and "1.running_mean" in keys


def test_validation_under_two_processes_equals_one(tmp_path):
    """5 validation samples in 3 batches: the 2 processes evaluate each sample once, in the
    1-process batches, so the validation loss is the 1-process one (accelerate's even
    batches would repeat samples 0 and 1 to give both processes 2 batches)."""
    from train_worker import uneven_validation

    worker = Path(__file__).with_name("train_worker.py")
    proc = launch_two_cpu_processes([str(worker), str(tmp_path / "two"), "--uneven-val"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "two" / f"val{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["val_seen"] == [0, 1, 4] and ranks[1]["val_seen"] == [2, 3]
    one = uneven_validation(tmp_path / "one")
    assert one["val_seen"] == [0, 1, 2, 3, 4]
    for got in ranks:
        assert got["final_val"].keys() == one["final_val"].keys()
        for k, v in one["final_val"].items():
            assert got["final_val"][k] == pytest.approx(v, rel=1e-12, abs=0), k


def test_two_process_cpu_run(tmp_path):
    out = tmp_path / "mp"
    worker = Path(__file__).with_name("train_worker.py")
    proc = launch_two_cpu_processes([str(worker), str(out), "--steps", "6", "--accum", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    assert r0["step"] == r1["step"] == 6
    assert r0["checksum"] == r1["checksum"]  # gradients averaged, weights in sync
    # crash at step 4 + resume from checkpoint-3 == straight run, on every process
    assert r0["checksum_resumed"] == r0["checksum"] and r1["checksum_resumed"] == r1["checksum"]
    assert r0["seen"][-len(r0["seen_resumed"]) :] == r0["seen_resumed"]
    assert r1["seen"][-len(r1["seen_resumed"]) :] == r1["seen_resumed"]
    # sharded: each process sees 3 of the 5 batches per epoch (accelerate pads the last round)
    assert len(r0["seen"]) == len(r1["seen"]) == 6 // 2 * 3 * 8
    assert r0["seen"][:8] != r1["seen"][:8]
    assert set(r0["seen"][:16]).isdisjoint(r1["seen"][:16])
    summary = read_json(out / "a" / "train_summary.json")
    assert summary["num_processes"] == 2 and summary["steps"] == 6
