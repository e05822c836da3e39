"""The training loop's speed switches (issue 18): compile (inductor on the CPU), the fused AdamW
kernel and channels_last give the eager run's numbers and keep the exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import diffalign.engine.train as train_mod
from diffalign.engine.compile import (
    compile_module,
    repeated_block_names,
    to_channels_last,
    uses_fused_adamw,
)
from diffalign.engine.io import load_pt, load_tensors
from diffalign.engine.train import OptimizerSpec, TrainConfig, TrainTask, train
from train_worker import RegressionTask


def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(
        output_dir=str(out),
        tracker="none",
        progress=False,
        log_every=1,
        max_steps=6,
        checkpoint_every=3,
        keep_checkpoints=0,
        ema_decay=0.8,
    )
    base.update(kw)
    return TrainConfig(**base)


def _final(out: Path, name: str = "net") -> dict[str, torch.Tensor]:
    return load_tensors(out / "checkpoint-final" / f"{name}.safetensors")[0]


def _losses(history: list[dict]) -> list[float]:
    return [e["loss"] for e in history if "loss" in e and "val" not in e]


def test_compiled_training_equals_eager_and_resumes_exactly(tmp_path):
    eager = train(RegressionTask(), _cfg(tmp_path / "eager"))
    compiled_task = RegressionTask()
    compiled = train(compiled_task, _cfg(tmp_path / "compiled", compile=True))
    # the module was compiled in place: same object, no `_orig_mod.` keys anywhere
    assert compiled_task.net._compiled_call_impl is not None
    assert _final(tmp_path / "compiled").keys() == _final(tmp_path / "eager").keys()
    ckpt = tmp_path / "compiled" / "checkpoints" / "checkpoint-3"
    keys = set(load_tensors(ckpt / "net.safetensors")[0]) | set(
        load_tensors(ckpt / "ema.safetensors")[0]
    )
    assert not any("_orig_mod" in k for k in keys)
    torch.testing.assert_close(_losses(compiled.history), _losses(eager.history))
    fa, fb = _final(tmp_path / "eager"), _final(tmp_path / "compiled")
    for k in fa:
        torch.testing.assert_close(fb[k], fa[k], rtol=1e-5, atol=1e-6)

    # crash after checkpoint-3 and resume, compiled: bit-identical to the straight compiled run
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(RegressionTask(crash_at=4), _cfg(tmp_path / "resumed", compile=True))
    resumed = train(
        RegressionTask(init_seed=5), _cfg(tmp_path / "resumed", compile=True, resume="latest")
    )
    assert resumed.history == compiled.history
    fr = _final(tmp_path / "resumed")
    assert all(torch.equal(fr[k], fb[k]) for k in fb)


def test_fused_adamw_kernel_is_kept_on_resume_and_resumes_exactly(tmp_path, monkeypatch):
    # the fused kernel is chosen for CUDA parameters only ...
    assert not uses_fused_adamw([torch.zeros(2)])
    assert not uses_fused_adamw([])
    # ... but torch also has it on the CPU: force it there to check the loop's resume of it
    monkeypatch.setattr(train_mod, "uses_fused_adamw", lambda params: True)
    straight = train(RegressionTask(), _cfg(tmp_path / "a", ema_decay=None))
    state = load_pt(tmp_path / "a" / "checkpoints" / "checkpoint-6" / "optimizer-main.pt")
    assert all(g["fused"] for g in state["param_groups"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(RegressionTask(crash_at=4), _cfg(tmp_path / "b", ema_decay=None))
    resumed = train(
        RegressionTask(init_seed=5), _cfg(tmp_path / "b", ema_decay=None, resume="latest")
    )
    assert resumed.history == straight.history
    fa, fb = _final(tmp_path / "a"), _final(tmp_path / "b")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)

    # a fused checkpoint resumed on the default kernel runs the default kernel
    monkeypatch.undo()
    out = tmp_path / "b"
    task = RegressionTask()
    trainer = train_mod._Trainer(task, _cfg(out, ema_decay=None, resume="latest"))
    trainer._setup()
    trainer._load_checkpoint(train_mod.list_checkpoints(out)[-1])
    groups = trainer.optimizers["main"].optimizer.param_groups
    assert all(not g["fused"] for g in groups)


class ConvTask(TrainTask):
    """A small conv net on 8x8 images (where channels_last changes the layout)."""

    def __init__(self):
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 1, 1))
        g = torch.Generator().manual_seed(1)
        self.data = torch.randn(16, 3, 8, 8, generator=g)

    def trainable(self):
        return {"net": self.net}

    def optimizers(self):
        return {"main": OptimizerSpec([{"params": self.net.parameters()}], lr=1e-2)}

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=4, shuffle=True)

    def training_step(self, batch, step, ctx):
        return {"loss": (self.net(batch) - batch.mean(1, keepdim=True)).pow(2).mean()}


def test_channels_last_gives_the_same_training_and_checkpoints(tmp_path):
    assert not to_channels_last(nn.Linear(2, 2))
    plain = train(ConvTask(), _cfg(tmp_path / "a", max_steps=4))
    task = ConvTask()
    nhwc = train(task, _cfg(tmp_path / "b", max_steps=4, channels_last=True))
    assert task.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(_losses(nhwc.history), _losses(plain.history))
    fa, fb = _final(tmp_path / "a"), _final(tmp_path / "b")
    assert fa.keys() == fb.keys()
    for k in fa:
        torch.testing.assert_close(fb[k], fa[k], rtol=1e-5, atol=1e-6)


def test_compile_module_is_regional_for_diffusers_repeated_blocks(tiny_model_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir("sd15"), subfolder="unet")
    keys = list(unet.state_dict())
    assert repeated_block_names(unet) == ["BasicTransformerBlock"]
    assert compile_module(unet) == "regional"
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert unet._compiled_call_impl is None
    assert list(unet.state_dict()) == keys
    net = nn.Sequential(nn.Linear(2, 2))
    assert compile_module(net) == "whole" and net._compiled_call_impl is not None


def test_speed_up_modules_is_what_the_loop_does_to_trainable_modules():
    # the one function behind TrainConfig(compile, channels_last), which bench/ also calls
    from diffalign.engine.compile import speed_up_modules

    def nets():
        return {"conv": nn.Sequential(nn.Conv2d(3, 4, 3)), "lin": nn.Linear(2, 2)}

    plain = nets()
    assert speed_up_modules(plain, "cpu") == {}
    assert plain["conv"]._compiled_call_impl is None
    assert plain["conv"][0].weight.is_contiguous()
    fast = nets()
    assert speed_up_modules(fast, "cpu", compile=True, channels_last=True) == {
        "conv": "whole",
        "lin": "whole",
    }
    assert fast["conv"][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(m._compiled_call_impl is not None for m in fast.values())
    layout = nets()
    assert speed_up_modules(layout, "cpu", channels_last=True) == {}
    assert layout["conv"][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert layout["lin"]._compiled_call_impl is None


class ThreeDropouts(nn.Module):
    """q, k, v projections of one input, each behind its own dropout (peft's LoRA dropout on an
    attention block's to_q / to_k / to_v)."""

    def __init__(self, n: int = 16):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(n, n) for _ in range(3))
        self.drop = nn.ModuleList(nn.Dropout(0.5) for _ in range(3))

    def forward(self, x):
        q, k, v = (p(d(x)) for p, d in zip(self.proj, self.drop))
        return (q * k).softmax(-1) * v


def test_compiled_dropout_draws_the_eager_masks_with_eager_random():
    """The training loop compiles with `eager_random`: inductor's dropout then draws from torch's
    generator in eager's order (output, gradients and the generator's state after the step are
    eager's); with inductor's own random numbers they are not."""

    def step(compile_kwargs: dict | None) -> list[torch.Tensor]:
        torch._dynamo.reset()  # no graph of another compile call reused
        torch.manual_seed(0)
        net = ThreeDropouts()
        if compile_kwargs is not None:
            compile_module(net, **compile_kwargs)
        torch.manual_seed(3)
        y = net(torch.ones(4, 16))
        y.square().sum().backward()
        return [y.detach(), net.proj[0].weight.grad, torch.rand(3)]

    eager = step(None)
    torch.testing.assert_close(step({"eager_random": True}), eager)
    assert not torch.equal(step({})[2], eager[2])
