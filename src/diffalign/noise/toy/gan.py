"""`train_gan`: the base one-step class-conditional generator, GAN-trained (spec N: Toy branch).

Hinge loss, projection discriminator, two Adam optimizers (``"d"`` then ``"g"`` each step)
through the shared training loop (`diffalign.engine.train`), with an EMA of the weights that
is used for the validation sample grids and the exported generator
(``OUT/checkpoint-final/generator.safetensors`` + ``generator.json``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from diffalign.engine.checkpoints import check_before_setup
from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import read_json_object
from diffalign.engine.train import OptimizerSpec, StepContext, TrainConfig, TrainTask, train
from diffalign.noise.toy.data import ToyData, load_dataset
from diffalign.noise.toy.losses import hinge_d_loss, hinge_g_loss
from diffalign.noise.toy.models import ToyModelConfig, build_model, generator_run_result, save_model

# default number of epochs per dataset (digits has 11 batches of 128 per epoch)
DEFAULT_EPOCHS = {"digits": 250, "mnist": 10, "cifar10": 20}


def fixed_grid_inputs(latent_shape, num_classes: int = 10, per_class: int = 10, seed: int = 1234):
    """The same noise and labels for every sample grid: row ``c`` holds class ``c``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((num_classes * per_class, *latent_shape), generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return z, labels


def save_samples(path, generator, latent_shape, num_classes: int = 10, per_class: int = 10) -> None:
    """Sample grid (rows = classes) of `generator` on the fixed grid noise, upscaled to be seen."""
    from diffalign.engine.reports import save_image_grid

    z, labels = fixed_grid_inputs(latent_shape, num_classes, per_class)
    dev = next(generator.parameters()).device
    was = generator.training
    generator.eval()
    with torch.no_grad():
        images = generator(z.to(dev), labels.to(dev)).cpu()
    generator.train(was)
    save_image_grid(
        path,
        images,
        ncols=per_class,
        pad=1,
        upscale=max(1, 64 // images.shape[-1]),
        row_labels=[f"class {c}" for c in range(num_classes)],
        col_labels=[f"z{k}" for k in range(per_class)],
    )


class GanTask(TrainTask):
    """Hinge GAN with a projection discriminator; generator and discriminator both train."""

    def __init__(self, data: ToyData, lr: float = 2e-4, batch_size: int = 128) -> None:
        self.data = data
        self.gcfg = ToyModelConfig.for_dataset("generator", data.name)
        self.generator = build_model(self.gcfg)
        self.discriminator = build_model(ToyModelConfig.for_dataset("discriminator", data.name))
        self.lr = lr
        self.batch_size = min(batch_size, len(data))

    def trainable(self):
        return {"generator": self.generator, "discriminator": self.discriminator}

    def optimizers(self):
        betas = (0.5, 0.999)
        return {
            "d": OptimizerSpec(
                [{"params": self.discriminator.parameters()}], lr=self.lr, betas=betas
            ),
            "g": OptimizerSpec([{"params": self.generator.parameters()}], lr=self.lr, betas=betas),
        }

    def train_dataloader(self):
        ds = TensorDataset(self.data.images, self.data.labels)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def training_step(self, batch, step: int, ctx: StepContext) -> dict:
        x, y = batch
        z = torch.randn((x.shape[0], *self.gcfg.latent_shape), device=x.device)
        fake = self.generator(z, y)
        loss_d = hinge_d_loss(self.discriminator(x, y), self.discriminator(fake.detach(), y))
        ctx.backward(loss_d, "d")
        loss_g = hinge_g_loss(self.discriminator(fake, y))
        ctx.backward(loss_g, "g")
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach()}

    def on_validation_end(self, step: int, out_dir: Path):
        save_samples(Path(out_dir) / "samples.png", self.generator, self.gcfg.latent_shape)
        return None

    def export(self, out_dir: Path) -> None:
        info = {"trained_by": "train-gan", "dataset": self.data.name, "split": self.data.split}
        save_model(self.generator, out_dir, info)
        save_model(self.discriminator, out_dir, info)

    def config_dict(self) -> dict:
        return _gan_record(self.data.name, len(self.data), self.lr, self.batch_size)


def _gan_record(dataset: str, items: int | None, lr: float, batch_size: int | None) -> dict:
    """`GanTask.config_dict` (also its identity)."""
    return {"dataset": dataset, "items": items, "lr": lr, "batch_size": batch_size}


def train_gan(
    output_dir: str | os.PathLike,
    dataset: str = "digits",
    data_dir: str | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    max_items: int | None = None,
    lr: float = 2e-4,
    batch_size: int = 128,
    seed: int = 0,
    ema_decay: float = 0.999,
    validate_every: int | None = None,
    overwrite: bool = False,
    resume: str | None = None,
    tracker: str = "tensorboard",
    progress: bool = True,
    data: ToyData | None = None,
    checkpoint_every: int = 100,
) -> dict:
    """Train the base generator on the train split; returns a summary with the export folder."""
    if batch_size < 1:
        raise DiffalignError(f"--batch-size must be >= 1, got {batch_size}")
    if not (lr > 0 and lr != float("inf")):  # also rejects NaN
        raise DiffalignError(f"--lr must be > 0, got {lr}")
    if max_items is not None and max_items < 1:
        raise DiffalignError("--max-items must be >= 1")
    name = dataset if data is None else data.name
    run_config = Path(output_dir) / "run_config.json"
    if resume and not overwrite and run_config.is_file():
        old = (read_json_object(run_config).get("task") or {}).get("dataset")
        if old not in (None, name):
            raise DiffalignError(
                f"{output_dir} holds a train-gan run on '{old}', not on '{name}'; "
                "resume it with the same --dataset or use another --output-dir"
            )
    cfg = TrainConfig(
        output_dir=str(output_dir),
        max_steps=max_steps,
        epochs=epochs if max_steps is None else None,
        max_grad_norm=None,
        lr_scheduler="constant",
        ema_decay=ema_decay,
        checkpoint_every=checkpoint_every,
        best_metric=None,
        seed=seed,
        tracker=tracker,
        progress=progress,
        run_name="train-gan",
        overwrite=overwrite,
        resume=resume,
    )
    # a used folder or a resume with other settings: refused before the data loads (the items
    # and batch size are known only then; the trainer compares everything again on resume)
    check_before_setup(
        cfg, lambda: _gan_record(name, None, lr, None), unknown=("items", "batch_size")
    )
    if data is None:
        data = load_dataset(dataset, "train", data_dir)
    if max_items is not None:
        data = data.subset(range(min(len(data), max_items)))
    torch.manual_seed(seed)  # model initialisation
    task = GanTask(data, lr=lr, batch_size=batch_size)
    if max_steps is None and epochs is None:
        epochs = DEFAULT_EPOCHS[data.name]
    steps_hint = max_steps or epochs * max(1, len(data) // task.batch_size)
    cfg = dataclasses.replace(
        cfg,
        epochs=epochs if max_steps is None else None,
        validate_every=validate_every if validate_every is not None else max(1, steps_hint // 4),
        log_every=max(1, min(50, steps_hint // 20)),
    )
    return generator_run_result(train(task, cfg))
