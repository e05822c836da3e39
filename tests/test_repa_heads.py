"""AlignHead, feature hooks and LoRA targets on a tiny SD 1.5 U-Net (seed 003, sections 2.2-2.4)."""

import pytest
import torch

from diffalign.engine.errors import DiffalignError
from diffalign.repa.heads import (
    LAYERS,
    AlignHead,
    FeatureHooks,
    add_lora,
    lora_config,
    lora_parameters,
    lora_target_regex,
    make_heads,
)
from diffalign.repa.model import RepaModel, RepaSpec


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(4, 8),
        layers_per_block=1,
        cross_attention_dim=8,
        norm_num_groups=2,
        attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )


def _run(unet, b=2):
    return unet(
        torch.randn(b, 4, 8, 8), torch.tensor([10] * b), encoder_hidden_states=torch.randn(b, 5, 8)
    )


def test_align_head_shapes_and_params():
    head = AlignHead(1280, 1024)  # the seed's sizes: ~2.4M parameters (2.2)
    n = sum(p.numel() for p in head.parameters())
    assert n == 1280 * 1024 + 1024 + 1024 * 1024
    assert head.proj[2].bias is None
    out = AlignHead(8, 6, hidden_dim=5, grid=4)(torch.randn(3, 8, 2, 2))
    assert out.shape == (3, 16, 6)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3, 16), atol=1e-5)
    lin = AlignHead(8, 6, grid=4, kind="linear")
    assert len(lin.proj) == 1 and lin(torch.randn(1, 8, 4, 4)).shape == (1, 16, 6)
    with pytest.raises(DiffalignError, match="unknown head"):
        AlignHead(8, 6, kind="deep")


@pytest.mark.parametrize("layer", LAYERS)
def test_hooks_and_heads_for_each_layer(layer):
    unet = tiny_unet()
    hooks = FeatureHooks(unet, [layer])
    heads = make_heads(unet, [layer], teacher_dim=6, hidden_dim=5, grid=4)
    _run(unet)
    feat = hooks.pop()[layer]
    expect_hw = {"mid": 4, "enc_last": 4, "dec_first": 8}[layer]
    assert feat.shape == (2, 8, expect_hw, expect_hw)
    assert heads[layer](feat).shape == (2, 16, 6)
    assert hooks.pop() == {}  # popped features are not reused
    hooks.remove()
    _run(unet)
    assert hooks.features == {}


def test_bad_layer_names():
    unet = tiny_unet()
    with pytest.raises(DiffalignError, match="unknown align layer 'middle'"):
        make_heads(unet, ["middle"], 6)
    with pytest.raises(DiffalignError, match="repeats"):
        make_heads(unet, ["mid", "mid"], 6)


def test_lora_targets_mid_block_attention_only():
    unet = tiny_unet()
    names = add_lora(unet, lora_config())
    assert names and all(n.startswith("mid_block.attentions.") for n in names)
    suffixes = {n.split(".attn")[1][2:] for n in names}
    assert suffixes == {"to_q", "to_k", "to_v", "to_out.0"}
    assert {n.split(".attn")[1][0] for n in names} == {"1", "2"}  # self- and cross-attention
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(lora_parameters(unet)) == 2 * len(names)
    cfg = lora_config()
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias) == (8, 8.0, 0.0, "none")
    # LoRA B starts at zero: the adapted U-Net equals the base one
    base = tiny_unet()
    torch.manual_seed(3)
    x = (torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 5, 8))
    assert torch.allclose(
        base(x[0], x[1], encoder_hidden_states=x[2]).sample,
        unet(x[0], x[1], encoder_hidden_states=x[2]).sample,
        atol=1e-6,
    )


def test_lora_blocks_conv_and_rank():
    unet = tiny_unet()
    names = add_lora(unet, lora_config(rank=4, alpha=8, blocks=["up", "mid"], conv=True))
    assert any(n.startswith("up_blocks.0.attentions") for n in names)
    assert any(n.startswith("mid_block.resnets.0.conv1") for n in names)
    assert any(n.startswith("up_blocks.1.resnets.0.conv2") for n in names)
    assert not any(n.startswith("down_blocks") for n in names)
    a = dict(unet.named_parameters())
    key = next(k for k in a if "lora_A" in k and "to_q" in k)
    assert a[key].shape[0] == 4
    assert "down_blocks" in lora_target_regex(["all"])
    assert r"down_blocks\.1" in lora_target_regex(["down_blocks.1"])
    with pytest.raises(DiffalignError, match="unknown LoRA block"):
        lora_target_regex(["middle"])


