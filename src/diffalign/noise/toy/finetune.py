"""Latent-matched SFT and the direct random-noise SFT baseline (spec N: Latent-matched SFT).

Both fine-tune the generator on the same targets with the same loss, steps and learning rate:

    loss = recon(G(z, y), x) + preserve_weight * mean (G(eps', y') - G_base(eps', y'))^2

- `sft` (latent-matched): ``z`` is the item's assigned noise ``Q* eps`` from the manifest.
- `direct_sft` (baseline): ``z`` is fresh ``N(0, I)`` noise at every step, no assignment.

``eps'`` and ``y'`` are fresh random noise and uniformly drawn labels at every step, and
``G_base`` is the frozen generator the run started from (or `base_ckpt`), so the preserve term
keeps the random-noise behaviour close to the base. Training runs through the shared loop; the
fine-tuned generator is exported to ``OUT/checkpoint-final/generator.safetensors``.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from diffalign.engine.errors import DiffalignError
from diffalign.engine.train import OptimizerSpec, StepContext, TrainConfig, TrainTask, train
from diffalign.noise.toy.losses import preserve_loss, reconstruction_loss
from diffalign.noise.toy.models import Generator, generator_run_result, load_model, save_model


class SftTask(TrainTask):
    """Fine-tune `generator` on (noise or fresh noise, label) -> target, plus the preserve loss."""

    def __init__(
        self,
        generator: Generator,
        base: Generator,
        labels: torch.Tensor,
        targets: torch.Tensor,
        noises: torch.Tensor | None = None,
        lr: float = 1e-4,
        batch_size: int = 64,
        preserve_weight: float = 0.25,
        l1_weight: float = 0.0,
        method: str = "matched",
    ) -> None:
        self.generator = generator
        self.base = base
        self.labels, self.targets, self.noises = labels, targets, noises
        self.lr = lr
        self.batch_size = min(batch_size, len(labels))
        self.preserve_weight = float(preserve_weight)
        self.l1_weight = float(l1_weight)
        self.method = method
        self.latent_shape = tuple(generator.config.latent_shape)
        self.num_classes = generator.config.num_classes

    def trainable(self):
        return {"generator": self.generator}

    def frozen(self):
        return {"base": self.base} if self.preserve_weight > 0 else {}

    def optimizers(self):
        return {"main": OptimizerSpec([{"params": self.generator.parameters()}], lr=self.lr)}

    def train_dataloader(self):
        tensors = [self.labels, self.targets]
        if self.noises is not None:
            tensors.append(self.noises)
        return DataLoader(TensorDataset(*tensors), batch_size=self.batch_size, shuffle=True)

    def training_step(self, batch, step: int, ctx: StepContext) -> dict:
        y, x = batch[0], batch[1]
        if self.noises is not None:
            z = batch[2]
        else:  # direct SFT: fresh random noise for every target at every step
            z = torch.randn((x.shape[0], *self.latent_shape), device=x.device)
        recon = reconstruction_loss(self.generator(z, y), x, self.l1_weight)
        out = {"recon": recon.detach()}
        loss = recon
        if self.preserve_weight > 0:
            eps = torch.randn((x.shape[0], *self.latent_shape), device=x.device)
            y2 = torch.randint(0, self.num_classes, (x.shape[0],), device=x.device)
            with torch.no_grad():
                ref = self.base(eps, y2)
            pres = preserve_loss(self.generator(eps, y2), ref)
            loss = loss + self.preserve_weight * pres
            out["preserve"] = pres.detach()
        out["loss"] = loss
        return out

    def export(self, out_dir: Path) -> None:
        save_model(
            self.generator,
            out_dir,
            {"trained_by": f"{self.method}-sft", "preserve_weight": self.preserve_weight},
        )

    def config_dict(self) -> dict:
        return {
            "method": self.method,
            "items": len(self.labels),
            "lr": self.lr,
            "batch_size": self.batch_size,
            "preserve_weight": self.preserve_weight,
            "l1_weight": self.l1_weight,
        }


def _run(
    task: SftTask,
    output_dir,
    epochs,
    max_steps,
    seed,
    overwrite,
    resume,
    tracker,
    progress,
    run_name,
    checkpoint_every: int = 100,
) -> dict:
    if max_steps is None and epochs is None:
        epochs = 5
    cfg = TrainConfig(
        output_dir=str(output_dir),
        max_steps=max_steps,
        epochs=epochs if max_steps is None else None,
        lr_scheduler="constant",
        ema_decay=None,
        checkpoint_every=checkpoint_every,
        best_metric=None,
        log_every=5,
        seed=seed,
        tracker=tracker,
        progress=progress,
        run_name=run_name,
        overwrite=overwrite,
        resume=resume,
    )
    return generator_run_result(train(task, cfg))


def _check_settings(lr: float, batch_size: int, preserve_weight: float, l1_weight: float) -> None:
    """One-line errors for settings the optimiser or the loss would choke on (or misuse)."""
    if not math.isfinite(lr) or lr <= 0:
        raise DiffalignError(f"--lr must be > 0, got {lr}")
    if batch_size < 1:
        raise DiffalignError(f"--batch-size must be >= 1, got {batch_size}")
    for name, value in (("--preserve-weight", preserve_weight), ("--l1-weight", l1_weight)):
        if not math.isfinite(value) or value < 0:
            raise DiffalignError(f"{name} must be >= 0, got {value}")


def _check_targets(labels: torch.Tensor, targets: torch.Tensor, gcfg, source) -> None:
    """The targets must be images of the generator's size and its labels in range."""
    if tuple(targets.shape[1:]) != tuple(gcfg.image_shape):
        raise DiffalignError(
            f"{source}: wrong image size {tuple(targets.shape[1:])}; the generator makes "
            f"{tuple(gcfg.image_shape)} images ({gcfg.dataset})"
        )
    if len(labels) and int(labels.max()) >= gcfg.num_classes:
        raise DiffalignError(
            f"{source}: label {int(labels.max())} out of range for {gcfg.num_classes} classes"
        )


