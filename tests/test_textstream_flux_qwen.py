"""The T verbs on FLUX.1 and Qwen-Image tiny models (issue 15): calibrate -> generate from the
CLI, per-model-card defaults, the method authors' `.pt` rotation layout driving generation, and
bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign.cli import main
from diffalign.textstream import TextStreamResidual, load_rotations
from diffalign.textstream.generate import GenerationConfig, resolve_sampling
from test_textstream_families import random_orthogonal

SIZE = ["--height", "32", "--width", "32"]


def test_model_card_defaults(tiny_model_dir):
    got = {
        kind: resolve_sampling(GenerationConfig(model=tiny_model_dir(kind)))
        for kind in ("flux-dev", "flux-schnell", "qwen-image", "sd3")
    }
    table = {k: (c.steps, c.cfg, c.guidance, c.max_sequence_length) for k, c in got.items()}
    assert table == {
        "flux-dev": (28, 1.0, 3.5, 512),
        "flux-schnell": (4, 1.0, 0.0, 256),
        "qwen-image": (50, 4.0, None, 512),
        "sd3": (28, 7.0, None, 256),
    }
    given = GenerationConfig(model=tiny_model_dir("flux-dev"), steps=3, guidance=2.0)
    assert (resolve_sampling(given).steps, resolve_sampling(given).guidance) == (3, 2.0)


@pytest.mark.parametrize("kind", ["flux-schnell", "qwen-image"])
def test_cli_calibrate_then_generate(tiny_model_dir, tmp_path, kind, capsys):
    model = tiny_model_dir(kind)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\ntwo dogs\na blue car\nsnow\n")
    rot = tmp_path / "cal" / "rot.safetensors"
    args = ["textstream", "calibrate", "--model", model, "--dataset", str(prompts)]
    args += ["--num-samples", "4", "--steps", "3", "--origin-layer", "0", "--output", str(rot)]
    args += ["--max-sequence-length", "24", "--token-strategy", "valid", *SIZE]
    assert main(args) == 0
    rs = load_rotations(rot)
    family = "flux" if kind.startswith("flux") else "qwen-image"
    assert rs.model_family == family and rs.token_strategy == "valid"
    summary = json.loads((rot.parent / "summary.json").read_text())
    assert summary["model_family"] == family and summary["num_valid_tokens"] > 0
    assert summary["mean_error_after"] <= summary["mean_error_before"]
    # FLUX: global indices over 2 double + 2 single blocks; default targets 2..3
    assert rs.target_layers == [2, 3] if family == "flux" else [2, 3][:0] or rs.target_layers

    out = tmp_path / "gen"
    gen = ["textstream", "generate", "--model", model, "--prompts", str(prompts), "--limit", "1"]
    gen += ["--output-dir", str(out), "--residual-procrustes-path", str(rot), "--steps", "2"]
    assert main([*gen, *SIZE]) == 0
    settings = json.loads((out / "settings.json").read_text())
    opts = settings["options"]
    if kind == "flux-schnell":
        assert (opts["guidance"], opts["max_sequence_length"], opts["cfg"]) == (0.0, 256, 1.0)
    else:
        assert (opts["cfg"], opts["max_sequence_length"], opts["guidance"]) == (4.0, 512, None)
    assert settings["residual"]["procrustes"]["model_family"] == family
    assert len(list(out.glob("00000_*/000.png"))) == 1


def authors_pt(path: Path, d: int, origin: int, targets: list[int], n_buckets: int, **extra):
    """A rotation file in the method authors' `.pt` layout (their keys, [N, L, d, d])."""
    mats = torch.stack(
        [torch.stack([random_orthogonal(d, 7 * b + t) for t in targets]) for b in range(n_buckets)]
    )
    raw = {
        "origin_layer": origin,
        "target_layers": targets,
        "rotation_matrices": mats,
        "feature_dim": d,
        "num_valid_tokens": 1234,
        "strategy": "row_ln",
        "column_center": False,
        "timestep_buckets": n_buckets,
        "timestep_bucket_edges": torch.linspace(0, 1000, n_buckets + 1).tolist(),
        **extra,
    }
    torch.save(raw, path)
    return mats


