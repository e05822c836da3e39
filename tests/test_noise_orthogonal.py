"""Patch-wise orthogonal transform (spec N), checked against slow independent references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from diffalign.engine.errors import DiffalignError
from diffalign.noise import (
    PatchOrthogonal,
    apply_patch_orthogonal,
    haar_orthogonal,
    orthogonality_error,
    patchify,
    skew_to_orthogonal,
    unpatchify,
)

PARAMS = ("matrix_exp", "cayley")


def slow_patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """Reference: extract each patch by indexing, flatten (c, dy, dx), patches row-major."""
    b, c, h, w = z.shape
    out = torch.empty(b, (h // p) * (w // p), c * p * p, dtype=z.dtype)
    for n in range(b):
        k = 0
        for py in range(h // p):
            for px in range(w // p):
                vec = []
                for ch in range(c):
                    for dy in range(p):
                        for dx in range(p):
                            vec.append(z[n, ch, py * p + dy, px * p + dx])
                out[n, k] = torch.stack(vec)
                k += 1
    return out


def slow_apply(z: torch.Tensor, q: np.ndarray, p: int) -> np.ndarray:
    """Reference: for every patch v (by indexing), write back Q v (float64, numpy)."""
    z = z.double().numpy()
    out = np.zeros_like(z)
    b, c, h, w = z.shape
    for n in range(b):
        qn = q[n] if q.ndim == 3 else q
        for py in range(0, h, p):
            for px in range(0, w, p):
                v = z[n, :, py : py + p, px : px + p].reshape(-1)  # C-order = (c, dy, dx)
                out[n, :, py : py + p, px : px + p] = (qn @ v).reshape(c, p, p)
    return out


@pytest.mark.parametrize("p", [1, 2, 3])
def test_patchify_matches_indexing_reference_and_inverts(p):
    z = torch.randn(2, 3, 3 * p, 2 * p)
    x = patchify(z, p)
    assert x.shape == (2, 6, 3 * p * p)
    assert torch.equal(x, slow_patchify(z, p))
    assert torch.equal(unpatchify(x, p, 3, 3 * p, 2 * p), z)


@pytest.mark.parametrize("parametrization", PARAMS)
@pytest.mark.parametrize("init", ["identity", "random"])
def test_forward_matches_slow_reference(parametrization, init):
    torch.manual_seed(0)
    q = PatchOrthogonal(3, 2, parametrization, init=init, seed=5)
    with torch.no_grad():
        q.weight.normal_(0, 0.5)
    z = torch.randn(2, 3, 4, 6)
    with torch.no_grad():
        out = q(z)
        mat = q.matrix().double().numpy()
    assert out.shape == z.shape and out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), slow_apply(z, mat, 2), atol=2e-6)


@pytest.mark.parametrize("parametrization", PARAMS)
def test_matrix_equals_independent_formula(parametrization):
    torch.manual_seed(1)
    a = torch.randn(12, 12, dtype=torch.float64)
    s = (a - a.T).numpy()  # the seed's S = raw - raw^T
    if parametrization == "matrix_exp":
        ref = scipy.linalg.expm(s)
    else:
        eye = np.eye(12)
        ref = np.linalg.inv(eye - s) @ (eye + s)
    q = skew_to_orthogonal(a.float(), parametrization)
    assert q.dtype == torch.float32
    np.testing.assert_allclose(q.double().numpy(), ref, atol=5e-6)


@pytest.mark.parametrize("parametrization", PARAMS)
@pytest.mark.parametrize("init", ["identity", "random"])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_orthogonal_to_float32_precision(parametrization, init, p):
    q = PatchOrthogonal(4, p, parametrization, init=init, seed=0)
    with torch.no_grad():
        q.weight.normal_(0, 3.0)  # far from the identity
    m = q.matrix().detach()
    assert m.dtype == torch.float32 and m.shape == (4 * p * p, 4 * p * p)
    assert orthogonality_error(m) < 1e-6
    # independent check with numpy in float64
    m64 = m.double().numpy()
    assert np.abs(m64 @ m64.T - np.eye(m64.shape[0])).max() < 1e-6


@pytest.mark.parametrize("parametrization", PARAMS)
def test_identity_init_is_bit_exact(parametrization):
    q = PatchOrthogonal(4, 2, parametrization, init="identity")
    z = torch.randn(3, 4, 8, 6)
    assert torch.equal(q.matrix(), torch.eye(16))
    assert torch.equal(q(z), z)
    zb = z.to(torch.bfloat16)
    out = q(zb)
    assert out.dtype == torch.bfloat16 and torch.equal(out, zb)
    # the identity still trains: gradients reach the parameter
    (q(z) * torch.randn_like(z)).sum().backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("parametrization", PARAMS)
@pytest.mark.parametrize("init", ["identity", "random"])
def test_stays_orthogonal_under_large_adam_steps(parametrization, init):
    torch.manual_seed(0)
    q = PatchOrthogonal(4, 2, parametrization, init=init, seed=3)
    z = torch.randn(2, 4, 8, 8)
    target = 3.0 * torch.randn(2, 4, 8, 8)
    opt = torch.optim.Adam(q.parameters(), lr=0.5)
    first = None
    for _ in range(200):
        loss = (q(z) - target).pow(2).mean()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(q.weight.detach().abs().max()) > 1.0  # really moved far from the start
    assert float(loss.detach()) < first
    assert orthogonality_error(q.matrix()) < 1e-5


def test_random_init_is_seeded_and_trainable():
    a = PatchOrthogonal(2, 2, init="random", seed=7).matrix()
    b = PatchOrthogonal(2, 2, init="random", seed=7).matrix()
    c = PatchOrthogonal(2, 2, init="random", seed=8).matrix()
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not torch.allclose(a, torch.eye(8), atol=0.1)
    q = PatchOrthogonal(2, 2, init="random", seed=7)
    with torch.no_grad():
        q.weight.normal_()
    assert not torch.allclose(q.matrix(), a, atol=1e-3)


def test_haar_sampler_is_unbiased():
    # Haar on O(3): E[Q_ij] = 0 and E[Q_ij^2] = 1/3 for every entry. Without the QR sign fix
    # the diagonal is biased, which this catches.
    q = haar_orthogonal(3, count=4000, generator=torch.Generator().manual_seed(0)).double()
    mean = q.mean(0)
    second = q.pow(2).mean(0)
    assert mean.abs().max() < 4 * (1 / 3) ** 0.5 / 4000**0.5
    assert (second - 1 / 3).abs().max() < 0.03
    assert orthogonality_error(q) < 1e-6


@pytest.mark.parametrize("parametrization", PARAMS)
def test_batched_transforms_match_a_loop_of_singles(parametrization):
    torch.manual_seed(0)
    n = 3
    batched = PatchOrthogonal(2, 2, parametrization, init="random", num_transforms=n, seed=4)
    with torch.no_grad():
        batched.weight.normal_(0, 0.7)
    z = torch.randn(n, 2, 4, 4)
    target = torch.randn(n, 2, 4, 4)
    out = batched(z)
    assert batched.matrix().shape == (n, 8, 8)
    singles = []
    for i in range(n):
        s = PatchOrthogonal(2, 2, parametrization, init="identity")
        with torch.no_grad():
            s.weight.copy_(batched.weight[i : i + 1])
        s.base = batched.base[i : i + 1].clone()
        singles.append(s)
        torch.testing.assert_close(s.matrix(), batched.matrix()[i], atol=1e-6, rtol=0)
        torch.testing.assert_close(s(z[i : i + 1]), out[i : i + 1], atol=1e-6, rtol=0)
    # one optimiser step moves every Q_i, each by its own sample's gradient
    loss = (out - target).pow(2).sum()
    loss.backward()
    for i, s in enumerate(singles):
        (s(z[i : i + 1]) - target[i : i + 1]).pow(2).sum().backward()
        torch.testing.assert_close(s.weight.grad[0], batched.weight.grad[i], atol=1e-5, rtol=1e-4)
    before = batched.matrix().detach().clone()
    torch.optim.SGD(batched.parameters(), lr=0.01).step()
    moved = (batched.matrix().detach() - before).abs().amax(dim=(1, 2))
    assert bool((moved > 0).all())


def test_bf16_input_and_bf16_module_keep_float32_q():
    torch.manual_seed(0)
    q = PatchOrthogonal(4, 2, init="random", seed=1)
    z = torch.randn(2, 4, 8, 8)
    zb = z.to(torch.bfloat16)
    out = q(zb)
    assert out.dtype == torch.bfloat16
    ref = apply_patch_orthogonal(zb.float(), q.matrix(), 2).to(torch.bfloat16)
    assert torch.equal(out, ref)
    q_b = q.to(torch.bfloat16)  # a whole-model .to(bf16) must not make Q bf16
    m = q_b.matrix()
    assert m.dtype == torch.float32 and orthogonality_error(m) < 1e-6


def test_bad_inputs_raise_clear_errors():
    q = PatchOrthogonal(4, 2)
    with pytest.raises(DiffalignError, match="channels"):
        q(torch.randn(1, 3, 8, 8))
    with pytest.raises(DiffalignError, match="divisible by the patch size 2"):
        q(torch.randn(1, 4, 7, 8))
    with pytest.raises(DiffalignError, match=r"\[B, C, H, W\]"):
        q(torch.randn(4, 8, 8))
    with pytest.raises(DiffalignError, match="batch must be 3"):
        PatchOrthogonal(4, 2, num_transforms=3)(torch.randn(2, 4, 8, 8))
    with pytest.raises(DiffalignError, match="parametrization"):
        PatchOrthogonal(4, 2, parametrization="householder")
    with pytest.raises(DiffalignError, match="init"):
        PatchOrthogonal(4, 2, init="zeros")
    with pytest.raises(DiffalignError, match="channels must be a positive integer"):
        PatchOrthogonal(0, 2)
    with pytest.raises(DiffalignError, match="patch_size must be a positive integer"):
        PatchOrthogonal(4, -1)
    with pytest.raises(DiffalignError, match="divisible"):
        patchify(torch.randn(1, 4, 6, 6), 4)
    with pytest.raises(DiffalignError, match="expected patches"):
        unpatchify(torch.randn(1, 5, 16), 2, 4, 4, 4)
    with pytest.raises(DiffalignError, match="Q must be"):
        apply_patch_orthogonal(torch.randn(1, 4, 4, 4), torch.eye(8), 2)
