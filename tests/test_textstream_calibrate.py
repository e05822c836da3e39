"""Procrustes calibration (spec T: Calibration; seed 000) against a slow reference that runs the
pipeline itself, unrolls the blocks by hand, stores every token and calls scipy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes

from diffalign.cli import main
from diffalign.textstream import build_residual, load_rotations
from diffalign.textstream.calibrate import calibrate, draw_sample
from launch_helper import launch_two_cpu_processes

PROMPTS = ["a red cat on a sofa", "two dogs", "a small blue car near a tall tree", "x"]


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from diffalign.engine.loading import load_sd3_pipeline

    return load_sd3_pipeline(tiny_model_dir("sd3"))


def valid_upto_eos(ids: list[int], eos: int) -> list[bool]:
    first = ids.index(eos)
    return [i <= first for i in range(len(ids))]


def reference_calibration(
    pipe, prompts, *, seed, steps, cfg, origin, targets, strategy, xt_source, eps=1e-6
):
    """Store all tokens: run the real pipeline to x_t, unroll the blocks, scipy Procrustes."""
    tr = pipe.transformer
    size = pipe.default_sample_size * pipe.vae_scale_factor
    shape = (tr.config.in_channels, pipe.default_sample_size, pipe.default_sample_size)
    xs, ys = [], {t: [] for t in targets}
    for index, prompt in enumerate(prompts):
        k, noise = draw_sample(seed, index, steps, shape)
        x = noise[None]
        if xt_source == "trajectory" and k > 0:
            seen = {}

            def grab(p, step, t, kw, seen=seen):
                seen[step] = kw["latents"].clone()
                return {}

            pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=cfg,
                latents=noise[None],
                height=size,
                width=size,
                output_type="latent",
                callback_on_step_end=grab,
            )
            x = seen[k - 1]
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sched.set_timesteps(steps)
        t = sched.timesteps[k].reshape(1)
        branches = [prompt]  # CFG shapes x_t; only the prompt's own tokens are fitted
        with torch.no_grad():
            for text_prompt in branches:
                pe, _, pooled, _ = pipe.encode_prompt(
                    text_prompt, None, None, do_classifier_free_guidance=False
                )
                hidden = tr.pos_embed(x)
                temb = tr.time_text_embed(t, pooled)
                text = tr.context_embedder(pe)
                entering = []
                for block in tr.transformer_blocks:
                    entering.append(text[0].double().numpy())
                    text, hidden = block(
                        hidden_states=hidden, encoder_hidden_states=text, temb=temb
                    )
                if strategy == "valid":
                    clip = pipe.tokenizer(
                        text_prompt, padding="max_length", max_length=77, truncation=True
                    ).input_ids
                    t5 = pipe.tokenizer_3(
                        text_prompt, padding="max_length", max_length=256, truncation=True
                    ).input_ids
                    keep = np.array(
                        valid_upto_eos(clip, pipe.tokenizer.eos_token_id)
                        + valid_upto_eos(t5, pipe.tokenizer_3.eos_token_id)
                    )
                else:
                    keep = np.ones(entering[0].shape[0], dtype=bool)
                xs.append(entering[origin][keep])
                for tl in targets:
                    ys[tl].append(entering[tl][keep])

    def std(a):
        return (a - a.mean(1, keepdims=True)) / np.sqrt(a.var(1, keepdims=True) + eps)

    x = std(np.concatenate(xs))
    ones = np.ones((1, x.shape[1]))  # zero-mean rows: pin R 1 = 1 with one constant token pair
    out = {}
    for tl in targets:
        y = std(np.concatenate(ys[tl]))
        r, _ = orthogonal_procrustes(np.vstack([x, ones]), np.vstack([y, ones]))
        yy = (y**2).sum()
        out[tl] = (r, ((x - y) ** 2).sum() / yy, ((x @ r - y) ** 2).sum() / yy, len(x))
    return out


@pytest.mark.parametrize(
    "opts",
    [
        dict(xt_source="trajectory", token_strategy="valid", cfg=2.0, batch_size=2, origin=0),
        dict(xt_source="noise", token_strategy="all", cfg=1.0, batch_size=3, origin=1),
    ],
    ids=["trajectory-valid-cfg", "noise-all"],
)
def test_calibration_matches_store_all_reference(pipe, tmp_path, opts):
    opts = dict(opts)
    origin = opts.pop("origin")
    out = tmp_path / "cal" / "rot.safetensors"
    summary = calibrate(
        pipe=pipe,
        prompts=PROMPTS,
        num_samples=4,
        origin_layer=origin,
        target_layer_start=2,
        output=str(out),
        seed=5,
        steps=4,
        **opts,
    )
    ref = reference_calibration(
        pipe,
        PROMPTS,
        seed=5,
        steps=4,
        cfg=opts["cfg"],
        origin=origin,
        targets=[2, 3],
        strategy=opts["token_strategy"],
        xt_source=opts["xt_source"],
    )
    rs = load_rotations(out, feature_dim=32)
    assert (rs.origin_layer, rs.target_layers, rs.token_strategy, rs.strategy) == (
        origin,
        [2, 3],
        opts["token_strategy"],
        "row_ln",
    )
    assert rs.num_valid_tokens == ref[2][3] == summary["num_valid_tokens"]
    for row in summary["per_layer"]:
        r_ref, before, after, _ = ref[row["layer"]]
        np.testing.assert_allclose(rs.rotations[row["layer"]].numpy(), r_ref, atol=2e-4)
        np.testing.assert_allclose(rs.rotations[row["layer"]].sum(1).numpy(), 1.0, atol=1e-5)
        assert row["error_before"] == pytest.approx(before, rel=1e-4)
        assert row["error_after"] == pytest.approx(after, rel=1e-3, abs=1e-6)
        assert row["error_after"] < row["error_before"]
    on_disk = json.loads((tmp_path / "cal" / "summary.json").read_text())
    assert on_disk["per_layer"] == summary["per_layer"]
    assert sum(on_disk["timestep_index_histogram"]) == 4
    assert (tmp_path / "cal" / "procrustes_errors.png").stat().st_size > 1000
    if opts["token_strategy"] == "all":
        assert summary["num_valid_tokens"] == 4 * 333


def test_trajectory_latents_are_the_pipelines(pipe):
    """x_t of the calibration trajectory equals the pipeline's latents at that step."""
    from diffalign.textstream.calibrate import _run_batch, _TokenCollector
    from diffalign.textstream.procrustes import ProcrustesAccumulator

    seen_inputs = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen_inputs.append(kw["hidden_states"].clone()), with_kwargs=True
    )
    acc = ProcrustesAccumulator([2], 32)
    col = _TokenCollector(pipe.transformer.transformer_blocks, 0, [2], acc, 1e-6)
    try:
        with torch.no_grad():
            ks = _run_batch(
                pipe,
                col,
                [0],
                ["a cat"],
                seed=1,
                steps=5,
                latent_shape=(16, 16, 16),
                cfg=1.0,
                xt_source="trajectory",
                token_strategy="all",
                max_sequence_length=256,
                dtype=torch.float32,
                device=torch.device("cpu"),
            )
            steps_seen = []
            _, noise = draw_sample(1, 0, 5, (16, 16, 16))
            pipe(
                "a cat",
                num_inference_steps=5,
                guidance_scale=1.0,
                latents=noise[None],
                height=32,
                width=32,
                output_type="latent",
                callback_on_step_end=lambda p, i, t, kw: steps_seen.append(1) or {},
            )
    finally:
        col.close()
        handle.remove()
    (k,) = ks[0]  # the one step sample 0 is collected at
    ours, theirs = seen_inputs[: k + 1], seen_inputs[k + 1 :]
    assert len(theirs) == 5 and len(steps_seen) == 5
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert acc.count[0] == 333


