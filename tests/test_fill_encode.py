"""FLUX Fill encoding (spec F "Encoding"): equal to what diffusers' FluxFillPipeline prepares."""

from __future__ import annotations

import pytest
import torch

from diffalign.engine.errors import DiffalignError
from diffalign.fill.encode import FillEncoder, TextCache, pack_latents, unpack_latents

P = 32  # panel size (a multiple of 16, as for the real model)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from diffusers import FluxFillPipeline

    return FluxFillPipeline.from_pretrained(tiny_model_dir("flux-fill"))


def _panels(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(b, 3, P, P, generator=g) for _ in range(3))


def test_channel_counts_follow_the_model(pipe):
    enc = FillEncoder(pipe)
    assert (enc.latent_dim, enc.cond_dim, enc.multiple) == (64, 320, 16)
    assert enc.latent_dim + enc.cond_dim == pipe.transformer.config.in_channels


def test_prompts_equal_pipeline_encode_prompt(pipe):
    prompts = ["a red cube on a table", "two cats"]
    ours = FillEncoder(pipe).encode_prompts(prompts, max_sequence_length=16)
    with torch.no_grad():  # as in the pipeline's __call__ (the fused kernels differ with grad)
        pe, pooled, ids = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=16)
    assert torch.equal(ours["prompt_embeds"], pe)
    assert torch.equal(ours["pooled_prompt_embeds"], pooled)
    assert torch.equal(ours["text_ids"], ids)
    assert not torch.equal(pe[0], pe[1])


