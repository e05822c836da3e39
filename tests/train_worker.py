"""Tiny tasks for the training-loop tests, and the entry point of the 2-process test.

`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/train_worker.py OUT`
trains the regression task straight (OUT/a) and with a crash + resume (OUT/b) and writes
`OUT/rank<r>.json` (sample ids seen, weight checksums, optimizer steps, world size).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from diffalign.engine.train import OptimizerSpec, TrainConfig, TrainTask, train


class IndexedData(Dataset):
    """Deterministic regression data y = sum(x) + sin(x0); items carry their index."""

    def __init__(self, n: int = 40, dim: int = 4, seed: int = 123):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x.sum(1, keepdim=True) + torch.sin(self.x[:, :1])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


def make_mlp(hidden: int = 16, dim: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))


class RegressionTask(TrainTask):
    """2-layer MLP regression; input noise from the global RNG exercises the RNG restore."""

    def __init__(
        self,
        hidden: int = 16,
        init_seed: int = 0,
        batch_size: int = 8,
        n: int = 40,
        lr: float = 1e-2,
        nan_steps: set[int] | None = None,
        crash_at: int | None = None,
        with_val: bool = False,
    ):
        self.net = make_mlp(hidden, seed=init_seed)
        self.data = IndexedData(n)
        self.batch_size = batch_size
        self.lr = lr
        self.nan_steps = nan_steps or set()
        self.crash_at = crash_at
        self.with_val = with_val
        self.seen: list[int] = []
        self.val_weights: list[torch.Tensor] = []
        self.val_dirs: list[Path] = []
        self.pred_dtypes: set[torch.dtype] = set()

    def trainable(self):
        return {"net": self.net}

    def optimizers(self):
        return {
            "main": OptimizerSpec(
                [
                    {"params": self.net[0].parameters()},
                    {"params": self.net[2].parameters(), "weight_decay": 0.0},
                ],
                lr=self.lr,
                weight_decay=0.01,
            )
        }

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)

    def training_step(self, batch, step, ctx):
        if self.crash_at is not None and step == self.crash_at:
            raise RuntimeError("simulated crash")
        x, y, idx = batch
        self.seen.extend(int(i) for i in idx)
        pred = self.net(x + 0.05 * torch.randn_like(x))
        self.pred_dtypes.add(pred.dtype)
        loss = ((pred.float() - y) ** 2).mean()
        if step in self.nan_steps:
            loss = loss * float("nan")
        return {"loss": loss, "pred_mean": pred.mean()}

    def val_dataloader(self):
        if not self.with_val:
            return None
        return DataLoader(IndexedData(16, seed=7), batch_size=8)

    def validation_step(self, batch):
        x, y, _ = batch
        self.val_weights.append(self.net[0].weight.detach().clone())
        return {"loss": float(((self.net(x) - y) ** 2).mean())}

    def on_validation_end(self, step, out_dir):
        self.val_dirs.append(out_dir)
        (out_dir / "note.txt").write_text(f"step {step}\n")
        return {"extra": 1.0}

    def config_dict(self):
        return {"hidden": self.net[0].out_features}


class GanTask(TrainTask):
    """1-D toy GAN: two optimizers, discriminator then generator, both via ctx.backward."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.g = nn.Linear(2, 2)
        self.d = nn.Sequential(nn.Linear(2, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
        g = torch.Generator().manual_seed(5)
        self.real = torch.randn(32, 2, generator=g) * 0.5 + torch.tensor([2.0, -1.0])

    def trainable(self):
        return {"g": self.g, "d": self.d}

    def optimizers(self):
        return {
            "d": OptimizerSpec([{"params": self.d.parameters()}], lr=1e-2, betas=(0.5, 0.999)),
            "g": OptimizerSpec([{"params": self.g.parameters()}], lr=1e-2, betas=(0.5, 0.999)),
        }

    def train_dataloader(self):
        return DataLoader(self.real, batch_size=8, shuffle=True)

    def training_step(self, batch, step, ctx):
        z = torch.randn(batch.shape[0], 2).to(batch.device)
        fake = self.g(z)
        loss_d = (
            nn.functional.softplus(self.d(fake.detach())).mean()
            + nn.functional.softplus(-self.d(batch)).mean()
        )
        ctx.backward(loss_d, "d")
        loss_g = nn.functional.softplus(-self.d(fake)).mean()
        ctx.backward(loss_g, "g")
        return {"loss_d": loss_d, "loss_g": loss_g}


class UnevenValTask(RegressionTask):
    """5 validation samples in batches of 2 (3 batches: 2 processes get 2 and 1) and lr 0, so
    every process holds the same weights; records the validation sample ids it saw."""

    def __init__(self):
        super().__init__(init_seed=0, lr=0.0, with_val=True)
        self.val_seen: list[int] = []

    def val_dataloader(self):
        return DataLoader(IndexedData(5, seed=7), batch_size=2)

    def validation_step(self, batch):
        self.val_seen.extend(int(i) for i in batch[2])
        return super().validation_step(batch)


def uneven_validation(out: Path) -> dict:
    """One step and the final validation of `UnevenValTask`: its metrics and the ids seen here."""
    task = UnevenValTask()
    cfg = TrainConfig(output_dir=str(out), max_steps=1, tracker="none", progress=False)
    val = [h for h in train(task, cfg).history if h.get("val")][-1]
    metrics = {k: v for k, v in val.items() if k.startswith("val/")}
    return {"final_val": metrics, "val_seen": task.val_seen}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--crash-at", type=int, default=4, help="0-based step of the simulated crash")
    ap.add_argument("--uneven-val", action="store_true", help="only `uneven_validation`")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    if args.uneven_val:
        got = uneven_validation(Path(args.out) / "run")
        (Path(args.out) / f"val{rank}.json").write_text(json.dumps(got))
        return 0

    def cfg(out: Path, resume: str | None = None) -> TrainConfig:
        return TrainConfig(
            output_dir=str(out),
            max_steps=args.steps,
            gradient_accumulation_steps=args.accum,
            ema_decay=0.9,
            checkpoint_every=3,
            log_every=2,
            tracker="none",
            progress=False,
            resume=resume,
        )

    def checksum(task: RegressionTask) -> float:
        return sum(float(p.detach().double().sum()) for p in task.net.parameters())

    out = Path(args.out)
    straight = RegressionTask(init_seed=rank + 11)  # ranks start different on purpose
    result = train(straight, cfg(out / "a"))
    crashed = RegressionTask(init_seed=rank + 11, crash_at=args.crash_at)
    try:
        train(crashed, cfg(out / "b"))
    except RuntimeError:
        pass
    resumed = RegressionTask(init_seed=rank + 31)
    train(resumed, cfg(out / "b", resume="latest"))

    from accelerate import PartialState

    state = PartialState()
    (out / f"rank{state.process_index}.json").write_text(
        json.dumps(
            {
                "seen": straight.seen,
                "seen_resumed": resumed.seen,
                "checksum": checksum(straight),
                "checksum_resumed": checksum(resumed),
                "step": result.step,
                "world": state.num_processes,
            }
        )
    )
    return 0


if __name__ == "__main__":
    code = main()
    import torch.distributed as dist

    if dist.is_initialized():  # as diffalign.cli.main: close gloo, skip the interpreter teardown
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