@pytest.mark.parametrize("xt_source", ["noise", "image"])
def test_one_forward_sources_feed_the_transformer_bit_for_bit(pipe, tmp_path, xt_source):
    """`xt_source` "noise" and "image" (one loop in `_run_batch`), batch 2 with CFG: one forward
    whose inputs are, bit for bit, the samples' initial noise at their drawn steps' schedule
    timesteps ("noise"), or (1 - t/1000) x0 + t/1000 eps at their drawn integer t ("image"),
    each twice (unconditional rows first)."""
    from PIL import Image

    from diffalign.textstream.calibrate import (
        _image_latents,
        _run_batch,
        _TokenCollector,
        draw_train_timesteps,
    )
    from diffalign.textstream.procrustes import ProcrustesAccumulator

    images = []
    for i, value in enumerate((40, 200)):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((36, 32, 3), value, dtype=np.uint8)).save(images[-1])
    shape = (16, 16, 16)
    x0 = _image_latents(pipe, "sd3", images, 32) if xt_source == "image" else None
    candidates = [list(range(1000))]
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["hidden_states"].clone(), kw["timestep"].clone())),
        with_kwargs=True,
    )
    acc = ProcrustesAccumulator([2], 32)
    col = _TokenCollector(pipe.transformer.transformer_blocks, 0, [2], acc, 1e-6)
    try:
        with torch.no_grad():
            plans = _run_batch(
                pipe,
                col,
                [0, 1],
                PROMPTS[:2],
                seed=7,
                steps=4,
                latent_shape=shape,
                cfg=2.0,
                xt_source=xt_source,
                token_strategy="all",
                max_sequence_length=256,
                dtype=torch.float32,
                device=torch.device("cpu"),
                x0=x0,
                train_candidates=candidates,
            )
    finally:
        col.close()
        handle.remove()
    draws = [draw_sample(7, i, 4, shape) for i in range(2)]
    eps = torch.stack([n for _, n in draws])
    if xt_source == "noise":
        assert plans == [[k] for k, _ in draws]
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sched.set_timesteps(4)
        t = sched.timesteps[[k for k, _ in draws]]
        xt = eps
    else:
        assert plans == [draw_train_timesteps(7, i, candidates) for i in range(2)]
        t = torch.tensor([float(p[0]) for p in plans])
        s = (t / 1000.0).view(-1, 1, 1, 1)
        xt = (1.0 - s) * x0 + s * eps
    assert len(seen) == 1 and acc.count[0] == 2 * 333
    assert torch.equal(seen[0][0], torch.cat([xt, xt]))
    assert torch.equal(seen[0][1], torch.cat([t, t]))


