"""Assigned-noise inversion on the one-step generators (spec N; seed 001 step 1)."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.cli import main
from diffalign.engine.io import load_tensors
from diffalign.noise.assign import assign_loss, assign_noise, base_noise, snapshot_schedule
from diffalign.noise.generators import load_generator
from diffalign.noise.orthogonal import orthogonality_error
from noise_data_helpers import SIZE, model_args, write_pairs


@pytest.fixture(scope="module")
def sdxl(tiny_model_dir):
    return tiny_model_dir("sdxl")


@pytest.fixture(scope="module")
def gen(sdxl):
    return load_generator(sdxl, height=SIZE, width=SIZE, device="cpu")


def test_assign_loss_matches_a_loop_reference():
    g = torch.Generator().manual_seed(0)
    lat, tlat = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    img, timg = torch.rand(3, 3, 4, 4, generator=g), torch.rand(3, 3, 4, 4, generator=g)
    got = assign_loss(lat, tlat, img, timg, 0.7, 0.3)
    for i in range(3):
        mse = sum(float(a - b) ** 2 for a, b in zip(lat[i].flatten(), tlat[i].flatten())) / 16
        l1 = sum(abs(float(a - b)) for a, b in zip(img[i].flatten(), timg[i].flatten())) / 48
        assert abs(float(got[i]) - (0.7 * mse + 0.3 * l1)) < 1e-5
    assert torch.equal(assign_loss(lat, tlat), (lat - tlat).pow(2).flatten(1).mean(1))


def test_snapshot_schedule():
    assert snapshot_schedule(40, 5) == [0, 10, 20, 30, 40]
    assert snapshot_schedule(3, 0) == []
    assert snapshot_schedule(0, 3) == [0]


def test_assign_noise_lowers_the_loss_keeps_q_orthogonal_and_items_independent(gen):
    targets = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    eps = base_noise([0, 1], gen.latent_shape(), seed=0)
    embeds = gen.encode_prompts(["a cat", "a dog"])
    kw = dict(steps=3, lr=0.05, patch_size=2, latent_loss_weight=1.0, pixel_l1_weight=0.1)
    res = assign_noise(gen, eps, embeds, gen.encode_images(targets), targets, **kw)
    assert (res.loss_after <= res.loss_before).all()
    assert (res.loss_after < res.loss_before).any()
    assert orthogonality_error(res.q) < 1e-5
    assert res.curves.shape == (4, 2) and res.best_step.shape == (2,)
    assert not any(p.requires_grad for p in gen.parameters())  # the generator stays frozen
    # item 1 alone gets the same Q as inside the batch (each Q_i only sees its own loss)
    one = assign_noise(
        gen, eps[1:], gen.encode_prompts(["a dog"]), gen.encode_images(targets[1:]),
        targets[1:], **kw,
    )  # fmt: skip
    assert torch.allclose(one.q[0], res.q[1], atol=1e-4)


def test_cli_assign_writes_the_seed_layout(sdxl, tmp_path):
    data = write_pairs(tmp_path / "data", n=1)
    out = tmp_path / "run"
    argv = ["noise", "assign", "--prompt", "a cat", "--target_image_path"]
    argv += [str(data / "images" / "0000.png"), "--output-dir", str(out), "--steps", "2"]
    assert main(argv + ["--num-intermediates", "2", *model_args(sdxl)]) == 0
    for name in (
        "best_input_noise.safetensors", "target.png", "best.png", "step_0000.png",
        "step_0002.png", "intermediates.png", "loss_curve.png", "loss_curve.json",
        "orthogonal_gaussian_init.png", "orthogonal_gaussian_final.json", "summary.json",
    ):  # fmt: skip
        assert (out / name).is_file(), name
    tensors, meta = load_tensors(out / "best_input_noise.safetensors")
    assert tensors["noise"].shape == (4, 4, 4) and meta["id"] == "0"
    s = json.loads((out / "summary.json").read_text())
    assert s["loss_after"] <= s["loss_before"] and s["orthogonality_error"] < 1e-5


@pytest.mark.parametrize(
    "problem,needle",
    [
        ("missing", "not found"),
        ("size", "64x64"),
        ("garbage", "cannot be read"),
        ("noloss", "both 0"),
    ],
)
def test_cli_assign_bad_input_is_one_line(sdxl, tmp_path, capsys, problem, needle):
    from PIL import Image

    target = tmp_path / "t.png"
    Image.new("RGB", (64 if problem == "size" else SIZE,) * 2).save(target)
    if problem == "garbage":
        target.write_bytes(b"not an image")
    if problem == "missing":
        target = tmp_path / "nope.png"
    argv = ["noise", "assign", "--prompt", "a cat", "--target-image", str(target)]
    argv += ["--output-dir", str(tmp_path / "out"), "--steps", "1", *model_args(sdxl)]
    if problem == "noloss":
        argv += ["--latent-loss-weight", "0", "--pixel-l1-weight", "0"]
    assert main(argv) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("diffalign")]
    assert len(err) == 1 and err[0].startswith("diffalign: error:") and needle in err[0]
    assert not (tmp_path / "out").exists()


def test_encode_images_is_the_scaled_vae_posterior_mode(gen):
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = gen.vae.encode(x * 2 - 1).latent_dist.mode() * gen.vae.config.scaling_factor
    lat = gen.encode_images(x)
    assert lat.shape == (2, *gen.latent_shape()) and torch.allclose(lat, ref, atol=1e-6)


def test_toy_generator_plugs_into_the_same_split():
    from diffalign.noise.toy.models import ToyModelConfig, build_model
    from diffalign.noise.toy.onestep import ToyOneStepGenerator

    torch.manual_seed(0)
    gen = ToyOneStepGenerator(build_model(ToyModelConfig.for_dataset("generator", "digits")))
    z = gen.sample_noise(3, generator=torch.Generator().manual_seed(0))
    e = gen.encode_prompts(["1", "digit 2", "3"])
    lat = gen.denoise(z, e)
    assert lat.shape == (3, 1, 8, 8)  # its own [-1, 1] output is its "latent"
    img = gen.decode(lat)
    assert torch.equal(img, gen.generate(z, e)) and img.shape == (3, 3, 8, 8)
    assert torch.allclose(gen.encode_images(img), lat, atol=1e-6)
    # the generic inversion runs on it as on a diffusion model
    res = assign_noise(gen, z, e, gen.encode_images(torch.rand(3, 3, 8, 8)), steps=2, lr=0.1)
    assert (res.loss_after <= res.loss_before).all() and orthogonality_error(res.q) < 1e-5


def test_load_target_image_resize_and_centre_crop(tmp_path):
    import numpy as np
    from PIL import Image

    from diffalign.engine.errors import DiffalignError
    from diffalign.noise.assign import load_target_image

    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, 20:60] = 255  # a white centre band, black sides
    Image.fromarray(arr).save(tmp_path / "wide.png")
    with pytest.raises(DiffalignError, match="--resize"):
        load_target_image(tmp_path / "wide.png", (20, 20))
    x = load_target_image(tmp_path / "wide.png", (20, 20), resize=True)
    assert x.shape == (3, 20, 20)  # short side 40 -> 20, width 80 -> 40, centre 20 columns
    assert float(x.min()) > 0.9  # the crop is the white centre