def _check_manifest_dataset(acfg: dict, gcfg, manifest_path) -> None:
    if acfg.get("dataset") not in (None, gcfg.dataset):
        raise DiffalignError(
            f"{manifest_path}: assigned on '{acfg.get('dataset')}' but the generator was trained "
            f"on '{gcfg.dataset}'"
        )


def _load_pair(generator_ckpt, base_ckpt, dataset):
    generator, gcfg = load_model(generator_ckpt, "generator", dataset)
    if base_ckpt is None:
        base = copy.deepcopy(generator)
    else:
        base, _ = load_model(base_ckpt, "generator", gcfg.dataset)
    generator.train()
    return generator, base, gcfg


def sft(
    generator_ckpt: str | os.PathLike,
    manifest_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    dataset: str | None = None,
    epochs: int | None = 5,
    max_steps: int | None = None,
    lr: float = 1e-4,
    batch_size: int = 64,
    preserve_weight: float = 0.25,
    l1_weight: float = 0.0,
    seed: int = 0,
    base_ckpt: str | os.PathLike | None = None,
    overwrite: bool = False,
    resume: str | None = None,
    tracker: str = "none",
    progress: bool = True,
    checkpoint_every: int = 100,
) -> dict:
    """Latent-matched SFT on an assignment manifest; the preserve anchor is `base_ckpt`
    (default: the generator it starts from)."""
    from diffalign.noise.toy.assignment import load_matched_pairs

    _check_settings(lr, batch_size, preserve_weight, l1_weight)
    generator, base, gcfg = _load_pair(generator_ckpt, base_ckpt, dataset)
    noises, labels, targets, acfg = load_matched_pairs(manifest_path)
    _check_manifest_dataset(acfg, gcfg, manifest_path)
    if tuple(noises.shape[1:]) != tuple(gcfg.latent_shape):
        raise DiffalignError(
            f"{manifest_path}: noises have shape {tuple(noises.shape[1:])}, the generator takes "
            f"{tuple(gcfg.latent_shape)}"
        )
    _check_targets(labels, targets, gcfg, manifest_path)
    torch.manual_seed(seed)
    task = SftTask(
        generator,
        base,
        labels,
        targets,
        noises,
        lr,
        batch_size,
        preserve_weight,
        l1_weight,
        method="matched",
    )
    return _run(
        task,
        output_dir,
        epochs,
        max_steps,
        seed,
        overwrite,
        resume,
        tracker,
        progress,
        "sft",
        checkpoint_every,
    )


def direct_sft(
    generator_ckpt: str | os.PathLike,
    output_dir: str | os.PathLike,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "train",
    max_items: int | None = None,
    manifest_path: str | os.PathLike | None = None,
    epochs: int | None = 5,
    max_steps: int | None = None,
    lr: float = 1e-4,
    batch_size: int = 64,
    preserve_weight: float = 0.25,
    l1_weight: float = 0.0,
    seed: int = 0,
    base_ckpt: str | os.PathLike | None = None,
    overwrite: bool = False,
    resume: str | None = None,
    tracker: str = "none",
    progress: bool = True,
    checkpoint_every: int = 100,
) -> dict:
    """Direct random-noise SFT (the baseline). Targets: the items of `manifest_path` when given
    (the same targets as a matched run), else the first `max_items` of the dataset split."""
    from diffalign.noise.toy.assignment import load_matched_pairs
    from diffalign.noise.toy.data import load_dataset

    _check_settings(lr, batch_size, preserve_weight, l1_weight)
    if max_items is not None and max_items < 1:
        raise DiffalignError(f"--max-items must be >= 1, got {max_items}")
    generator, base, gcfg = _load_pair(generator_ckpt, base_ckpt, dataset)
    if manifest_path is not None:
        _, labels, targets, acfg = load_matched_pairs(manifest_path)
        _check_manifest_dataset(acfg, gcfg, manifest_path)
        _check_targets(labels, targets, gcfg, manifest_path)
    else:
        data = load_dataset(gcfg.dataset, split, data_dir)
        n = len(data) if max_items is None else min(len(data), max_items)
        labels, targets = data.labels[:n], data.images[:n]
    torch.manual_seed(seed)
    task = SftTask(
        generator,
        base,
        labels,
        targets,
        None,
        lr,
        batch_size,
        preserve_weight,
        l1_weight,
        method="direct",
    )
    return _run(
        task,
        output_dir,
        epochs,
        max_steps,
        seed,
        overwrite,
        resume,
        tracker,
        progress,
        "direct-sft",
        checkpoint_every,
    )
