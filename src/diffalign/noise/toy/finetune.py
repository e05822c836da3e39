"""Latent-matched SFT and the direct random-noise SFT baseline (spec N: Latent-matched SFT).

Both fine-tune the generator on the same targets with the same loss, steps and learning rate:

    loss = recon(G(z, y), x) + preserve_weight * mean (G(eps', y') - G_base(eps', y'))^2

- `sft` (latent-matched): ``z`` is the item's assigned noise ``Q* eps`` from the manifest.
- `direct_sft` (baseline): ``z`` is fresh ``N(0, I)`` noise at every step, no assignment.

``eps'`` and ``y'`` are fresh random noise and uniformly drawn labels at every step, and
``G_base`` is the frozen generator the run started from (or `base_ckpt`), so the preserve term
keeps the random-noise behaviour close to the base. Both run the generic
:class:`diffalign.noise.sft.MatchedSftTask` (the same task as `diffalign noise sft`) on the
shared loop; the fine-tuned generator is exported to
``OUT/checkpoint-final/generator.safetensors``.
"""

from __future__ import annotations

import copy
import os

import torch

from diffalign.engine.checkpoints import RESUME_HINT
from diffalign.engine.errors import DiffalignError
from diffalign.engine.train import TrainConfig, train
from diffalign.noise.sft import MatchedSftTask
from diffalign.noise.toy.models import Generator, generator_run_result, load_model

# The toy branch runs the one generic task (diffalign.noise.sft.MatchedSftTask): its generator
# plugs in through ToyOneStepGenerator, its labels are the prompts, its [-1, 1] targets the
# target "latents" (recon = latent MSE + pixel L1 on [0, 1] images, hence the factor 2 on the
# L1 weight; preserve = latent MSE to the frozen base on random labels).
SftTask = MatchedSftTask


def toy_sft_task(
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
) -> MatchedSftTask:
    """The generic SFT task on a toy generator (module doc; ``noises=None``: direct SFT)."""
    from diffalign.noise.sft import TensorPairs
    from diffalign.noise.toy.onestep import ToyOneStepGenerator

    gen = ToyOneStepGenerator(generator)
    generator.requires_grad_(True)  # the wrapper freezes its model; SFT trains it
    pixel = gen.decode(targets) if l1_weight else None
    data = TensorPairs([str(int(y)) for y in labels], targets, pixel, noises)
    return MatchedSftTask(
        gen,
        ToyOneStepGenerator(base) if preserve_weight > 0 else None,
        data,
        lr=lr,
        batch_size=batch_size,
        **_loss_weights(preserve_weight, l1_weight),
        direct=noises is None,
        export_info={"trained_by": f"{method}-sft", "preserve_weight": preserve_weight},
    )


def _loss_weights(preserve_weight: float, l1_weight: float) -> dict[str, float]:
    """The generic task's loss weights for the toy's ``preserve_weight`` and ``l1_weight``."""
    return {
        "latent_loss_weight": 1.0,
        "pixel_l1_weight": 2.0 * float(l1_weight),
        "preserve_latent_weight": float(preserve_weight),
        "preserve_pixel_weight": 0.0,
    }


def _check_before_loading(
    loop: TrainConfig,
    *,
    direct: bool,
    items: int | None,
    lr: float,
    batch_size: int,
    preserve_weight: float,
    l1_weight: float,
    hint: str = RESUME_HINT,
) -> None:
    """The trainer's used-folder and resume refusals (`engine.checkpoints.check_before_setup`)
    before the generator loads, from `toy_sft_task`'s settings (``items`` None: the number of
    targets is known only once the dataset split loads; the trainer compares again on
    resume); ``hint``: the refusal's advice."""
    from diffalign.engine.checkpoints import check_before_setup
    from diffalign.noise.sft import _LOSS_WEIGHTS, _settings_record
    from diffalign.noise.toy.onestep import ToyOneStepGenerator

    weights = _loss_weights(preserve_weight, l1_weight)

    def identity() -> dict:
        return _settings_record(
            direct=direct,
            items=items,
            lr=lr,
            batch_size=batch_size if items is None else min(batch_size, items),
            weights=tuple(weights[k] for k in _LOSS_WEIGHTS),
            lora=False,
            weight_decay=0.0,  # MatchedSftTask's default: toy_sft_task keeps it
            generator=ToyOneStepGenerator.name,
        )

    unknown = () if items is not None else ("items", "batch_size")
    check_before_setup(loop, identity, unknown=unknown, hint=hint)


