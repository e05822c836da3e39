"""`diffalign fill train`: LoRA + semantic cross-attention on FLUX.1-Fill by flow matching
(spec F: Train; seed 004 sections 2-6), on the shared training loop (`engine.train`).

Each step: the prompt -> T5/CLIP embeddings (or the text cache), the diptych `[visible | target]`
with the target half masked -> `x_0` and the 320-channel fill condition, the semantic panel ->
tokens on the same grid (all under no_grad, frozen VAE / text encoders); then `x_1 ~ N(0, I)`,
`t` from the chosen sampling, `x_t = (1 - t) x_0 + t x_1`, the transformer's velocity on
`[semantic(x_t) | cond]`, and the MSE against `x_1 - x_0`. Two AdamW parameter groups (LoRA,
cross-attention) with their own learning rates; the per-layer cross-attention scale is logged.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from diffalign.engine.checkpoints import check_task_config
from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import write_json
from diffalign.engine.train import (
    OptimizerSpec,
    StepContext,
    TrainConfig,
    TrainTask,
    set_cublas_workspace_config,
    train,
)
from diffalign.fill.config import FillTrainConfig, resume_free_keys
from diffalign.fill.data import collate_triptychs
from diffalign.fill.flow import (
    flow_matching_loss,
    interpolate,
    sample_timesteps,
    shift_mu,
    target_token_weight,
    velocity_target,
)
from diffalign.fill.model import (
    SemanticFillTransformer,
    add_lora,
    count_parameters,
    lora_parameters,
)
from diffalign.fill.pipeline import latent_width, load_fill_pipeline
from diffalign.fill.weights import (
    COMBINED_FILE,
    SEMANTIC_FILE,
    build_semantic,
    save_combined,
    save_lora,
    save_semantic,
)

VALIDATION_T = (0.25, 0.5, 0.75)  # fixed timesteps of the validation loss


def semantic_scales(module: torch.nn.Module | None) -> list[float]:
    """Per-layer residual scales of the semantic module (empty without one)."""
    if module is None:
        return []
    return [float(s) for s in module.scales()]


class FillTrainTask(TrainTask):
    """The FLUX Fill + semantic cross-attention trainer as a `TrainTask` (spec F)."""

    def __init__(self, cfg: FillTrainConfig, log=print):
        from diffalign.fill.data import DEFAULT_CAPTIONS, TriptychDataset
        from diffalign.fill.encode import FillEncoder

        self.cfg = cfg
        self.log = log
        self._shapes_logged = False
        if cfg.base_dtype not in ("float32", "fp32") and cfg.mixed_precision == "no":
            raise DiffalignError(
                f"base_dtype {cfg.base_dtype} needs mixed_precision bf16 or fp16 (the trainable "
                "weights stay float32)"
            )
        self.dataset = TriptychDataset(
            cfg.data,
            captions=cfg.captions or DEFAULT_CAPTIONS,
            image_field=cfg.image_field,
            prompt_field=cfg.prompt_field,
            panel=cfg.panel,
            max_panel_size=cfg.max_panel_size,
        )
        self.pipe = load_fill_pipeline(cfg.model, cfg.base_dtype)
        self.encoder = FillEncoder(self.pipe)
        self.transformer = self.pipe.transformer
        self.lora_config = add_lora(
            self.transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout
        )
        if cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.latent_dim = latent_width(self.pipe)
        self.semantic_shape = (self.latent_dim, cfg.semantic_heads, cfg.semantic_layers)
        self.semantic = build_semantic(*self.semantic_shape) if cfg.semantic else None
        self.model = SemanticFillTransformer(self.transformer, self.semantic, cfg.guidance)
        self.text_cache = None
        if cfg.cache_text:
            from diffalign.fill.encode import TextCache

            folder = cfg.text_cache_dir or str(Path(cfg.output_dir) / "text_cache")
            self.text_cache = TextCache(folder, namespace=str(cfg.model))
            self.cache_report = self.fill_text_cache()
        self.n_lora = count_parameters(lora_parameters(self.transformer))
        self.n_semantic = int(self.semantic.num_parameters()) if self.semantic is not None else 0
        if _is_main():
            targets = sorted(self.lora_config.target_modules)
            log(
                f"[fill] LoRA: {self.n_lora:,} parameters (rank {self.lora_config.r}, alpha "
                f"{self.lora_config.lora_alpha:g}, {len(targets)} target names)"
            )
            if self.semantic is not None:
                log(
                    f"[fill] semantic cross-attention: {self.n_semantic:,} parameters "
                    f"({cfg.semantic_layers} layer(s), {cfg.semantic_heads} heads, dim "
                    f"{self.latent_dim})"
                )
            else:
                log("[fill] semantic cross-attention: off (LoRA only)")
            log("[fill] " + self.dataset.report().replace("\n", "\n[fill] "))
            if self.text_cache is not None:
                log(
                    f"[fill] text cache {self.text_cache.root}: {self.cache_report['prompts']} "
                    f"prompts, {self.cache_report['encoded_here']} encoded now"
                )

    def fill_text_cache(self, batch: int = 16) -> dict[str, int]:
        """Encode every prompt of the dataset once into the text cache (`--cache-text`), each
        process its share, on the accelerator's device; the text encoders then stay on the CPU
        and out of the training step."""
        from diffalign.engine.distributed import process_state
        from diffalign.engine.progress import progress

        state = process_state()
        msl = self.cfg.max_sequence_length
        prompts = sorted({r.prompt for r in self.dataset.records})
        mine = prompts[state.process_index :: state.num_processes]
        todo = [p for p in mine if not self.text_cache.path(p, msl).is_file()]
        if todo:
            encoders = (self.pipe.text_encoder, self.pipe.text_encoder_2)
            for enc in encoders:
                enc.to(state.device)
            try:
                for i in progress(range(0, len(todo), batch), desc="text cache"):
                    self.encoder.encode_prompts(todo[i : i + batch], msl, cache=self.text_cache)
            finally:
                for enc in encoders:
                    enc.to("cpu")
        state.wait_for_everyone()
        return {"prompts": len(prompts), "encoded_here": len(todo)}

    # -- TrainTask -----------------------------------------------------------------------------

    def trainable(self) -> dict[str, torch.nn.Module]:
        mods = {"transformer": self.transformer}
        if self.semantic is not None:
            mods["semantic"] = self.semantic
        return mods

    def frozen(self) -> dict[str, torch.nn.Module]:
        mods = {"vae": self.pipe.vae}
        if self.text_cache is None:
            mods["text_encoder"] = self.pipe.text_encoder
            mods["text_encoder_2"] = self.pipe.text_encoder_2
        return mods

    def optimizers(self) -> dict[str, OptimizerSpec]:
        groups = [{"params": lora_parameters(self.transformer), "lr": self.cfg.lr_lora}]
        if self.semantic is not None:
            groups.append({"params": list(self.semantic.parameters()), "lr": self.cfg.lr_semantic})
        return {
            "main": OptimizerSpec(groups, lr=self.cfg.lr_lora, weight_decay=self.cfg.weight_decay)
        }

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.cfg.batch_size,
            shuffle=True,
            num_workers=self.cfg.num_workers,
            collate_fn=collate_triptychs,
        )

    def val_dataloader(self) -> DataLoader | None:
        n = min(self.cfg.num_validation, len(self.dataset))
        if n == 0:
            return None
        return DataLoader(
            Subset(self.dataset, range(n)),
            batch_size=self.cfg.batch_size,
            collate_fn=collate_triptychs,
        )

    def encode_text(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Prompt embeddings (T5), pooled CLIP embeddings and text ids, cached on disk if asked."""
        out = self.encoder.encode_prompts(
            list(prompts), self.cfg.max_sequence_length, cache=self.text_cache
        )
        return {k: v.to(device) for k, v in out.items()}

    def encode_batch(
        self, batch: dict, device: torch.device, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """Everything a step needs from a triptych batch, without gradients (seed 004, 2-3);
        the VAE's latent samples draw from `generator` (default: the global RNG)."""
        with torch.no_grad():
            visible = batch["visible"].to(device)
            target = batch["target"].to(device)
            enc = self.encoder.encode_diptych(visible, target, generator=generator)
            sem = None
            if self.semantic is not None:
                sem = self.encoder.encode_semantic(
                    batch["semantic"].to(device),
                    layout=self.cfg.semantic_layout,
                    generator=generator,
                )
            text = self.encode_text(batch["prompt"], device)
        return {**enc, **text, "semantic_tokens": sem}

    def _mu(self, seq_len: int) -> float | None:
        if not self.cfg.resolution_shift:
            return None
        sc = self.pipe.scheduler.config
        return shift_mu(
            seq_len,
            sc.get("base_image_seq_len", 256),
            sc.get("max_image_seq_len", 4096),
            sc.get("base_shift", 0.5),
            sc.get("max_shift", 1.15),
        )

    def loss(self, enc: dict[str, Any], x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Flow-matching loss of one encoded batch for noise `x1` at times `t` (seed 004, 2.4/6)."""
        x0, cond = enc["x0"].float(), enc["cond"]
        xt = interpolate(x0, x1, t)
        pred = self.model(
            xt,
            cond,
            t.to(xt.dtype),
            enc["prompt_embeds"],
            enc["pooled_prompt_embeds"],
            enc["text_ids"],
            enc["img_ids"],
            semantic_tokens=enc["semantic_tokens"],
        )
        weight = (
            target_token_weight(cond, x0.shape[-1]) if self.cfg.loss_region == "target" else None
        )
        return flow_matching_loss(pred, velocity_target(x0, x1), weight)

    def training_step(self, batch: Any, step: int, ctx: StepContext) -> dict:
        enc = self.encode_batch(batch, ctx.device)
        x0 = enc["x0"].float()
        x1 = torch.randn_like(x0)
        c = self.cfg
        t = sample_timesteps(
            c.timestep_sampling,
            x0.shape[0],
            logit_mean=c.logit_mean,
            logit_std=c.logit_std,
            mode_scale=c.mode_scale,
            mu=self._mu(x0.shape[1]),
            device=x0.device,
        )
        if step == 0 and not self._shapes_logged and _is_main():
            self._shapes_logged = True  # the seed's step-0 check of every tensor's shape
            sem = enc["semantic_tokens"]
            self.log(
                f"[fill] step 0 shapes: panels {list(batch['visible'].shape)}, x_0 "
                f"{list(x0.shape)}, cond {list(enc['cond'].shape)}, semantic tokens "
                f"{list(sem.shape) if sem is not None else None}, transformer input "
                f"{[*x0.shape[:2], x0.shape[2] + enc['cond'].shape[2]]}, cross-attention "
                f"scale per layer {semantic_scales(self.semantic)}"
            )
        return {"loss": self.loss(enc, x1, t)}

    def log_state(self) -> dict[str, float]:
        """The module's residual scale per layer as it is after the logged optimizer step (read
        in `training_step`, before the step's update, it lagged one step behind)."""
        return {f"xattn_scale/{i}": s for i, s in enumerate(semantic_scales(self.semantic))}

    def validation_step(self, batch: Any) -> dict[str, float]:
        """Flow loss of the fixed validation examples at fixed t with seeded noise."""
        device = next(self.transformer.parameters()).device
        enc = self.encode_batch(
            batch, device, torch.Generator(device=device).manual_seed(self.cfg.seed + 54321)
        )
        x0 = enc["x0"].float()
        gen = torch.Generator().manual_seed(self.cfg.seed + 12345)
        losses = []
        for tv in VALIDATION_T:
            x1 = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.full((x0.shape[0],), tv, device=device)
            losses.append(float(self.loss(enc, x1, t)))
        return {"loss": sum(losses) / len(losses)}

    def on_validation_end(self, step: int, out_dir: Path) -> dict | None:
        """Sample the fixed examples and write `grid.png` (visible | prediction | target |
        semantic, one row each); returns the mean squared error of prediction vs target."""
        from diffalign.fill.infer import sample_panels, save_validation_grid

        n = min(self.cfg.num_validation, len(self.dataset))
        if n == 0:
            return None
        items = [self.dataset[i] for i in range(n)]
        device = next(self.transformer.parameters()).device
        preds = []
        for start in range(0, n, self.cfg.batch_size):
            chunk = items[start : start + self.cfg.batch_size]
            preds.append(
                sample_panels(
                    self.pipe,
                    self.model,
                    self.encoder,
                    visible=torch.stack([it["visible"] for it in chunk]).to(device),
                    semantic=torch.stack([it["semantic"] for it in chunk]).to(device),
                    prompts=[it["prompt"] for it in chunk],
                    steps=self.cfg.validation_steps,
                    guidance=self.cfg.guidance,
                    seeds=[self.cfg.seed + start + j for j in range(len(chunk))],
                    semantic_layout=self.cfg.semantic_layout,
                    encode_text=lambda p: self.encode_text(p, device),
                ).cpu()
            )
        pred = torch.cat(preds)
        target = torch.stack([it["target"] for it in items]).float()
        save_validation_grid(
            out_dir / "grid.png",
            [it["visible"] for it in items],
            list(pred),
            [it["target"] for it in items],
            [it["semantic"] for it in items],
            [str(it.get("name", i)) for i, it in enumerate(items)],
            title=f"step {step}",
        )
        return {"sample_mse": float(((pred.float() - target) ** 2).mean())}

    def export(self, out_dir: Path) -> None:
        """LoRA in diffusers' format, the module, both in one file, and fill_config.json."""
        out_dir = Path(out_dir)
        save_lora(out_dir, self.transformer, self.lora_config)
        layout = self.cfg.semantic_layout
        if self.semantic is not None:
            save_semantic(out_dir / SEMANTIC_FILE, self.semantic, layout)
        save_combined(
            out_dir / COMBINED_FILE, self.transformer, self.semantic, self.lora_config, layout
        )
        write_json(out_dir / "fill_config.json", self.config_dict())

    def check_resume(self, saved_config: dict | None, path: Path) -> None:
        """A checkpoint of another module shape, LoRA, objective or optimiser setting is one
        error line naming the first differing key (fill.config.RESUME_FREE may change)."""
        check_task_config(saved_config, self.config_dict(), path, resume_free_keys)

    def identity(self) -> dict:
        """Compared on resume (`engine.identity`): the settings outside RESUME_FREE (the loop's
        own options, max_steps included, are compared by the loop) and the base model by
        identity (resolved path, config and weights hashes) instead of its path text."""
        return _fill_identity(self.config_dict(), self.cfg.model)

    def config_dict(self) -> dict:
        import dataclasses

        return {
            **dataclasses.asdict(self.cfg),
            "latent_dim": self.latent_dim,
            "lora_parameters": self.n_lora,
            "semantic_parameters": self.n_semantic,
            "lora_target_modules": sorted(self.lora_config.target_modules),
        }


# config_dict()'s keys that only the loaded model tells
MODEL_DERIVED = ("latent_dim", "lora_parameters", "semantic_parameters", "lora_target_modules")


def _fill_identity(config: dict, model: str) -> dict:
    from diffalign.engine.identity import model_identity
    from diffalign.fill.config import RESUME_FREE

    free = RESUME_FREE | {"max_steps", "epochs"}
    return {
        **{k: v for k, v in config.items() if k not in free},
        "models": {"model": model_identity(model, ("transformer",))},
    }


def check_before_loading(cfg: FillTrainConfig, loop: TrainConfig) -> None:
    """The trainer's used-folder and resume refusals (`engine.checkpoints.check_before_setup`)
    from the config alone, before the pipeline loads or the text cache is filled: a re-run
    with other settings is refused in seconds, not after the text encoders ran."""
    import dataclasses

    from diffalign.engine.checkpoints import check_before_setup

    config = dataclasses.asdict(cfg)
    check_before_setup(
        loop,
        lambda: _fill_identity(config, cfg.model),
        unknown=MODEL_DERIVED,
        check_task=lambda saved, path: check_task_config(
            saved, config, path, resume_free_keys, MODEL_DERIVED
        ),
    )


def _is_main() -> bool:
    from diffalign.engine.progress import is_main_process

    return is_main_process()


def train_config(cfg: FillTrainConfig) -> TrainConfig:
    """The shared loop's options from the Fill config."""
    return TrainConfig(
        output_dir=cfg.output_dir,
        max_steps=cfg.max_steps,
        epochs=cfg.epochs,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        max_grad_norm=cfg.max_grad_norm,
        lr_scheduler=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        ema_decay=cfg.ema_decay,
        validate_every=cfg.validate_every,
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints,
        log_every=cfg.log_every,
        seed=cfg.seed,
        tracker=cfg.tracker,
        resume=cfg.resume,
        run_name="fill",
        overwrite=cfg.overwrite,
        best_metric="val/loss" if cfg.num_validation > 0 else None,
        deterministic=cfg.deterministic,
        compile=cfg.compile,
    )


def run_train(cfg: FillTrainConfig, log=print):
    """Train (or resume) and add the Fill facts to summary.json; returns the TrainResult.

    The output folder is locked for the whole run (text cache, training, the summary written
    after the loop): a second run into the same folder is one error line before it writes."""
    from diffalign.engine.io import output_lock

    loop = train_config(cfg)
    loop.validate()  # the loop's options fail before the model loads or anything is written
    with output_lock(cfg.output_dir, "training output folder"):  # the loop re-enters it
        return _run_train(cfg, loop, log)


def _run_train(cfg: FillTrainConfig, loop: TrainConfig, log):
    from diffalign.engine.reports import write_summary

    if cfg.deterministic:  # before the text cache's first matmul
        set_cublas_workspace_config()
    check_before_loading(cfg, loop)  # a used folder or another run's checkpoint: refused now
    torch.manual_seed(cfg.seed)  # the module's and LoRA's initial weights
    task = FillTrainTask(cfg, log=log)
    cudnn_before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(cfg.cudnn_attention and cudnn_before)
    try:
        result = train(task, loop)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn_before)
    if _is_main() and result.summary:
        scales = semantic_scales(task.semantic)
        history = [
            {"step": e["step"], **{k: v for k, v in e.items() if k.startswith("xattn_scale/")}}
            for e in result.history
            if any(k.startswith("xattn_scale/") for k in e)
        ]
        summary = {
            **result.summary,
            "fill": {
                "lora_parameters": task.n_lora,
                "semantic_parameters": task.n_semantic,
                "semantic_scales_final": scales,
                "semantic_scale_history": history,
                "data": task.dataset.summary(),
                "exports": {
                    "lora": str(result.final_dir / "pytorch_lora_weights.safetensors"),
                    "semantic_module": str(result.final_dir / SEMANTIC_FILE)
                    if task.semantic is not None
                    else None,
                    "combined": str(result.final_dir / COMBINED_FILE),
                },
            },
        }
        for name in ("train_summary.json", "summary.json"):
            write_summary(Path(cfg.output_dir) / name, summary)
        if history:
            from diffalign.engine.reports import plot_curves

            keys = sorted({k for e in history for k in e if k != "step"})
            plot_curves(
                Path(cfg.output_dir) / "xattn_scales.png",
                {
                    f"layer {k.split('/')[-1]}": (
                        [e["step"] for e in history if k in e],
                        [e[k] for e in history if k in e],
                    )
                    for k in keys
                },
                title="semantic cross-attention: residual scale per layer",
                ylabel="scale",
            )
        result.summary = summary
        loss = next((e.get("loss") for e in reversed(result.history) if "loss" in e), math.nan)
        log(
            f"[fill] done: {result.step} steps, last loss {loss:.4g}, cross-attention scales "
            f"[{', '.join(f'{s:.4g}' for s in scales)}]; exports in {result.final_dir}"
        )
    return result
