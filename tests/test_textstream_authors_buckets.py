"""Timestep buckets as the method's authors make and use them (Yaoyuxuanyyds/Training-free-
Residual-SD3 at e9d7900). Calibration: `_build_bucket_edges` in
`Flux-Residual/compute_flux_text_procrustes.py` and `Qwen-Image-Residual/compute_qwen_text_
procrustes.py` splits the integer timesteps 0..999 into N buckets of equal count, the first
`1000 % N` one larger, and draws an integer `t` in `[edges[b], edges[b + 1])` for bucket b.
Generation: `resolve_rotation_bucket` in their `util.py` takes
`searchsorted(edges, t, side="right") - 1`, clamped, of the scheduler timestep.

Ours buckets the timestep as the transformer receives it (`t.to(dtype) / 1000` on FLUX.1 and
Qwen-Image); in float32 that is theirs for every integer timestep and every scheduler timestep
not within float32 rounding of an edge. Before: edges `1000 k / N` (N = 3: 333.3, not 334) and
float32's `0.7 * 1000 = 699.99999` put t = 700 below the edge 700 (N = 10)."""

from __future__ import annotations

import bisect

import numpy as np
import pytest
import torch

from diffalign.textstream.adapters import StreamAdapter
from diffalign.textstream.calibrate import received_buckets, train_timestep_candidates
from diffalign.textstream.rotations import equal_bucket_edges

ADAPTERS = [
    StreamAdapter("flux", (), 0, timestep_scale=1000.0),
    StreamAdapter("qwen-image", (), 0, timestep_scale=1000.0),
    StreamAdapter("sd3", (), 0),
]


def authors_edges(num_train_timesteps: int, num_buckets: int) -> list[int]:
    """Their `_build_bucket_edges`, line for line."""
    if num_buckets <= 1:
        return [0, num_train_timesteps]
    base = num_train_timesteps // num_buckets
    remainder = num_train_timesteps % num_buckets
    edges = [0]
    for bucket_idx in range(num_buckets):
        size = base + (1 if bucket_idx < remainder else 0)
        edges.append(edges[-1] + size)
    edges[-1] = num_train_timesteps
    return edges


def authors_bucket(t: float, edges: list[int]) -> int:
    """Their `resolve_rotation_bucket`: `searchsorted(edges, t, side="right") - 1`, clamped."""
    return max(min(bisect.bisect_right(edges, t) - 1, len(edges) - 2), 0)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 7, 9, 10, 13, 16, 999, 1000])
def test_edges_are_the_authors(n):
    assert equal_bucket_edges(n) == [float(e) for e in authors_edges(1000, n)]


def test_more_buckets_than_timesteps_is_refused():
    from diffalign.engine.errors import DiffalignError

    with pytest.raises(DiffalignError, match="at most one bucket per timestep"):
        equal_bucket_edges(1001)


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.family)
@pytest.mark.parametrize("n", [3, 5, 6, 7, 10])
def test_integer_draws_per_bucket_are_the_authors_in_float32(adapter, n):
    """`--xt-source image`: the integers each bucket draws from = their `range(start, end)`."""
    edges = equal_bucket_edges(n)
    theirs = authors_edges(1000, n)
    got = train_timestep_candidates(edges, adapter, torch.float32)
    assert got == [list(range(theirs[b], theirs[b + 1])) for b in range(n)]


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.family)
def test_generation_looks_up_the_authors_bucket_in_float32(adapter):
    """Scheduler timesteps (float32) -> bucket, at and around the edges of 3 and 10 buckets."""
    ts = [1000.0, 999.5, 800.01, 700.0, 699.9, 667.0, 666.9, 500.0, 334.0, 333.5, 100.0, 0.5]
    for n in (3, 10):
        edges = equal_bucket_edges(n)
        theirs = authors_edges(1000, n)
        t32 = torch.tensor(ts, dtype=torch.float32)
        want = [authors_bucket(float(t), theirs) for t in t32]
        assert received_buckets(t32, edges, adapter, torch.float32).tolist() == want


