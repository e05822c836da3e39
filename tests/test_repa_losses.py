"""U-REPA losses against slow references written from seed 003's formulas (sections 4.1-4.5)."""

import math

import pytest
import torch

import diffalign.repa as repa
from diffalign.engine.errors import DiffalignError
from diffalign.repa.losses import (
    add_noise,
    align_coeff,
    diffusion_target,
    total_loss,
)


def _cos(a, b):
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b)) / (max(na, 1e-6) * max(nb, 1e-6))


def slow_token_loss(pred, target):
    """(1/BN) sum_b sum_i [1 - cos(z_bi, z~_bi)] (seed 4.3)."""
    B, N, _ = pred.shape
    total = 0.0
    for b in range(B):
        for i in range(N):
            total += 1.0 - _cos(pred[b, i].tolist(), target[b, i].tolist())
    return total / (B * N)


def slow_manifold_loss(pred, target, mask_diag=True, upper_only=True):
    """MSE between Gram matrices of mean-pooled, normalised samples (seed 4.4)."""
    B, N, D = pred.shape

    def pooled(x):
        out = []
        for b in range(B):
            v = [sum(float(x[b, i, d]) for i in range(N)) / N for d in range(D)]
            n = max(math.sqrt(sum(t * t for t in v)), 1e-6)
            out.append([t / n for t in v])
        return out

    p, t = pooled(pred), pooled(target)
    diff = [
        [
            sum(a * c for a, c in zip(p[i], p[j])) - sum(a * c for a, c in zip(t[i], t[j]))
            for j in range(B)
        ]
        for i in range(B)
    ]
    if mask_diag:
        for i in range(B):
            diff[i][i] = 0.0
    if upper_only:
        pairs = [(i, j) for i in range(B) for j in range(B) if j > i]
        return sum(diff[i][j] ** 2 for i, j in pairs) / len(pairs)
    return sum(diff[i][j] ** 2 for i in range(B) for j in range(B)) / (B * B)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_token_loss_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 5, 7, generator=g).to(dtype)
    target = torch.randn(3, 5, 7, generator=g).to(dtype)
    got = repa.token_loss(pred, target)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(slow_token_loss(pred.float(), target.float()), abs=1e-5)
    # identical tokens: 0; opposite tokens: 2
    assert repa.token_loss(pred, pred).item() == pytest.approx(0.0, abs=1e-2)
    assert repa.token_loss(pred.float(), -pred.float()).item() == pytest.approx(2.0, abs=1e-5)


@pytest.mark.parametrize("mask_diag", [True, False])
@pytest.mark.parametrize("upper_only", [True, False])
def test_manifold_loss_matches_reference(mask_diag, upper_only):
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(4, 6, 5, generator=g)
    target = torch.randn(4, 6, 5, generator=g)
    got = repa.manifold_loss(pred, target, mask_diag=mask_diag, upper_only=upper_only)
    ref = slow_manifold_loss(pred, target, mask_diag, upper_only)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref, rel=1e-5, abs=1e-7)


def test_manifold_loss_seed_example_and_edge_cases():
    # the seed's worked example (4.4, step 6): upper-triangle diff entries -> mean of squares
    x = torch.randn(4, 3, 8)
    assert repa.manifold_loss(x, x).item() == pytest.approx(0.0, abs=1e-7)
    one = torch.randn(1, 3, 8)
    assert repa.manifold_loss(one, torch.randn(1, 3, 8)).item() == 0.0
    pred = torch.randn(2, 3, 8, requires_grad=True)
    repa.manifold_loss(pred, torch.randn(2, 3, 8)).backward()
    assert torch.isfinite(pred.grad).all()


_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("loss", ["token_loss", "manifold_loss"])
def test_alignment_losses_are_fp32_under_bf16_autocast(device, loss):
    # seed 8.1: loss computation in FP32 even under bf16 autocast. Autocast casts matrix products
    # (the manifold loss's einsum) to bf16 whatever the inputs' dtype, a 0.5-1% gradient error.
    fn = getattr(repa, loss)
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(6, 16, 48, generator=g).to(device).requires_grad_(True)
    target = torch.randn(6, 16, 48, generator=g).to(device)
    ref = fn(pred, target)
    (ref_grad,) = torch.autograd.grad(ref, pred)
    with torch.autocast(device, dtype=torch.bfloat16):
        # the hazard is live here: a product of fp32 tensors comes out in bf16
        assert torch.einsum("bd,cd->bc", pred[:, 0], pred[:, 0]).dtype == torch.bfloat16
        got = fn(pred, target)
    (grad,) = torch.autograd.grad(got, pred)  # backward outside autocast, as the training loop
    assert got.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-9)
    slow = slow_token_loss if loss == "token_loss" else slow_manifold_loss
    assert got.item() == pytest.approx(slow(pred.detach().cpu(), target.cpu()), rel=1e-5)


