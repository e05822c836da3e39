"""`diffalign selftest` checks of FLUX Fill (`tests/test_fill_encode.py`, `test_fill_infer.py`
on the real files): FillEncoder against FluxFillPipeline's own preparation, a LoRA written by
`fill train` and read back by the pipeline's `load_lora_weights`, and `attach_semantic` on the
pipeline against our sampler's model for one transformer call."""

from __future__ import annotations

import tempfile

import torch

from diffalign.engine.selftest import Asset, SelftestContext, pipeline_of, register_check

FILL = pipeline_of("FluxFillPipeline")


def _pipe(asset: Asset, ctx: SelftestContext):
    """The pipeline of `asset`, loaded once for all Fill checks (they leave it unchanged)."""
    from diffalign.fill.pipeline import load_fill_pipeline

    key = f"fill:{asset.path}"
    if key not in ctx.cache:
        ctx.cache.clear()  # one big pipeline in memory at a time
        ctx.cache[key] = load_fill_pipeline(str(asset.path)).to(ctx.device)
    return ctx.cache[key]


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())


@register_check("FillEncoder vs FluxFillPipeline preparation", FILL, 1e-5)
def _check_encoder(asset: Asset, ctx: SelftestContext) -> float:
    from diffalign.fill.encode import FillEncoder, pack_latents

    pipe = _pipe(asset, ctx)
    p, dev = ctx.size, ctx.device
    g = torch.Generator().manual_seed(0)
    visible, target = torch.rand(1, 3, p, p, generator=g), torch.rand(1, 3, p, p, generator=g)
    enc = FillEncoder(pipe)
    ours = enc.encode_diptych(
        visible.to(dev), target.to(dev), generator=torch.Generator(dev).manual_seed(7)
    )
    # the pipeline: x0 as prepare_latents encodes the image, then prepare_mask_latents
    gen = torch.Generator(dev).manual_seed(7)
    h, w = p, 2 * p
    init = pipe.image_processor.preprocess(torch.cat([visible, target], -1), height=h, width=w)
    init = init.to(dev, torch.float32)
    x0 = pack_latents(pipe._encode_vae_image(init, gen))
    mask = pipe.mask_processor.preprocess(enc.target_mask(1, p, p), height=h, width=w).to(dev)
    c = pipe.vae.config.latent_channels
    mask_l, masked_l = pipe.prepare_mask_latents(
        mask, init * (1 - mask), 1, c, 1, h, w, torch.float32, dev, gen
    )
    ids = pipe._prepare_latent_image_ids(1, h // 16, w // 16, dev, torch.float32)
    return max(
        _diff(ours["x0"], x0),
        _diff(ours["cond"], torch.cat([masked_l, mask_l], -1)),
        _diff(ours["img_ids"], ids),
    )


def _transformer_inputs(pipe, size: int, device) -> dict:
    """Fixed random inputs of one FluxFillPipeline transformer call at `size` px panels."""
    cfg = pipe.transformer.config
    g = torch.Generator().manual_seed(3)
    n = (size // 16) * (2 * size // 16)
    return {
        "hidden_states": torch.randn(1, n, cfg.in_channels, generator=g).to(device),
        "timestep": torch.tensor([0.6], device=device),
        "guidance": torch.tensor([30.0], device=device) if cfg.guidance_embeds else None,
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device),
        "encoder_hidden_states": torch.randn(1, 8, cfg.joint_attention_dim, generator=g).to(device),
        "txt_ids": torch.zeros(8, 3, device=device),
        "img_ids": pipe._prepare_latent_image_ids(
            1, size // 16, 2 * size // 16, device, torch.float32
        ),
        "return_dict": False,
    }


@register_check("LoRA round trip (save_lora -> load_lora_weights)", FILL, 1e-5)
def _check_lora(asset: Asset, ctx: SelftestContext) -> tuple[float, str]:
    from diffalign.fill.model import ADAPTER_NAME, add_lora, lora_parameters
    from diffalign.fill.weights import save_lora

    pipe = _pipe(asset, ctx)
    tr = pipe.transformer
    inputs = _transformer_inputs(pipe, ctx.size, ctx.device)
    torch.manual_seed(0)
    with torch.no_grad():
        plain = tr(**inputs)[0]
        cfg = add_lora(tr, rank=4)
        try:
            for p in lora_parameters(tr):
                p.normal_(0, 0.02)
            trained = tr(**inputs)[0]
            with tempfile.TemporaryDirectory() as tmp:
                save_lora(tmp, tr, cfg)
                tr.delete_adapters(ADAPTER_NAME)
                pipe.load_lora_weights(tmp, adapter_name="selftest")
            try:
                loaded = tr(**inputs)[0]
            finally:
                tr.delete_adapters("selftest")
        finally:
            if ADAPTER_NAME in getattr(tr, "peft_config", {}):
                tr.delete_adapters(ADAPTER_NAME)
    moved = _diff(trained, plain)
    if moved == 0:
        raise RuntimeError("the random LoRA did not change the output: nothing to compare")
    return _diff(loaded, trained), f"the LoRA moves the output by {moved:.3g}"


@register_check("attach_semantic hook vs SemanticFillTransformer", FILL, 1e-5)
def _check_attach(asset: Asset, ctx: SelftestContext) -> float:
    from diffalign.fill.attach import SemanticAttachment
    from diffalign.fill.model import SemanticFillTransformer
    from diffalign.fill.weights import build_semantic

    pipe = _pipe(asset, ctx)
    tr = pipe.transformer
    dim = pipe.vae.config.latent_channels * 4
    torch.manual_seed(0)
    module = build_semantic(dim, 8, 1).to(ctx.device)
    with torch.no_grad():
        module.layers[0].scale.fill_(0.5)
    inputs = _transformer_inputs(pipe, ctx.size, ctx.device)
    hidden = inputs["hidden_states"]
    sem = torch.randn(1, hidden.shape[1] // 2, dim, generator=torch.Generator().manual_seed(4))
    sem = sem.to(ctx.device)
    model = SemanticFillTransformer(tr, module, guidance=30.0)
    with torch.no_grad():
        ours = model(
            hidden[..., :dim],
            hidden[..., dim:],
            inputs["timestep"],
            inputs["encoder_hidden_states"],
            inputs["pooled_projections"],
            inputs["txt_ids"],
            inputs["img_ids"],
            semantic_tokens=sem,
        )
        attached = SemanticAttachment(pipe, module, "panel")
        attached.semantic_tokens = sem
        try:
            hooked = tr(**inputs)[0]
        finally:
            attached.remove()
    return _diff(hooked, ours)
