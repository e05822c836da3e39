"""Seed 001 compatibility of the noise capability (issue 14 items 1-5): each test checks ours
against code written the way the seed's `runners.py` / `adapters.py` / `runners_sft.py` are."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from diffalign.engine.io import load_tensors
from diffalign.noise.onestep import OneStepGenerator
from diffalign.noise.optimize import OptimizeSettings, optimize_prompts

SIGMA = 14.6146  # SDXL-Turbo's init_noise_sigma (EulerAncestral, trailing, t = 999)


class ScaledToyGenerator(OneStepGenerator):
    """A differentiable stand-in whose first latents are ``sigma * z`` (as a diffusion one-step
    generator's): images = sigmoid(conv(sigma z)). ``from_scaled`` runs it on the seed's noise."""

    name = "scaled-toy"

    def __init__(self, sigma: float = SIGMA):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.register_buffer("w", torch.randn(3, 4, 3, 3, generator=g) * 0.05)
        self.sigma = sigma

    def init_noise_sigma(self) -> float:
        return self.sigma

    def latent_shape(self, height=None, width=None):
        return (4, 8, 8)

    def encode_prompts(self, prompts):
        return {"p": torch.zeros(len(prompts), 1)}

    def from_scaled(self, latents):
        return torch.sigmoid(F.conv2d(latents, self.w, padding=1))

    def generate(self, noise, embeds):
        return self.from_scaled(self.sigma * noise)


class PatternReward(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.register_buffer("target", torch.rand(3, 8, 8, generator=g))

    def forward(self, images, prompts):
        return -((images - self.target) ** 2).flatten(1).mean(1) * 100


def seed_patch_apply(eps, q, p):
    """The seed's PatchOrthogonalNoise.forward, as written there."""
    b, c, h, w = eps.shape
    d = c * p * p
    x = eps.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).contiguous()
    x = x.view(b, -1, d) @ q.T
    x = x.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).contiguous()
    return x.view(b, c, h, w)


def seed_reference(gen, reward, *, seed, steps, lr, noise_l2_weight, optimizer, init_scale=1e-4):
    """The seed's `_run_test_time_oft_core` loop (batch 1, patch 2): raw ~ init_scale * randn
    right after manual_seed(seed), S = raw - raw^T, Q = matrix_exp(S), base noise = randn(seed)
    * init_noise_sigma, loss = -reward + w * mse(eps_theta, base_noise). Returns (Q per step,
    drift per step)."""
    torch.manual_seed(seed)
    d = 4 * 2 * 2
    raw = torch.zeros(d, d)
    raw += init_scale * torch.randn_like(raw)
    raw = torch.nn.Parameter(raw)
    if optimizer == "adam":
        opt = torch.optim.AdamW([raw], lr=lr, weight_decay=0.0)
    else:
        opt = torch.optim.SGD([raw], lr=lr)
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    base_noise = torch.randn((1, 4, 8, 8), generator=g, dtype=torch.float32)
    base_noise = base_noise * float(gen.init_noise_sigma())
    qs, drifts = [], []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        q = torch.matrix_exp(raw - raw.transpose(0, 1))
        eps_theta = seed_patch_apply(base_noise, q, 2)
        drift_reg = F.mse_loss(eps_theta, base_noise)
        images = gen.from_scaled(eps_theta)
        loss = -reward(images, ["x"]).mean() + noise_l2_weight * drift_reg
        loss.backward()
        opt.step()
        drifts.append(float(drift_reg.detach()))
    with torch.no_grad():
        qs.append(torch.matrix_exp(raw - raw.transpose(0, 1)))
    return qs[-1], drifts


