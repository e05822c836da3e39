"""Gaussianity diagnostics for orthogonally transformed noise (spec N: Noise diagnostics).

Compares a noise tensor ``z`` with its transform ``z2 = Q z``: moments, a Kolmogorov-Smirnov
statistic of the flattened values against N(0, 1), patch-norm statistics (an orthogonal map
keeps every patch norm, so ``||patch||^2 ~ chi^2_D`` is kept exactly), and the error of the
patch covariance against the identity. Writes ``<name>.png`` + ``<name>.json``.

The statistics are streaming (:class:`GaussianStats`): memory does not grow with the number of
samples, so ``diffalign noise theory`` can run over millions of values. The in-memory report
uses the exact KS statistic from the sorted sample (:func:`ks_statistic`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import atomic_path, write_json
from diffalign.noise.orthogonal import orthogonality_error, patchify

# Resolution of the binned KS statistic: values are mapped through the reference CDF and
# counted in this many equal bins of [0, 1]; the binned statistic is within 1 / bins of the
# exact one (far below the 1 / sqrt(n) sampling scale for any n we run).
KS_BINS = 1 << 18
VALUE_RANGE = 6.0
VALUE_BINS = 240


# ---------------------------------------------------------------- pure statistics


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF, evaluated in float64."""
    return torch.special.ndtr(x.to(torch.float64))


def chi2_cdf(x: torch.Tensor, dof: int) -> torch.Tensor:
    """CDF of the chi-square distribution with ``dof`` degrees of freedom (float64)."""
    x = x.to(torch.float64).clamp_min(0.0)
    return torch.special.gammainc(torch.full_like(x, dof / 2.0), x / 2.0)


def kolmogorov_pvalue(d: float, n: int) -> float:
    """Two-sided KS p-value: Kolmogorov's limit law with Stephens' small-sample correction."""
    if n <= 0:
        return math.nan
    sqrt_n = math.sqrt(n)
    lam = (sqrt_n + 0.12 + 0.11 / sqrt_n) * d
    if lam < 1e-3:
        return 1.0
    total = 0.0
    for k in range(1, 101):
        term = 2.0 * (-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam)
        total += term
        if abs(term) < 1e-16:
            break
    return float(min(1.0, max(0.0, total)))


def ks_statistic(x: torch.Tensor, cdf=normal_cdf) -> tuple[float, float]:
    """Exact one-sample two-sided KS statistic ``sup |F_n - F|`` and its p-value.

    From the sorted sample: ``D = max_i max(i/n - F(x_(i)), F(x_(i)) - (i-1)/n)``.
    """
    flat = x.detach().reshape(-1).to(torch.float64)
    n = flat.numel()
    if n == 0:
        raise DiffalignError("cannot compute a KS statistic of an empty tensor")
    f = cdf(torch.sort(flat).values)
    i = torch.arange(1, n + 1, dtype=torch.float64, device=f.device)
    d = max(float((i / n - f).max()), float((f - (i - 1) / n).max()))
    return d, kolmogorov_pvalue(d, n)


def binned_ks_statistic(counts: torch.Tensor) -> float:
    """KS statistic from counts of ``F(x)`` in equal bins of [0, 1] (within 1/bins of exact)."""
    counts = counts.to(torch.float64)
    n = float(counts.sum())
    if n == 0:
        return math.nan
    bins = counts.numel()
    empirical = torch.cumsum(counts, 0) / n  # F_n at the upper bin edges
    edges = torch.arange(1, bins + 1, dtype=torch.float64, device=counts.device) / bins
    return float((empirical - edges).abs().max())


def patch_covariance(patches: torch.Tensor) -> torch.Tensor:
    """Population covariance ``[D, D]`` of patch vectors ``[..., D]`` (float64)."""
    v = patches.reshape(-1, patches.shape[-1]).to(torch.float64)
    centred = v - v.mean(0, keepdim=True)
    return centred.T @ centred / v.shape[0]