def test_diptych_equals_pipeline_preparation(pipe):
    from diffusers.utils.torch_utils import randn_tensor

    visible, target, _ = _panels()
    b, c, h, w = 2, 16, P, 2 * P
    enc = FillEncoder(pipe)
    ours = enc.encode_diptych(visible, target, generator=torch.Generator().manual_seed(7))
    assert ours["x0"].shape == (b, (h // 16) * (w // 16), 64)
    assert ours["cond"].shape == (b, (h // 16) * (w // 16), 320)
    assert (ours["height"], ours["width"]) == (h, w)

    # The pipeline's own preprocessing of the same diptych and mask.
    diptych = torch.cat([visible, target], dim=-1)
    init_image = pipe.image_processor.preprocess(diptych, height=h, width=w).float()
    assert torch.equal(init_image, enc.to_pixels(diptych))
    mask_image = pipe.mask_processor.preprocess(enc.target_mask(b, P, P), height=h, width=w)
    assert torch.equal(mask_image, enc.target_mask(b, P, P))

    # prepare_latents: x0 is its first generator draw, then noise, then x_t = (1-s) x0 + s noise.
    pipe.scheduler.set_timesteps(sigmas=[0.7], mu=1.0)
    t = pipe.scheduler.timesteps[:1].repeat(b)
    sigma = pipe.scheduler.sigmas[0]
    x_t, ids = pipe.prepare_latents(
        init_image, t, b, c, h, w, torch.float32, "cpu", torch.Generator().manual_seed(7)
    )
    g = torch.Generator().manual_seed(7)
    randn_tensor((b, c, h // 8, w // 8), generator=g)  # the x0 sample
    noise = randn_tensor((b, c, h // 8, w // 8), generator=g)
    x0 = unpack_latents(ours["x0"], h // 8, w // 8)
    expected = pack_latents(sigma * noise + (1.0 - sigma) * x0)
    torch.testing.assert_close(x_t, expected, rtol=0, atol=1e-6)
    assert torch.equal(ours["img_ids"], ids)

    # prepare_mask_latents: our masked-image sample is the generator's second draw.
    g = torch.Generator().manual_seed(7)
    randn_tensor((b, c, h // 8, w // 8), generator=g)
    mask, masked_latents = pipe.prepare_mask_latents(
        mask_image, init_image * (1 - mask_image), b, c, 1, h, w, torch.float32, "cpu", g
    )
    assert torch.equal(ours["cond"], torch.cat([masked_latents, mask], dim=-1))
    # The mask channels: 0 on visible-half tokens, 1 on target-half tokens.
    grid = ours["cond"][..., 64:].view(b, h // 16, w // 16, 256)
    assert grid[:, :, : w // 32].eq(0).all() and grid[:, :, w // 32 :].eq(1).all()


def test_argmax_mode_is_deterministic(pipe):
    visible, target, _ = _panels()
    enc = FillEncoder(pipe, sample_mode="argmax")
    a = enc.encode_diptych(visible, target)
    b = enc.encode_diptych(visible, target)
    assert torch.equal(a["x0"], b["x0"]) and torch.equal(a["cond"], b["cond"])
    z = pipe.vae.encode(enc.to_pixels(torch.cat([visible, target], -1))).latent_dist.mode()
    torch.testing.assert_close(a["x0"], pack_latents((z - 0.1159) * 0.3611))


def test_semantic_layouts_and_no_grad(pipe):
    _, _, semantic = _panels()
    enc = FillEncoder(pipe, sample_mode="argmax")
    pipe.vae.requires_grad_(True)
    try:
        tgt = enc.encode_semantic(semantic)  # default: target-half
        both = enc.encode_semantic(semantic, layout="both-halves")
    finally:
        pipe.vae.requires_grad_(False)
    assert not tgt.requires_grad and not both.requires_grad
    assert tgt.shape == both.shape == (2, (P // 16) * (2 * P // 16), 64)
    z = pipe.vae.encode(enc.to_pixels(semantic)).latent_dist.mode()
    z = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    grid_t = unpack_latents(tgt, P // 8, 2 * P // 8)
    grid_b = unpack_latents(both, P // 8, 2 * P // 8)
    assert grid_t[..., : P // 8].eq(0).all()
    torch.testing.assert_close(grid_t[..., P // 8 :], z)
    torch.testing.assert_close(grid_b[..., : P // 8], z)
    torch.testing.assert_close(grid_b[..., P // 8 :], z)
    with pytest.raises(DiffalignError, match="layout"):
        enc.encode_semantic(semantic, layout="left")


def test_bad_panels(pipe):
    enc = FillEncoder(pipe)
    visible = torch.rand(1, 3, P, P)
    with pytest.raises(DiffalignError, match="same size"):
        enc.encode_diptych(visible, torch.rand(1, 3, 48, 48))
    with pytest.raises(DiffalignError, match="not divisible by 16"):
        enc.encode_diptych(torch.rand(1, 3, 24, 24), torch.rand(1, 3, 24, 24))
    with pytest.raises(DiffalignError, match="semantic panel is .* visible is"):
        enc.encode_semantic(torch.rand(1, 3, 48, 48), visible=visible)
    with pytest.raises(DiffalignError, match=r"\[B, 3, P, P\]"):
        enc.encode_semantic(torch.rand(3, P, P))


def test_decode_roundtrip_shape(pipe):
    visible, target, _ = _panels(b=1)
    enc = FillEncoder(pipe, sample_mode="argmax")
    out = enc.encode_diptych(visible, target)
    img = enc.decode(out["x0"], out["height"], out["width"])
    assert img.shape == (1, 3, P, 2 * P) and 0 <= img.min() and img.max() <= 1


def test_text_cache(pipe, tmp_path):
    enc = FillEncoder(pipe)
    cache = TextCache(tmp_path / "text", namespace="tiny")
    first = enc.encode_prompts(["a", "b"], max_sequence_length=8, cache=cache)
    assert (cache.hits, cache.misses) == (0, 2)
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 2
    again = enc.encode_prompts(["b", "a", "c"], max_sequence_length=8, cache=cache)
    assert (cache.hits, cache.misses) == (2, 3)
    assert torch.equal(again["prompt_embeds"][1], first["prompt_embeds"][0])
    assert torch.equal(again["pooled_prompt_embeds"][0], first["pooled_prompt_embeds"][1])
    plain = enc.encode_prompts(["b", "a", "c"], max_sequence_length=8)
    assert torch.equal(again["prompt_embeds"], plain["prompt_embeds"])
    # Another namespace or length never shares entries; a foreign file is refused.
    assert TextCache(tmp_path / "text", namespace="other").get("a", 8) is None
    assert cache.get("a", 16) is None
    cache.path("a", 8).replace(cache.path("zzz", 8))
    with pytest.raises(DiffalignError, match="does not belong"):
        cache.get("zzz", 8)
    # an entry made by a model with other text widths (same folder, same model name) is refused
    cache.put(
        "wide", 8, {"prompt_embeds": torch.zeros(8, 99), "pooled_prompt_embeds": torch.zeros(7)}
    )
    with pytest.raises(DiffalignError, match="another model"):
        enc.encode_prompts(["a", "wide"], max_sequence_length=8, cache=cache)


def test_module_at_init_leaves_transformer_output_bit_identical(pipe):
    """Seed 004 section 4: hidden = cat(m(x_t, semantic), cond); at init == cat(x_t, cond)."""
    from diffalign.fill import SemanticCrossAttention

    visible, target, semantic = _panels(b=1)
    enc = FillEncoder(pipe)
    g = torch.Generator().manual_seed(3)
    d = enc.encode_diptych(visible, target, generator=g)
    sem = enc.encode_semantic(semantic, generator=g)
    text = enc.encode_prompts(["a cat"], max_sequence_length=8)
    t = torch.tensor([0.6])
    x_t = (1 - t) * d["x0"] + t * torch.randn(d["x0"].shape, generator=g)
    m = SemanticCrossAttention(dim=enc.latent_dim, heads=8, layers=2)

    def run(tokens):
        with torch.no_grad():
            return pipe.transformer(
                hidden_states=torch.cat([tokens, d["cond"]], dim=-1),
                timestep=t,
                guidance=torch.full((1,), 30.0),
                pooled_projections=text["pooled_prompt_embeds"],
                encoder_hidden_states=text["prompt_embeds"],
                txt_ids=text["text_ids"],
                img_ids=d["img_ids"],
                return_dict=False,
            )[0]

    plain = run(x_t)
    assert plain.shape == x_t.shape
    assert torch.equal(run(m(x_t, sem)), plain)
    with torch.no_grad():
        m.layers[0].scale.fill_(0.2)
    assert not torch.allclose(run(m(x_t, sem)), plain)


def test_panel_layout_is_the_panels_own_tokens(pipe):
    """`panel` (the seed's literal layout): K/V = the semantic panel's packed latents alone."""
    _, _, semantic = _panels()
    enc = FillEncoder(pipe, sample_mode="argmax")
    panel = enc.encode_semantic(semantic, layout="panel")
    z = pipe.vae.encode(enc.to_pixels(semantic)).latent_dist.mode()
    z = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    assert panel.shape == (2, (P // 16) ** 2, 64)
    torch.testing.assert_close(panel, pack_latents(z))


def _attention_mass_on_zero_tokens(enc, layout, panel=64):
    """Mean share of the softmax attention that a fresh semantic layer puts on semantic tokens
    that are all zero (the visible half of `target-half`), explicit `softmax(QK^T/sqrt d)`."""
    from diffalign.fill.attention import SemanticCrossAttention

    g = torch.Generator().manual_seed(0)
    semantic = torch.rand(2, 3, panel, panel, generator=g)
    s = enc.encode_semantic(semantic, layout=layout)
    x = torch.randn(2, (panel // 16) * (2 * panel // 16), 64, generator=g)
    torch.manual_seed(0)
    layer = SemanticCrossAttention(64, heads=8, layers=1).layers[0]
    with torch.no_grad():
        q, k, _ = layer.project(x, s)
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    zero = s.abs().sum(-1).eq(0)[:, None, None, :]
    return float((probs * zero).sum(-1).mean())


def test_zero_tokens_take_half_the_attention_in_the_target_half_layout(pipe):
    """Supports README's note: the visible half's zero latents become identical K/V tokens
    (LayerNorm of a zero vector is its bias) and take about half of the attention mass at
    initialisation (0.495 at 64 px panels, 0.499 at 128 px); `panel` has none."""
    enc = FillEncoder(pipe, sample_mode="argmax")
    mass = _attention_mass_on_zero_tokens(enc, "target-half")
    assert 0.4 < mass < 0.6, mass
    assert _attention_mass_on_zero_tokens(enc, "panel") == 0.0
    assert _attention_mass_on_zero_tokens(enc, "both-halves") == 0.0
