"""Text-stream residual on FLUX.1 and Qwen-Image (issue 15): the hooks against hand-written
forward loops of `FluxTransformer2DModel` / `QwenImageTransformer2DModel`, global block
indices (FLUX: double blocks, then single blocks) and timestep buckets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffalign.engine.errors import DiffalignError
from diffalign.textstream import TextStreamResidual
from diffalign.textstream.adapters import stream_adapter
from diffalign.textstream.residual import bucket_index
from test_textstream_residual import random_orthogonal, ref_standardize_token

D = 32  # text-stream width of the tiny transformers


def make_flux(guidance: bool = True, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=12,
        guidance_embeds=guidance,
        axes_dims_rope=[2, 6, 8],
    ).eval()


def make_qwen(seed: int = 0):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        axes_dims_rope=(2, 6, 8),
    ).eval()


def flux_inputs(batch: int = 2, seed: int = 1, timesteps=None):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(4, 4, 3)
    img_ids[..., 1] = torch.arange(4)[:, None]
    img_ids[..., 2] = torch.arange(4)[None, :]
    t = torch.rand(batch, generator=g) if timesteps is None else torch.tensor(timesteps)
    return {
        "hidden_states": torch.randn(batch, 16, 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 24, generator=g),
        "pooled_projections": torch.randn(batch, 12, generator=g),
        "timestep": t,  # the pipeline passes t / 1000
        "img_ids": img_ids.reshape(16, 3),
        "txt_ids": torch.zeros(5, 3),
        "guidance": torch.full((batch,), 3.5),
    }


def qwen_inputs(batch: int = 2, seed: int = 1, timesteps=None):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 6, dtype=torch.long)
    mask[0, 4:] = 0  # padding in the first prompt
    t = torch.rand(batch, generator=g) if timesteps is None else torch.tensor(timesteps)
    return {
        "hidden_states": torch.randn(batch, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, 6, 24, generator=g),
        "encoder_hidden_states_mask": mask,
        "timestep": t,
        "img_shapes": [[(1, 4, 4)]] * batch,
    }


def ref_rows(target, origin, weight, mode, rotations=None, eps=1e-6):
    """Per-token float64 loops; `rotations[b]` is row b's [d, d] rotation (or None)."""
    t = np.asarray(target, dtype=np.float64)
    o = np.asarray(origin, dtype=np.float64)
    out = np.empty_like(t)
    for b in range(t.shape[0]):
        if mode == "plain":
            out[b] = t[b] + weight * o[b]
            continue
        on = np.array([ref_standardize_token(list(v), eps)[0] for v in o[b]])
        if rotations is not None:
            r = np.asarray(rotations[b], dtype=np.float64)
            on = np.array(
                [[sum(v[k] * r[k, j] for k in range(len(v))) for j in range(len(v))] for v in on]
            )
        for n in range(t.shape[1]):
            tn, mean_t, std_t = ref_standardize_token(list(t[b, n]), eps)
            out[b, n] = [(a + weight * c) * std_t + mean_t for a, c in zip(tn, on[n])]
    return out


def _mix_ref(text, o, spec, k, t_units):
    """The residual at global block k for this forward, by the slow reference."""
    w = spec["weights"][spec["targets"].index(k)]
    rots = None
    if spec.get("rotations") is not None:
        r = spec["rotations"][k]
        if r.ndim == 2:
            rots = [r] * text.shape[0]
        else:
            buckets = bucket_index(t_units, spec["edges"])
            rots = [r[int(b)] for b in buckets.expand(text.shape[0])]
    out = ref_rows(text.detach(), o.detach(), w, spec["mode"], rots)
    return torch.from_numpy(out).to(text.dtype)