def test_repa_model_forward_and_gradients():
    unet = tiny_unet()
    spec = RepaSpec(align_layers=["mid", "dec_first"], head_hidden_dim=5, grid=4, teacher_dim=6)
    m = RepaModel(unet, spec)
    pred, feats, tokens = m.forward(
        torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 5, 8)
    )
    assert pred.shape == (2, 4, 8, 8)
    assert set(tokens) == {"mid", "dec_first"} and tokens["mid"].shape == (2, 16, 6)
    (pred.square().mean() + sum(t.sum() for t in tokens.values())).backward()
    assert all(p.grad is not None for p in m.heads.parameters())
    assert any(p.grad is not None for p in lora_parameters(unet))
    assert all(p.grad is None for n, p in unet.named_parameters() if "lora_" not in n)


def test_real_sd15_sizes_on_the_meta_device():
    """SD 1.5's own U-Net config (no weights: meta tensors): the seed's shapes and counts."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            sample_size=64,
        )
        m = RepaModel(unet, RepaSpec(align_layers=list(LAYERS)))
        pred, feats, tokens = m.forward(
            torch.randn(2, 4, 64, 64), torch.tensor([1, 2]), torch.randn(2, 77, 768)
        )
    assert pred.shape == (2, 4, 64, 64)
    assert feats["mid"].shape == (2, 1280, 8, 8)  # seed 2.1
    assert feats["enc_last"].shape == (2, 1280, 8, 8)
    assert feats["dec_first"].shape == (2, 1280, 16, 16)
    assert all(t.shape == (2, 256, 1024) for t in tokens.values())
    # AlignHead: ~2.4M parameters (seed 2.2)
    assert sum(p.numel() for p in m.heads["mid"].parameters()) == 2_360_320
    # LoRA r8 on the mid block's attention: SD 1.5's mid block has ONE transformer block, so
    # 8 projections and 155,648 parameters (the seed's "~1.2M" assumes 10 blocks)
    assert len(unet.mid_block.attentions[0].transformer_blocks) == 1
    assert len([n for n in m.lora_modules if n.startswith("mid_block")]) == 8
    assert sum(p.numel() for p in lora_parameters(unet)) == 155_648


def test_disabled_adapters_give_the_base_unet_features():
    """`repa extract`'s un-aligned features: the trained U-Net with its LoRA disabled."""
    base, unet = tiny_unet(), tiny_unet()
    m = RepaModel(unet, RepaSpec(head_hidden_dim=4, grid=4, teacher_dim=6))
    for n, p in unet.named_parameters():
        if "lora_B" in n:
            p.data.normal_()  # a trained LoRA
    x = (torch.randn(2, 4, 8, 8), torch.tensor([3, 4]), torch.randn(2, 5, 8))
    adapted = m.forward(*x)[1]["mid"]
    unet.disable_adapters()
    off = m.forward(*x)[1]["mid"]
    unet.enable_adapters()
    ref = RepaModel(base, m.spec, lora=False).forward(*x)[1]["mid"]
    assert torch.equal(off, ref) and not torch.allclose(adapted, ref)
    assert torch.equal(m.forward(*x)[1]["mid"], adapted)


def _slow_bilinear(x: torch.Tensor, out: int) -> torch.Tensor:
    """[C, h, w] -> [C, out, out], half-pixel centres (`align_corners=False`), written out:
    source coordinate `max((o + 0.5) * in / out - 0.5, 0)`, neighbours clamped at the edge."""
    c, h, w = x.shape

    def taps(o, n):
        s = max((o + 0.5) * n / out - 0.5, 0.0)
        i0 = int(s)
        return i0, min(i0 + 1, n - 1), s - i0

    y = torch.zeros(c, out, out, dtype=torch.float64)
    for r in range(out):
        r0, r1, fr = taps(r, h)
        for q in range(out):
            q0, q1, fq = taps(q, w)
            y[:, r, q] = (
                (1 - fr) * (1 - fq) * x[:, r0, q0]
                + (1 - fr) * fq * x[:, r0, q1]
                + fr * (1 - fq) * x[:, r1, q0]
                + fr * fq * x[:, r1, q1]
            )
    return y


