"""`noise optimize / assign / build-dataset --compile` (issue 18): the compiled generator and
reward forward give the eager result (fp32: float rounding; bf16: bf16 rounding); --cuda-graphs
off CUDA is one error line. Inductor builds C++ kernels on the CPU (slow: few, small tests)."""

from __future__ import annotations

import json

import pytest
import torch

import diffalign.noise.onestep as onestep
from diffalign.cli import main
from diffalign.engine.io import load_tensors
from diffalign.noise.optimize import OptimizeSettings, optimize_prompts
from noise_data_helpers import model_args, write_pairs
from test_noise_optimize import LinearGenerator, TargetReward, _noise


def test_compiled_optimize_equals_eager_on_a_small_generator():
    prompts = ["a", "b"]
    settings = OptimizeSettings(steps=3, lr=0.05, images_per_prompt=2)
    gen, reward = LinearGenerator(), TargetReward()
    eager = optimize_prompts(gen, reward, prompts, _noise(2, 2), settings)
    assert onestep.compile_generator(gen) == {"conv": "whole"}  # the reward: the slow tests
    assert gen.conv._compiled_call_impl is not None
    compiled = optimize_prompts(gen, reward, prompts, _noise(2, 2), settings)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(torch.tensor(b.reward_history), torch.tensor(a.reward_history))
        torch.testing.assert_close(b.best_noise, a.best_noise, rtol=1e-5, atol=1e-6)


def test_cuda_graphs_off_cuda_is_one_line(tmp_path, capsys):
    code = main(
        ["noise", "optimize", "--prompt", "a cat", "--model", str(tmp_path / "absent"),
         "--cuda-graphs", "--device", "cpu", "--output-dir", str(tmp_path / "o")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == "diffalign: error: --cuda-graphs needs a CUDA device; this run is on cpu"
    assert not (tmp_path / "o").exists()


def test_build_dataset_compile_compiles_the_generator(tiny_model_dir, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(
        onestep, "compile_generator", lambda g, cuda_graphs=False, reward=None: seen.append(g.name)
    )
    data = write_pairs(tmp_path / "data", n=1)
    code = main(
        ["noise", "build-dataset", "--data-root", str(data), "--output-dir", str(tmp_path / "ds"),
         *model_args(tiny_model_dir("sdxl")), "--steps", "1", "--compile", "--no-plots"]
    )  # fmt: skip
    assert code == 0 and seen == ["sdxl-turbo"]


@pytest.mark.slow
@pytest.mark.inductor
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiled_generator_and_reward_equal_eager(tiny_model_dir, dtype):
    """Image, reward and gradient wrt the noise of tiny SDXL-Turbo + CLIP, eager then compiled
    in place (the U-Net's transformer blocks, the VAE decoder, CLIP's layers)."""
    from diffalign.engine.rewards import load_reward
    from diffalign.noise.generators import load_generator

    gen = load_generator(
        tiny_model_dir("sdxl"), "sdxl-turbo", dtype=dtype, device="cpu", height=32, width=32
    )
    reward = load_reward("clip", clip_model=tiny_model_dir("clip"))
    embeds = gen.encode_prompts(["a cat", "a red dog"])
    noise = torch.randn((2, *gen.latent_shape()), generator=torch.Generator().manual_seed(0))

    def run():
        z = noise.clone().requires_grad_(True)
        images = gen.generate(z, embeds)
        r = reward(images, ["a cat", "a red dog"])
        r.sum().backward()
        return images.detach(), r.detach(), z.grad

    eager = run()
    done = onestep.compile_generator(gen, reward=reward)
    assert done["unet"] == "regional" and done["vae.decoder"] == "whole"
    compiled = run()
    if dtype == "fp32":
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    else:  # bf16 U-Net: a few bf16 roundings (eps 2^-8) of the [0, 1] image and what follows
        torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=2**-6)
        torch.testing.assert_close(compiled[1], eager[1], rtol=2**-6, atol=2**-6)
        g_e, g_c = eager[2], compiled[2]
        assert (g_c - g_e).norm() <= 2**-5 * g_e.norm()


@pytest.mark.slow
@pytest.mark.inductor
def test_cli_optimize_compile_equals_eager_fp32(tiny_model_dir, tmp_path):
    base = [
        "noise", "optimize", "--prompt", "a cat", "--model", tiny_model_dir("sdxl"),
        "--generator", "sdxl-turbo", "--reward", "clip", "--clip-model", tiny_model_dir("clip"),
        "--height", "32", "--width", "32", "--steps", "2", "--lr", "0.05", "--save-every", "0",
    ]  # fmt: skip
    assert main([*base, "--output-dir", str(tmp_path / "e")]) == 0
    assert main([*base, "--output-dir", str(tmp_path / "c"), "--compile"]) == 0
    he = json.loads((tmp_path / "e" / "reward_history.json").read_text())
    hc = json.loads((tmp_path / "c" / "reward_history.json").read_text())
    torch.testing.assert_close(torch.tensor(hc["reward"]), torch.tensor(he["reward"]))
    ne, _ = load_tensors(tmp_path / "e" / "best_noise.safetensors")
    nc, _ = load_tensors(tmp_path / "c" / "best_noise.safetensors")
    for k in ne:
        torch.testing.assert_close(nc[k], ne[k], rtol=1e-4, atol=1e-5)


class ReplayedGenerator(LinearGenerator):
    """The rule `--cuda-graphs` (torch.compile's "reduce-overhead") puts on the loop: a CUDA
    graph's replay writes its outputs into the same static memory, so an output kept past the
    next call changes under its holder. Here every `generate` returns one buffer, overwritten
    in place (autograd flows through the copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.static: torch.Tensor | None = None

    def generate(self, noise, embeds):
        out = super().generate(noise, embeds)
        if self.static is None or self.static.shape != out.shape:
            self.static = torch.zeros_like(out.detach())
        return self.static.detach().copy_(out)  # the same memory, this call's history


def test_optimize_keeps_nothing_a_graph_replay_overwrites():
    # what the loop keeps (images of step 0 and of the best step, the best noise, the history)
    # is copied out when seen: the same results as a generator with fresh outputs
    prompts = ["a", "b"]
    settings = OptimizeSettings(steps=4, lr=0.3, images_per_prompt=2)
    fresh = optimize_prompts(LinearGenerator(), TargetReward(), prompts, _noise(2, 2), settings)
    frames = []
    replayed = optimize_prompts(
        ReplayedGenerator(),
        TargetReward(),
        prompts,
        _noise(2, 2),
        settings,
        on_step=lambda step, active, images, rewards: frames.append(images),
    )
    assert len({f.data_ptr() for f in frames}) == 1  # one buffer, as a replay gives
    for i, (a, b) in enumerate(zip(fresh, replayed)):
        assert b.reward_history == a.reward_history
        assert torch.equal(b.init_images, a.init_images)
        assert torch.equal(b.best_images, a.best_images)
        assert torch.equal(b.best_noise, a.best_noise)
        # the buffer holds the last evaluation now: step 0's images were overwritten
        assert not torch.equal(frames[-1][2 * i : 2 * i + 2], a.init_images)
