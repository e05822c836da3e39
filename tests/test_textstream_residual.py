"""Text-stream residual (spec T): the pure mix against slow references, and the hooks on tiny
SD3 / SD3.5 transformers against a hand-written block loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffalign.engine.errors import DiffalignError
from diffalign.textstream import TextStreamResidual, build_residual
from diffalign.textstream.residual import residual_mix, standardize

# ---------------------------------------------------------------------------------------------
# slow references: explicit per-token loops in float64


def ref_standardize_token(v: list[float], eps: float) -> tuple[list[float], float, float]:
    d = len(v)
    mean = sum(v) / d
    var = sum((x - mean) ** 2 for x in v) / d  # population variance
    std = math.sqrt(var + eps)
    return [(x - mean) / std for x in v], mean, std


def ref_mix(target, origin, weight, mode, rotation=None, layernorm=False, eps=1e-6):
    """Per-token python loop over a [..., n, d] tensor pair; returns float64 numpy."""
    t = np.asarray(target, dtype=np.float64)
    o = np.asarray(origin, dtype=np.float64)
    out = np.empty_like(t)
    rot = None if rotation is None else np.asarray(rotation, dtype=np.float64)
    for idx in np.ndindex(*t.shape[:-1]):
        tv, ov = list(t[idx]), list(o[idx])
        if mode == "plain":
            out[idx] = [a + weight * b for a, b in zip(tv, ov)]
            continue
        tn, mean_t, std_t = ref_standardize_token(tv, eps)
        on, _, _ = ref_standardize_token(ov, eps)
        if rot is not None:
            d = len(on)
            on = [sum(on[k] * rot[k, j] for k in range(d)) for j in range(d)]
        m = [a + weight * b for a, b in zip(tn, on)]
        if layernorm:
            m, _, _ = ref_standardize_token(m, eps)
        out[idx] = [x * std_t + mean_t for x in m]
    return out


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# pure math


def test_standardize_matches_loop():
    x = torch.randn(2, 5, 7, dtype=torch.float64) * 3 + 1
    xn, mean, std = standardize(x, 1e-6)
    for idx in np.ndindex(2, 5):
        ref, m, s = ref_standardize_token(x[idx].tolist(), 1e-6)
        np.testing.assert_allclose(xn[idx].numpy(), ref, rtol=1e-12, atol=1e-12)
        assert mean[idx].item() == pytest.approx(m, rel=1e-12)
        assert std[idx].item() == pytest.approx(s, rel=1e-12)
    torch.testing.assert_close(xn * std + mean, x)


@pytest.mark.parametrize(
    "mode,rotate,layernorm",
    [
        ("plain", False, False),
        ("ln", False, False),
        ("ln", True, False),
        ("ln", False, True),
        ("ln", True, True),
    ],
)
def test_residual_mix_matches_loop(mode, rotate, layernorm):
    g = torch.Generator().manual_seed(0)
    d = 6
    target = torch.randn(2, 4, d, generator=g) * 2.0 + 0.5
    origin = torch.randn(2, 4, d, generator=g) * 0.3 - 1.0
    rot = random_orthogonal(d, 1) if rotate else None
    out = residual_mix(target, origin, 0.7, mode, rot, layernorm=layernorm, eps=1e-6)
    ref = ref_mix(target, origin, 0.7, mode, rot, layernorm, 1e-6)
    assert out.dtype == torch.float32 and out.shape == target.shape
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_residual_mix_low_precision_computes_in_float32():
    g = torch.Generator().manual_seed(3)
    target = (torch.randn(1, 3, 16, generator=g) * 4).to(torch.bfloat16)
    origin = torch.randn(1, 3, 16, generator=g).to(torch.bfloat16)
    out = residual_mix(target, origin, 0.5, "ln", random_orthogonal(16, 2), eps=1e-6)
    assert out.dtype == torch.bfloat16
    ref = ref_mix(target.float(), origin.float(), 0.5, "ln", random_orthogonal(16, 2))
    np.testing.assert_allclose(out.float().numpy(), ref, rtol=2e-2, atol=2e-2)
    ref_bf16 = torch.from_numpy(ref).to(torch.float32).to(torch.bfloat16)
    assert (out.float() - ref_bf16.float()).abs().max() <= 0.07  # at most one bf16 ulp apart


def test_residual_mix_ln_weight_zero_is_round_trip_and_rejects_bad_input():
    t = torch.randn(3, 8, dtype=torch.float64)
    out = residual_mix(t, torch.randn(3, 8, dtype=torch.float64), 0.0, "ln")
    torch.testing.assert_close(out, t, rtol=1e-12, atol=1e-12)
    with pytest.raises(DiffalignError, match="mode"):
        residual_mix(t, t, 1.0, "nope")
    with pytest.raises(DiffalignError, match="shape"):
        residual_mix(t, t[:2], 1.0, "plain")
    with pytest.raises(DiffalignError, match="ln"):
        residual_mix(t, t, 1.0, "plain", rotation=torch.eye(8))
    with pytest.raises(DiffalignError, match="does not fit"):
        residual_mix(t, t, 1.0, "ln", rotation=torch.eye(4))


# ---------------------------------------------------------------------------------------------
# tiny transformers and a hand-written reference forward


def make_transformer(kind: str, num_layers: int = 4, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    extra = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if kind == "sd35" else {}
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        **extra,
    ).eval()


def make_inputs(batch: int = 1, seed: int = 1, tokens: int = 7):
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, tokens, 32, generator=g),
        "pooled_projections": torch.randn(batch, 64, generator=g),
        "timestep": torch.rand(batch, generator=g) * 1000,
    }


def reference_forward(
    tr,
    inputs,
    origin=None,
    targets=(),
    weights=(),
    mode="plain",
    rotations=None,
    layernorm=False,
    eps=1e-6,
):
    """SD3Transformer2DModel.forward unrolled by hand; the residual applied between blocks."""
    x = inputs["hidden_states"]
    h, w = x.shape[-2:]
    hidden = tr.pos_embed(x)
    temb = tr.time_text_embed(inputs["timestep"], inputs["pooled_projections"])
    text = tr.context_embedder(inputs["encoder_hidden_states"])
    o = None
    mix = dict(zip(targets, weights))
    for i, block in enumerate(tr.transformer_blocks):
        if i == origin:
            o = text
        if i in mix:
            rot = None if rotations is None else rotations[i]
            text = torch.from_numpy(
                ref_mix(text.detach(), o.detach(), mix[i], mode, rot, layernorm, eps)
            ).to(text.dtype)
        text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb)
    hidden = tr.proj_out(tr.norm_out(hidden, temb))
    p, c = tr.config.patch_size, tr.out_channels
    hidden = hidden.reshape(hidden.shape[0], h // p, w // p, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", hidden).reshape(hidden.shape[0], c, h, w)


def run(tr, inputs):
    return tr(**inputs, return_dict=False)[0]


def hook_count(model) -> int:
    """Forward (pre-)hooks on any submodule; the bookkeeping dicts must agree."""
    n = 0
    for m in model.modules():
        n += len(m._forward_pre_hooks) + len(m._forward_hooks)
        assert set(m._forward_pre_hooks_with_kwargs) <= set(m._forward_pre_hooks)
    return n


@pytest.mark.parametrize("kind", ["sd3", "sd35"])
def test_reference_loop_equals_vanilla_forward(kind):
    tr = make_transformer(kind)
    inputs = make_inputs()
    with torch.no_grad():
        torch.testing.assert_close(reference_forward(tr, inputs), run(tr, inputs))


CASES = [
    dict(origin_layer=0, target_layers=[2, 3], weights=[0.5], mode="plain"),
    dict(origin_layer=1, target_layers=[2, 3], weights=[0.8, -0.3], mode="plain"),
    dict(origin_layer=0, target_layers=[1, 3], weights=[0.6, 1.2], mode="ln"),
    dict(origin_layer=0, target_layers=[2, 3], weights=[0.5], mode="ln", layernorm=True),
    dict(origin_layer=1, target_layers=[2, 3], weights=[0.7], mode="ln", rotate=True),
    dict(origin_layer=0, target_layers=[1, 2, 3], mode="ln", rotate=True, layernorm=True),
]


@pytest.mark.parametrize("kind", ["sd3", "sd35"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_attached_forward_matches_reference(kind, case):
    case = dict(case)
    rotate = case.pop("rotate", False)
    tr = make_transformer(kind)
    rotations = (
        {t: random_orthogonal(32, 10 + t) for t in case["target_layers"]} if rotate else None
    )
    res = TextStreamResidual(**case, rotations=rotations)
    inputs = make_inputs(batch=2)  # CFG-like batch of 2
    with torch.no_grad():
        vanilla = run(tr, inputs)
        with res.attach(tr):
            out = run(tr, inputs)
        ref = reference_forward(
            tr,
            inputs,
            res.origin_layer,
            res.target_layers,
            res.weights,
            res.mode,
            rotations,
            res.layernorm,
        )
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, vanilla, atol=1e-4)  # the residual really changed something
    assert hook_count(tr) == 0


def test_batch_rows_are_independent_under_cfg_batch():
    tr = make_transformer("sd3")
    inputs = make_inputs(batch=2)
    res = TextStreamResidual(0, [2, 3], [0.5], mode="ln")
    with torch.no_grad(), res.attach(tr):
        both = run(tr, inputs)
        single = [run(tr, {k: v[i : i + 1] for k, v in inputs.items()}) for i in range(2)]
    torch.testing.assert_close(both, torch.cat(single), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sd3", "sd35"])
def test_off_is_bit_identical_and_registers_nothing(kind):
    tr = make_transformer(kind)
    inputs = make_inputs(batch=2)
    with torch.no_grad():
        vanilla = run(tr, inputs)
        for res in (
            TextStreamResidual(0, [], mode="plain"),
            TextStreamResidual(0, [], [0.3, 0.4], mode="ln"),  # weights ignored without targets
            TextStreamResidual(0, [1, 2, 3], [0.0], mode="plain"),
        ):
            with res.attach(tr) as handle:
                assert not handle.attached and hook_count(tr) == 0
                assert torch.equal(run(tr, inputs), vanilla)
        # zero-weight targets are skipped while the others still apply
        res = TextStreamResidual(0, [2, 3], [0.0, 0.5], mode="plain")
        with res.attach(tr):
            assert len(tr.transformer_blocks[2]._forward_pre_hooks) == 0
            out = run(tr, inputs)
        ref = reference_forward(tr, inputs, 0, [3], [0.5])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_detach_restores_model_exactly_also_on_exception():
    tr = make_transformer("sd35")
    inputs = make_inputs()
    state = {k: v.clone() for k, v in tr.state_dict().items()}
    attrs = {name: set(vars(m)) for name, m in tr.named_modules()}
    res = TextStreamResidual(
        0, [1, 2, 3], [0.5], mode="ln", rotations={t: random_orthogonal(32, t) for t in (1, 2, 3)}
    )
    with torch.no_grad():
        vanilla = run(tr, inputs)
        with pytest.raises(RuntimeError, match="boom"), res.attach(tr):
            assert hook_count(tr) == 4
            run(tr, inputs)
            raise RuntimeError("boom")
        assert hook_count(tr) == 0
        assert torch.equal(run(tr, inputs), vanilla)
    handle = res.attach(tr)
    handle.detach()
    handle.detach()  # idempotent
    assert hook_count(tr) == 0
    assert {name: set(vars(m)) for name, m in tr.named_modules()} == attrs
    after = tr.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)


def test_positional_block_call_gets_the_residual():
    tr = make_transformer("sd3")
    inputs = make_inputs()
    res = TextStreamResidual(0, [1], [0.5], mode="plain")
    with torch.no_grad(), res.attach(tr):
        hidden = tr.pos_embed(inputs["hidden_states"])
        temb = tr.time_text_embed(inputs["timestep"], inputs["pooled_projections"])
        text = tr.context_embedder(inputs["encoder_hidden_states"])
        t1, h1 = tr.transformer_blocks[0](hidden, text, temb)
        kw = tr.transformer_blocks[1](hidden_states=h1, encoder_hidden_states=t1, temb=temb)
        pos = tr.transformer_blocks[1](h1, t1, temb)
    with torch.no_grad():  # detached: feed the mixed text by hand
        plain = tr.transformer_blocks[1](h1, t1 + 0.5 * text, temb)
    for a, b in zip(kw, pos):
        assert torch.equal(a, b)
    for a, b in zip(pos, plain):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("origin", [0, 1])
def test_gradient_checkpointing_double_calls_give_same_gradients(origin):
    torch.manual_seed(0)
    inputs = [make_inputs(seed=s) for s in (1, 2)]
    res = TextStreamResidual(
        origin, [2, 3], [0.5], mode="ln", rotations={t: random_orthogonal(32, t) for t in (2, 3)}
    )

    def grads(checkpointing: bool):
        tr = make_transformer("sd35")
        tr.train()
        if checkpointing:
            tr.enable_gradient_checkpointing()
        calls = []
        counter = tr.transformer_blocks[3].register_forward_pre_hook(lambda *a: calls.append(1))
        with res.attach(tr):
            # two forwards before one backward: recomputes must find their own origin tokens
            loss = sum(run(tr, x).square().mean() for x in inputs)
            loss.backward()
        counter.remove()
        assert hook_count(tr) == 0
        return {n: p.grad.clone() for n, p in tr.named_parameters() if p.grad is not None}, calls

    plain, calls_plain = grads(False)
    ckpt, calls_ckpt = grads(True)
    assert len(calls_plain) == 2 and len(calls_ckpt) == 4  # the recompute really re-ran hooks
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_skipped_origin_block_is_a_clear_error():
    tr = make_transformer("sd3")
    inputs = make_inputs()
    res = TextStreamResidual(1, [2], mode="plain")
    with torch.no_grad(), res.attach(tr):
        tr(**inputs)  # a full forward first: its origin must not leak into the next one
        with pytest.raises(DiffalignError, match="skip_layers"):
            tr(**inputs, skip_layers=[1])


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(origin_layer=2, target_layers=[2, 3]), "after the origin"),
        (dict(origin_layer=3, target_layers=[1]), "after the origin"),
        (dict(origin_layer=-1, target_layers=[1]), ">= 0"),
        (dict(target_layers=[1, 1]), "duplicates"),
        (dict(target_layers="1,x"), "not an integer"),
        (dict(target_layers=[1, 2, 3], weights=[0.5, 0.5]), "2 residual weights for 3"),
        (dict(target_layers=[1], weights=[float("nan")]), "finite"),
        (dict(target_layers=[1], mode="xx"), "mode"),
        (dict(target_layers=[1], rotations={1: torch.eye(32)}), "ln"),
        (dict(target_layers=[1], layernorm=True), "ln"),
        (dict(target_layers=[1, 2], mode="ln", rotations={1: torch.eye(32)}), "no rotation"),
        (dict(target_layers=[1], mode="ln", rotations={1: 2 * torch.eye(32)}), "not orthogonal"),
        (dict(target_layers=[1], eps=0.0), "eps"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, match):
    with pytest.raises(DiffalignError, match=match):
        TextStreamResidual(**kwargs)


def test_model_dependent_checks_at_attach():
    tr = make_transformer("sd3")
    with pytest.raises(DiffalignError, match="out of range"):
        TextStreamResidual(0, [4]).attach(tr)
    with pytest.raises(DiffalignError, match="feature size 32"):
        TextStreamResidual(0, [1], mode="ln", rotations={1: torch.eye(16)}).attach(tr)
    assert hook_count(tr) == 0
    # the last block (context_pre_only) is a valid target
    with torch.no_grad(), TextStreamResidual(0, [3]).attach(tr) as h:
        assert h.attached
        run(tr, make_inputs())


def test_weights_broadcast_default_and_strings():
    assert TextStreamResidual(0, [1, 2, 3]).weights == [1.0, 1.0, 1.0]
    assert TextStreamResidual(np.int64(0), [np.int64(2)]).target_layers == [2]
    with pytest.raises(DiffalignError, match="numbers"):
        TextStreamResidual(0, [1], ["a"])
    with pytest.raises(DiffalignError, match="integer"):
        TextStreamResidual(0, [1.5])
    assert TextStreamResidual(0, "1 2 3", "0.5").weights == [0.5] * 3
    assert TextStreamResidual(0, "1,2", 0.25).weights == [0.25, 0.25]
    s = TextStreamResidual(0, [3, 5, 7], [0.8, 0.6, 0.4], mode="ln", layernorm=True).settings()
    assert s == {
        "enabled": True,
        "origin_layer": 0,
        "target_layers": [3, 5, 7],
        "weights": [0.8, 0.6, 0.4],
        "mode": "ln",
        "layernorm": True,
        "eps": 1e-6,
        "rotations": False,
    }


def test_build_residual_resolves_defaults(tmp_path):
    from diffalign.textstream import RotationSet, save_rotations

    assert build_residual(24, 1536) is None
    assert build_residual(24, 1536, target_layers="") is None
    res = build_residual(24, 1536, target_layers="3,5,7", weights="0.8 0.6 0.4")
    assert (res.origin_layer, res.target_layers, res.weights, res.mode) == (
        0,
        [3, 5, 7],
        [0.8, 0.6, 0.4],
        "plain",
    )
    with pytest.raises(DiffalignError, match="out of range"):
        build_residual(4, 32, target_layers=[4])

    path = tmp_path / "rot.safetensors"
    rots = {t: random_orthogonal(32, t) for t in (2, 3)}
    save_rotations(path, RotationSet(1, [2, 3], rots, 32, 99, "valid"))
    res = build_residual(4, 32, weights=[0.5], procrustes_path=str(path))
    assert (res.origin_layer, res.target_layers, res.mode) == (1, [2, 3], "ln")
    assert torch.equal(res.rotations[3], rots[3])
    s = res.settings()
    assert s["rotations"] and s["procrustes"]["token_strategy"] == "valid"
    assert s["procrustes"]["strategy"] == "row_ln"
    res = build_residual(4, 32, origin_layer=0, target_layers=[3], procrustes_path=str(path))
    assert (res.origin_layer, res.target_layers) == (0, [3])
    assert build_residual(4, 32, target_layers=[], procrustes_path=str(path)) is None
    with pytest.raises(DiffalignError, match="mode ln"):
        build_residual(4, 32, mode="plain", procrustes_path=str(path))
    with pytest.raises(DiffalignError, match="feature size"):
        build_residual(4, 64, procrustes_path=str(path))
    with pytest.raises(DiffalignError, match="no rotation for target layers \\[1\\]"):
        build_residual(4, 32, origin_layer=0, target_layers=[1, 2], procrustes_path=str(path))
    with pytest.raises(DiffalignError, match="not found"):
        build_residual(4, 32, procrustes_path=str(tmp_path / "missing.safetensors"))


def test_rotations_accept_a_loaded_rotation_set(tmp_path):
    """`rotations=load_rotations(path)` works as well as the `{layer: R}` dict."""
    from diffalign.textstream import RotationSet, load_rotations, save_rotations

    path = tmp_path / "rot.safetensors"
    rots = {t: random_orthogonal(32, t) for t in (2, 3)}
    save_rotations(path, RotationSet(0, [2, 3], rots, 32, 10, "all"))
    res = TextStreamResidual(0, [3], 0.5, mode="ln", rotations=load_rotations(path))
    assert list(res.rotations) == [3] and torch.equal(res.rotations[3], rots[3])
    with pytest.raises(DiffalignError, match="rotations must be"):
        TextStreamResidual(0, [2], mode="ln", rotations=torch.stack(list(rots.values())))
