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

import numpy as np
import pytest
import torch

from diffalign.textstream import load_rotations
from diffalign.textstream.calibrate import calibrate, draw_sample

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


def prompt_call(pipe, kind: str, index: int, prompt: str) -> tuple[dict, int]:
    """(transformer kwargs of the prompt's own row at the drawn step, the drawn step)."""
    vsf = pipe.vae_scale_factor
    channels = pipe.transformer.config.in_channels // (1 if kind == "sd3" else 4)
    shape = (channels, SIZE // vsf, SIZE // vsf)
    k, noise = draw_sample(SEED, index, STEPS, shape)
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True
    )
    common = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent")
    common["max_sequence_length"] = MSL
    try:
        if kind == "sd3":
            pipe(prompt, latents=noise[None], guidance_scale=CFG, **common)
        else:
            packed = pipe._pack_latents(noise[None], 1, *shape)
            extra = {"guidance_scale": 3.5} if kind == "flux-dev" else {}
            negative = "" if kind == "flux-dev" else " "
            pipe(
                prompt,
                latents=packed,
                true_cfg_scale=CFG,
                negative_prompt=negative,
                **common,
                **extra,
            )
    finally:
        hook.remove()
    if kind == "sd3":  # one call per step, rows [unconditional, conditional]
        kw = calls[k]
        return {n: (v[1:] if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}, k
    return calls[2 * k], k  # true CFG: the prompt's call, then the negative prompt's


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


def reference_rotations(pipe, kind: str) -> tuple[dict[int, np.ndarray], int]:
    d = None
    xty: dict[int, np.ndarray] = {}
    count = 0
    for index, prompt in enumerate(PROMPTS):
        kwargs, _ = prompt_call(pipe, kind, index, prompt)
        text = entering_text(pipe, kwargs)
        keep = authors_token_mask(pipe, kind, prompt, text[0].shape[0])
        d = text[0].shape[1]
        for j in np.flatnonzero(keep):  # the slow, obvious sum over kept tokens
            x = authors_standardize(text[ORIGIN][j])
            count += 1
            for t in TARGETS:
                y = authors_standardize(text[t][j])
                xty[t] = xty.get(t, np.zeros((d, d))) + np.outer(x, y)
    out = {}
    for t in TARGETS:
        u, _, vh = np.linalg.svd(xty[t])
        out[t] = u @ vh
    return out, count


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