def run_ours(gen, reward, settings, seed):
    """`run_optimize`'s draw of the base noise and start, then the method itself."""
    z = gen.sample_noise(1, generator=torch.Generator().manual_seed(seed))
    (res,) = optimize_prompts(gen, reward, ["x"], z, settings, init_seed=seed)
    return res.q_final, res.drift_history


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_steps_equal_the_seeds_from_the_same_start(optimizer):
    """Items 1 + 2: same seed -> the seed's raw start (--init-std 1e-4) and base noise; each
    step at a given lr moves Q as the seed's does (S = raw - raw^T), with the drift term on the
    sigma-scaled noise. (S = (A - A^T)/2 moves S 4x slower under SGD, 2x under Adam; a drift
    on unscaled z is 214x weaker: either fails this.)"""
    gen, reward = ScaledToyGenerator(), PatternReward()
    steps, lr, w = (1, 0.02, 0.5) if optimizer == "sgd" else (3, 0.01, 0.5)
    q_ref, drift_ref = seed_reference(
        gen, reward, seed=42, steps=steps, lr=lr, noise_l2_weight=w, optimizer=optimizer
    )
    settings = OptimizeSettings(
        steps=steps,
        lr=lr,
        optimizer=optimizer,
        momentum=0.0,
        grad_clip=1e9,
        noise_l2_weight=w,
        init_std=1e-4,
    )
    q_ours, drift = run_ours(gen, reward, settings, seed=42)
    moved = float((q_ref - torch.eye(16)).abs().max())
    assert moved > 1e-3  # the step is not negligible
    assert torch.allclose(q_ours, q_ref, atol=2e-6, rtol=0), float((q_ours - q_ref).abs().max())
    # the drift we record is the seed's F.mse_loss on sigma-scaled noise, step for step
    assert drift[:steps] == pytest.approx(drift_ref, rel=1e-4, abs=1e-12)


def test_drift_weight_matters_at_the_seeds_scale():
    """The same weight on a sigma = 14.6 generator pulls Q back as hard as the seed's (the drift
    gradient dominates the reward's at w = 50; on unscaled z it would not)."""
    gen, reward = ScaledToyGenerator(), PatternReward()
    base = dict(steps=1, lr=0.02, optimizer="sgd", momentum=0.0, grad_clip=1e9, init_std=1e-4)
    q_free, _ = run_ours(gen, reward, OptimizeSettings(**base, noise_l2_weight=0.0), 0)
    q_reg, _ = run_ours(gen, reward, OptimizeSettings(**base, noise_l2_weight=50.0), 0)
    q_ref, _ = seed_reference(
        gen, reward, seed=0, steps=1, lr=0.02, noise_l2_weight=50.0, optimizer="sgd"
    )
    # float32 rounding of a drift gradient scaled by sigma^2 * 50: 1e-5, against a 1e-2 effect
    assert torch.allclose(q_reg, q_ref, atol=2e-5, rtol=0)
    assert float((q_reg - q_free).abs().max()) > 1e-2


def test_identity_start_stays_the_default():
    """SPEC: Q = I at start unless --init-std: step 0's image is the base noise's."""
    gen, reward = ScaledToyGenerator(), PatternReward()
    s = OptimizeSettings(steps=1, lr=1e-3)
    assert s.init_std == 0.0
    z = gen.sample_noise(1, generator=torch.Generator().manual_seed(5))
    (res,) = optimize_prompts(gen, reward, ["x"], z, s, init_seed=5)
    r0 = float(reward(gen.generate(z, gen.encode_prompts(["x"])), ["x"]))
    assert res.reward_history[0] == r0 and res.q_init is None and res.drift_history[0] == 0.0


def test_init_std_option_and_help():
    from diffalign.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["noise", "optimize", "--prompt", "a", "--init-std", "1e-4"])
    from diffalign.noise.cli_optimize import settings_from_args

    assert settings_from_args(args).init_std == 1e-4
    assert parser.parse_args(["noise", "optimize", "--prompt", "a"]).init_std == 0.0


# ------------------------------------------------- item 5: the seed's sigma-scaled noise files