def flux_reference(tr, inp, spec=None):
    """FluxTransformer2DModel.forward unrolled by hand; global block k: double blocks first,
    then single block j = k - num_double."""
    hidden = tr.x_embedder(inp["hidden_states"])
    timestep = inp["timestep"].to(hidden.dtype) * 1000
    if tr.config.guidance_embeds:
        temb = tr.time_text_embed(timestep, inp["guidance"] * 1000, inp["pooled_projections"])
    else:
        temb = tr.time_text_embed(timestep, inp["pooled_projections"])
    text = tr.context_embedder(inp["encoder_hidden_states"])
    rope = tr.pos_embed(torch.cat((inp["txt_ids"], inp["img_ids"]), dim=0))
    blocks = [*tr.transformer_blocks, *tr.single_transformer_blocks]
    o = None
    for k, block in enumerate(blocks):
        if spec is not None and k == spec["origin"]:
            o = text
        if spec is not None and k in spec["targets"]:
            text = _mix_ref(text, o, spec, k, timestep)
        text, hidden = block(
            hidden_states=hidden, encoder_hidden_states=text, temb=temb, image_rotary_emb=rope
        )
    return tr.proj_out(tr.norm_out(hidden, temb))


def qwen_reference(tr, inp, spec=None):
    """QwenImageTransformer2DModel.forward unrolled by hand."""
    hidden = tr.img_in(inp["hidden_states"])
    timestep = inp["timestep"].to(hidden.dtype)
    text = tr.txt_in(tr.txt_norm(inp["encoder_hidden_states"]))
    mask = inp["encoder_hidden_states_mask"].bool()
    temb = tr.time_text_embed(timestep, hidden, None)
    rope = tr.pos_embed(inp["img_shapes"], max_txt_seq_len=text.shape[1], device=hidden.device)
    o = None
    for k, block in enumerate(tr.transformer_blocks):
        if spec is not None and k == spec["origin"]:
            o = text
        if spec is not None and k in spec["targets"]:
            text = _mix_ref(text, o, spec, k, timestep * 1000)
        text, hidden = block(
            hidden_states=hidden,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            temb=temb,
            image_rotary_emb=rope,
        )
    return tr.proj_out(tr.norm_out(hidden, temb))


FAMILIES = {
    "flux": (make_flux, flux_inputs, flux_reference, 5),
    "qwen-image": (make_qwen, qwen_inputs, qwen_reference, 4),
}


def run(tr, inp):
    return tr(**inp, return_dict=False)[0]


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_loop_equals_vanilla_forward(family):
    make, inputs, reference, _ = FAMILIES[family]
    tr, inp = make(), inputs()
    with torch.no_grad():
        torch.testing.assert_close(reference(tr, inp), run(tr, inp))


def test_adapters_list_blocks_in_execution_order():
    tr = make_flux()
    a = stream_adapter(tr)
    assert (a.family, a.num_blocks, a.feature_dim) == ("flux", 5, D)
    assert a.blocks[2] is tr.single_transformer_blocks[0]
    assert a.block_name(1) == "transformer_blocks.1"
    assert a.block_name(4) == "single_transformer_blocks.2"
    q = stream_adapter(make_qwen())
    assert (q.family, q.num_blocks, q.temb_arg) == ("qwen-image", 4, 3)


def _cases(family, n):
    rot = {t: random_orthogonal(D, 10 + t) for t in range(1, n)}
    edges = [0.0, 400.0, 700.0, 1000.0]
    bucketed = {
        t: torch.stack([random_orthogonal(D, 100 * t + b) for b in range(3)]) for t in range(1, n)
    }
    last = n - 1
    return [
        dict(origin=0, targets=[1, last], weights=[0.5, -0.3], mode="plain"),
        dict(origin=1, targets=[2, last], weights=[0.7, 0.4], mode="ln", rotations=rot),
        dict(
            origin=0,
            targets=[2, 3],
            weights=[0.6, 1.1],
            mode="ln",
            rotations=bucketed,
            edges=edges,
        ),
    ]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", [0, 1, 2], ids=["plain", "ln-rotation", "ln-bucket"])
