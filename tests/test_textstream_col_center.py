"""Generation with a rotation file calibrated with `--col-center` (issue 15) against the method
authors' generation code, read at Yaoyuxuanyyds/Training-free-Residual-SD3 e9d7900 (the fork
Yuxuan0919/Training-free-Residual-SD3 3f200a7 only adds 4 import lines at the top):
`Flux-Residual/flux_transformer_res.py` `_standardize_tokenwise` (line 31) and `_apply_residual`
(lines 66-99) standardise each token (unbiased std, clamped at eps, divided by std + eps),
rotate the origin, mix, rescale by the target's mean and std; `Flux-Residual/util.py`
`resolve_rotation_bucket` (lines 101-120) picks the bucket of the scheduler timestep. Column
centring happens only in their calibration (`Flux-Residual/compute_flux_text_procrustes.py`
lines 357-377: `X^T Y - s_x s_y^T / n` over the unpadded calibration tokens); generation never
centres, and their files hold no column means."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from diffalign.cli import main
from diffalign.textstream import build_residual, load_rotations
from diffalign.textstream.residual import residual_mix
from test_textstream_families import random_orthogonal
from test_textstream_flux_qwen import SIZE, authors_pt

EPS = 1e-6


def authors_standardize(v: list[float]) -> tuple[list[float], float, float]:
    """One token as the authors standardise it: unbiased std, clamped, eps added to the std."""
    d = len(v)
    mean = sum(v) / d
    std = max(math.sqrt(sum((x - mean) ** 2 for x in v) / (d - 1)), EPS)
    return [(x - mean) / (std + EPS) for x in v], mean, std


def authors_mix(target, origin, weight: float, rotation, center: bool = False) -> np.ndarray:
    """The authors' residual (no LayerNorm) for one sequence `[n, d]`, token by token.
    `center=True` is what diffalign did before: the standardised origin centred over the
    sequence's tokens before the rotation (the authors never do this at generation)."""
    t = np.asarray(target, dtype=np.float64)
    r = np.asarray(rotation, dtype=np.float64)
    o = [authors_standardize(list(v))[0] for v in np.asarray(origin, dtype=np.float64)]
    n, d = t.shape
    if center:
        means = [sum(o[i][j] for i in range(n)) / n for j in range(d)]
        o = [[o[i][j] - means[j] for j in range(d)] for i in range(n)]
    out = np.empty_like(t)
    for i in range(n):
        rotated = [sum(o[i][k] * r[k, j] for k in range(d)) for j in range(d)]
        tn, mean, std = authors_standardize(list(t[i]))
        out[i] = [(a + weight * b) * std + mean for a, b in zip(tn, rotated)]
    return out


def authors_bucket(t: float, edges: list[float]) -> int:
    """`searchsorted(edges, t, side="right") - 1`, clamped to the buckets."""
    below = sum(1 for e in edges if e <= t) - 1
    return min(max(below, 0), len(edges) - 2)


def test_mix_is_the_authors_arithmetic_without_centring():
    g = torch.Generator().manual_seed(0)
    d = 12
    # columns with clear means over the tokens, so centring them would matter
    target = torch.randn(2, 7, d, generator=g) * 2.0 + torch.randn(d, generator=g)
    origin = torch.randn(2, 7, d, generator=g) * 0.5 + 3.0 * torch.randn(d, generator=g)
    rot = random_orthogonal(d, 5)
    ours = residual_mix(target, origin, 0.8, "ln", rot).numpy()
    for b in range(2):
        ref = authors_mix(target[b], origin[b], 0.8, rot)
        np.testing.assert_allclose(ours[b], ref, rtol=1e-5, atol=1e-5)
        centred = authors_mix(target[b], origin[b], 0.8, rot, center=True)
        assert np.abs(ours[b] - centred).max() > 0.1


