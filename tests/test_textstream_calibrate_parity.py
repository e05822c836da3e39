"""Calibration fits the tokens the method's authors fit (Yaoyuxuanyyds/Training-free-Residual-SD3
at e9d7900: `compute_sd3_text_procrustes.py`, `Flux-Residual/compute_flux_text_procrustes.py`,
`Qwen-Image-Residual/compute_qwen_text_procrustes.py`): the conditional prompt alone (batch 1),
padding masked by the tokenizers' attention masks (SD3: CLIP-L | CLIP-G through EOS, then T5;
FLUX.1: T5; Qwen-Image: a lone prompt has no padding), each token standardised with the
unbiased std plus eps, `X^T Y` summed token by token.

The reference runs the real pipeline (batch 1, with CFG) from each sample's noise, takes the
transformer call of the drawn step for the prompt, reruns it on the prompt's row alone with
hooks on every block, and builds `X^T Y` in a plain loop over the kept tokens. Rotations are
compared on the zero-mean subspace (`P R`, `P = I - 1 1^T / d`) where standardised tokens live:
the authors' SVD leaves `R 1` free, ours pins `R 1 = 1`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign.engine.errors import DiffalignError
from diffalign.textstream import load_rotations
from diffalign.textstream.calibrate import (
    calibrate,
    draw_bucket_steps,
    draw_sample,
    schedule_buckets,
)

PROMPTS = ["a red cat", "two dogs on wet grass", "x", "a blue car near a tall tree", "sunset"]
STEPS, SEED, SIZE, MSL, CFG = 3, 7, 32, 32, 2.0
ORIGIN, TARGETS = 1, [2, 3]


def load_pipe(tiny_model_dir, kind: str):
    if kind == "sd3":
        from diffusers import StableDiffusion3Pipeline as cls
    elif kind == "flux-dev":
        from diffusers import FluxPipeline as cls
    else:
        from diffusers import QwenImagePipeline as cls
    pipe = cls.from_pretrained(tiny_model_dir(kind))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def authors_token_mask(pipe, kind: str, prompt: str, num_tokens: int) -> np.ndarray:
    """The padding mask of the authors' encode_prompt for one prompt."""
    if kind == "sd3":
        clip = [
            np.array(
                tok(prompt, padding="max_length", max_length=77, truncation=True).attention_mask,
                dtype=bool,
            )
            for tok in (pipe.tokenizer, pipe.tokenizer_2)
        ]
        t5 = pipe.tokenizer_3(prompt, padding="max_length", max_length=MSL, truncation=True)
        return np.concatenate([clip[0] | clip[1], np.array(t5.attention_mask, dtype=bool)])
    if kind == "flux-dev":
        t5 = pipe.tokenizer_2(prompt, padding="max_length", max_length=MSL, truncation=True)
        return np.array(t5.attention_mask, dtype=bool)
    return np.ones(num_tokens, dtype=bool)  # Qwen-Image: one prompt alone is not padded


def pipeline_calls(pipe, kind: str, index: int, prompt: str, steps: int, cfg: float):
    """Every transformer call (kwargs) of the real pipeline run from the sample's noise."""
    vsf = pipe.vae_scale_factor
    channels = pipe.transformer.config.in_channels // (1 if kind == "sd3" else 4)
    shape = (channels, SIZE // vsf, SIZE // vsf)
    _, noise = draw_sample(SEED, index, steps, shape)
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True
    )
    common = dict(num_inference_steps=steps, height=SIZE, width=SIZE, output_type="latent")
    common["max_sequence_length"] = MSL
    try:
        if kind == "sd3":
            pipe(prompt, latents=noise[None], guidance_scale=cfg, **common)
        else:
            packed = pipe._pack_latents(noise[None], 1, *shape)
            extra = {"guidance_scale": 3.5} if kind == "flux-dev" else {}
            negative = "" if kind == "flux-dev" else " "
            pipe(
                prompt,
                latents=packed,
                true_cfg_scale=cfg,
                negative_prompt=negative,
                **common,
                **extra,
            )
    finally:
        hook.remove()
    return calls


