"""Test-time optimisation of per-prompt orthogonal Q (spec N; `diffalign noise optimize`)."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from torch import nn

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from diffalign.engine.rewards import Reward
from diffalign.noise.onestep import OneStepGenerator
from diffalign.noise.optimize import (
    OptimizeSettings,
    clip_grad_norm_per_transform,
    optimize_prompts,
    run_optimize,
)
from diffalign.noise.orthogonal import orthogonality_error


def _prompt_vector(prompt: str, n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
    return torch.rand(n, generator=g)


class LinearGenerator(OneStepGenerator):
    """A small differentiable stand-in: 1x1 conv of the 4x4x4 noise + a per-prompt colour."""

    name = "linear"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 3, 1)
        self.requires_grad_(False)

    def encode_prompts(self, prompts):
        return {"colour": torch.stack([_prompt_vector(p) for p in prompts])}

    def latent_shape(self, height=None, width=None):
        return (4, 4, 4)

    def generate(self, noise, embeds):
        self.check_noise(noise, embeds)
        x = self.conv(noise) + embeds["colour"][:, :, None, None]
        return torch.sigmoid(nn.functional.interpolate(x, scale_factor=2))


class TargetReward(Reward):
    """Higher when the image is close to a per-prompt target colour; NaN for prompt 'nan'."""

    name = "target"

    def score(self, images, prompts):
        target = torch.stack([_prompt_vector("t" + p) for p in prompts])[:, :, None, None]
        r = -((images - target) ** 2).flatten(1).mean(1)
        bad = torch.tensor([p == "nan" for p in prompts])
        return torch.where(bad, torch.full_like(r, float("nan")), r)


def _noise(n_prompts: int, k: int, seed: int = 0) -> torch.Tensor:
    one = torch.randn((k, 4, 4, 4), generator=torch.Generator().manual_seed(seed))
    return one.repeat(n_prompts, 1, 1, 1)


def test_per_transform_clip_matches_torch_clip_on_each_prompt():
    grads = torch.randn(4, 6, 6) * torch.tensor([0.01, 1.0, 5.0, 0.05])[:, None, None]
    ours = grads.clone()
    norms = clip_grad_norm_per_transform(ours, 0.1)
    for i in range(4):
        p = nn.Parameter(torch.zeros(6, 6))
        p.grad = grads[i].clone()
        ref = torch.nn.utils.clip_grad_norm_([p], 0.1)
        assert torch.allclose(norms[i], ref)
        assert torch.allclose(ours[i], p.grad, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_batched_prompts_get_the_same_updates_as_one_at_a_time(optimizer):
    gen, reward = LinearGenerator(), TargetReward()
    lr = 0.05 if optimizer == "adam" else 2.0
    s = OptimizeSettings(steps=5, lr=lr, optimizer=optimizer, images_per_prompt=2)
    prompts = ["a cat", "a dog", "a house"]
    batched = optimize_prompts(gen, reward, prompts, _noise(3, 2), s)
    for i, p in enumerate(prompts):
        alone = optimize_prompts(gen, reward, [p], _noise(1, 2), s)[0]
        assert alone.reward_history == pytest.approx(batched[i].reward_history, abs=1e-5)
        assert torch.allclose(alone.q_final, batched[i].q_final, atol=1e-5)


def test_reward_rises_and_q_stays_orthogonal():
    gen, reward = LinearGenerator(), TargetReward()
    s = OptimizeSettings(steps=25, lr=0.1, images_per_prompt=4, noise_l2_weight=0.0)
    res = optimize_prompts(gen, reward, ["a cat", "a dog"], _noise(2, 4), s)
    for r in res:
        assert r.ok and len(r.reward_history) == 26
        assert r.reward_history[-1] > r.reward_history[0]
        assert r.best_reward >= max(r.reward_history) - 1e-9
        assert orthogonality_error(r.q_final) < 1e-5
        # the best noise is Q_best applied to the base noise: patch norms kept
        assert torch.allclose(r.best_noise.norm(), r.base_noise.norm(), rtol=1e-5)
        assert r.best_images.shape == (4, 3, 8, 8)


def test_nan_reward_fails_that_prompt_only():
    gen, reward = LinearGenerator(), TargetReward()
    s = OptimizeSettings(steps=3, lr=0.05)
    res = optimize_prompts(gen, reward, ["a cat", "nan", "a dog"], _noise(3, 1), s)
    assert res[0].ok and res[2].ok and len(res[0].reward_history) == 4
    assert not res[1].ok and "not finite" in res[1].error and res[1].failed_step == 0


def test_run_optimize_layouts(tmp_path):
    gen, reward = LinearGenerator(), TargetReward()
    s = OptimizeSettings(steps=2, lr=0.05)
    one = tmp_path / "one"
    run_optimize(gen, reward, ["a cat"], one, s, seed=1)
    for name in (
        "init.png",
        "best.png",
        "final_best.png",
        "step_000.png",
        "step_002.png",
        "best_noise.safetensors",
        "adapter_final.safetensors",
        "reward_history.png",
        "reward_history.json",
        "orthogonal_gaussian_init.png",
        "orthogonal_gaussian_init.json",
        "orthogonal_gaussian_final.png",
        "orthogonal_gaussian_final.json",
        "summary.json",
    ):
        assert (one / name).is_file(), name
    summary = json.loads((one / "summary.json").read_text())
    assert summary["prompt"] == "a cat" and summary["status"] == "ok"
    assert summary["orthogonality_error_final"] < 1e-5
    assert summary["init_noise_sigma"] == 1.0
    from diffalign.engine.io import load_tensors
    from diffalign.noise.assign import read_noise_file

    _, meta = load_tensors(one / "best_noise.safetensors")
    assert meta["sigma_scaled"] == "false" and meta["init_noise_sigma"] == "1.0"
    noise, _ = read_noise_file(one / "best_noise.safetensors", 14.6)  # z, whatever the sigma
    assert torch.equal(noise, load_tensors(one / "best_noise.safetensors")[0]["noise"][0])
    with pytest.raises(DiffalignError, match="already holds a run"):
        run_optimize(gen, reward, ["a cat"], one, s)

    many = tmp_path / "many"
    report = run_optimize(gen, reward, ["a", "nan", "b"], many, s, batch_size=2)
    assert [p["status"] for p in report.summary["prompts"]] == ["ok", "failed", "ok"]
    assert (many / "prompt_2" / "best.png").is_file()
    assert (many / "metrics_per_prompt.json").is_file()
    failures = [json.loads(x) for x in (many / "failures.jsonl").read_text().splitlines()]
    assert [f["prompt"] for f in failures] == ["nan"]
    with pytest.raises(DiffalignError, match="every prompt failed"):
        run_optimize(gen, reward, ["nan"], tmp_path / "bad", s)

    # --overwrite leaves one run in the folder: no step images or prompt folders of the last
    (many / "notes.txt").write_text("mine")
    run_optimize(gen, reward, ["a", "b"], many, OptimizeSettings(steps=1, lr=0.05), overwrite=True)
    assert sorted(p.name for p in many.glob("prompt_*")) == ["prompt_0", "prompt_1"]
    assert sorted(p.name for p in (many / "prompt_0").glob("step_*")) == [
        "step_000.png",
        "step_001.png",
    ]
    assert (many / "notes.txt").read_text() == "mine"


def test_settings_are_checked():
    gen, reward = LinearGenerator(), TargetReward()
    with pytest.raises(DiffalignError, match="unknown optimizer"):
        optimize_prompts(gen, reward, ["a"], _noise(1, 1), OptimizeSettings(optimizer="lbfgs"))
    with pytest.raises(DiffalignError, match="base noises"):
        optimize_prompts(gen, reward, ["a", "b"], _noise(1, 1), OptimizeSettings())
    with pytest.raises(DiffalignError, match="divisible"):
        run_optimize(gen, reward, ["a"], "/tmp/unused-ngen", OptimizeSettings(patch_size=3))


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def tiny_models(tiny_model_dir):
    return {"sdxl": tiny_model_dir("sdxl"), "clip": tiny_model_dir("clip")}


def test_cli_end_to_end_on_tiny_sdxl_turbo(tiny_models, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na red dog\n")
    out = tmp_path / "run"
    code = main(
        [
            "noise",
            "optimize",
            "--prompts",
            str(prompts),
            "--model_id",  # the seed's spelling
            tiny_models["sdxl"],
            "--reward_type",
            "clip",
            "--clip_local_dir",
            tiny_models["clip"],
            "--output_dir",
            str(out),
            "--height",
            "32",
            "--width",
            "32",
            "--steps",
            "2",
            "--lr",
            "0.05",
            "--batch-size",
            "2",
            "--save-every",
            "0",
        ]
    )
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_ok"] == 2 and summary["generator"] == "sdxl-turbo"
    assert summary["latent_shape"] == [4, 4, 4]
    assert (out / "prompt_1" / "orthogonal_gaussian_final.json").is_file()
    assert not (out / "prompt_1" / "step_001.png").exists()  # --save-every 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--reward", "clip:x"], "weight"),
        (["--reward", "nosuchreward"], "unknown reward"),
        (["--prompts", "/nonexistent/prompts.txt"], "not found"),
        (["--model", "/nonexistent/model"], "not found"),
        ([], "no prompt"),
    ],
)
def test_cli_bad_input_is_one_line(tiny_models, tmp_path, capsys, extra, message):
    args = ["noise", "optimize", "--output-dir", str(tmp_path / "o")]
    if "--model" not in extra:
        args += ["--model", tiny_models["sdxl"]]
    if extra and "--prompts" not in extra:
        args += ["--prompt", "a cat"]
    args += ["--clip-model", tiny_models["clip"], "--height", "32", "--width", "32"] + extra
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and err.startswith("diffalign: error:"), err
    assert message in err, err


def test_cli_option_of_an_unused_reward_is_an_error(tmp_path, capsys):
    """Told before any model is loaded (the model here does not exist), nothing written."""
    out = tmp_path / "o"
    code = main(
        ["noise", "optimize", "--prompt", "a cat", "--model", str(tmp_path / "no-model")]
        + ["--reward", "clip", "--aesthetic_ckpt", "a.pth", "--output-dir", str(out)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        "diffalign: error: --reward clip does not use --aesthetic_ckpt (for the aesthetic and "
        "hybrid rewards); drop it or add its reward to --reward"
    ]
    assert not out.exists()


def test_cli_empty_prompts_file(tiny_models, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code = main(
        ["noise", "optimize", "--prompts", str(empty), "--model", tiny_models["sdxl"]]
        + ["--output-dir", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "is empty" in err


def test_cli_missing_models_name_the_download(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFALIGN_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model, asset in (("sdxl-turbo", "sdxl-turbo"), ("hyper-sd15", "sd15")):
        code = main(
            ["noise", "optimize", "--prompt", "a cat", "--model", model]
            + ["--output-dir", str(tmp_path / "o")]
        )
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and f"diffalign download --only {asset}" in err, err


def test_cli_hyper_weights_missing(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFALIGN_MODELS_DIR", str(tmp_path / "models"))
    code = main(
        ["noise", "optimize", "--prompt", "a cat", "--model", tiny_model_dir("sd15")]
        + ["--generator", "hyper-sd15", "--output-dir", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "diffalign download --only hyper-sd" in err, err