def _chi2_scaled_pdf(x: torch.Tensor, dof: int) -> torch.Tensor:
    """Density of ``chi^2_dof / dof`` at ``x``."""
    y = (x * dof).clamp_min(1e-300)
    log_pdf = (dof / 2 - 1) * torch.log(y) - y / 2 - (dof / 2) * math.log(2) - math.lgamma(dof / 2)
    return dof * torch.exp(log_pdf)


# ---------------------------------------------------------------- streaming accumulator


class GaussianStats:
    """Streaming statistics of one noise tensor stream, compared against N(0, I).

    ``update(z)`` takes ``[B, C, H, W]`` latents; memory is O(D^2 + KS_BINS) regardless of how
    many latents are seen. Moments use sums shifted by the first batch's mean (numerically
    stable central moments); the KS statistic is binned (see ``KS_BINS``).
    """

    def __init__(self, patch_size: int, ks_bins: int = KS_BINS) -> None:
        self.patch_size = patch_size
        self.ks_bins = ks_bins
        self.n = 0
        self.num_patches = 0
        self.dim: int | None = None
        self.shift: float | None = None
        self.power_sums = torch.zeros(4, dtype=torch.float64)
        self.min = math.inf
        self.max = -math.inf
        self.value_counts = torch.zeros(ks_bins, dtype=torch.float64)
        self.value_hist = torch.zeros(VALUE_BINS, dtype=torch.float64)
        self.norm_counts = torch.zeros(ks_bins, dtype=torch.float64)
        self.norm_sum = 0.0
        self.norm_sq_sum = 0.0
        self.norm_hist: torch.Tensor | None = None
        self.norm_range = 0.0
        self.patch_sum: torch.Tensor | None = None
        self.patch_outer: torch.Tensor | None = None

    def _bin(self, u: torch.Tensor) -> torch.Tensor:
        idx = (u * self.ks_bins).long().clamp_(0, self.ks_bins - 1)
        return torch.bincount(idx, minlength=self.ks_bins).to(torch.float64)

    def update(self, z: torch.Tensor) -> None:
        z = z.detach()
        patches = (
            patchify(z, self.patch_size)
            .to(torch.float64)
            .reshape(-1, z.shape[1] * self.patch_size**2)
        )
        patches = patches.cpu()
        d = patches.shape[1]
        if self.dim is None:
            self.dim = d
            self.patch_sum = torch.zeros(d, dtype=torch.float64)
            self.patch_outer = torch.zeros(d, d, dtype=torch.float64)
            self.norm_range = max(4.0, 1.0 + 10.0 * math.sqrt(2.0 / d))
            self.norm_hist = torch.zeros(VALUE_BINS, dtype=torch.float64)
        elif d != self.dim:
            raise DiffalignError(f"patch dimension changed from {self.dim} to {d} between batches")
        flat = patches.reshape(-1)
        if not torch.isfinite(flat).all():
            raise DiffalignError("noise contains NaN or infinite values")
        if self.shift is None:
            self.shift = float(flat.mean())
        c = flat - self.shift
        c2 = c * c
        self.power_sums += torch.stack([c.sum(), c2.sum(), (c2 * c).sum(), (c2 * c2).sum()])
        self.n += flat.numel()
        self.min = min(self.min, float(flat.min()))
        self.max = max(self.max, float(flat.max()))
        self.value_counts += self._bin(normal_cdf(flat))
        self.value_hist += torch.histc(flat, VALUE_BINS, -VALUE_RANGE, VALUE_RANGE)
        norm_sq = (patches * patches).sum(1)
        self.norm_counts += self._bin(chi2_cdf(norm_sq, d))
        scaled = norm_sq / d
        self.norm_sum += float(scaled.sum())
        self.norm_sq_sum += float((scaled * scaled).sum())
        self.norm_hist += torch.histc(scaled, VALUE_BINS, 0.0, self.norm_range)
        self.num_patches += patches.shape[0]
        self.patch_sum += patches.sum(0)
        self.patch_outer += patches.T @ patches

    def covariance(self) -> torch.Tensor:
        mean = self.patch_sum / self.num_patches
        return self.patch_outer / self.num_patches - torch.outer(mean, mean)

    def report(self) -> dict[str, Any]:
        """JSON-able statistics (floats only)."""
        if self.n == 0:
            raise DiffalignError("no samples were accumulated")
        s1, s2, s3, s4 = (float(v) / self.n for v in self.power_sums)
        mean = self.shift + s1
        m2 = s2 - s1**2
        m3 = s3 - 3 * s1 * s2 + 2 * s1**3
        m4 = s4 - 4 * s1 * s3 + 6 * s1**2 * s2 - 3 * s1**4
        ks = binned_ks_statistic(self.value_counts)
        d = self.dim
        cov_err = self.covariance() - torch.eye(d, dtype=torch.float64)
        norm_mean = self.norm_sum / self.num_patches
        norm_var = max(self.norm_sq_sum / self.num_patches - norm_mean**2, 0.0)
        norm_ks = binned_ks_statistic(self.norm_counts)
        return {
            "num_values": self.n,
            "mean": mean,
            "std": math.sqrt(max(m2, 0.0)),
            "skewness": m3 / m2**1.5 if m2 > 0 else math.nan,
            "excess_kurtosis": m4 / m2**2 - 3.0 if m2 > 0 else math.nan,
            "min": self.min,
            "max": self.max,
            "ks_statistic": ks,
            "ks_pvalue": kolmogorov_pvalue(ks, self.n),
            "ks_method": f"binned ({self.ks_bins} bins of the normal CDF; within {1 / self.ks_bins:.1e} of exact)",
            "num_patches": self.num_patches,
            "patch_norm_sq_over_d_mean": norm_mean,
            "patch_norm_sq_over_d_std": math.sqrt(norm_var),
            "patch_norm_ks_statistic_vs_chi2": norm_ks,
            "patch_norm_ks_pvalue_vs_chi2": kolmogorov_pvalue(norm_ks, self.num_patches),
            "patch_cov_error_fro_over_d": float(torch.linalg.norm(cov_err)) / d,
            "patch_cov_error_max_abs": float(cov_err.abs().max()),
        }


