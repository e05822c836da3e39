"""The DINOv2 teacher (seed 003 §3.3): pooling against a slow reference, the seed's layout
reproduced literally, the token-layout test, and the tiny models through the real loader."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffalign.engine.errors import DiffalignError
from diffalign.repa.teacher import (
    dino_preprocess,
    dino_tokens,
    load_dino,
    num_prefix_tokens,
    pool_patch_tokens,
)


def _reference_adaptive_pool(grid_tokens: torch.Tensor, out: int) -> torch.Tensor:
    """Slow adaptive average pooling of [side, side, D] -> [out*out, D]: bin i covers rows
    floor(i*side/out) .. ceil((i+1)*side/out) - 1 (PyTorch's definition)."""
    side = grid_tokens.shape[0]
    rows = []
    for i in range(out):
        r0, r1 = (i * side) // out, -((-(i + 1) * side) // out)
        for j in range(out):
            c0, c1 = (j * side) // out, -((-(j + 1) * side) // out)
            cells = [grid_tokens[r, c] for r in range(r0, r1) for c in range(c0, c1)]
            rows.append(torch.stack(cells).mean(0))
    return torch.stack(rows)


def _seed_code(x_norm_patchtokens: torch.Tensor) -> torch.Tensor:
    """The seed's §3.3 snippet, verbatim apart from B and the dim."""
    B, D = x_norm_patchtokens.shape[0], x_norm_patchtokens.shape[-1]
    patch_tokens = x_norm_patchtokens[:, :1296, :]
    patch_tokens = patch_tokens.view(B, 36, 36, D)
    patch_tokens = patch_tokens.permute(0, 3, 1, 2)
    tokens_16x16 = F.adaptive_avg_pool2d(patch_tokens, (16, 16))
    tokens_16x16 = tokens_16x16.permute(0, 2, 3, 1)
    tokens = tokens_16x16.flatten(1, 2)
    return F.normalize(tokens, dim=-1)


def test_grid_pooling_matches_the_slow_reference():
    torch.manual_seed(0)
    tokens = torch.randn(2, 37 * 37, 5)
    ours = pool_patch_tokens(tokens, "grid", 16)
    for b in range(2):
        ref = _reference_adaptive_pool(tokens[b].view(37, 37, 5), 16)
        assert torch.allclose(ours[b], ref, atol=1e-5)


def test_seed_layout_reproduces_the_seed_code():
    torch.manual_seed(1)
    tokens = torch.randn(2, 1369, 8)
    assert torch.allclose(
        F.normalize(pool_patch_tokens(tokens, "seed", 16), dim=-1), _seed_code(tokens), atol=1e-6
    )


def test_token_layout_planted_step_survives_grid_and_not_seed():
    # a vertical edge: the left 18 patch columns of the 37 x 37 grid are 1, the rest 0
    side = 37
    cols = torch.arange(side).view(1, side).expand(side, side)
    planted = (cols < 18).float().reshape(1, side * side, 1)
    grid = pool_patch_tokens(planted, "grid", 16).view(16, 16)
    seed = pool_patch_tokens(planted, "seed", 16).view(16, 16)
    # ours: every row of the 16 x 16 grid shows the same edge, at the same place
    assert torch.allclose(grid, grid[:1].expand(16, 16))
    assert (grid[:, :7] == 1).all() and (grid[:, 9:] == 0).all()
    # the seed's: row i of its 36 x 36 view starts i patches further left, so the edge drifts
    # across the image from row to row (a diagonal), and the top-left cell is no longer all 1
    assert not torch.allclose(seed, seed[:1].expand(16, 16))
    # half-way down the seed's grid the picture is mirrored: the bright left half reads dark and
    # the dark right half bright
    assert seed[8, :8].max() < 0.2 and seed[8, 9:].min() > 0.9
    assert (grid - seed).abs().max() > 0.9


def test_pool_rejects_bad_input():
    with pytest.raises(DiffalignError, match="square grid"):
        pool_patch_tokens(torch.zeros(1, 10, 2))
    with pytest.raises(DiffalignError, match="unknown token layout"):
        pool_patch_tokens(torch.zeros(1, 9, 2), "rows")


def test_dino_preprocess_resizes_crops_and_normalises():
    img = torch.rand(2, 3, 64, 80)
    x = dino_preprocess(img)
    assert x.shape == (2, 3, 518, 518)
    flat = torch.full((1, 3, 518, 600), 0.5)
    y = dino_preprocess(flat)
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(y[0, :, 100, 100], expected, atol=1e-4)
    with pytest.raises(DiffalignError, match=r"\[B, 3, H, W\]"):
        dino_preprocess(torch.rand(3, 8, 8))


def test_dino_preprocess_is_close_to_the_seeds_pil_resize():
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photo = Image.fromarray(load_sample_images().images[0][:400, :400]).resize((512, 512))
    pil = torch.from_numpy(np.asarray(photo.resize((518, 518), Image.BICUBIC)).copy())
    pil = pil.permute(2, 0, 1).float().div(255)
    ours = torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1).float().div(255)
    ours = dino_preprocess(ours[None])[0]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    diff = (ours * std + mean - pil).abs() * 255
    assert diff.mean() < 0.3 and diff.max() <= 8.01  # PIL's fixed-point maths differs slightly