def test_losses_reject_bad_shapes():
    with pytest.raises(DiffalignError, match="differ"):
        repa.token_loss(torch.randn(2, 4, 3), torch.randn(2, 4, 5))
    with pytest.raises(DiffalignError, match=r"\[B, N, D\]"):
        repa.manifold_loss(torch.randn(2, 4), torch.randn(2, 4))


def test_align_coeff_schedule_seed_timeline():
    # seed 4.5 timeline
    assert align_coeff(0) == 0.0
    assert align_coeff(750) == pytest.approx(0.125)
    assert align_coeff(1500) == pytest.approx(0.25)
    assert align_coeff(2250) == pytest.approx(0.375)
    assert align_coeff(3000) == 0.5
    assert align_coeff(10_000) == 0.5
    assert align_coeff(0, 0.5, 0) == 0.5  # no warm-up ablation


def test_total_loss_and_diffusion_targets():
    # seed 4.5 worked example: 1.67 + 0.5 (0.68 + 3 * 0.02) = 2.04
    t = total_loss(torch.tensor(1.67), torch.tensor(0.68), torch.tensor(0.02), 0.5, 3.0)
    assert t.item() == pytest.approx(2.04, abs=1e-6)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ac = torch.cumprod(1 - betas, 0)
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    ts = torch.tensor([0, 500, 999])
    zt = add_noise(x0, eps, ac, ts)
    v = diffusion_target(x0, eps, ac, ts, "v_prediction")
    for k, step in enumerate(ts.tolist()):
        a = float(ac[step])
        assert torch.allclose(zt[k], math.sqrt(a) * x0[k] + math.sqrt(1 - a) * eps[k], atol=1e-6)
        assert torch.allclose(v[k], math.sqrt(a) * eps[k] - math.sqrt(1 - a) * x0[k], atol=1e-6)
    assert torch.equal(diffusion_target(x0, eps, ac, ts, "epsilon"), eps)
    # diffusers' DDPMScheduler agrees (SD 1.5's schedule)
    from diffusers import DDPMScheduler

    s = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.allclose(s.get_velocity(x0, eps, ts), v, atol=1e-5)
    assert torch.allclose(s.add_noise(x0, eps, ts), zt, atol=1e-5)


def test_training_schedule_is_the_seeds_linear_betas_by_default():
    """Seed 4.2 / spec R: betas linear from 0.00085 to 0.012 over 1000 steps, abar = prod(1 -
    beta); `model` keeps SD 1.5's own scaled_linear config."""
    from diffalign.repa.model import SD15_SCHEDULE, training_schedule

    abar, cfg = training_schedule(dict(SD15_SCHEDULE))
    assert cfg["beta_schedule"] == "linear" and abar.shape == (1000,)
    prod, ref = 1.0, []
    for t in range(1000):
        prod *= 1.0 - (0.00085 + (0.012 - 0.00085) * t / 999)
        ref.append(prod)
    assert torch.allclose(abar.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5)
    sd15, cfg15 = training_schedule(dict(SD15_SCHEDULE), "model")
    assert cfg15["beta_schedule"] == "scaled_linear"
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(sd15.double(), torch.cumprod(1 - betas, 0), rtol=1e-5)
    assert not torch.allclose(sd15, abar)


def test_cap_loss_scales_value_keeps_gradient_direction():
    from diffalign.repa.losses import cap_loss

    x = torch.tensor([2.0, 3.0], requires_grad=True)
    loss = (x**2).sum()  # 13
    used, capped = cap_loss(loss, 0.1)
    assert used.item() == pytest.approx(0.1) and capped.item() == 1.0
    used.backward()
    assert torch.allclose(x.grad, 2 * x.detach() * 0.1 / 13.0)
    small, c2 = cap_loss(torch.tensor(0.05), 0.1)
    assert small.item() == pytest.approx(0.05) and c2.item() == 0.0
    nan, c3 = cap_loss(torch.tensor(float("nan")), 0.1)
    assert torch.isnan(nan) and c3.item() == 0.0  # left to the loop's non-finite skip
    same, c4 = cap_loss(torch.tensor(5.0), None)
    assert same.item() == 5.0 and c4.item() == 0.0
