"""Learned residual weights (spec T; issue 16): the math against slow references, the gradient
reaching the weights only (finite differences), `textstream cache`, `train-weights` and
`--residual-weights-file` end to end on the tiny SD3, exact resume, bad input."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from diffalign.textstream import TextStreamResidual
from diffalign.textstream.train_weights import CachedPairs
from diffalign.textstream.weights import (
    LearnedWeights,
    ResidualWeights,
    TimeSampling,
    load_learned_weights,
    noisy_latents,
    resolve_weights_file,
    sample_unit_times,
    save_learned_weights,
    shift_times,
    smoothness_penalty,
    softplus_inverse,
    velocity_loss,
)
from folder_helpers import file_mtimes

CAPTIONS = ["a red square", "a blue circle", "a green cat", "a yellow dog", "two birds", "a tree"]


# ---------------------------------------------------------------------------------------------
# pure math


def test_shift_matches_the_flow_match_scheduler_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    u = torch.linspace(1.0, 0.05, 10)  # unshifted sigmas; the scheduler shifts them
    sched.set_timesteps(sigmas=u.numpy())
    torch.testing.assert_close(shift_times(u, 3.0), sched.sigmas[:-1].float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(shift_times(u, 1.0), u)


@pytest.mark.parametrize("shift_type", ["exponential", "linear"])
def test_default_shift_is_the_schedulers_also_with_dynamic_shifting(shift_type):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    from diffalign.textstream.train_weights import scheduler_shift

    static = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert scheduler_shift(static.config, 4096) == 3.0
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=shift_type)
    c = sched.config
    mu = calculate_shift(1024, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    u = torch.linspace(1.0, 0.05, 8)
    sched.set_timesteps(sigmas=u.numpy(), mu=mu)
    shifted = shift_times(u, scheduler_shift(sched.config, 1024))
    torch.testing.assert_close(shifted, sched.sigmas[:-1].float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "ts,mean,var",
    [
        (TimeSampling("uniform"), 0.5, 1 / 12),
        (TimeSampling("beta", alpha=2.0, beta=5.0), 2 / 7, 2 * 5 / (7**2 * 8)),
        (TimeSampling("gaussian", mean=0.5, std=0.1), 0.5, 0.01),
    ],
    ids=["uniform", "beta", "gaussian"],
)
def test_time_modes_have_their_distributions(ts, mean, var):
    u = sample_unit_times(200_000, ts, torch.Generator().manual_seed(0)).double()
    assert float(u.min()) >= 0.0 and float(u.max()) <= 1.0
    assert abs(float(u.mean()) - mean) < 3e-3 and abs(float(u.var()) - var) < 3e-3
    # the same generator seed gives the same times
    again = sample_unit_times(5, ts, torch.Generator().manual_seed(1))
    assert torch.equal(again, sample_unit_times(5, ts, torch.Generator().manual_seed(1)))


def test_logitnorm_is_the_sigmoid_of_a_normal():
    ts = TimeSampling("logitnorm", mean=0.5, std=0.8)
    u = sample_unit_times(100_000, ts, torch.Generator().manual_seed(0)).double()
    z = torch.logit(u)
    assert abs(float(z.mean()) - 0.5) < 0.01 and abs(float(z.std()) - 0.8) < 0.01


def test_time_sampling_rejects_bad_values():
    for bad in (
        TimeSampling("nope"),
        TimeSampling("beta", alpha=0.0),
        TimeSampling("gaussian", std=math.nan),
        TimeSampling(shift=math.inf),
    ):
        with pytest.raises(DiffalignError):
            bad.validate()


def test_parametrisation_penalty_and_loss_against_loops():
    w = torch.tensor([1e-4, 0.3, 1.0, 7.0, 25.0])
    torch.testing.assert_close(
        torch.nn.functional.softplus(softplus_inverse(w)), w, rtol=1e-5, atol=0
    )
    with pytest.raises(DiffalignError, match="> 0"):
        softplus_inverse(torch.tensor([1.0, 0.0]))
    mod = ResidualWeights(torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(mod(), torch.tensor([0.5, 2.0]))
    ws = [0.5, 2.0, 1.0, 1.5]
    ref = sum((ws[k + 1] - ws[k]) ** 2 for k in range(3)) / 3
    assert math.isclose(float(smoothness_penalty(torch.tensor(ws))), ref, rel_tol=1e-6)
    assert float(smoothness_penalty(torch.tensor([3.0]))) == 0.0
    g = torch.Generator().manual_seed(0)
    x0, eps, pred = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    s = torch.tensor([0.25, 0.9])
    xs = noisy_latents(x0, eps, s)
    for b in range(2):
        torch.testing.assert_close(xs[b], (1 - s[b]) * x0[b] + s[b] * eps[b])
    ref_loss = (
        sum(
            (float(pred.flatten()[i]) - (float(eps.flatten()[i]) - float(x0.flatten()[i]))) ** 2
            for i in range(pred.numel())
        )
        / pred.numel()
    )
    assert math.isclose(float(velocity_loss(pred, x0, eps)), ref_loss, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------
# the gradient reaches the weights only, and equals finite differences


def make_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    ).eval()


def make_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=g, dtype=dtype),
        "encoder_hidden_states": torch.randn(2, 7, 32, generator=g, dtype=dtype),
        "pooled_projections": torch.randn(2, 64, generator=g, dtype=dtype),
        "timestep": torch.tensor([300.0, 800.0], dtype=dtype),
    }


@pytest.mark.parametrize("mode", ["plain", "ln"])
def test_gradient_reaches_only_the_weights_and_matches_finite_differences(mode):
    tr = make_transformer().double().requires_grad_(False)
    before = {k: v.clone() for k, v in tr.state_dict().items()}
    inputs = make_inputs()
    probe = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weights = ResidualWeights(torch.tensor([0.7, 1.3])).double()
    res = TextStreamResidual(origin_layer=1, target_layers=[2, 3], weights=weights(), mode=mode)

    def loss() -> torch.Tensor:
        res.weights = weights()  # swapped in before each forward, read by the hooks
        return (tr(**inputs, return_dict=False)[0] * probe).sum()

    with res.attach(tr):
        value = loss()
        value.backward()
        grad = weights.raw.grad.clone()
        h = 1e-6
        fd = []
        with torch.no_grad():
            for k in range(2):
                for sign in (1, -1):
                    weights.raw[k] += sign * h
                    fd.append(float(loss()))
                    weights.raw[k] -= sign * h
        fd = torch.tensor(
            [(fd[0] - fd[1]) / (2 * h), (fd[2] - fd[3]) / (2 * h)], dtype=torch.float64
        )
    assert bool((grad != 0).all())
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-8)
    assert all(p.grad is None and not p.requires_grad for p in tr.parameters())
    after = tr.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradient_checkpointing_gives_the_same_weight_gradient():
    def grad(checkpointing: bool) -> torch.Tensor:
        tr = make_transformer().requires_grad_(False)
        if checkpointing:
            tr.enable_gradient_checkpointing()
        weights = ResidualWeights(torch.tensor([0.5, 1.0, 2.0]))
        res = TextStreamResidual(0, [1, 2, 3], weights=weights(), mode="ln")
        with res.attach(tr):
            tr(**make_inputs(torch.float32), return_dict=False)[0].square().mean().backward()
        return weights.raw.grad

    torch.testing.assert_close(grad(True), grad(False), rtol=1e-5, atol=1e-9)


def test_weight_tensor_is_kept_and_checked():
    w = torch.tensor([0.5, 0.0], requires_grad=True)
    res = TextStreamResidual(origin_layer=0, target_layers=[1, 2], weights=w)
    assert res.weights is not None and res.weights.requires_grad
    assert [t for t, _ in res.active_targets] == [1, 2]  # a zero tensor weight is still hooked
    assert res.settings()["weights"] == [0.5, 0.0]
    assert TextStreamResidual(0, [1, 2], weights=torch.tensor([2.0])).weights.tolist() == [2, 2]
    with pytest.raises(DiffalignError, match="3 residual weights for 2"):
        TextStreamResidual(origin_layer=0, target_layers=[1, 2], weights=torch.ones(3))
    with pytest.raises(DiffalignError, match="finite"):
        TextStreamResidual(0, [1, 2], weights=torch.tensor([1.0, float("nan")]))


# ---------------------------------------------------------------------------------------------
# the weights file and --residual-weights-file


def _rotation_file(path: Path, targets, d: int = 32, seed: int = 0) -> Path:
    from diffalign.textstream.rotations import RotationSet, save_rotations

    g = torch.Generator().manual_seed(seed)
    rots = {}
    for t in targets:
        q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        rots[t] = (q * torch.sign(torch.diagonal(r))).float()
    save_rotations(path, RotationSet(0, list(targets), rots, d, 10, "all"))
    return path


def test_weights_file_round_trip_and_checks(tmp_path):
    from diffalign.textstream.weights import file_sha256

    rot = _rotation_file(tmp_path / "rot.safetensors", [1, 2])
    other = _rotation_file(tmp_path / "other.safetensors", [1, 2], seed=1)
    path = tmp_path / "w.safetensors"
    lw = LearnedWeights([0.25, 1.5], 0, [1, 2], "ln", False, file_sha256(rot))
    save_learned_weights(path, lw)
    back = load_learned_weights(path)
    assert (back.weights, back.target_layers, back.mode) == ([0.25, 1.5], [1, 2], "ln")
    base = dict(origin_layer=None, target_layers=None, weights=None, mode=None, layernorm=False)
    got = resolve_weights_file(path, procrustes_path=str(rot), **base)
    assert got == {
        "origin_layer": 0,
        "target_layers": [1, 2],
        "weights": [0.25, 1.5],
        "mode": "ln",
        "layernorm": False,
    }
    assert resolve_weights_file(path, procrustes_path=str(rot), **{**base, **got}) == got
    bad = [
        ({"procrustes_path": None}, "rotation file"),
        ({"procrustes_path": str(other)}, "another rotation file"),
        ({"procrustes_path": str(rot), "target_layers": [1, 3]}, "target layers"),
        ({"procrustes_path": str(rot), "origin_layer": 1}, "origin layer"),
        ({"procrustes_path": str(rot), "mode": "plain"}, "mode"),
        ({"procrustes_path": str(rot), "weights": [1.0]}, "drop --residual-weights"),
    ]
    for extra, match in bad:
        with pytest.raises(DiffalignError, match=match):
            resolve_weights_file(path, **{**base, **extra})
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(DiffalignError, match="cannot read"):
        load_learned_weights(tmp_path / "junk.safetensors")
    with pytest.raises(DiffalignError, match="not a residual weights file"):
        load_learned_weights(rot)


def test_init_from_a_constant_a_json_or_a_weights_file(tmp_path):
    from diffalign.textstream.train_weights import parse_init

    assert parse_init("0.5", [2, 3]).tolist() == [0.5, 0.5]
    (tmp_path / "list.json").write_text("[0.25, 2.0]")
    (tmp_path / "dict.json").write_text('{"residual_weights": [1.5, 0.5]}')
    assert parse_init(str(tmp_path / "list.json"), [2, 3]).tolist() == [0.25, 2.0]
    assert parse_init(str(tmp_path / "dict.json"), [2, 3]).tolist() == [1.5, 0.5]
    save_learned_weights(tmp_path / "w.safetensors", LearnedWeights([0.75, 3.0], 0, [2, 3], "ln"))
    assert parse_init(str(tmp_path / "w.safetensors"), [2, 3]).tolist() == [0.75, 3.0]
    for init, targets, match in (
        (str(tmp_path / "w.safetensors"), [1, 2], "target layers"),
        (str(tmp_path / "list.json"), [1, 2, 3], "2 weights for 3"),
        ("-1", [2], "> 0"),
        ("nan", [2], "> 0"),
    ):
        with pytest.raises(DiffalignError, match=match):
            parse_init(init, targets)


def test_the_authors_weight_files_are_read(tmp_path):
    """Their `residual_weights_step*.json` and `.pth` (weights_only): weights, origin and
    targets; mode and rotation are not recorded there, so the given ones are kept unchecked."""
    data = {"residual_weights": [0.5, 1.25], "origin_layer": 1, "target_layers": [2, 3]}
    (tmp_path / "w.json").write_text(json.dumps(data))
    torch.save({**data, "residual_weights": torch.tensor([0.5, 1.25])}, tmp_path / "w.pth")
    rot = _rotation_file(tmp_path / "rot.safetensors", [2, 3])
    base = dict(origin_layer=None, target_layers=None, weights=None, layernorm=False)
    for name in ("w.json", "w.pth"):
        lw = load_learned_weights(tmp_path / name)
        assert (lw.weights, lw.origin_layer, lw.target_layers) == ([0.5, 1.25], 1, [2, 3])
        assert lw.mode is None and lw.rotation_sha256 is None
        got = resolve_weights_file(tmp_path / name, mode="ln", procrustes_path=str(rot), **base)
        assert got["mode"] == "ln" and got["weights"] == [0.5, 1.25]
        assert (
            resolve_weights_file(tmp_path / name, mode=None, procrustes_path=None, **base)["mode"]
            is None
        )
    (tmp_path / "bad.json").write_text(json.dumps({"residual_weights": [1.0]}))
    with pytest.raises(DiffalignError, match="needs residual_weights, origin_layer"):
        load_learned_weights(tmp_path / "bad.json")


@pytest.mark.parametrize("verb", ["sample", "generate", "geneval", "dpg"])
def test_every_generation_verb_reads_and_checks_a_weights_file(verb, tmp_path, capsys):
    save_learned_weights(tmp_path / "w.safetensors", LearnedWeights([0.5, 1.5], 0, [2, 3], "plain"))
    (tmp_path / "p.txt").write_text("a cat\n")
    meta = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"}
    (tmp_path / "meta.jsonl").write_text(json.dumps(meta) + "\n")
    (tmp_path / "dpg").mkdir()
    (tmp_path / "dpg" / "a.txt").write_text("a cat")
    source = {
        "sample": ["--prompt", "a cat"],
        "generate": ["--prompts", str(tmp_path / "p.txt")],
        "geneval": ["--metadata", str(tmp_path / "meta.jsonl")],
        "dpg": ["--prompts-dir", str(tmp_path / "dpg")],
    }[verb]
    out = tmp_path / "out"
    argv = ["textstream", verb, *source, "--output-dir", str(out), "--model", "missing-model"]
    for extra, match in (
        (["--residual-weights-file", str(tmp_path / "none.safetensors")], "not found"),
        (
            ["--residual-weights-file", str(tmp_path / "w.safetensors"), "--residual-mode", "ln"],
            "trained in mode 'plain'",
        ),
    ):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
        assert not out.exists()


# ---------------------------------------------------------------------------------------------
# cache -> train-weights -> sample on the tiny SD3


def _image_folder(root: Path, n: int = len(CAPTIONS)) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(CAPTIONS[:n]):
        arr = rng.integers(0, 255, (36 + 2 * i, 44, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(caption)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "nocap.png")
    return root


def _cache_args(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "textstream", "cache", "--model", model, "--dataset", str(data), "--output-dir",
        str(out), "--resolution", "32", "--batch-size", "2", "--max-sequence-length", "8",
        *extra,
    ]  # fmt: skip


def _train_args(model: str, cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        "textstream", "train-weights", "--model", model, "--cache", str(cache), "--output-dir",
        str(out), "--residual-target-layers", "2,3", "--batch-size", "2", "--max-steps", "4",
        "--lr", "0.05", "--eval-steps", "1", "--eval-samples", "1", "--log-every", "1",
        "--tracker", "none", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def sd3(tiny_model_dir):
    return tiny_model_dir("sd3")


@pytest.fixture(scope="module")
def cache(sd3, tmp_path_factory):
    root = tmp_path_factory.mktemp("tscache")
    data = _image_folder(root / "data")
    assert main(_cache_args(sd3, data, root / "cache")) == 0
    return root / "cache"


def _records(cache_dir: Path) -> dict:
    from diffalign.engine.lmdb_store import TensorLMDB

    out = {}
    for name in ("latents.lmdb", "prompt_embeds.lmdb", "pooled_prompt_embeds.lmdb"):
        db = TensorLMDB(cache_dir / name)
        out[name] = {k: db.get(k).clone() for k in db.keys()}
        db.close()
    return out


def test_cache_records_match_the_pipeline(sd3, cache):
    from diffalign.engine.loading import load_sd3_pipeline

    job = json.loads((cache / "job.json").read_text())
    assert job["resolution"] == 32 and job["shapes"]["latents.lmdb"] == [16, 16, 16]
    pairs = [json.loads(line) for line in (cache / "pairs.jsonl").read_text().splitlines()]
    assert [p["caption"] for p in pairs] == CAPTIONS and pairs[0]["id"] == "img0"
    summary = json.loads((cache / "summary.json").read_text())
    assert summary["written"] == len(CAPTIONS) and summary["skipped_no_caption"] == 1
    recs = _records(cache)
    assert set(recs["prompt_embeds.lmdb"]) == {p["id"] for p in pairs} | {"__empty__"}
    # reference: PIL resize + centre crop by hand, the VAE's posterior mean, encode_prompt
    pipe = load_sd3_pipeline(sd3)
    with Image.open(pairs[1]["image"]) as im:
        w, h = im.size
        scale = 32 / min(w, h)
        size = (max(32, round(w * scale)), max(32, round(h * scale)))
        im = im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - 32) // 2, (size[1] - 32) // 2
        im = im.crop((left, top, left + 32, top + 32))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        mean = pipe.vae.encode(x).latent_dist.mean
        ref = (mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        pe, _, pooled, _ = pipe.encode_prompt(
            CAPTIONS[1], None, None, do_classifier_free_guidance=False, max_sequence_length=8
        )
        epe, _, epooled, _ = pipe.encode_prompt(
            "", None, None, do_classifier_free_guidance=False, max_sequence_length=8
        )
    got = recs["latents.lmdb"]["img1"].float()
    torch.testing.assert_close(got, ref[0].half().float(), rtol=0, atol=2e-3)
    torch.testing.assert_close(recs["prompt_embeds.lmdb"]["img1"], pe[0].half())
    torch.testing.assert_close(recs["pooled_prompt_embeds.lmdb"]["img1"], pooled[0].half())
    torch.testing.assert_close(recs["prompt_embeds.lmdb"]["__empty__"], epe[0].half())
    torch.testing.assert_close(recs["pooled_prompt_embeds.lmdb"]["__empty__"], epooled[0].half())


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded")


def test_cache_killed_then_rerun_equals_straight_run(sd3, cache, tmp_path, monkeypatch, capsys):
    from diffalign.textstream import cache as cache_mod

    data = _image_folder(tmp_path / "data")
    out = tmp_path / "cache"
    original = cache_mod._encode_batch
    calls = []

    def dies_in_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "_encode_batch", dies_in_third_batch)
    assert main(_cache_args(sd3, data, out)) == 130
    monkeypatch.setattr(cache_mod, "_encode_batch", original)
    assert len(_records(out)["latents.lmdb"]) == 4  # two batches of two were committed
    assert main(_cache_args(sd3, data, out)) == 0
    assert json.loads((out / "summary.json").read_text())["already_present"] == 4
    # a re-run with nothing left loads no model
    monkeypatch.setattr("diffalign.engine.loading.load_pipeline", _no_model)
    assert main(_cache_args(sd3, data, out)) == 0
    assert json.loads((out / "summary.json").read_text())["already_present"] == len(CAPTIONS)
    monkeypatch.undo()
    a, b = _records(cache), _records(out)
    for name in a:
        assert a[name].keys() == b[name].keys()
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    capsys.readouterr()
    # a re-run with another resolution or model is refused, nothing changed
    for extra, match in (
        (["--resolution", "64"], "resolution"),
        (["--max-sequence-length", "16"], "max_sequence_length"),
    ):
        args = _cache_args(sd3, data, out)
        args[args.index(extra[0]) + 1] = extra[1]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0] and "--overwrite" in err[0], err


def test_cache_skips_an_unreadable_image(sd3, tmp_path):
    from diffalign.textstream.cache import open_cache

    data = _image_folder(tmp_path / "data", n=3)
    (data / "broken.png").write_bytes(b"not a png")
    (data / "broken.txt").write_text("a broken image")
    assert main(_cache_args(sd3, data, tmp_path / "cache")) == 0
    summary = json.loads((tmp_path / "cache" / "summary.json").read_text())
    assert summary["failed"] == 1 and summary["failures"][0]["id"] == "broken"
    assert open_cache(tmp_path / "cache").complete_ids() == ["img0", "img1", "img2"]


@pytest.mark.slow
def test_cache_two_processes_match_one(sd3, cache, tmp_path):
    """`accelerate launch` with 2 CPU processes: rank 1's batches reach rank 0's writer, and the
    store holds the records of the 1-process cache bit for bit."""
    from launch_helper import launch_two_cpu_processes

    data = _image_folder(tmp_path / "data")
    out = tmp_path / "cache2"
    proc = launch_two_cpu_processes(["-m", "diffalign.cli", *_cache_args(sd3, data, out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["num_processes"] == 2
    a, b = _records(cache), _records(out)
    for name in a:
        assert a[name].keys() == b[name].keys()
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name


def test_train_weights_then_sample_with_the_file(sd3, cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(sd3, cache, run, "--num-val", "2", "--eval-every", "2")) == 0
    lw = load_learned_weights(run / "residual_weights.safetensors")
    assert lw.target_layers == [2, 3] and lw.origin_layer == 0 and lw.mode == "plain"
    assert all(w > 0 for w in lw.weights) and lw.weights != [1.0, 1.0]
    summary = json.loads((run / "summary.json").read_text())
    rw = summary["residual_weights"]
    assert rw["learned"] == lw.weights and rw["initial"] == [1.0, 1.0] and rw["val_pairs"] == 2
    assert rw["val_loss_initial"] is not None and rw["val_loss_final"] is not None
    assert rw["time_shift"] == 1.0  # none by default, as the authors
    for name in ("residual_weights.png", "residual_weights_history.png", "train_history.png"):
        assert (run / name).is_file()
    for step in ("step-0000002", "step-0000004"):
        assert (run / "validation" / step / "grid.png").is_file()
        record = json.loads((run / "validation" / step / "weights.json").read_text())
        assert record["target_layers"] == [2, 3]
    final = json.loads((run / "validation/step-0000004/weights.json").read_text())
    assert final["weights"] == lw.weights

    # generation with the file: the learned weights are recorded and used
    out = tmp_path / "samples"
    argv = [
        "textstream", "sample", "--model", sd3, "--prompt", "a cat", "--output-dir", str(out),
        "--steps", "2", "--height", "32", "--width", "32",
    ]  # fmt: skip
    assert main([*argv, "--residual-weights-file", str(run / "residual_weights.safetensors")]) == 0
    settings = json.loads(next(out.glob("*/settings.json")).read_text())
    assert settings["residual"]["weights"] == lw.weights
    assert settings["residual"]["target_layers"] == [2, 3]
    by_hand = tmp_path / "by_hand"
    weights = [str(w) for w in lw.weights]
    hand = [*argv, "--residual-target-layers", "2,3", "--residual-weights", *weights]
    hand[hand.index(str(out))] = str(by_hand)
    assert main(hand) == 0
    a = np.asarray(Image.open(next(out.glob("*/000.png"))))
    b = np.asarray(Image.open(next(by_hand.glob("*/000.png"))))
    assert np.array_equal(a, b)
    capsys.readouterr()
    bad = [*argv, "--residual-weights-file", str(run / "residual_weights.safetensors")]
    bad[bad.index(str(out))] = str(tmp_path / "bad")
    assert main([*bad, "--residual-target-layers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "target layers [2, 3]" in err[0]
    assert not (tmp_path / "bad").exists()


def test_sd35_cache_and_train_with_a_rotation_file(tiny_model_dir, tmp_path):
    sd35 = tiny_model_dir("sd35")
    data = _image_folder(tmp_path / "data", n=2)
    assert main(_cache_args(sd35, data, tmp_path / "cache")) == 0
    rot = _rotation_file(tmp_path / "rot.safetensors", [1, 2, 3])
    args = _train_args(sd35, tmp_path / "cache", tmp_path / "run")
    args[args.index("--max-steps") + 1] = "2"
    assert main([*args, "--residual-procrustes-path", str(rot)]) == 0
    lw = load_learned_weights(tmp_path / "run" / "residual_weights.safetensors")
    assert lw.mode == "ln" and lw.target_layers == [2, 3] and lw.weights != [1.0, 1.0]
    assert lw.rotation_sha256 == hashlib.sha256(rot.read_bytes()).hexdigest()  # its bytes


def test_generate_resumes_with_a_moved_copy_and_refuses_other_weights(sd3, tmp_path, capsys):
    import shutil

    save_learned_weights(tmp_path / "a.safetensors", LearnedWeights([0.5, 1.5], 0, [2, 3], "ln"))
    shutil.copy(tmp_path / "a.safetensors", tmp_path / "copy.safetensors")
    save_learned_weights(tmp_path / "b.safetensors", LearnedWeights([0.5, 2.5], 0, [2, 3], "ln"))
    (tmp_path / "p.txt").write_text("a cat\n")
    argv = [
        "textstream", "generate", "--model", sd3, "--prompts", str(tmp_path / "p.txt"),
        "--output-dir", str(tmp_path / "out"), "--steps", "1", "--height", "32", "--width", "32",
    ]  # fmt: skip
    assert main([*argv, "--residual-weights-file", str(tmp_path / "a.safetensors")]) == 0
    assert main([*argv, "--residual-weights-file", str(tmp_path / "copy.safetensors")]) == 0
    assert "0 prompts generated, 1 skipped" in capsys.readouterr().out
    assert main([*argv, "--residual-weights-file", str(tmp_path / "b.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0], err


def test_train_weights_stop_and_resume_equals_straight_run(sd3, cache, tmp_path, monkeypatch):
    from diffalign.engine.io import load_tensors
    from diffalign.textstream.train_weights import WeightsTask

    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--checkpoint-every", "2", "--residual-mode", "ln", "--smoothness-weight", "0.5")
    assert main(_train_args(sd3, cache, straight, *common)) == 0
    original = WeightsTask.training_step

    def killed(self, batch, step, ctx):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, batch, step, ctx)

    monkeypatch.setattr(WeightsTask, "training_step", killed)
    assert main(_train_args(sd3, cache, split, *common)) == 130
    monkeypatch.setattr(WeightsTask, "training_step", original)
    assert main(_train_args(sd3, cache, split, *common, "--resume", "latest")) == 0
    a, _ = load_tensors(straight / "residual_weights.safetensors")
    b, _ = load_tensors(split / "residual_weights.safetensors")
    assert torch.equal(a["weights"], b["weights"])
    hist = [json.loads((r / "summary.json").read_text())["final_train"] for r in (straight, split)]
    assert hist[0]["loss"] == hist[1]["loss"]


def test_transformer_stays_bit_identical_and_frozen(sd3, cache, tmp_path):
    from diffalign.engine.train import train
    from diffalign.textstream.train_weights import WeightsTask, WeightsTrainConfig, loop_config

    cfg = WeightsTrainConfig(
        cache=str(cache), model=None, output_dir=str(tmp_path / "run"), target_layers=[1, 2, 3],
        max_steps=2, batch_size=2, lr=0.5, eval_steps=1, eval_samples=1, tracker="none",
    )  # fmt: skip
    task = WeightsTask(cfg)
    assert cfg.model == sd3  # the model the cache was made with
    before = {k: v.clone() for k, v in task.transformer.state_dict().items()}
    start = task.weights().detach().clone()
    train(task, loop_config(cfg))
    task.close()
    after = task.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in task.transformer.parameters())
    assert all(p.grad is None for p in task.transformer.parameters())
    assert not torch.equal(task.weights().detach(), start)


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit 2


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--lr", "nan"], "not a finite number"),
        (["--time-shift", "inf"], "not a finite number"),
        (["--time-std", "0"], "must be > 0"),
        (["--init", "0"], "> 0"),
        (["--init", "nope.json"], "no such file"),
        (["--resolution", "64"], "resolution 32"),
        (["--residual-target-layers", "1,7"], "out of range"),
        (["--num-val", "6"], "leaves none"),
    ],
)
def test_train_weights_bad_input(sd3, cache, tmp_path, capsys, extra, match):
    args = _train_args(sd3, cache, tmp_path / "run")
    if extra[0] in args:
        i = args.index(extra[0])
        args[i : i + 2] = extra
    else:
        args += extra
    try:
        rc = main(args)
    except SystemExit as e:  # option types reject bad numbers while parsing
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and ": error: " in err[-1] and match in err[-1], err
    assert not (tmp_path / "run" / "checkpoint-final").exists()


def test_train_weights_refuses_another_model_and_missing_rotations(
    sd3, cache, tiny_model_dir, tmp_path, capsys
):
    assert main(_train_args(tiny_model_dir("sd35"), cache, tmp_path / "a")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another model" in err[0]
    rot = _rotation_file(tmp_path / "rot.safetensors", [2])
    args = _train_args(sd3, cache, tmp_path / "b", "--residual-procrustes-path", str(rot))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no rotation for target layers [3]" in err[0]
    assert main(_train_args(sd3, tmp_path, tmp_path / "c")) == 2
    assert "not a text-stream cache" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# a planted target: data whose best weights are known


def _exact_loss(tr, res, weights, latents, pe, pooled) -> float:
    """`mean ||v_w(x0, t=0) + x0||^2`: the expected loss at s = 0 minus E||eps||^2."""
    res.weights = torch.tensor(weights)
    with torch.no_grad(), res.attach(tr):
        v = tr(
            hidden_states=latents,
            timestep=torch.zeros(latents.shape[0]),
            encoder_hidden_states=pe,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
    return float((v + latents).pow(2).mean())


@pytest.mark.slow  # about 30 s on a busy 2-core machine: 60 steps
def test_planted_weights_are_learned(sd3, tmp_path):
    """At s = 0 the loss is `||v_w(x0) + x0||^2 + E||eps||^2`; latents that are fixed points
    `x0 = -v_{w*}(x0)` make w* its minimum. Training from elsewhere must move toward w* and lower
    the held-out loss (the text-to-image attention values are scaled up so that w matters)."""
    import shutil

    from diffusers import SD3Transformer2DModel

    from diffalign.engine.lmdb_store import TensorLMDB, TensorLMDBWriter

    model = tmp_path / "model"
    shutil.copytree(sd3, model)
    tr = SD3Transformer2DModel.from_pretrained(model / "transformer")
    with torch.no_grad():
        for block in tr.transformer_blocks:
            block.attn.add_v_proj.weight.mul_(30.0)
    tr.save_pretrained(model / "transformer")
    tr.requires_grad_(False)
    data = _image_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    assert main(_cache_args(str(model), data, cache)) == 0

    planted, init = [2.0, 1.0], [0.5, 0.5]
    res = TextStreamResidual(origin_layer=0, target_layers=[1, 3])
    ids = [json.loads(line)["id"] for line in (cache / "pairs.jsonl").read_text().splitlines()]
    stores = {n: TensorLMDB(cache / n) for n in ("prompt_embeds.lmdb", "pooled_prompt_embeds.lmdb")}
    pe = torch.stack([stores["prompt_embeds.lmdb"].get(k).float() for k in ids])
    pooled = torch.stack([stores["pooled_prompt_embeds.lmdb"].get(k).float() for k in ids])
    x = TensorLMDB(cache / "latents.lmdb").get_many(ids).float()
    res.weights = torch.tensor(planted)
    with torch.no_grad(), res.attach(tr):
        for _ in range(30):  # x <- -v(x): a contraction on this model
            x = -tr(
                hidden_states=x,
                timestep=torch.zeros(len(ids)),
                encoder_hidden_states=pe,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
    with TensorLMDBWriter(cache / "latents.lmdb", tuple(x.shape[1:])) as w:
        for k, xi in zip(ids, x):
            w.put(k, xi)
    x = TensorLMDB(cache / "latents.lmdb").get_many(ids).float()  # as stored (fp16)

    # the finite-difference picture: w* is the minimum of the exact loss on a grid around it
    grid = {(a, b): _exact_loss(tr, res, [a, b], x, pe, pooled) for a in (1.5, 2.0, 2.5)
            for b in (0.5, 1.0, 1.5)}  # fmt: skip
    assert min(grid, key=grid.get) == (2.0, 1.0) and grid[(2.0, 1.0)] < 1e-5

    run = tmp_path / "run"
    s_zero = ["--time-mode", "gaussian", "--time-mean", "-5", "--time-std", "0.001"]
    args = _train_args(str(model), cache, run, *s_zero, "--time-shift", "1", "--init", "0.5")
    args[args.index("--residual-target-layers") + 1] = "1,3"
    args[args.index("--max-steps") + 1] = "60"
    args[args.index("--lr") + 1] = "0.1"
    args[args.index("--batch-size") + 1] = "4"
    assert main([*args, "--num-val", "2", "--lr-scheduler", "constant"]) == 0
    learned = load_learned_weights(run / "residual_weights.safetensors").weights
    for w, p, i in zip(learned, planted, init):
        assert abs(w - p) < 0.5 * abs(i - p), (learned, planted)
    held = [ids.index(k) for k in ids[-2:]]
    before = _exact_loss(tr, res, init, x[held], pe[held], pooled[held])
    after = _exact_loss(tr, res, learned, x[held], pe[held], pooled[held])
    assert after < 0.5 * before, (before, after)


# ---------------------------------------------------------------------------------------------
# against the authors' `train_residual_weights.py` (Training-free-Residual-SD3), written out


def _authors_t(mode: str, n: int, g: torch.Generator) -> torch.Tensor:
    """Their `sample_timesteps(n, 1000, mode)` with the parameters their script passes
    (`mu=--time_shift` = 0, `sigma=1`; gaussian and beta take the function's own defaults)."""
    if mode == "uniform":
        return torch.randint(0, 1000, (n,), generator=g)
    if mode == "gaussian":  # mu = int(1000 * 0.6), sigma = int(1000 * 0.1)
        return torch.normal(torch.full((n,), 600.0), 100.0, generator=g).clamp(0, 999).long()
    if mode == "beta":  # Beta(5, 2)
        x = torch._standard_gamma(torch.full((n,), 5.0), generator=g)
        y = torch._standard_gamma(torch.full((n,), 2.0), generator=g)
        return (x / (x + y) * 999).long()
    z = torch.normal(torch.zeros(n), 1.0, generator=g)  # logitnorm, mu 0, sigma 1
    return (torch.sigmoid(z) * 999).long()


@pytest.mark.parametrize("mode", [None, "uniform", "gaussian", "beta", "logitnorm"])
def test_default_time_draws_are_the_authors(mode, monkeypatch):
    """`s` as the authors draw it (`t / 1000`, no shift) for every mode with its default
    parameters, through the CLI's defaults; `None` = no `--time-mode` (theirs: logitnorm)."""
    import diffalign.textstream.train_weights as tw
    from diffalign.textstream.weights import sample_times

    seen = {}
    monkeypatch.setattr(tw, "run_train_weights", lambda cfg: seen.__setitem__("cfg", cfg))
    argv = ["textstream", "train-weights", "--cache", "c", "--output-dir", "o"]
    assert main(argv + ([] if mode is None else ["--time-mode", mode])) == 0
    cfg = seen["cfg"]
    assert cfg.lr == 1e-3  # their runs (SD3, FLUX.1, Qwen-Image scripts)
    ts = cfg.time_sampling(default_shift=3.0)  # the scheduler's shift is not the default
    ours = sample_times(200_000, ts, torch.Generator().manual_seed(0)).double()
    theirs = _authors_t(mode or "logitnorm", 200_000, torch.Generator().manual_seed(1)) / 1000
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    # their t is an integer step: s is at most 1e-3 below ours
    assert torch.allclose(ours.quantile(q), theirs.double().quantile(q), atol=6e-3), mode
    assert abs(float(ours.mean() - theirs.double().mean())) < 3e-3
    # the scheduler's shift on request
    assert main([*argv, "--time-shift", "scheduler"]) == 0
    assert seen["cfg"].time_shift is None
    assert seen["cfg"].time_sampling(default_shift=3.0).shift == 3.0


def test_a_default_training_step_is_the_authors_loss(sd3, cache, tmp_path):
    """One `training_step` with the default options = the authors' `compute_total_loss`
    written out: `x_s = (1 - s) x0 + s x1`, the transformer at timestep `1000 s` with the residual
    at `softplus(raw)`, `mse(v, x1 - x0)`; `s = sigmoid(z)`, `z ~ N(0, 1)`, no shift."""
    from types import SimpleNamespace

    from diffalign.textstream.train_weights import WeightsTask, WeightsTrainConfig

    cfg = WeightsTrainConfig(
        cache=str(cache), model=sd3, output_dir=str(tmp_path / "run"), target_layers=[2, 3],
        init="0.5",
    )  # fmt: skip
    task = WeightsTask(cfg, log=lambda *a: None)
    try:
        batch = next(iter(DataLoader(CachedPairs(task.cache, task.train_ids[:2]), batch_size=2)))
        torch.manual_seed(7)
        got = task.training_step(batch, 1, SimpleNamespace(device=torch.device("cpu")))
    finally:
        task.close()
    x0 = batch["latents"].float()
    torch.manual_seed(7)  # our draw order: the noise, then the times
    x1 = torch.randn(x0.shape)
    s = torch.sigmoid(torch.randn(2))
    x_s = (1 - s.view(2, 1, 1, 1)) * x0 + s.view(2, 1, 1, 1) * x1
    res = TextStreamResidual(origin_layer=task.residual.origin_layer, target_layers=[2, 3])
    res.weights = torch.nn.functional.softplus(softplus_inverse(torch.tensor([0.5, 0.5])))
    with torch.no_grad(), res.attach(task.transformer):
        v = task.transformer(
            hidden_states=x_s,
            timestep=s * 1000,
            encoder_hidden_states=batch["prompt_embeds"].float(),
            pooled_projections=batch["pooled"].float(),
            return_dict=False,
        )[0]
    ref = torch.nn.functional.mse_loss(v, x1 - x0)
    torch.testing.assert_close(got["flow_loss"], ref, rtol=1e-5, atol=0)
    assert task.time.shift == 1.0


def test_the_authors_flux_weight_files_are_read(tmp_path):
    """Their FLUX.1 trainer saves `residual_origin_layer` / `residual_target_layers` (and
    `step`) instead of `origin_layer` / `target_layers`, in the `.pth` and the `.json`."""
    data = {"residual_origin_layer": 2, "residual_target_layers": [3, 4, 5], "step": 200}
    (tmp_path / "w.json").write_text(json.dumps({**data, "residual_weights": [0.1, 0.2, 0.3]}))
    torch.save({**data, "residual_weights": torch.tensor([0.1, 0.2, 0.3])}, tmp_path / "w.pth")
    for name in ("w.json", "w.pth"):
        lw = load_learned_weights(tmp_path / name)
        assert lw.origin_layer == 2 and lw.target_layers == [3, 4, 5], name
        assert lw.weights == pytest.approx([0.1, 0.2, 0.3]) and lw.mode is None


def test_used_folder_and_mismatched_resume_refused_before_loading(
    sd3, cache, tmp_path, capsys, monkeypatch
):
    """train-weights refuses a used output folder, or a --resume into a run made with other
    settings, before the transformer loads: one line, exit 2, nothing lost."""
    import diffalign.engine.loading as loading

    out = tmp_path / "run"
    common = ("--max-steps", "2", "--checkpoint-every", "2", "--lr-scheduler", "constant")
    assert main(_train_args(sd3, cache, out, *common)) == 0

    before = file_mtimes(out)
    loads = []
    real_load = loading.load_pipeline

    def load(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(loading, "load_pipeline", load)
    for extra, words in (
        (("--resume", "latest", "--lr", "0.01"), ("cannot resume", "lr")),
        (("--resume", "latest", "--residual-mode", "ln"), ("cannot resume", "mode")),
        (("--resume", "latest", "--seed", "7"), ("cannot resume", "seed")),
        ((), ("already holds a training run", "--resume latest")),
        (("--lr", "0.01"), ("already holds a training run", "--overwrite")),
    ):
        capsys.readouterr()
        assert main(_train_args(sd3, cache, out, *common, *extra)) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), (extra, err)
        assert loads == [], extra  # refused before the transformer loaded
    assert file_mtimes(out) == before

    # the same settings still resume (more steps at a constant lr)
    more = [a if a != "2" else "3" for a in common[:2]] + list(common[2:])
    # checking the resume reads the cache's records once (they were read for the task check,
    # then again for the identity); stopped where the trainer would set up
    import diffalign.textstream.train_weights as tw

    reads = []

    def counted(path):
        reads.append(path)
        return real_open(path)

    def stop(*args, **kwargs):
        raise DiffalignError("stop before the setup")

    real_open = tw.open_cache
    with monkeypatch.context() as m:
        m.setattr(tw, "open_cache", counted)
        m.setattr(tw, "WeightsTask", stop)
        capsys.readouterr()
        assert main(_train_args(sd3, cache, out, *more, "--resume", "latest")) == 2
        assert "stop before the setup" in capsys.readouterr().err
    assert len(reads) == 1 and loads == []
    assert main(_train_args(sd3, cache, out, *more, "--resume", "latest")) == 0
    assert len(loads) == 1


def test_cache_takes_the_seeds_prompt_field_spelling():
    """Seed 001's pairs.jsonl: "rename the fields with --prompt_field and --image_field";
    `cache` called the caption key only --caption-field."""
    from diffalign.cli import build_parser

    base = ["textstream", "cache", "--dataset", "p.jsonl", "--output-dir", "c"]
    for flag in ("--prompt_field", "--prompt-field", "--caption-field"):
        args = build_parser().parse_args([*base, flag, "text", "--image_field", "file"])
        assert (args.caption_field, args.image_field) == ("text", "file")
