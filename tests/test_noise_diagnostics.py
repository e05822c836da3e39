"""Gaussianity diagnostics (spec N): KS, moments, patch statistics vs independent computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image

from diffalign.engine.errors import DiffalignError
from diffalign.noise import (
    PatchOrthogonal,
    gaussianity_report,
    haar_orthogonal,
    write_gaussianity_diagnostics,
)
from diffalign.noise.diagnostics import (
    GaussianStats,
    binned_ks_statistic,
    chi2_cdf,
    kolmogorov_pvalue,
    ks_statistic,
    normal_cdf,
)


def _patches_by_loop(z: torch.Tensor, p: int) -> np.ndarray:
    """Independent patch extraction: slice each p x p block, flatten (c, dy, dx)."""
    a = z.double().numpy()
    b, c, h, w = a.shape
    rows = [
        a[n, :, y : y + p, x : x + p].reshape(-1)
        for n in range(b)
        for y in range(0, h, p)
        for x in range(0, w, p)
    ]
    return np.stack(rows)


@pytest.mark.parametrize("n", [50, 2000, 30000])
def test_ks_statistic_matches_scipy(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen) * 1.05 + 0.02
    d, p = ks_statistic(x)
    ref = scipy.stats.kstest(x.double().numpy(), "norm")
    assert d == pytest.approx(ref.statistic, abs=1e-12)
    assert p == pytest.approx(ref.pvalue, abs=0.02)  # Stephens approximation of the exact law


def test_ks_detects_non_gaussian_and_pvalue_law():
    d, p = ks_statistic(torch.rand(5000) * 2 - 1)
    assert d > 0.1 and p < 1e-10
    for lam in (0.5, 1.0, 1.5):
        n = 100000
        assert kolmogorov_pvalue(lam / n**0.5, n) == pytest.approx(
            scipy.stats.kstwobign.sf(lam), abs=2e-3
        )


def test_binned_ks_is_within_resolution_of_exact():
    x = torch.randn(20000, generator=torch.Generator().manual_seed(1))
    bins = 4096
    u = normal_cdf(x)
    counts = torch.bincount((u * bins).long().clamp(0, bins - 1), minlength=bins)
    exact, _ = ks_statistic(x)
    approx = binned_ks_statistic(counts)
    assert approx <= exact + 1e-12
    assert exact - approx <= 1.0 / bins + 1e-12


def test_chi2_cdf_matches_scipy():
    x = torch.linspace(0.01, 60, 50)
    for dof in (1, 4, 16, 64):
        np.testing.assert_allclose(
            chi2_cdf(x, dof).numpy(), scipy.stats.chi2.cdf(x.numpy(), dof), atol=1e-10
        )


def test_streaming_moments_and_covariance_match_numpy():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(6, 3, 4, 4, generator=gen) ** 3 + 0.5  # skewed, heavy-tailed, shifted
    st = GaussianStats(patch_size=2)
    for chunk in z.split(2):  # streaming over batches equals one pass
        st.update(chunk)
    r = st.report()
    flat = z.double().numpy().reshape(-1)
    assert r["mean"] == pytest.approx(flat.mean(), rel=1e-9)
    assert r["std"] == pytest.approx(flat.std(), rel=1e-9)
    assert r["skewness"] == pytest.approx(scipy.stats.skew(flat), rel=1e-7)
    assert r["excess_kurtosis"] == pytest.approx(scipy.stats.kurtosis(flat), rel=1e-7)
    patches = _patches_by_loop(z, 2)
    cov = np.cov(patches, rowvar=False, bias=True)
    np.testing.assert_allclose(st.covariance().numpy(), cov, atol=1e-9)
    err = cov - np.eye(12)
    assert r["patch_cov_error_fro_over_d"] == pytest.approx(np.linalg.norm(err) / 12, rel=1e-9)
    assert r["patch_cov_error_max_abs"] == pytest.approx(np.abs(err).max(), rel=1e-9)
    norm_sq = (patches**2).sum(1) / 12
    assert r["patch_norm_sq_over_d_mean"] == pytest.approx(norm_sq.mean(), rel=1e-9)
    assert r["patch_norm_sq_over_d_std"] == pytest.approx(norm_sq.std(), rel=1e-6)


def test_fixed_q_output_is_standard_gaussian_independent_check():
    gen = torch.Generator().manual_seed(3)
    q = haar_orthogonal(16, generator=gen)
    z = torch.randn(512, 4, 8, 8, generator=gen)
    mod = PatchOrthogonal(4, 2, init="identity")
    mod.base = q.unsqueeze(0)
    with torch.no_grad():
        z2 = mod(z)
    # independent computation: numpy patches of Q z, empirical covariance vs I
    patches = _patches_by_loop(z2, 2)
    n = patches.shape[0]
    cov = patches.T @ patches / n
    assert np.abs(cov - np.eye(16)).max() < 6 * np.sqrt(2.0 / n)
    assert np.abs(patches.mean(0)).max() < 6 / np.sqrt(n)
    assert scipy.stats.kstest(z2.double().numpy().reshape(-1), "norm").pvalue > 1e-3
    # Q really mixes the patch (it is not near the identity), so this is not trivially z
    assert (z2 - z).abs().mean() > 0.5
    r = gaussianity_report(z, z2, q=q)
    assert r["z2"]["ks_pvalue"] > 1e-3
    scale = r["expected_for_standard_normal"]["patch_cov_error_fro_over_d"]
    assert r["z2"]["patch_cov_error_fro_over_d"] < 2 * scale
    assert r["orthogonality_error"] < 1e-6
    assert r["patch_dim"] == 16 and r["patch_size"] == 2


def test_patch_norms_preserved_exactly_even_for_per_sample_optimised_q():
    torch.manual_seed(0)
    z = torch.randn(8, 2, 4, 4)
    target = torch.ones(1, 2, 4, 4)
    q = PatchOrthogonal(2, 2, "cayley", init="random", num_transforms=8, seed=1)
    opt = torch.optim.Adam(q.parameters(), lr=0.1)
    for _ in range(40):
        loss = (q(z) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        z2 = q(z)
    before = np.linalg.norm(_patches_by_loop(z, 2), axis=1)
    after = np.linalg.norm(_patches_by_loop(z2, 2), axis=1)
    assert np.abs(before - after).max() < 2e-6  # float32 rounding only
    r = gaussianity_report(z, z2)
    assert r["patch_norm_max_abs_diff"] < 2e-6
    assert len(r["per_sample_patch_norm_max_abs_diff"]) == 8
    # ... while the values themselves moved toward the target (not N(0, I) any more)
    assert r["z2"]["mean"] > r["z"]["mean"] + 0.2


def test_write_diagnostics_files_and_json(tmp_path):
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    q = PatchOrthogonal(4, 2, init="random", seed=0)
    with torch.no_grad():
        z2 = q(z)
    r = write_gaussianity_diagnostics(
        tmp_path, "orthogonal_gaussian_init", z, z2, q=q.matrix().detach()
    )
    png = tmp_path / "orthogonal_gaussian_init.png"
    assert Image.open(png).size[0] > 500
    loaded = json.loads((tmp_path / "orthogonal_gaussian_init.json").read_text())
    assert loaded["z2"]["ks_statistic"] == pytest.approx(r["z2"]["ks_statistic"])
    assert loaded["z"]["ks_method"].startswith("exact")
    assert loaded["patch_size"] == 2  # inferred from Q's size
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave nothing behind
    # a single latent [C, H, W] works too
    r1 = gaussianity_report(z[0], z2[0], patch_size=4)
    assert r1["num_latents"] == 1 and r1["patch_dim"] == 64


def test_diagnostics_bad_input():
    with pytest.raises(DiffalignError, match="same shape"):
        gaussianity_report(torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 4))
    with pytest.raises(DiffalignError, match="divisible"):
        gaussianity_report(torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6), patch_size=4)
    with pytest.raises(DiffalignError, match="NaN"):
        z = torch.randn(1, 4, 4, 4)
        z[0, 0, 0, 0] = float("nan")
        gaussianity_report(z, z)
    with pytest.raises(DiffalignError, match="shape"):
        gaussianity_report(torch.randn(16), torch.randn(16))
