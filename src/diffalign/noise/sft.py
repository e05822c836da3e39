"""Latent-matched SFT and the direct random-noise baseline on any one-step generator (spec N;
seed 001 "Step 3: fine-tune on matched noises instead of random noises").

One task for every generator (:class:`MatchedSftTask` on the shared training loop):

    loss = assign_loss(denoise(z, c), encode(x), decode(.), x; latent_w, pixel_w)
         + assign_loss(denoise(eps', c'), denoise_base(eps', c'), decode(.), decode_base(.);
                       preserve_latent_w, preserve_pixel_w)

- matched SFT: ``z`` is the item's assigned noise ``Q* eps`` (from the dataset manifest);
- direct SFT (``--direct``, the baseline): ``z`` is fresh ``N(0, I)`` noise at every step;
- preserve: ``eps'`` is fresh random noise, ``c'`` the generator's preserve conditions (the
  batch's prompts; the toy draws random labels), and the base is the frozen generator the run
  started from (with a LoRA: the same U-Net with the adapter switched off).

The toy branch (`diffalign noise toy sft/direct-sft`) and `diffalign noise sft` both run this
task; what differs is only the generator (toy GAN vs diffusers U-Net, full or LoRA) and how it
is exported (`OneStepGenerator.export_finetuned`: a toy weights file, a full diffusers pipeline,
or diffusers LoRA weights that `pipe.load_lora_weights` reads). Checkpoints: the loop's
resumable ones under ``checkpoints/`` (exact resume), exports ``checkpoint-final``,
``checkpoint-best`` (lowest validation loss on fixed noises), ``checkpoint-epoch-NNN``, and
``train_history.png`` / ``train_summary.json``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset

from diffalign.engine.checkpoints import RESUME_HINT
from diffalign.engine.errors import DiffalignError, library_output_held
from diffalign.engine.train import OptimizerSpec, StepContext, TrainConfig, TrainTask, train
from diffalign.noise.assign import assign_loss, base_noise, load_target_image

if TYPE_CHECKING:
    from diffalign.noise.dataset import BuiltDataset

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# AdamW weight decay of `noise sft` / `noise em` (seed 001 `cli_train_latent_matched_sft`); the toy
# branch keeps its own default (the seed's toy trainers use Adam without decay)
SEED_WEIGHT_DECAY = 1e-4


class ManifestPairs(Dataset):
    """(assigned noise, target image, prompt) items of a `build-dataset` manifest."""

    def __init__(
        self,
        records: list[dict],
        size: tuple[int, int],
        with_noise: bool = True,
        sigma: float = 1.0,
    ):
        self.records, self.size, self.with_noise = records, tuple(size), with_noise
        self.sigma = sigma  # the generator's init_noise_sigma: the seed's .pt files hold sigma z

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        from diffalign.noise.assign import read_noise_file

        r = self.records[i]
        item = {
            "target": load_target_image(r["target_path"], self.size),
            "prompt": r["prompt"],
            "index": i,
        }
        if self.with_noise:
            item["noise"] = read_noise_file(r["noise_path"], self.sigma)[0]
        return item


class TensorPairs(Dataset):
    """In-memory items (the toy branch): ``target_latent`` (and ``target`` images when a pixel
    loss needs them), prompts, optional noises."""

    def __init__(self, prompts, target_latents, targets=None, noises=None):
        self.prompts, self.lat, self.targets, self.noises = prompts, target_latents, targets, noises

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        item = {"target_latent": self.lat[i], "prompt": self.prompts[i], "index": i}
        if self.targets is not None:
            item["target"] = self.targets[i]
        if self.noises is not None:
            item["noise"] = self.noises[i]
        return item


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module):
    """Run a LoRA'd diffusers model as its base (the preserve loss's reference)."""
    module.disable_adapters()
    try:
        yield
    finally:
        module.enable_adapters()


class MatchedSftTask(TrainTask):
    """Matched (or ``direct``) SFT of ``generator.trainable_module()`` (module doc)."""

    def __init__(
        self,
        generator,
        base,
        data: Dataset,
        val_data: Dataset | None = None,
        *,
        lr: float = 1e-5,
        batch_size: int = 1,
        latent_loss_weight: float = 1.0,
        pixel_l1_weight: float = 0.1,
        preserve_latent_weight: float = 0.5,
        preserve_pixel_weight: float = 0.05,
        direct: bool = False,
        lora: bool = False,
        weight_decay: float = 0.0,
        seed: int = 0,
        export_info: dict | None = None,
        models: dict | None = None,
    ) -> None:
        self.generator, self.base, self.data, self.val_data = generator, base, data, val_data
        self.lr, self.weight_decay = lr, weight_decay
        self.batch_size = min(batch_size, len(data))
        self.w = (latent_loss_weight, pixel_l1_weight)
        self.pw = (preserve_latent_weight, preserve_pixel_weight)
        self.direct, self.lora, self.seed = direct, lora, seed
        self.latent_shape = tuple(generator.latent_shape())
        self.export_info = dict(export_info or {})
        self.models = dict(models or {})  # identities of the models and data (engine.identity)
        self.module = generator.trainable_module()

    @property
    def preserving(self) -> bool:
        return self.pw[0] > 0 or self.pw[1] > 0

    def trainable(self):
        return {self.generator.trainable_name: self.module}

    def frozen(self):
        # the generator's other parts (VAE, text encoders) follow its U-Net to the loop's device
        mods = dict(self.generator.frozen_modules())
        if self.preserving and self.base is not None:
            mods["base"] = self.base.trainable_module()
        return mods

    def optimizers(self):
        params = [p for p in self.module.parameters() if p.requires_grad]
        return {
            "main": OptimizerSpec([{"params": params}], lr=self.lr, weight_decay=self.weight_decay)
        }

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        if self.val_data is None:
            return None
        return DataLoader(self.val_data, batch_size=self.batch_size, shuffle=False)

    # -- the loss

    def _targets(self, batch):
        gen = self.generator
        target = batch.get("target")
        if target is not None:
            target = target.to(gen.device)
        lat = batch.get("target_latent")
        if lat is None:
            with torch.no_grad():
                lat = gen.encode_images(target)
        return lat.to(gen.device), target

    def _recon(self, batch, z: torch.Tensor) -> torch.Tensor:
        gen = self.generator
        lat_t, img_t = self._targets(batch)
        embeds = gen.encode_prompts(list(batch["prompt"]))
        lat = gen.denoise(z.to(gen.device), embeds)
        img = gen.decode(lat) if self.w[1] else None
        return assign_loss(lat, lat_t, img, img_t, *self.w).mean(), embeds

    def _base_out(self, eps, embeds):
        need_img = bool(self.pw[1])
        with torch.no_grad():
            if self.base is not None:
                lat = self.base.denoise(eps, embeds)
                return lat, (self.base.decode(lat) if need_img else None)
            with adapters_disabled(self.module):
                lat = self.generator.denoise(eps, embeds)
                return lat, (self.generator.decode(lat) if need_img else None)

    def training_step(self, batch, step: int, ctx: StepContext) -> dict:
        gen = self.generator
        n = len(batch["prompt"])
        if self.direct:  # the baseline: fresh random noise for every target at every step
            z = torch.randn((n, *self.latent_shape), device=gen.device)
        else:
            z = batch["noise"]
        recon, embeds = self._recon(batch, z)
        out = {"recon": recon.detach()}
        loss = recon
        if self.preserving:
            eps = torch.randn((n, *self.latent_shape), device=gen.device)
            pe = gen.preserve_embeds(embeds)
            ref_lat, ref_img = self._base_out(eps, pe)
            lat = gen.denoise(eps, pe)
            img = gen.decode(lat) if self.pw[1] else None
            pres = assign_loss(lat, ref_lat, img, ref_img, *self.pw).mean()
            loss = loss + pres
            out["preserve"] = pres.detach()
        out["loss"] = loss
        return out

    def validation_step(self, batch) -> dict[str, float]:
        """Reconstruction loss on fixed noises: the matched noises, or (direct) per-item seeded
        random noises, so the metric is comparable across steps."""
        if self.direct or "noise" not in batch:
            ids = [int(i) for i in batch["index"]]
            z = base_noise(ids, self.latent_shape, self.seed + 7)
        else:
            z = batch["noise"]
        recon, _ = self._recon(batch, z)
        return {"loss": float(recon)}

    def export(self, out_dir: Path) -> None:
        self.generator.export_finetuned(out_dir, self.export_info)

    def config_dict(self) -> dict:
        return _settings_record(
            direct=self.direct,
            items=len(self.data),
            lr=self.lr,
            batch_size=self.batch_size,
            weights=(*self.w, *self.pw),
            lora=self.lora,
            weight_decay=self.weight_decay,
            generator=getattr(self.generator, "name", None),
        )

    def identity(self) -> dict:
        """Compared on resume: the settings above, weight decay, the models and the data."""
        return {**self.config_dict(), "weight_decay": self.weight_decay, **self.models}


def _settings_record(
    *, direct, items, lr, batch_size, weights, lora, weight_decay, generator
) -> dict:
    """`MatchedSftTask.config_dict`: ``weights`` = (latent, pixel L1, preserve latent, preserve
    pixel)."""
    return {
        "method": "direct" if direct else "matched",
        "items": items,
        "lr": lr,
        "batch_size": batch_size,
        "latent_loss_weight": weights[0],
        "pixel_l1_weight": weights[1],
        "preserve_latent_weight": weights[2],
        "preserve_pixel_weight": weights[3],
        "lora": lora,
        "weight_decay": weight_decay,
        "generator": generator,
    }


def check_sft_settings(lr: float, batch_size: int, **weights: float) -> None:
    """One-line errors for settings the optimiser or the loss would choke on."""
    if not math.isfinite(lr) or lr <= 0:
        raise DiffalignError(f"--lr must be > 0, got {lr}")
    if batch_size < 1:
        raise DiffalignError(f"--batch-size must be >= 1, got {batch_size}")
    for name, value in weights.items():
        if not math.isfinite(value) or value < 0:
            raise DiffalignError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


def run_sft(task: MatchedSftTask, config: TrainConfig):
    """Train ``task`` on the shared loop (returns the loop's `TrainResult`)."""
    return train(task, config)


def sft_result(result) -> dict:
    """What `diffalign noise sft` returns: the exported model folders and the run's record."""
    return {
        "model": str(result.final_dir),
        "best": str(result.best_dir) if result.best_dir else None,
        "steps": result.step,
        "output_dir": str(result.output_dir),
        "summary": result.summary,
    }


# ----------------------------------------------------------------------------- diffusion models


def prepare_unet(
    generator,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lora_targets=LORA_TARGETS,
    init_lora: str | os.PathLike | None = None,
) -> bool:
    """Make the U-Net trainable: all of it, or a LoRA adapter (new, or ``init_lora``'s weights,
    to continue an earlier LoRA run). A LoRA fused at load (Hyper-SD 1.5) stays fused; its
    adapter layers are dropped first. Returns whether a LoRA is trained."""
    unet = generator.trainable_module()
    if getattr(unet, "peft_config", None):
        generator.pipe.unload_lora_weights()  # keeps the fused weights, drops the layers
    unet.requires_grad_(False)
    if lora_rank is None and init_lora is None:
        unet.requires_grad_(True)
        return False
    if not hasattr(unet, "add_adapter"):  # e.g. PixArt-alpha's transformer in diffusers 0.42
        raise DiffalignError(
            f"{generator.name} takes no LoRA: its {type(unet).__name__} has no diffusers LoRA "
            "support; fine-tune the whole model (leave out --lora-rank / --init-lora)"
        )
    if init_lora is not None:
        try:
            with library_output_held():  # diffusers logs the failure itself: our line alone
                generator.load_lora(init_lora, adapter_name="default")
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DiffalignError(f"--init-lora {init_lora}: cannot load it ({first})") from None
    else:
        from peft import LoraConfig

        unet.add_adapter(
            LoraConfig(
                r=int(lora_rank),
                lora_alpha=float(lora_alpha or lora_rank),
                init_lora_weights="gaussian",
                target_modules=list(lora_targets),
            )
        )
    for name, p in unet.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    if not any(p.requires_grad for p in unet.parameters()):
        raise DiffalignError("the LoRA adapter has no trainable weight in this U-Net")
    return True


def sft(
    generator,
    manifest_path: str | os.PathLike | BuiltDataset,
    output_dir: str | os.PathLike,
    *,
    direct: bool = False,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    init_lora: str | os.PathLike | None = None,
    epochs: int | None = 2,
    max_steps: int | None = None,
    batch_size: int = 1,
    lr: float = 1e-5,
    latent_loss_weight: float = 1.0,
    pixel_l1_weight: float = 0.1,
    preserve_latent_weight: float = 0.5,
    preserve_pixel_weight: float = 0.05,
    ema_decay: float | None = None,
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float | None = 1.0,
    weight_decay: float = SEED_WEIGHT_DECAY,
    val_items: int = 4,
    seed: int = 0,
    checkpoint_every: int = 0,
    resume: str | None = None,
    overwrite: bool = False,
    tracker: str = "tensorboard",
    progress: bool = True,
    model_info: dict | None = None,
    deterministic: bool = False,
    allow_other_generator: bool = False,
    compile: bool = False,
) -> dict:
    """`diffalign noise sft`: fine-tune a diffusion one-step generator's U-Net (full, or LoRA
    with ``lora_rank``) on a `build-dataset` manifest; ``direct`` = random-noise baseline. A
    dataset built with another generator or model is refused (``allow_other_generator``: a
    warning); a resume with other settings, models or data is refused (`engine.identity`).
    ``manifest_path``: the dataset's folder or manifest, or the `BuiltDataset` read already."""
    from diffalign.noise.dataset import (
        as_dataset,
        check_dataset_generator,
        check_generator_size,
        model_record,
    )

    check_sft_settings(
        lr,
        batch_size,
        latent_loss_weight=latent_loss_weight,
        pixel_l1_weight=pixel_l1_weight,
        preserve_latent_weight=preserve_latent_weight,
        preserve_pixel_weight=preserve_pixel_weight,
    )
    if latent_loss_weight == 0 and pixel_l1_weight == 0:
        raise DiffalignError("--latent-loss-weight and --pixel-l1-weight are both 0: no loss")
    if lora_rank is not None and lora_rank < 1:
        raise DiffalignError(f"--lora-rank must be >= 1, got {lora_rank}")
    dataset = as_dataset(manifest_path)
    records = dataset.records
    check_generator_size(dataset, generator)
    record = model_record(model_info)
    warning = None
    if not direct:  # the direct baseline reads targets and prompts only, never the noises
        warning = check_dataset_generator(
            dataset, generator.name, record, allow=allow_other_generator
        )
    if warning is not None:
        print(f"diffalign: warning: {warning}", file=sys.stderr, flush=True)
    models = _data_identity(dataset, init_lora, lora_rank, lora_alpha, record)
    shape = tuple(generator.latent_shape())
    if not direct:
        from diffalign.noise.assign import check_noise_file
        from diffalign.noise.assign import item_id as _item

        for r in records:
            problem = check_noise_file(r["noise_path"], shape, _item(r.get("id")), r["prompt"])
            if problem is not None:
                raise DiffalignError(f"{dataset.path}: item {r.get('id')}: {problem}")
    for r in records:
        if not r["target_path"].is_file():
            raise DiffalignError(f"{dataset.path}: item {r.get('id')}: {r['target_path']} missing")
    size = generator.image_size()
    torch.manual_seed(seed)  # the LoRA's initial weights come from the global RNG
    lora = prepare_unet(generator, lora_rank, lora_alpha, init_lora=init_lora)
    base = None
    if (preserve_latent_weight or preserve_pixel_weight) and not lora:
        base = generator.frozen_copy()
    sigma = float(generator.init_noise_sigma())
    data = ManifestPairs(records, size, with_noise=not direct, sigma=sigma)
    val = ManifestPairs(records[: max(1, val_items)], size, with_noise=not direct, sigma=sigma)
    torch.manual_seed(seed)
    task = MatchedSftTask(
        generator,
        base,
        data,
        val,
        lr=lr,
        batch_size=batch_size,
        latent_loss_weight=latent_loss_weight,
        pixel_l1_weight=pixel_l1_weight,
        preserve_latent_weight=preserve_latent_weight,
        preserve_pixel_weight=preserve_pixel_weight,
        direct=direct,
        lora=lora,
        weight_decay=weight_decay,
        seed=seed,
        export_info=model_info,
        models=models,
    )
    given = locals()  # sft's own arguments: the loop's are the ones `check_before_loading` uses
    loop_options = {k: given[k] for k in _LOOP_OPTIONS}
    cfg = _loop_config(output_dir, len(data), task.batch_size, **loop_options)
    return sft_result(run_sft(task, cfg))


def _data_identity(
    dataset: BuiltDataset, init_lora, lora_rank, lora_alpha, record: dict | None
) -> dict:
    """The identity's models and data part; ``record`` None: the models not known yet."""
    from diffalign.engine.identity import model_identity

    return {
        "models": None
        if record is None
        else {k: record.get(k) for k in ("model", "vae", "weights")},
        "init_lora": model_identity(init_lora),
        "lora_rank": lora_rank,
        "lora_alpha": lora_alpha,
        "manifest_sha256": dataset.manifest_sha256,
    }


def _loop_config(output_dir, items: int, batch_size: int, **options) -> TrainConfig:
    """The shared loop's options: validation once an epoch of ``items`` in (the task's)
    ``batch_size`` batches on each process."""
    from diffalign.noise.assign import dist_state

    world = dist_state()[1]  # accelerate shards the data: each process sees 1/world of it
    batches = math.ceil(items / world / batch_size)
    steps_per_epoch = math.ceil(batches / options["gradient_accumulation_steps"])
    direct, epochs, max_steps = options.pop("direct"), options.pop("epochs"), options["max_steps"]
    return TrainConfig(
        output_dir=str(output_dir),
        epochs=epochs if max_steps is None else None,
        lr_scheduler="constant",
        validate_every=max(1, steps_per_epoch),
        export_every_epoch=True,
        best_metric="val/loss",
        log_every=1,
        run_name="direct-sft" if direct else "latent-matched-sft",
        **options,
    )


def check_before_loading(manifest_path, output_dir, *, hint: str = RESUME_HINT, **options) -> None:
    """`sft`'s used-folder and resume refusals (`engine.checkpoints.check_before_setup`) before
    the generator loads: ``options`` are `sft`'s keywords (its defaults apply), ``manifest_path``
    as `sft`'s (a `BuiltDataset` passed on to `sft` is read once); ``hint``: the refusal's advice
    (`noise em` offers its own options). The models' identity and the
    generator's name are known only once it loads (the trainer compares everything again on
    resume)."""
    from diffalign.engine.checkpoints import check_before_setup
    from diffalign.engine.config_values import call_arguments
    from diffalign.noise.dataset import as_dataset

    a = call_arguments(sft, None, manifest_path, output_dir, **options)
    dataset = as_dataset(manifest_path)
    records = dataset.records
    batch_size = min(a["batch_size"], len(records))
    loop = _loop_config(
        output_dir,
        len(records),
        max(1, batch_size),
        **{k: a[k] for k in _LOOP_OPTIONS},
    )
    lora = a["lora_rank"] is not None or a["init_lora"] is not None

    def identity() -> dict:
        settings = _settings_record(
            direct=a["direct"],
            items=len(records),
            lr=a["lr"],
            batch_size=batch_size,
            weights=tuple(a[k] for k in _LOSS_WEIGHTS),
            lora=lora,
            weight_decay=a["weight_decay"],
            generator=None,
        )
        data = _data_identity(dataset, a["init_lora"], a["lora_rank"], a["lora_alpha"], None)
        return {**settings, **data}

    check_before_setup(loop, identity, unknown=("generator", "models"), hint=hint)


_LOSS_WEIGHTS = (
    "latent_loss_weight",
    "pixel_l1_weight",
    "preserve_latent_weight",
    "preserve_pixel_weight",
)
_LOOP_OPTIONS = (
    "max_steps", "epochs", "gradient_accumulation_steps", "mixed_precision", "max_grad_norm",
    "ema_decay", "checkpoint_every", "seed", "tracker", "progress", "direct", "overwrite",
    "resume", "deterministic", "compile",
)  # fmt: skip