@pytest.mark.parametrize("kind", ["dinov2", "dinov2-reg"])
def test_dino_tokens_on_tiny_models(tiny_model_dir, kind):
    model = load_dino(tiny_model_dir(kind))
    assert num_prefix_tokens(model) == (1 if kind == "dinov2" else 5)
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    tokens = dino_tokens(model, images)
    assert tokens.shape == (2, 256, model.config.hidden_size) and tokens.dtype == torch.float32
    assert torch.allclose(tokens.norm(dim=-1), torch.ones(2, 256), atol=1e-5)
    with torch.no_grad():
        hidden = model(pixel_values=dino_preprocess(images)).last_hidden_state
    patches = hidden[:, num_prefix_tokens(model) :]
    assert patches.shape[1] == 1369
    expected = F.normalize(pool_patch_tokens(patches, "grid"), dim=-1)
    assert torch.allclose(tokens, expected, atol=1e-5)
    seed = dino_tokens(model, dino_preprocess(images), layout="seed", preprocess=False)
    assert torch.allclose(seed, _seed_code(patches), atol=1e-5)


def test_load_dino_errors(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFALIGN_MODELS_DIR", str(tmp_path / "models"))
    with pytest.raises(DiffalignError, match="diffalign download --only dinov2-large"):
        load_dino("dinov2-large")
    with pytest.raises(DiffalignError, match="no such folder"):
        load_dino(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffalignError, match="no config.json"):
        load_dino(str(tmp_path / "empty"))
    text_encoder = f"{tiny_model_dir('sd15')}/text_encoder"
    with pytest.raises(DiffalignError, match="not a DINOv2 model"):
        load_dino(text_encoder)


@pytest.mark.parametrize("kind", ["dinov2", "dinov2-reg"])
def test_online_teacher_in_training_matches_reference_and_cached_store(tiny_model_dir, kind):
    """`repa train --teacher online` must give the tokens `repa preprocess dino` caches: the
    seed §3.3 transform applied once. Reference written out here: a 518 px image needs no resize
    or crop, so the input is `(x / 255 - mean) / std` with the ImageNet constants; the patch
    tokens are `last_hidden_state` after CLS (+ registers), on their 37 x 37 grid, pooled to
    16 x 16 and L2-normalised. (Old code normalised twice: `dino_preprocess` then `dino_tokens`.)"""
    from types import SimpleNamespace

    from diffalign.repa.train import RepaTask

    model = load_dino(tiny_model_dir(kind))
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (2, 3, 518, 518), generator=g, dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = model(pixel_values=(images.float() / 255.0 - mean) / std).last_hidden_state
    skip = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
    patches = hidden[:, skip:].reshape(2, 37, 37, -1)
    expected = torch.stack(
        [F.normalize(_reference_adaptive_pool(patches[b], 16), dim=-1) for b in range(2)]
    )
    task = SimpleNamespace(dino=model, cfg=SimpleNamespace(grid=16, token_layout="grid"))
    online = RepaTask._teacher_tokens(task, {"image": images}, "cpu")
    cached = dino_tokens(model, images.float() / 255.0)  # what `repa preprocess dino` stores
    torch.testing.assert_close(online, expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(cached, expected, rtol=0, atol=2e-5)