def prompt_row(calls: list[dict], kind: str, step: int, cfg: float) -> dict:
    """The transformer kwargs of the prompt's own row at `step`."""
    if kind == "sd3":  # one call per step; with CFG rows [unconditional, conditional]
        kw = calls[step]
        if cfg <= 1:
            return kw
        return {n: (v[1:] if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    return calls[2 * step if cfg > 1 else step]  # true CFG: the prompt's call, then the negative


def prompt_call(pipe, kind: str, index: int, prompt: str) -> tuple[dict, int]:
    """(transformer kwargs of the prompt's own row at the drawn step, the drawn step)."""
    calls = pipeline_calls(pipe, kind, index, prompt, STEPS, CFG)
    vsf = pipe.vae_scale_factor
    channels = pipe.transformer.config.in_channels // (1 if kind == "sd3" else 4)
    k, _ = draw_sample(SEED, index, STEPS, (channels, SIZE // vsf, SIZE // vsf))
    return prompt_row(calls, kind, k, CFG), k


def entering_text(pipe, kwargs: dict) -> list[np.ndarray]:
    """The text tokens `[n, d]` entering each block (global order) for a batch-1 call."""
    tr = pipe.transformer
    blocks = list(tr.transformer_blocks) + list(getattr(tr, "single_transformer_blocks", []))
    seen: list[np.ndarray] = []
    hooks = [
        b.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["encoder_hidden_states"][0].double().numpy()),
            with_kwargs=True,
        )
        for b in blocks
    ]
    try:
        with torch.no_grad():
            tr(**kwargs)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(blocks)
    return seen


def authors_standardize(token: np.ndarray) -> np.ndarray:
    """One token over its features: (x - mean) / (unbiased std + 1e-6)."""
    return (token - token.mean()) / (token.std(ddof=1) + 1e-6)


def add_tokens(xty: dict, pipe, kind: str, prompt: str, kwargs: dict) -> int:
    """Add the prompt's kept tokens of one call to `xty[target]`; returns their number."""
    text = entering_text(pipe, kwargs)
    keep = authors_token_mask(pipe, kind, prompt, text[0].shape[0])
    d = text[0].shape[1]
    for j in np.flatnonzero(keep):  # the slow, obvious sum over kept tokens
        x = authors_standardize(text[ORIGIN][j])
        for t in TARGETS:
            y = authors_standardize(text[t][j])
            xty[t] = xty.get(t, np.zeros((d, d))) + np.outer(x, y)
    return int(keep.sum())


def procrustes(xty: np.ndarray) -> np.ndarray:
    u, _, vh = np.linalg.svd(xty)
    return u @ vh


def reference_rotations(pipe, kind: str) -> tuple[dict[int, np.ndarray], int]:
    xty: dict[int, np.ndarray] = {}
    count = 0
    for index, prompt in enumerate(PROMPTS):
        kwargs, _ = prompt_call(pipe, kind, index, prompt)
        count += add_tokens(xty, pipe, kind, prompt, kwargs)
    return {t: procrustes(xty[t]) for t in TARGETS}, count


def on_zero_mean_rows(r: np.ndarray) -> np.ndarray:
    d = r.shape[0]
    return (np.eye(d) - np.ones((d, d)) / d) @ r


@pytest.mark.parametrize(
    "kind,strategy",
    [("sd3", "valid"), ("flux-dev", "valid"), ("qwen-image", "valid"), ("qwen-image", "all")],
)
def test_rotations_fit_the_authors_tokens(tiny_model_dir, tmp_path, kind, strategy):
    pipe = load_pipe(tiny_model_dir, kind)
    out = tmp_path / "rot.safetensors"
    summary = calibrate(
        pipe=pipe,
        prompts=PROMPTS,
        num_samples=len(PROMPTS),
        origin_layer=ORIGIN,
        target_layers=TARGETS,
        output=str(out),
        seed=SEED,
        steps=STEPS,
        cfg=CFG,
        height=SIZE,
        width=SIZE,
        max_sequence_length=MSL,
        token_strategy=strategy,
        batch_size=2,  # Qwen-Image: the batch pads the shorter prompt; those rows are dropped
    )
    ref, count = reference_rotations(pipe, kind)
    rs = load_rotations(out)
    assert rs.num_valid_tokens == summary["num_valid_tokens"] == count
    assert rs.metadata["collected_branch"] == "conditional"
    # what else shapes the rotations travels with the file
    assert int(rs.metadata["max_sequence_length"]) == summary["max_sequence_length"]
    assert "guidance" in rs.metadata
    for t in TARGETS:
        ours = rs.rotations[t].double().numpy()
        np.testing.assert_allclose(on_zero_mean_rows(ours), on_zero_mean_rows(ref[t]), atol=2e-4)


def test_sd3_all_tokens_collects_the_conditional_rows_only(tiny_model_dir, tmp_path):
    """`--token-strategy all` with CFG: 77 CLIP + T5 tokens of each prompt, no empty-prompt row."""
    pipe = load_pipe(tiny_model_dir, "sd3")
    summary = calibrate(
        pipe=pipe,
        prompts=PROMPTS[:2],
        num_samples=2,
        origin_layer=ORIGIN,
        target_layers=TARGETS,
        output=str(tmp_path / "rot.safetensors"),
        seed=SEED,
        steps=STEPS,
        cfg=CFG,
        max_sequence_length=MSL,
        xt_source="noise",
        token_strategy="all",
    )
    assert summary["num_valid_tokens"] == 2 * (77 + MSL)
    assert summary["collected_branch"] == "conditional"


def test_qwen_image_tokens_do_not_depend_on_the_batch(tiny_model_dir, tmp_path):
    """A Qwen-Image batch pads its prompts to the longest; those rows are not the prompt's."""
    pipe = load_pipe(tiny_model_dir, "qwen-image")
    runs = {}
    for batch_size in (1, 2):
        out = tmp_path / f"b{batch_size}" / "rot.safetensors"
        summary = calibrate(
            pipe=pipe,
            prompts=PROMPTS[:2],  # 9 and 21 characters: the first is padded in a batch of 2
            num_samples=2,
            origin_layer=ORIGIN,
            target_layers=TARGETS,
            output=str(out),
            seed=SEED,
            steps=STEPS,
            height=SIZE,
            width=SIZE,
            xt_source="noise",
            batch_size=batch_size,
        )
        runs[batch_size] = (summary["num_valid_tokens"], load_rotations(out))
    assert runs[1][0] == runs[2][0]
    for t in TARGETS:
        torch.testing.assert_close(
            runs[1][1].rotations[t], runs[2][1].rotations[t], atol=1e-5, rtol=0
        )


def test_schedule_buckets_and_bucket_draws():
    timesteps = torch.tensor([1000.0, 937.5, 857.1, 750.0, 600.0, 375.0])
    candidates = schedule_buckets(timesteps, [0.0, 500.0, 1000.0])
    assert candidates == [[5], [0, 1, 2, 3, 4]]
    assert schedule_buckets(timesteps, None) == [list(range(6))]
    draws = [draw_bucket_steps(3, i, candidates) for i in range(200)]
    assert all(d[0] == 5 and d[1] in range(5) for d in draws)
    assert {d[1] for d in draws} == set(range(5))  # every candidate gets drawn
    assert draws == [draw_bucket_steps(3, i, candidates) for i in range(200)]  # deterministic
    with pytest.raises(DiffalignError, match=r"bucket\(s\) \[0\].*more --steps"):
        schedule_buckets(timesteps, [0.0, 250.0, 1000.0])


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_bucket_draw_reaches_every_bucket_per_sample(tiny_model_dir, tmp_path, kind):
    """`timestep_draw="bucket"`: each sample is collected once per bucket, at a step drawn
    among the schedule's steps in that bucket (the authors' per-bucket loop); the rotations
    per bucket equal the reference built from the pipeline's own calls at those steps."""
    pipe = load_pipe(tiny_model_dir, kind)
    steps, edges = 6, [0.0, 500.0, 1000.0]
    out = tmp_path / "rot.safetensors"
    summary = calibrate(
        pipe=pipe,
        prompts=PROMPTS,
        num_samples=len(PROMPTS),
        origin_layer=ORIGIN,
        target_layers=TARGETS,
        output=str(out),
        seed=SEED,
        steps=steps,
        height=SIZE,
        width=SIZE,
        max_sequence_length=MSL,
        token_strategy="valid",
        timestep_buckets=2,
        timestep_draw="bucket",
        batch_size=2,
    )
    scale = 1000.0 if kind == "flux-dev" else 1.0  # FLUX.1's transformer takes sigma
    xty: list[dict] = [{}, {}]
    counts = [0, 0]
    for index, prompt in enumerate(PROMPTS):
        calls = pipeline_calls(pipe, kind, index, prompt, steps, 1.0)
        ts = [float(c["timestep"].flatten()[0]) * scale for c in calls]
        top = edges[-1]  # the last bucket also holds t = 1000 (the first step)
        candidates = [
            [i for i, t in enumerate(ts) if lo <= t < hi or (hi == top and t >= top)]
            for lo, hi in zip(edges, edges[1:])
        ]
        for b, step in enumerate(draw_bucket_steps(SEED, index, candidates)):
            counts[b] += add_tokens(xty[b], pipe, kind, prompt, prompt_row(calls, kind, step, 1.0))
    assert summary["bucket_tokens"] == counts
    assert sum(summary["timestep_index_histogram"]) == 2 * len(PROMPTS)
    rs = load_rotations(out)
    assert rs.metadata["timestep_draw"] == "bucket"
    for t in TARGETS:
        for b in range(2):
            ours = on_zero_mean_rows(rs.rotations[t][b].double().numpy())
            np.testing.assert_allclose(ours, on_zero_mean_rows(procrustes(xty[b][t])), atol=2e-4)


def test_cli_timestep_draw(tiny_model_dir, tmp_path, capsys):
    from diffalign.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "r.safetensors"
    args = ["textstream", "calibrate", "--model", tiny_model_dir("sd3"), "--dataset", str(prompts)]
    args += ["--num-samples", "3", "--xt-source", "noise", "--timestep-buckets", "4"]
    args += ["--timestep-draw", "bucket", "--output", str(out)]
    assert main([*args, "--steps", "2"]) == 2  # 2 steps cannot fill 4 buckets
    assert "hold none of the schedule's 2 timesteps" in capsys.readouterr().err
    assert not out.exists()
    assert main([*args, "--steps", "8"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["timestep_draw"] == "bucket" and sum(summary["timestep_index_histogram"]) == 12
    assert len(set(summary["bucket_tokens"])) == 1  # every sample in every bucket


def write_images(folder, count: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        pixels = rng.integers(0, 256, size=(40 + 4 * i, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def image_latent(pipe, kind: str, path: str) -> torch.Tensor:
    """`[C, h, w]` VAE posterior mean of the centre-cropped image, normalised per family."""
    from PIL import Image

    from diffalign.engine.pairs import center_crop_resize

    with Image.open(path) as im:
        img = center_crop_resize(im, SIZE)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    vae = pipe.vae
    with torch.no_grad():
        if kind == "qwen-image":
            mean = vae.encode(x[:, :, None]).latent_dist.mean[:, :, 0]
            mu = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
            sd = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
            return ((mean - mu) / sd)[0]
        mean = vae.encode(x).latent_dist.mean
        shift = vae.config.shift_factor or 0.0
        return ((mean - shift) * vae.config.scaling_factor)[0]


@pytest.mark.parametrize(
    "kind,cfg,buckets", [("sd3", CFG, 1), ("flux-dev", 1.0, 2), ("qwen-image", 1.0, 1)]
)
def test_image_source_is_the_authors_training_noising(tiny_model_dir, tmp_path, kind, cfg, buckets):
    """`xt_source="image"`: x_t = (1 - t/1000) x0 + t/1000 eps from the pair's image latent at an
    integer t drawn uniformly (per bucket with the bucket draw), one forward; the reference
    replaces the pipeline call's latents and timestep by hand."""
    from diffalign.textstream.calibrate import draw_train_timesteps, train_timestep_candidates

    pipe = load_pipe(tiny_model_dir, kind)
    images = write_images(tmp_path, len(PROMPTS))
    out = tmp_path / "rot.safetensors"
    edges = None if buckets == 1 else [0.0, 500.0, 1000.0]
    summary = calibrate(
        pipe=pipe,
        prompts=PROMPTS,
        images=images,
        num_samples=len(PROMPTS),
        origin_layer=ORIGIN,
        target_layers=TARGETS,
        output=str(out),
        seed=SEED,
        steps=STEPS,
        cfg=cfg,
        height=SIZE,
        width=SIZE,
        max_sequence_length=MSL,
        token_strategy="valid",
        xt_source="image",
        timestep_buckets=buckets,
        timestep_draw="bucket",
        batch_size=2,
    )
    vsf = pipe.vae_scale_factor
    channels = pipe.transformer.config.in_channels // (1 if kind == "sd3" else 4)
    shape = (channels, SIZE // vsf, SIZE // vsf)
    xty: list[dict] = [{} for _ in range(buckets)]
    counts = [0] * buckets
    for index, prompt in enumerate(PROMPTS):
        kwargs = prompt_row(pipeline_calls(pipe, kind, index, prompt, STEPS, cfg), kind, 0, cfg)
        _, eps = draw_sample(SEED, index, STEPS, shape)
        x0 = image_latent(pipe, kind, images[index])
        # float32: every integer t reaches the transformer in the bucket it is drawn in
        for b, t in enumerate(draw_train_timesteps(SEED, index, train_timestep_candidates(edges))):
            s = t / 1000.0
            xt = ((1 - s) * x0 + s * eps)[None]
            if kind == "sd3":
                call = {**kwargs, "hidden_states": xt, "timestep": torch.tensor([float(t)])}
            else:
                packed = pipe._pack_latents(xt, 1, *shape)
                call = {**kwargs, "hidden_states": packed, "timestep": torch.tensor([s])}
            counts[b] += add_tokens(xty[b], pipe, kind, prompt, call)
    assert summary["bucket_tokens"] == counts
    assert summary["xt_source"] == "image" and sum(summary["timestep_histogram_per_100"]) == (
        buckets * len(PROMPTS)
    )
    rs = load_rotations(out)
    for t in TARGETS:
        for b in range(buckets):
            ours = rs.rotations[t] if buckets == 1 else rs.rotations[t][b]
            np.testing.assert_allclose(
                on_zero_mean_rows(ours.double().numpy()),
                on_zero_mean_rows(procrustes(xty[b][t])),
                atol=2e-4,
            )


def test_image_source_needs_pairs_and_a_square_size(tiny_model_dir, tmp_path):
    pipe = load_pipe(tiny_model_dir, "sd3")
    common = dict(pipe=pipe, prompts=PROMPTS[:2], num_samples=2, xt_source="image", steps=2)
    with pytest.raises(DiffalignError, match="needs image-caption pairs: sample 0"):
        calibrate(output=str(tmp_path / "a" / "r.safetensors"), **common)
    images = write_images(tmp_path, 2)
    with pytest.raises(DiffalignError, match="must be equal"):
        calibrate(
            output=str(tmp_path / "b" / "r.safetensors"),
            images=images,
            height=32,
            width=64,
            **common,
        )
    assert not (tmp_path / "a" / "r.safetensors").exists()


def test_cli_image_source_from_a_jsonl_of_pairs(tiny_model_dir, tmp_path, capsys):
    from diffalign.cli import main

    images = write_images(tmp_path, 2)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": p, "image": Path(i).name}) + "\n" for p, i in zip(PROMPTS, images)
        )
    )
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "cal" / "r.safetensors"
    args = ["textstream", "calibrate", "--model", tiny_model_dir("sd3"), "--num-samples", "2"]
    args += ["--xt-source", "image", "--steps", "2", "--output", str(out)]
    assert main([*args, "--dataset", str(prompts)]) == 2
    assert "needs image-caption pairs" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--dataset", str(pairs), "--height", "32", "--width", "32"]) == 0
    summary = json.loads((tmp_path / "cal" / "summary.json").read_text())
    assert summary["xt_source"] == "image" and sum(summary["timestep_histogram_per_100"]) == 2
    assert load_rotations(out).metadata["xt_source"] == "image"


def test_the_default_token_strategy_is_the_authors_valid(capsys):
    """Padding masked by default, as the authors calibrate (`--no-padding-mask` turns it off)."""
    import inspect

    from diffalign.cli import main

    assert inspect.signature(calibrate).parameters["token_strategy"].default == "valid"
    with pytest.raises(SystemExit):
        main(["textstream", "calibrate", "--help"])
    assert "(default: valid)" in " ".join(capsys.readouterr().out.split())