def _loop_config(
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
) -> TrainConfig:
    """The shared loop's options of a toy SFT run."""
    if max_steps is None and epochs is None:
        epochs = 5
    return TrainConfig(
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


def _check_settings(lr: float, batch_size: int, preserve_weight: float, l1_weight: float) -> None:
    """One-line errors for settings the optimiser or the loss would choke on (or misuse)."""
    from diffalign.noise.sft import check_sft_settings

    check_sft_settings(lr, batch_size, preserve_weight=preserve_weight, l1_weight=l1_weight)


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
    tracker: str = "tensorboard",
    progress: bool = True,
    checkpoint_every: int = 100,
) -> dict:
    """Latent-matched SFT on an assignment manifest; the preserve anchor is `base_ckpt`
    (default: the generator it starts from)."""
    given = locals()  # sft's arguments (nothing else is bound yet)
    from diffalign.noise.toy.assignment import load_matched_pairs

    loop = check_sft_before_loading(**given)
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
    task = toy_sft_task(
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
    return generator_run_result(train(task, loop))


def check_sft_before_loading(*, hint: str = RESUME_HINT, **arguments) -> TrainConfig:
    """`sft`'s setting checks and its used-folder and resume refusals (`_check_before_loading`),
    before its generator loads; ``arguments``: `sft`'s (its defaults apply). Returns the loop's
    options. The EM loop calls it for the M-step it would resume, before its first E-step,
    with its own ``hint``."""
    from diffalign.engine.config_values import call_arguments
    from diffalign.noise.toy.assignment import load_manifest

    a = call_arguments(sft, **arguments)
    _check_settings(a["lr"], a["batch_size"], a["preserve_weight"], a["l1_weight"])
    loop = _loop_config(
        a["output_dir"], a["epochs"], a["max_steps"], a["seed"], a["overwrite"], a["resume"],
        a["tracker"], a["progress"], "sft", a["checkpoint_every"],
    )  # fmt: skip
    _check_before_loading(
        loop,
        direct=False,
        items=len(load_manifest(a["manifest_path"])[0]),
        lr=a["lr"],
        batch_size=a["batch_size"],
        preserve_weight=a["preserve_weight"],
        l1_weight=a["l1_weight"],
        hint=hint,
    )
    return loop


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
    tracker: str = "tensorboard",
    progress: bool = True,
    checkpoint_every: int = 100,
) -> dict:
    """Direct random-noise SFT (the baseline). Targets: the items of `manifest_path` when given
    (the same targets as a matched run), else the first `max_items` of the dataset split."""
    from diffalign.noise.toy.assignment import load_manifest, load_matched_pairs
    from diffalign.noise.toy.data import load_dataset

    _check_settings(lr, batch_size, preserve_weight, l1_weight)
    if max_items is not None and max_items < 1:
        raise DiffalignError(f"--max-items must be >= 1, got {max_items}")
    loop = _loop_config(
        output_dir, epochs, max_steps, seed, overwrite, resume, tracker, progress, "direct-sft",
        checkpoint_every,
    )  # fmt: skip
    _check_before_loading(
        loop,
        direct=True,
        items=None if manifest_path is None else len(load_manifest(manifest_path)[0]),
        lr=lr,
        batch_size=batch_size,
        preserve_weight=preserve_weight,
        l1_weight=l1_weight,
    )
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
    task = toy_sft_task(
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
    return generator_run_result(train(task, loop))