def test_authors_pt_layout_drives_generation(tiny_model_dir, tmp_path):
    from diffusers import FluxPipeline

    model = tiny_model_dir("flux-dev")
    path = tmp_path / "flux_coco5k_o1.pt"
    mats = authors_pt(path, 32, 1, [2, 3], 2)
    rs = load_rotations(path, feature_dim=32, family="flux")
    assert rs.num_buckets == 2 and rs.timestep_bucket_edges == [0.0, 500.0, 1000.0]
    torch.testing.assert_close(rs.rotations[3], mats[:, 1])

    out = tmp_path / "s"
    args = ["textstream", "sample", "--model", model, "--prompt", "a red cat", *SIZE]
    args += ["--steps", "3", "--output-dir", str(out), "--residual-procrustes-path", str(path)]
    args += ["--residual-weights", "0.8", "--max-sequence-length", "16", "--dtype", "fp32"]
    assert main(args) == 0
    folder = next(out.glob("*_a_red_cat"))
    ours = np.asarray(__import__("PIL.Image").Image.open(folder / "000.png"))
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["residual"]["timestep_bucket_edges"] == [0.0, 500.0, 1000.0]

    pipe = FluxPipeline.from_pretrained(model)
    res = TextStreamResidual(1, [2, 3], [0.8], mode="ln", rotations=rs)

    def render(residual):
        kwargs = dict(
            prompt="a red cat",
            num_inference_steps=3,
            guidance_scale=3.5,
            height=32,
            width=32,
            max_sequence_length=16,
            generator=[torch.Generator("cpu").manual_seed(0)],
        )
        if residual is None:
            return np.asarray(pipe(**kwargs).images[0])
        with residual.attach(pipe.transformer):
            return np.asarray(pipe(**kwargs).images[0])

    assert np.array_equal(ours, render(res))
    assert not np.array_equal(ours, render(None))


BAD = [
    ("family", "calibrated on a sd3 model"),
    ("dimension", "feature size 16"),
    ("buckets", "timestep_buckets says 3"),
    ("past-last", "has 4 blocks"),
    ("col-center", "without column centring"),
    ("guidance", "distilled guidance"),
    ("origin-after-target", "has 4 blocks"),
    ("target-past-last", "has 4 blocks"),
]


@pytest.mark.parametrize("case,match", BAD, ids=[c for c, _ in BAD])
def test_bad_input_one_line_exit_2_nothing_written(tiny_model_dir, tmp_path, capsys, case, match):
    model = tiny_model_dir("flux-schnell")
    f = tmp_path / "r.pt"
    extra: list[str] = []
    if case == "family":
        authors_pt(f, 32, 1, [2, 3], 1, model_family="sd3")
    elif case == "dimension":
        authors_pt(f, 16, 1, [2, 3], 1)
    elif case == "buckets":
        authors_pt(f, 32, 1, [2, 3], 2)
        raw = torch.load(f, weights_only=True)
        raw["timestep_buckets"] = 3
        torch.save(raw, f)
    elif case == "past-last":
        authors_pt(f, 32, 1, [2, 3, 4], 1)
    elif case == "col-center":
        authors_pt(f, 32, 1, [2, 3], 1)
        extra = ["--col-center"]
    elif case == "guidance":
        authors_pt(f, 32, 1, [2, 3], 1)
        extra = ["--guidance", "2"]
        model = tiny_model_dir("qwen-image")
    elif case == "origin-after-target":
        extra = ["--residual-origin-layer", "3", "--residual-target-layers", "2"]
    else:
        extra = ["--residual-target-layers", "2,7"]
    out = tmp_path / "out"
    args = ["textstream", "sample", "--model", model, "--prompt", "x", "--output-dir", str(out)]
    args += ["--steps", "1", *SIZE, *extra]
    if f.exists():
        args += ["--residual-procrustes-path", str(f)]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not out.exists() or not any(p for p in out.rglob("*.png"))