def test_cli_calibrate_then_generate_with_the_file(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n\na house\n")
    out = tmp_path / "run" / "procrustes_rotations.pt"  # the seed's name still works
    rc = main(
        [
            "textstream",
            "calibrate",
            "--model",
            tiny_model_dir("sd35"),
            "--dataset",
            str(prompts),
            "--num_samples",
            "2",
            "--origin_layer",
            "0",
            "--target_layer_start",
            "1",
            "--output",
            str(out),
            "--steps",
            "3",
            "--token-strategy",
            "valid",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert "3 rotations" in capsys.readouterr().out
    summary = json.loads((out.parent / "summary.json").read_text())
    assert summary["target_layers"] == [1, 2, 3] and summary["num_samples"] == 2
    res = build_residual(4, 32, weights=0.5, procrustes_path=str(out))
    assert (res.mode, res.target_layers) == ("ln", [1, 2, 3])
    assert set(res.settings()["procrustes"]) >= {"path", "strategy", "num_valid_tokens"}


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--dataset", "nonexistent-set"], "nonexistent-set"),
        (["--target-layers", "2,9"], "out of range"),
        (["--origin-layer", "3", "--target-layers", "2"], "after the origin"),
        (["--target-layers", "2,x"], "not an integer"),
        (["--num-samples", "0"], "'0' must be >= 1"),
        (["--height", "33"], "must be a multiple of"),
    ],
)
def test_cli_calibrate_bad_input(tiny_model_dir, tmp_path, capsys, extra, match):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "rot.safetensors"
    argv = [
        "textstream",
        "calibrate",
        "--model",
        tiny_model_dir("sd3"),
        "--dataset",
        str(prompts),
        "--steps",
        "2",
        "--output",
        str(out),
    ]
    try:
        rc = main(argv + extra)
    except SystemExit as e:  # option types reject bad numbers while parsing
        rc = e.code
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # earlier lines: diffusers' loading bars
    assert rc == 2 and last.startswith("diffalign") and ": error: " in last and match in last
    assert not out.exists()


def test_cli_calibrate_missing_model(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    rc = main(
        [
            "textstream",
            "calibrate",
            "--model",
            str(tmp_path / "no-model"),
            "--dataset",
            str(prompts),
            "--output",
            str(tmp_path / "r.safetensors"),
        ]
    )
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc != 0 and last.startswith("diffalign: error:") and "no-model" in last


@pytest.mark.slow
def test_two_processes_match_one(tiny_model_dir, tmp_path):
    """Two CPU processes under `accelerate launch`: shards summed by all-reduce = 1 process."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS + ["a green apple", "snow"]) + "\n")
    common = [
        "textstream",
        "calibrate",
        "--model",
        tiny_model_dir("sd3"),
        "--dataset",
        str(prompts),
        "--num-samples",
        "5",
        "--steps",
        "3",
        "--token-strategy",
        "valid",
        "--origin-layer",
        "1",
        "--seed",
        "3",
        "--batch-size",
        "2",  # 5 samples: the 2 processes run the 1-process batches [0, 1], [2, 3] and [4]
    ]
    two = tmp_path / "two" / "rot.safetensors"
    target = ["-m", "diffalign.cli", *common, "--device", "cpu", "--output", str(two)]
    proc = launch_two_cpu_processes(target)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp_path / "one" / "rot.safetensors"
    assert main([*common, "--output", str(one)]) == 0
    r1, r2 = load_rotations(one), load_rotations(two)
    assert r1.num_valid_tokens == r2.num_valid_tokens
    for t in r1.target_layers:
        torch.testing.assert_close(r2.rotations[t], r1.rotations[t], atol=1e-6, rtol=0)
    s1 = json.loads(Path(one.parent / "summary.json").read_text())
    s2 = json.loads(Path(two.parent / "summary.json").read_text())
    assert s2["num_processes"] == 2 and s1["num_processes"] == 1
    assert s1["timestep_index_histogram"] == s2["timestep_index_histogram"]