def expected_sampling_scale(num_values: int, num_patches: int, dim: int) -> dict[str, float]:
    """What N(0, I) itself gives at this sample size (the yardstick for every statistic)."""
    return {
        "mean_std_error": 1.0 / math.sqrt(num_values),
        "ks_statistic_typical": 0.87 / math.sqrt(num_values),  # median of sqrt(n) D is ~0.83-0.87
        "patch_norm_sq_over_d_std": math.sqrt(2.0 / dim),
        "patch_cov_error_fro_over_d": math.sqrt(dim * dim + dim) / math.sqrt(num_patches) / dim,
    }


class GaussianityComparison:
    """Streaming comparison of ``z`` and ``z2 = Q z``: two :class:`GaussianStats` plus the
    per-sample patch-norm differences (zero for any orthogonal map, up to float rounding)."""

    def __init__(self, patch_size: int, ks_bins: int = KS_BINS) -> None:
        self.patch_size = patch_size
        self.z = GaussianStats(patch_size, ks_bins)
        self.z2 = GaussianStats(patch_size, ks_bins)
        self.norm_diff_max = 0.0
        self.norm_rel_diff_max = 0.0
        self.per_sample_norm_diff: list[float] = []
        self.num_latents = 0

    def update(self, z: torch.Tensor, z2: torch.Tensor) -> None:
        z, z2 = _as_batch(z), _as_batch(z2)
        if z.shape != z2.shape:
            raise DiffalignError(
                f"z and z2 must have the same shape, got {tuple(z.shape)} and {tuple(z2.shape)}"
            )
        self.z.update(z)
        self.z2.update(z2)
        n1 = patchify(z.detach().double(), self.patch_size).norm(dim=-1)
        n2 = patchify(z2.detach().double(), self.patch_size).norm(dim=-1)
        diff = (n1 - n2).abs()  # [B, L]
        per_sample = diff.amax(dim=1).cpu()
        self.norm_diff_max = max(self.norm_diff_max, float(per_sample.max()))
        rel = diff / n1.clamp_min(1e-12)
        self.norm_rel_diff_max = max(self.norm_rel_diff_max, float(rel.max()))
        if len(self.per_sample_norm_diff) < 64:
            self.per_sample_norm_diff.extend(
                per_sample.tolist()[: 64 - len(self.per_sample_norm_diff)]
            )
        self.num_latents += z.shape[0]

    def report(self, q: torch.Tensor | None = None) -> dict[str, Any]:
        rz, rz2 = self.z.report(), self.z2.report()
        out: dict[str, Any] = {
            "patch_size": self.patch_size,
            "patch_dim": self.z.dim,
            "num_latents": self.num_latents,
            "z": rz,
            "z2": rz2,
            "patch_norm_max_abs_diff": self.norm_diff_max,
            "patch_norm_max_rel_diff": self.norm_rel_diff_max,
            "per_sample_patch_norm_max_abs_diff": self.per_sample_norm_diff,
            "expected_for_standard_normal": expected_sampling_scale(
                rz["num_values"], rz["num_patches"], self.z.dim
            ),
        }
        if q is not None:
            out["orthogonality_error"] = orthogonality_error(q)
            out["q_shape"] = list(q.shape)
        return out