def test_calibrate_bad_targets_and_empty_bucket(tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("flux-schnell")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    base = ["textstream", "calibrate", "--model", model, "--dataset", str(prompts), *SIZE]
    capsys.readouterr()
    out = tmp_path / "c" / "r.safetensors"
    assert main([*base, "--target-layers", "2,4", "--output", str(out)]) == 2
    assert "has 4 blocks" in capsys.readouterr().err
    # 4 steps (1000, 750, 500, 250) cannot reach the bucket 0..250: refused at the first batch
    rc = main([*base, "--num-samples", "2", "--timestep-buckets", "4", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "hold none of the schedule's 4 timesteps" in err and "--steps" in err
    assert not out.exists()
    # 2 samples cannot fill 4 buckets of an 8-step schedule: refused, nothing written
    argv = [*base, "--num-samples", "2", "--timestep-buckets", "4", "--steps", "8"]
    assert main([*argv, "--output", str(out)]) == 2
    assert "got no samples" in capsys.readouterr().err
    assert not out.exists()
    # more --num-samples than the dataset holds: all are used, and the run says so
    assert main([*base, "--num-samples", "5", "--output", str(out)]) == 0
    assert "holds 2 samples, fewer than --num-samples 5" in capsys.readouterr().out


@pytest.mark.parametrize("xt_source", ["trajectory", "noise"])
def test_flux_calibration_matches_store_all_reference(tiny_model_dir, tmp_path, xt_source):
    """Calibration through the FLUX pipeline = run the pipeline, record the transformer call of
    the drawn step, rerun it storing every text token entering each block, scipy Procrustes."""
    from diffusers import FluxPipeline
    from scipy.linalg import orthogonal_procrustes

    from diffalign.textstream.calibrate import calibrate, draw_sample

    pipe = FluxPipeline.from_pretrained(tiny_model_dir("flux-dev"))
    prompts = ["a red cat", "two dogs on grass", "x"]
    steps, seed, origin, targets = 4, 3, 1, [2, 3]
    out = tmp_path / "r.safetensors"
    calibrate(
        pipe=pipe,
        prompts=prompts,
        num_samples=3,
        origin_layer=origin,
        target_layers=targets,
        output=str(out),
        seed=seed,
        steps=steps,
        height=32,
        width=32,
        xt_source=xt_source,
        max_sequence_length=16,
        batch_size=2,
        token_strategy="all",  # the reference stores every text token
    )
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    xs, ys = [], {t: [] for t in targets}
    for i, prompt in enumerate(prompts):
        k, noise = draw_sample(seed, i, steps, (16, 4, 4))
        packed = pipe._pack_latents(noise[None], 1, 16, 4, 4)
        calls = []
        h = pipe.transformer.register_forward_pre_hook(
            lambda m, a, kw, calls=calls: calls.append(dict(kw)), with_kwargs=True
        )
        try:
            pipe(
                prompt,
                latents=packed,
                num_inference_steps=steps,
                guidance_scale=3.5,
                height=32,
                width=32,
                max_sequence_length=16,
                output_type="latent",
            )
        finally:
            h.remove()
        kwargs = dict(calls[k])
        if xt_source == "noise":
            kwargs["hidden_states"] = packed
        entering = []
        hooks = [
            b.register_forward_pre_hook(
                lambda m, a, kw, e=entering: e.append(kw["encoder_hidden_states"][0].double()),
                with_kwargs=True,
            )
            for b in blocks
        ]
        try:
            with torch.no_grad():
                pipe.transformer(**kwargs)
        finally:
            for hk in hooks:
                hk.remove()
        xs.append(entering[origin].numpy())
        for t in targets:
            ys[t].append(entering[t].numpy())

    def std(a):
        return (a - a.mean(1, keepdims=True)) / np.sqrt(a.var(1, keepdims=True) + 1e-6)

    x = std(np.concatenate(xs))
    ones = np.ones((1, x.shape[1]))
    rs = load_rotations(out)
    assert rs.num_valid_tokens == len(x) == 3 * 16
    for t in targets:
        y = std(np.concatenate(ys[t]))
        r, _ = orthogonal_procrustes(np.vstack([x, ones]), np.vstack([y, ones]))
        np.testing.assert_allclose(rs.rotations[t].numpy(), r, atol=2e-4)


def test_sd3_buckets_and_col_center_file(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(8)) + "\n")
    out = tmp_path / "r.safetensors"
    args = ["textstream", "calibrate", "--model", tiny_model_dir("sd3"), "--dataset", str(prompts)]
    args += ["--num-samples", "8", "--steps", "4", "--timestep-buckets", "2", "--col-center"]
    args += ["--xt-source", "noise", "--output", str(out)]
    assert main(args) == 0
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        shape = tuple(f.get_slice("rotation_matrices").get_shape())
        meta = f.metadata()
    assert shape == (2, 2, 32, 32)  # [N, L, d, d]
    assert meta["strategy"] == "row_ln_then_col_center" and meta["model_family"] == "sd3"
    assert json.loads(meta["timestep_bucket_edges"]) == [0.0, 500.0, 1000.0]
    rs = load_rotations(out, feature_dim=32, family="sd3")
    assert rs.column_center and rs.num_buckets == 2


def test_safetensors_header_length_starting_with_0x80_is_not_a_pickle(tmp_path):
    """A safetensors file whose 8-byte header length begins with byte 0x80 was sniffed as a
    pickle and refused ("not a text-stream rotation file"); found while adding metadata."""
    from diffalign.textstream.rotations import RotationSet, save_rotations

    rots = {2: random_orthogonal(8, 1)}
    for pad in range(0, 256):
        path = tmp_path / f"r{pad}.safetensors"
        save_rotations(path, RotationSet(0, [2], rots, 8, 1, "all", {"pad": "x" * pad}))
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length starting with 0x80")
    assert load_rotations(path).target_layers == [2]


def test_run_inference_sh_flux_schnell(tiny_model_dir, tmp_path):
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.endswith("_MODEL_PATH")}
    env.pop("VAE_PATH", None)
    env.update(
        MODEL_DIR=str(tmp_path / "models"),
        FLUX_SCHNELL_MODEL_PATH=tiny_model_dir("flux-schnell"),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(repo / "src") + os.pathsep + env.get("PYTHONPATH", ""),
    )
    out = tmp_path / "o"
    cmd = ["bash", str(repo / "run_inference.sh"), "flux-schnell", "a cat", *SIZE]
    cmd += ["--save_dir", str(out), "--residual_target_layers", "3", "--residual_origin_layer", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    settings = json.loads((folder / "settings.json").read_text())
    assert (settings["options"]["steps"], settings["options"]["guidance"]) == (4, 0.0)
    assert settings["residual"]["target_layers"] == [3]  # a single-stream block of FLUX
    env.pop("FLUX_SCHNELL_MODEL_PATH")
    proc = subprocess.run(cmd[:4], env=env, capture_output=True, text=True, timeout=300)
    note = [line for line in proc.stderr.splitlines() if line.startswith("run_inference.sh:")]
    assert proc.returncode == 2 and "FLUX_SCHNELL_MODEL_PATH" in note[0]


def test_geneval_on_flux_dev_and_dpg_on_qwen_image(tiny_model_dir, tmp_path):
    from PIL import Image

    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text(json.dumps({"tag": "single_object", "include": [], "prompt": "a cat"}) + "\n")
    out = tmp_path / "ge"
    argv = ["textstream", "geneval", "--metadata", str(meta), "--model", tiny_model_dir("flux-dev")]
    argv += ["--output-dir", str(out), "--n-samples", "1", "--steps", "1", *SIZE]
    argv += ["--residual-target-layers", "2,3", "--residual-weights", "0.5"]
    assert main(argv) == 0
    assert Image.open(out / "00000" / "samples" / "0000.png").size == (32, 32)
    prompts = tmp_path / "dpg" / "prompts"
    prompts.mkdir(parents=True)
    (prompts / "p1.txt").write_text("a blue cube\n")
    dpg = tmp_path / "dpg_out"
    argv = ["textstream", "dpg", "--prompts-dir", str(prompts.parent), "--output-dir", str(dpg)]
    argv += ["--model", tiny_model_dir("qwen-image"), "--resolution", "32"]
    argv += ["--residual-target-layers", "3", "--residual-origin-layer", "1"]
    # one step on Qwen-Image's shift_terminal schedule gives NaN sigmas: refused
    assert main([*argv, "--steps", "1"]) == 2 and not dpg.exists()
    assert main([*argv, "--steps", "2"]) == 0
    assert Image.open(dpg / "p1.png").size == (64, 64)
    settings = json.loads((tmp_path / "dpg_out.settings.json").read_text())
    assert settings["options"]["cfg"] == 4.0 and settings["residual"]["target_layers"] == [3]