def test_attached_forward_matches_hand_written_loop(family, case):
    make, inputs, reference, n = FAMILIES[family]
    spec = _cases(family, n)[case]
    tr = make()
    # rows at timesteps in different buckets (0.25 -> 250, 0.9 -> 900)
    inp = inputs(timesteps=[0.25, 0.9])
    res = TextStreamResidual(
        spec["origin"],
        spec["targets"],
        spec["weights"],
        mode=spec["mode"],
        rotations=None
        if "rotations" not in spec
        else {t: spec["rotations"][t] for t in spec["targets"]},
        timestep_bucket_edges=spec.get("edges"),
    )
    with torch.no_grad():
        vanilla = run(tr, inp)
        with res.attach(tr):
            out = run(tr, inp)
        ref = reference(tr, inp, spec)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, vanilla, atol=1e-4)
    assert hook_count(tr) == 0
    if case == 2:  # the bucket really matters: all rows in bucket 0 gives another result
        with torch.no_grad(), res.attach(tr):
            other = run(tr, inputs(timesteps=[0.25, 0.25]))
        assert not torch.allclose(other[1], out[1], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_off_is_bit_identical_and_detach_restores(family):
    make, inputs, _, n = FAMILIES[family]
    tr, inp = make(), inputs()
    state = {k: v.clone() for k, v in tr.state_dict().items()}
    with torch.no_grad():
        vanilla = run(tr, inp)
        with TextStreamResidual(0, [], mode="ln").attach(tr) as h:
            assert not h.attached and hook_count(tr) == 0
            assert torch.equal(run(tr, inp), vanilla)
        res = TextStreamResidual(0, [1, n - 1], [0.5], mode="ln")
        with pytest.raises(RuntimeError, match="boom"), res.attach(tr):
            assert hook_count(tr) == 3
            raise RuntimeError("boom")
        assert hook_count(tr) == 0 and torch.equal(run(tr, inp), vanilla)
    assert all(torch.equal(v, tr.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_targets_past_the_last_block_name_the_block_count(family):
    make, _, _, n = FAMILIES[family]
    with pytest.raises(DiffalignError, match=f"has {n} blocks"):
        TextStreamResidual(0, [n], mode="plain").attach(make())


def test_tensor_weights_are_read_at_call_time_and_get_gradients():
    tr = make_flux()
    inp = flux_inputs()
    w = torch.tensor([0.3, 0.6], requires_grad=True)
    res = TextStreamResidual(0, [1, 3], w, mode="ln")
    with res.attach(tr):
        out = run(tr, inp)
        out.square().mean().backward()
        assert w.grad is not None and bool((w.grad != 0).all())
        res.weights = torch.tensor([0.0, 0.0])  # swapped in after attach: used by the hooks
        with torch.no_grad():
            zero = run(tr, inp)
    with torch.no_grad():
        torch.testing.assert_close(zero, run(tr, inp), rtol=1e-5, atol=1e-6)
    assert res.settings()["weights"] == [0.0, 0.0]


def test_flux2_is_refused_with_the_reason():
    class Flux2Transformer2DModel(torch.nn.Module):
        config = type("C", (), {"num_attention_heads": 2, "attention_head_dim": 16})()

    with pytest.raises(DiffalignError, match="FLUX.2.*concatenated"):
        stream_adapter(Flux2Transformer2DModel())


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_positional_calls_match(family):
    """Under gradient checkpointing the blocks are called positionally (Qwen-Image: the text
    mask before temb); outputs and weight gradients equal the plain run's."""
    make, inputs, _, n = FAMILIES[family]
    tr, inp = make(), inputs(timesteps=[0.25, 0.9])
    edges = [0.0, 500.0, 1000.0]
    rots = {t: torch.stack([random_orthogonal(D, 3 * t + b) for b in range(2)]) for t in (2, 3)}
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            tr.enable_gradient_checkpointing()
        w = torch.tensor([0.4, 0.7], requires_grad=True)
        res = TextStreamResidual(
            1, [2, 3], w, mode="ln", rotations=rots, timestep_bucket_edges=edges
        )
        with res.attach(tr):
            out = run(tr, inp)
            out.square().mean().backward()
        results.append((out.detach(), w.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-7)