def test_bf16_keeps_the_order_of_the_edges():
    """In bf16 neighbouring timesteps arrive as one value; the edge's own value goes up:
    a timestep at or above an edge is never looked up below it."""
    flux = ADAPTERS[0]
    edges = equal_bucket_edges(6)  # ..., 501, ...: bf16(501) = 500, so 499..501 arrive as 0.5
    ts = torch.arange(0, 1000, dtype=torch.float32)
    got = received_buckets(ts, edges, flux, torch.bfloat16).tolist()
    theirs = authors_edges(1000, 6)
    assert all(g >= authors_bucket(float(t), theirs) for g, t in zip(got, ts))
    assert got == sorted(got)
    assert got[499] == got[500] == got[501] == 3


def test_qwen_image_bucketed_generation_is_the_authors(tiny_model_dir, tmp_path):
    """QwenImagePipeline (true CFG, both branches get the residual) with an authors' `.pt` of
    3 buckets = the same pipeline with their residual done by hand: their `transformer.py`
    `_apply_residual` without LayerNorm (unbiased std, eps added to it; Qwen-Image clamps
    nothing), the rotation of `resolve_rotation_bucket(t)` with their integer edges, on the
    text entering each block (after `txt_norm` / `txt_in` for block 0)."""
    from diffusers import QwenImagePipeline

    from diffalign.textstream import build_residual
    from diffalign.textstream.adapters import stream_adapter
    from test_textstream_col_center import authors_mix
    from test_textstream_flux_qwen import authors_pt

    pipe = QwenImagePipeline.from_pretrained(tiny_model_dir("qwen-image"))
    tr = pipe.transformer
    adapter = stream_adapter(tr)
    d, origin, targets = adapter.feature_dim, 1, [2, 3]
    path = tmp_path / "qwen_o1.pt"
    edges = authors_edges(1000, 3)
    mats = authors_pt(path, d, origin, targets, 3, timestep_bucket_edges=edges)
    seen: dict = {"buckets": []}

    def run():
        with torch.no_grad():
            return pipe(
                prompt="a red cat",
                negative_prompt=" ",
                true_cfg_scale=4.0,
                num_inference_steps=6,
                height=32,
                width=32,
                max_sequence_length=16,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="latent",
            ).images

    def on_call(module, args, kwargs):
        t = float(kwargs["timestep"].flatten()[0]) * 1000  # the pipeline's t / 1000, float32
        seen["bucket"] = authors_bucket(t, edges)
        seen["buckets"].append(seen["bucket"])

    def on_origin(module, args, kwargs):
        seen["origin"] = kwargs["encoder_hidden_states"]

    def on_target(layer):
        def hook(module, args, kwargs):
            rot = mats[seen["bucket"], targets.index(layer)]
            text = kwargs["encoder_hidden_states"]
            mixed = [authors_mix(text[b], seen["origin"][b], 0.8, rot) for b in range(len(text))]
            kwargs["encoder_hidden_states"] = torch.from_numpy(np.stack(mixed)).to(text.dtype)
            return args, kwargs

        return hook

    blocks = adapter.blocks
    handles = [
        tr.register_forward_pre_hook(on_call, with_kwargs=True),
        blocks[origin].register_forward_pre_hook(on_origin, with_kwargs=True),
        *(blocks[k].register_forward_pre_hook(on_target(k), with_kwargs=True) for k in targets),
    ]
    try:
        theirs = run()
    finally:
        for h in handles:
            h.remove()
    assert sorted(set(seen["buckets"])) == [0, 1, 2]  # the 6 steps reach every bucket

    res = build_residual(adapter.num_blocks, d, procrustes_path=str(path), weights=0.8)
    assert res.timestep_bucket_edges == [0.0, 334.0, 667.0, 1000.0]
    with res.attach(tr):
        ours = run()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert (ours - run()).abs().max() > 1e-3  # the residual does change the latents