def write_seed_dataset(root, z, sigma, built_at="/elsewhere/assigned_noise_dataset"):
    """A dataset laid out as the seed's `build_assigned_noise_dataset` writes it: per sample
    `torch.save(best_input_noise)` (sigma * z, batch of one) and the target image; manifest
    records with the absolute paths of the machine that built it."""
    from PIL import Image

    lines = []
    for i in range(z.shape[0]):
        sample_id = f"{i:06d}_{i:04d}"
        sdir = root / "samples" / sample_id
        sdir.mkdir(parents=True)
        torch.save((z[i : i + 1] * sigma).clone(), sdir / "best_input_noise.pt")
        Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(sdir / f"{i:04d}.png")
        lines.append(
            {
                "sample_id": sample_id,
                "prompt": f"a photo number {i}",
                "target_image_path": f"{built_at}/samples/{sample_id}/{i:04d}.png",
                "best_input_noise_path": f"{built_at}/samples/{sample_id}/best_input_noise.pt",
                "source_image_path": f"/data/images/{i:04d}.png",
                "line_idx": i,
                "stats": {"loss": 0.1},
            }
        )
    (root / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def test_seed_noise_files_read_as_z(tmp_path):
    from diffalign.noise.assign import read_noise_file, save_noise_file
    from diffalign.noise.dataset import load_dataset_manifest
    from diffalign.noise.sft import ManifestPairs

    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    root = write_seed_dataset(tmp_path / "seedds", z, SIGMA)
    records, _ = load_dataset_manifest(root)
    assert [r["noise_path"].parent.name for r in records] == ["000000_0000", "000001_0001"]
    pairs = ManifestPairs(records, (32, 32), sigma=SIGMA)
    for i in range(2):
        assert torch.allclose(pairs[i]["noise"], z[i], atol=1e-6)
    noise, meta = read_noise_file(records[0]["noise_path"], SIGMA)
    assert meta["sigma_scaled"] == "true" and meta["format"] == "seed"
    # ours record that they are not scaled and come back unchanged whatever the sigma
    ours = tmp_path / "ours.safetensors"
    save_noise_file(ours, z[0], z[1], torch.eye(16), {"id": 0})
    assert load_tensors(ours)[1]["sigma_scaled"] == "false"
    assert torch.equal(read_noise_file(ours, SIGMA)[0], z[0])
    # a file of ours that records sigma * z is divided like the seed's
    from diffalign.engine.io import save_tensors

    save_tensors(tmp_path / "s.safetensors", {"noise": z[0] * 2.0}, {"sigma_scaled": "true"})
    assert torch.allclose(read_noise_file(tmp_path / "s.safetensors", 2.0)[0], z[0])


def test_seed_manifest_stays_inside_its_folder(tmp_path):
    from diffalign.engine.errors import DiffalignError
    from diffalign.noise.dataset import load_dataset_manifest

    z = torch.randn(1, 4, 4, 4)
    root = write_seed_dataset(tmp_path / "seedds", z, SIGMA)
    rec = json.loads((root / "manifest.jsonl").read_text())
    rec["sample_id"] = "../../outside"
    (root / "manifest.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(DiffalignError, match="noise_file"):
        load_dataset_manifest(root)


def test_noise_sft_trains_on_a_seed_dataset(tiny_model_dir, tmp_path):
    """`noise sft` reads the seed's dataset (its .pt files, weights_only) and trains on z."""
    from diffalign.cli import main
    from diffalign.noise.generators import load_generator

    sdxl = tiny_model_dir("sdxl")
    gen = load_generator(sdxl, height=32, width=32, device="cpu")
    sigma = gen.init_noise_sigma()
    assert sigma > 1.0  # EulerAncestral trailing: sigma_max
    z = torch.randn(2, *gen.latent_shape(), generator=torch.Generator().manual_seed(1))
    root = write_seed_dataset(tmp_path / "seedds", z, sigma)
    argv = ["noise", "sft", "--manifest-path", str(root), "--model", sdxl, "--height", "32"]
    argv += ["--width", "32", "--output-dir", str(tmp_path / "sft"), "--max-steps", "1"]
    assert main([*argv, "--tracker", "none", "--batch-size", "2"]) == 0
    cfg = json.loads((tmp_path / "sft" / "run_config.json").read_text())
    assert cfg["task"]["items"] == 2 and cfg["task"]["weight_decay"] == 1e-4


def test_sft_weight_decay_defaults_to_the_seeds():
    import inspect

    from diffalign.cli import build_parser
    from diffalign.noise.sft import sft

    assert inspect.signature(sft).parameters["weight_decay"].default == 1e-4
    parser = build_parser()
    a = parser.parse_args(["noise", "sft", "--manifest-path", "m", "--model", "x"])
    assert a.weight_decay == 1e-4
    a = parser.parse_args(["noise", "em", "--data-root", "d", "--model", "x"])
    assert a.weight_decay == 1e-4