def _as_batch(z: torch.Tensor) -> torch.Tensor:
    if z.ndim == 3:
        return z.unsqueeze(0)
    if z.ndim != 4:
        raise DiffalignError(
            f"expected noise of shape [B, C, H, W] or [C, H, W], got {tuple(z.shape)}"
        )
    return z


def _infer_patch_size(z: torch.Tensor, q: torch.Tensor | None, patch_size: int | None) -> int:
    if patch_size is not None:
        return patch_size
    if q is not None:
        p = math.isqrt(q.shape[-1] // z.shape[1])
        if z.shape[1] * p * p == q.shape[-1]:
            return p
        raise DiffalignError(
            f"Q of size {q.shape[-1]} does not fit {z.shape[1]} channels with a square patch"
        )
    return 2


# ---------------------------------------------------------------- public report + files


def _comparison(z, z2, q, patch_size) -> GaussianityComparison:
    z, z2 = _as_batch(z), _as_batch(z2)
    comp = GaussianityComparison(_infer_patch_size(z, q, patch_size))
    comp.update(z, z2)
    return comp


def _exact_ks_into(report: dict[str, Any], z: torch.Tensor, z2: torch.Tensor) -> None:
    for key, t in (("z", z), ("z2", z2)):
        d, p = ks_statistic(t)
        report[key]["ks_statistic"] = d
        report[key]["ks_pvalue"] = p
        report[key]["ks_method"] = "exact (sorted sample)"


def gaussianity_report(
    z: torch.Tensor,
    z2: torch.Tensor,
    q: torch.Tensor | None = None,
    patch_size: int | None = None,
) -> dict[str, Any]:
    """Compare noise ``z`` with ``z2 = Q z`` against N(0, I) (spec N: Noise diagnostics).

    ``z``/``z2``: ``[B, C, H, W]`` or ``[C, H, W]``. ``patch_size`` defaults to the one implied by
    ``q`` (``D = C p^2``) or 2. Returns a JSON-able dict: per tensor ``mean``, ``std``,
    ``skewness``, ``excess_kurtosis``, exact ``ks_statistic``/``ks_pvalue`` vs N(0, 1), patch
    norm and patch covariance statistics; ``patch_norm_max_abs_diff`` between z and z2; and
    ``orthogonality_error`` of ``q`` when given.
    """
    comp = _comparison(z, z2, q, patch_size)
    report = comp.report(q)
    _exact_ks_into(report, z, z2)
    return report


def plot_gaussianity(
    path: str | os.PathLike,
    comparison: GaussianityComparison,
    title: str = "",
    labels: tuple[str, str] = ("z", "Q z"),
) -> None:
    """PNG: value histograms vs N(0,1), QQ plot, patch-norm histograms vs chi^2, covariance
    error heatmaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = (comparison.z, comparison.z2)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), dpi=90)
    edges = torch.linspace(-VALUE_RANGE, VALUE_RANGE, VALUE_BINS + 1, dtype=torch.float64)
    centres = 0.5 * (edges[1:] + edges[:-1])
    width = float(edges[1] - edges[0])
    density = torch.exp(-0.5 * centres**2) / math.sqrt(2 * math.pi)
    for ax, st, label in zip(axes[0, :2], stats, labels):
        hist = st.value_hist / (st.n * width)
        ax.bar(centres.numpy(), hist.numpy(), width=width, alpha=0.6, label=f"{label} values")
        ax.plot(centres.numpy(), density.numpy(), "k-", lw=1.5, label="N(0, 1)")
        r = st.report()
        ax.set_title(
            f"{label}: mean {r['mean']:+.3f} std {r['std']:.3f} KS {r['ks_statistic']:.2e}",
            fontsize=9,
        )
        ax.set_xlim(-5, 5)
        ax.legend(fontsize=8)
    ax = axes[0, 2]
    probs = torch.linspace(0.0005, 0.9995, 400, dtype=torch.float64)
    theo = torch.special.ndtri(probs)
    for st, label in zip(stats, labels):
        cum = torch.cumsum(st.value_counts, 0) / st.n
        idx = torch.searchsorted(cum, probs).clamp(max=st.ks_bins - 1)
        u = ((idx.to(torch.float64) + 0.5) / st.ks_bins).clamp(1e-12, 1 - 1e-12)
        ax.plot(theo.numpy(), torch.special.ndtri(u).numpy(), ".", ms=2.5, label=label)
    ax.plot([-3.5, 3.5], [-3.5, 3.5], "k--", lw=1, label="y = x")
    ax.set_title("QQ plot vs N(0, 1)", fontsize=9)
    ax.set_xlabel("normal quantile")
    ax.set_ylabel("empirical quantile")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    d = comparison.z.dim
    rng = comparison.z.norm_range
    n_edges = torch.linspace(0, rng, VALUE_BINS + 1, dtype=torch.float64)
    n_centres = 0.5 * (n_edges[1:] + n_edges[:-1])
    n_width = float(n_edges[1] - n_edges[0])
    for st, label, style in zip(stats, labels, ("-", ":")):
        ax.step(
            n_centres.numpy(),
            (st.norm_hist / (st.num_patches * n_width)).numpy(),
            style,
            where="mid",
            label=label,
        )
    ax.plot(
        n_centres.numpy(),
        _chi2_scaled_pdf(n_centres, d).numpy(),
        "k--",
        lw=1,
        label=f"chi2_{d}/{d}",
    )
    ax.set_title(
        f"||patch||^2 / D (D={d}); max |norm diff| {comparison.norm_diff_max:.1e}", fontsize=9
    )
    ax.legend(fontsize=8)
    for ax, st, label in zip(axes[1, 1:], stats, labels):
        err = (st.covariance() - torch.eye(d, dtype=torch.float64)).numpy()
        lim = max(float(abs(err).max()), 1e-6)
        im = ax.imshow(err, cmap="coolwarm", vmin=-lim, vmax=lim)
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(f"{label}: patch covariance - I (max {lim:.2e})", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_comparison(
    out_dir: str | os.PathLike,
    name: str,
    comparison: GaussianityComparison,
    q: torch.Tensor | None = None,
    title: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``<name>.png`` and ``<name>.json`` from a (streamed) comparison; return the report."""
    report = comparison.report(q)
    if extra:
        report.update(extra)
    out_dir = Path(out_dir)
    plot_gaussianity(out_dir / f"{name}.png", comparison, title=title or name)
    write_json(out_dir / f"{name}.json", report)
    return report


def write_gaussianity_diagnostics(
    out_dir: str | os.PathLike,
    name: str,
    z: torch.Tensor,
    z2: torch.Tensor,
    q: torch.Tensor | None = None,
    patch_size: int | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Write ``<name>.png`` + ``<name>.json`` comparing ``z`` and ``z2 = Q z`` (e.g. ``name=
    "orthogonal_gaussian_init"`` / ``"orthogonal_gaussian_final"``); return the report."""
    comp = _comparison(z, z2, q, patch_size)
    report = comp.report(q)
    _exact_ks_into(report, z, z2)
    out_dir = Path(out_dir)
    plot_gaussianity(out_dir / f"{name}.png", comp, title=title or name)
    write_json(out_dir / f"{name}.json", report)
    return report