def test_col_centred_file_through_flux_generation_matches_the_authors(tiny_model_dir, tmp_path):
    """`textstream sample --col-center` with an authors' `.pt` calibrated with column centring
    (two timestep buckets) = FluxPipeline with the authors' residual done by hand in hooks."""
    from diffusers import FluxPipeline
    from PIL import Image

    model = tiny_model_dir("flux-dev")
    path = tmp_path / "flux_o1_cc.pt"
    extra = {"strategy": "row_ln_then_col_center", "column_center": True}
    mats = authors_pt(path, 32, 1, [2, 3], 2, **extra)
    edges = [0.0, 500.0, 1000.0]
    assert load_rotations(path).column_center  # what the file holds: rotations and flags only

    def sample(name: str, *flags: str) -> np.ndarray:
        out = tmp_path / name
        args = ["textstream", "sample", "--model", model, "--prompt", "a red cat", *SIZE]
        args += ["--steps", "3", "--output-dir", str(out), "--residual-procrustes-path", str(path)]
        args += ["--residual-weights", "0.8", "--max-sequence-length", "16", "--dtype", "fp32"]
        assert main([*args, *flags]) == 0
        folder = next(out.glob("*_a_red_cat"))
        settings = json.loads((folder / "settings.json").read_text())
        assert settings["residual"]["procrustes"]["column_center"] is True
        return np.asarray(Image.open(folder / "000.png"), dtype=np.int16)

    ours = sample("cc", "--col-center")
    # the flag only checks the file: the same pixels without it
    assert np.array_equal(ours, sample("plain"))
    # a folder an older diffalign made with --col-center (centred at generation) is not added to
    old = next((tmp_path / "cc").glob("*_a_red_cat")) / "settings.json"
    recorded = json.loads(old.read_text())
    assert recorded["identity"]["residual_options"]["col_center"] != True  # noqa: E712
    recorded["identity"]["residual_options"]["col_center"] = True
    old.write_text(json.dumps(recorded))
    args = ["textstream", "sample", "--model", model, "--prompt", "a red cat", *SIZE, "--steps"]
    args += ["3", "--output-dir", str(tmp_path / "cc"), "--residual-procrustes-path", str(path)]
    args += ["--residual-weights", "0.8", "--max-sequence-length", "16", "--dtype", "fp32"]
    assert main([*args, "--col-center"]) == 0  # sample puts the new images beside, unmixed
    assert len(list((tmp_path / "cc").glob("*_a_red_cat*"))) == 2

    pipe = FluxPipeline.from_pretrained(model)
    tr = pipe.transformer
    blocks = [*tr.transformer_blocks, *tr.single_transformer_blocks]

    def run(output_type: str):
        with torch.no_grad():
            return pipe(
                prompt="a red cat",
                num_inference_steps=3,
                guidance_scale=3.5,
                height=32,
                width=32,
                max_sequence_length=16,
                generator=[torch.Generator("cpu").manual_seed(0)],
                output_type=output_type,
            ).images

    def authors(center: bool, output_type: str):
        seen: dict = {}

        def on_call(module, args, kwargs):
            seen["t"] = float(kwargs["timestep"].flatten()[0]) * 1000  # the pipeline's t / 1000

        def on_origin(module, args, kwargs):
            seen["origin"] = kwargs["encoder_hidden_states"]

        def on_target(layer):
            def hook(module, args, kwargs):
                rot = mats[authors_bucket(seen["t"], edges), [2, 3].index(layer)]
                text = kwargs["encoder_hidden_states"]
                mixed = [
                    authors_mix(text[b], seen["origin"][b], 0.8, rot, center)
                    for b in range(text.shape[0])
                ]
                kwargs["encoder_hidden_states"] = torch.from_numpy(np.stack(mixed)).to(text.dtype)
                return args, kwargs

            return hook

        handles = [
            tr.register_forward_pre_hook(on_call, with_kwargs=True),
            blocks[1].register_forward_pre_hook(on_origin, with_kwargs=True),
            *(blocks[k].register_forward_pre_hook(on_target(k), with_kwargs=True) for k in (2, 3)),
        ]
        try:
            return run(output_type)
        finally:
            for h in handles:
                h.remove()

    png = np.asarray(authors(center=False, output_type="pil")[0], dtype=np.int16)
    assert np.abs(ours - png).max() <= 1  # float64 loop vs float32: rounding at most
    # the latents, where the old centring shows clearly: the library path the CLI takes
    res = build_residual(4, 32, procrustes_path=str(path), weights=0.8, column_center=True)
    with res.attach(tr):
        latent = run("latent")
    torch.testing.assert_close(latent, authors(False, "latent"), rtol=1e-4, atol=1e-5)
    centred = authors(True, "latent")
    assert (latent - centred).abs().max() > 1e-3  # measured 0.023; rounding is 2e-7