@pytest.mark.parametrize("side", [2, 3])
def test_align_head_forward_matches_written_out_reference(side):
    """Seed 2.2: W1 x + b1 per position, exact (erf) GELU, W2 (no bias), bilinear to the grid,
    flatten row-major to [B, grid^2, D], L2 norm: recomputed here in float64 from the weights."""
    import math

    torch.manual_seed(0)
    head = AlignHead(6, 5, hidden_dim=7, grid=4).double()
    x = torch.randn(2, 6, side, side, dtype=torch.float64)
    w1 = head.proj[0].weight[:, :, 0, 0].detach()
    b1 = head.proj[0].bias.detach()
    w2 = head.proj[2].weight[:, :, 0, 0].detach()
    expected = torch.zeros(2, 16, 5, dtype=torch.float64)
    for b in range(2):
        h = torch.zeros(5, side, side, dtype=torch.float64)
        for r in range(side):
            for q in range(side):
                pre = w1 @ x[b, :, r, q] + b1
                act = torch.tensor([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in pre])
                h[:, r, q] = w2 @ act.double()
        up = _slow_bilinear(h, 4)
        for r in range(4):
            for q in range(4):
                v = up[:, r, q]
                expected[b, r * 4 + q] = v / v.norm()
    with torch.no_grad():
        got = head(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_training_step_losses_match_a_written_out_step():
    """`RepaTask._losses` (what the loop optimises) recomputed independently: t and eps drawn in
    the same order from the same generator, `z_t` and the v target from the seed 4.2 formulas on
    linear betas, the U-Net run directly with the mid-block output hooked by hand, and the
    token / manifold / total losses written out (seed 4.1-4.5) at step 1500 (lambda 0.25)."""
    import math
    from types import SimpleNamespace

    from diffalign.repa.train import RepaTask

    unet = tiny_unet()
    rm = RepaModel(unet, RepaSpec(head_hidden_dim=5, grid=4, teacher_dim=6, lora_rank=2))
    for p in unet.parameters():  # LoRA B starts at zero: make the adapter matter
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    betas = [0.00085 + (0.012 - 0.00085) * i / 999 for i in range(1000)]
    abar, prod = [], 1.0
    for beta in betas:
        prod *= 1.0 - beta
        abar.append(prod)
    cfg = SimpleNamespace(
        prediction_type="v_prediction",
        manifold_mask_diag=True,
        manifold_upper_only=True,
        manifold_cap=None,
        align_coeff=0.5,
        align_warmup_steps=3000,
        manifold_weight=3.0,
    )
    task = SimpleNamespace(
        cfg=cfg,
        heads=rm.heads,
        model=rm,
        alphas_cumprod=torch.tensor(abar, dtype=torch.float32),
        num_timesteps=1000,
        weight_dtype=torch.float32,
    )
    task._teacher_tokens = lambda batch, device: RepaTask._teacher_tokens(task, batch, device)
    g = torch.Generator().manual_seed(11)
    batch = {
        "latent": torch.randn(3, 4, 8, 8, generator=g),
        "tokens": torch.nn.functional.normalize(torch.randn(3, 16, 6, generator=g), dim=-1),
        "class_embedding": torch.randn(3, 5, 8, generator=g),
    }
    out = RepaTask._losses(task, batch, 1500, torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (3,), generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    x0 = batch["latent"]
    a = torch.tensor([abar[i] for i in t.tolist()]).view(3, 1, 1, 1)
    zt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    seen = {}
    handle = unet.mid_block.register_forward_hook(lambda m, i, o: seen.update(mid=o))
    rm.hooks.remove()
    with torch.no_grad():
        pred = unet(zt, t, encoder_hidden_states=batch["class_embedding"]).sample
        tokens = rm.heads["mid"](seen["mid"])
    handle.remove()
    l_diff = ((pred - v) ** 2).mean().item()
    target = batch["tokens"]
    l_tok = (
        sum(
            1
            - torch.dot(tokens[b, i], target[b, i]).item()
            / float(tokens[b, i].norm() * target[b, i].norm())
            for b in range(3)
            for i in range(16)
        )
        / 48
    )
    pm = [tokens[b].mean(0) / tokens[b].mean(0).norm() for b in range(3)]
    tm = [target[b].mean(0) / target[b].mean(0).norm() for b in range(3)]
    pairs = [(0, 1), (0, 2), (1, 2)]
    l_man = sum((torch.dot(pm[i], pm[j]) - torch.dot(tm[i], tm[j])).item() ** 2 for i, j in pairs)
    l_man /= 3
    lam = 0.5 * 1500 / 3000
    assert out["align_coeff"] == pytest.approx(lam)
    assert out["diffusion"].item() == pytest.approx(l_diff, rel=1e-5)
    assert out["token"].item() == pytest.approx(l_tok, rel=1e-5)
    assert out["manifold"].item() == pytest.approx(l_man, rel=1e-4, abs=1e-8)
    total = l_diff + lam * (l_tok + 3.0 * l_man)
    assert out["total"].item() == pytest.approx(total, rel=1e-5)
    assert math.isfinite(total) and l_man > 0
