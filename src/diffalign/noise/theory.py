"""`diffalign noise theory`: what an orthogonal patch map does to Gaussian noise (spec N).

Three cases, each written as ``<case>.png`` + ``<case>.json``, with ``summary.json`` and
``theory.md`` stating what is exact and what is not:

1. ``fixed_random_q``: one Haar-random ``Q``; ``Q z`` for fresh ``z ~ N(0, I)`` is exactly
   N(0, I) (an isotropic Gaussian is invariant under rotations).
2. ``optimized_shared_q``: one ``Q`` optimised with Adam on a *fixed* batch to move ``Q z``
   toward a target pattern (so ``Q`` depends on data), then applied to *fresh* ``z``. ``Q`` is
   independent of the fresh ``z``, so this is again exactly N(0, I).
3. ``per_sample_optimized_q``: every sample ``z_i`` gets its own ``Q_i`` optimised *after
   seeing* ``z_i`` (toward the same target). Each patch norm is still preserved exactly (so each
   patch's ``||v||^2 ~ chi^2_D`` law is kept), but the collection ``{Q_i z_i}`` is no longer
   i.i.d. N(0, I): its mean, covariance and marginal law move toward the target.

Statistics are streamed batch by batch, so memory does not depend on ``num_samples``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import output_lock, write_json, write_text
from diffalign.engine.progress import progress
from diffalign.noise.diagnostics import GaussianityComparison, write_comparison
from diffalign.noise.orthogonal import (
    PatchOrthogonal,
    apply_patch_orthogonal,
    haar_orthogonal,
    orthogonality_error,
)

CASES = ("fixed_random_q", "optimized_shared_q", "per_sample_optimized_q")


def target_pattern(channels: int, size: int) -> torch.Tensor:
    """A smooth, deterministic ``[1, C, s, s]`` target with unit RMS (what optimisation chases)."""
    y = torch.arange(size, dtype=torch.float64).view(size, 1)
    x = torch.arange(size, dtype=torch.float64).view(1, size)
    chans = []
    for c in range(channels):
        chans.append(torch.cos(2 * math.pi * (x + c * y) / size + c * math.pi / 3) + 0.5)
    t = torch.stack(chans).unsqueeze(0)
    return (t / t.pow(2).mean().sqrt()).float()


def optimize_toward(
    q: PatchOrthogonal, z: torch.Tensor, target: torch.Tensor, steps: int, lr: float
) -> list[float]:
    """Adam on ``mean ||q(z) - target||^2``; returns the loss curve (pure w.r.t. files)."""
    opt = torch.optim.Adam(q.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = (q(z) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _validate(
    channels: int,
    patch_size: int,
    num_samples: int,
    batch_size: int,
    latent_size: int,
    opt_steps: int,
    per_sample_count: int,
    lr: float,
) -> None:
    for name, value in (
        ("channels", channels),
        ("patch size", patch_size),
        ("num samples", num_samples),
        ("batch size", batch_size),
        ("latent size", latent_size),
        ("opt steps", opt_steps),
        ("per-sample count", per_sample_count),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise DiffalignError(f"{name} must be a positive integer, got {value!r}")
    if latent_size % patch_size:
        raise DiffalignError(
            f"patch size {patch_size} does not divide the latent size {latent_size}"
        )
    if not (lr > 0 and math.isfinite(lr)):
        raise DiffalignError(f"learning rate must be positive, got {lr}")


def _stream(
    comp: GaussianityComparison,
    q: torch.Tensor,
    gen: torch.Generator,
    num_samples: int,
    batch_size: int,
    shape: tuple[int, int, int],
    patch_size: int,
    desc: str,
) -> None:
    batches = math.ceil(num_samples / batch_size)
    done = 0
    for _ in progress(range(batches), desc=desc, total=batches):
        b = min(batch_size, num_samples - done)
        z = torch.randn((b, *shape), generator=gen)
        comp.update(z, apply_patch_orthogonal(z, q, patch_size))
        done += b


def _checks(case: str, report: dict[str, Any]) -> dict[str, bool]:
    """Pass/fail of the claims, at generous multiples of the sampling scale."""
    z2 = report["z2"]
    exp = report["expected_for_standard_normal"]
    norms_kept = report["patch_norm_max_rel_diff"] < 1e-5
    gaussian = (
        z2["ks_pvalue"] > 1e-4
        and abs(z2["mean"]) < 6 * exp["mean_std_error"]
        and z2["patch_cov_error_fro_over_d"] < 3 * exp["patch_cov_error_fro_over_d"]
    )
    if case == "per_sample_optimized_q":
        return {"patch_norms_preserved": norms_kept, "not_iid_standard_normal": not gaussian}
    return {"patch_norms_preserved": norms_kept, "standard_normal": gaussian}


def run_noise_theory(
    output_dir: str | os.PathLike,
    channels: int = 4,
    patch_size: int = 2,
    num_samples: int = 65536,
    batch_size: int = 4096,
    latent_size: int | None = None,
    seed: int = 0,
    opt_steps: int = 200,
    per_sample_count: int = 512,
    lr: float = 0.05,
    parametrization: str = "cayley",
) -> dict[str, Any]:
    """Verify the Gaussianity claims over many samples and write plots, JSON and theory.md.

    A sample is one latent ``[channels, latent_size, latent_size]`` (default latent size
    ``4 * patch_size``, i.e. 16 patches). Cases 1-2 stream ``num_samples`` fresh latents;
    case 3 optimises ``min(per_sample_count, num_samples)`` per-sample ``Q_i`` (``opt_steps``
    Adam steps each, batched). Returns the summary (also ``summary.json``).
    """
    latent_size = 4 * patch_size if latent_size is None else latent_size
    _validate(
        channels, patch_size, num_samples, batch_size, latent_size, opt_steps, per_sample_count, lr
    )
    out = Path(output_dir)
    out = Path(output_dir)
    with output_lock(out, "theory output folder"):  # one run per folder
        shape = (channels, latent_size, latent_size)
        dim = channels * patch_size * patch_size
        target = target_pattern(channels, latent_size)
        cases: dict[str, Any] = {}
        timings: dict[str, float] = {}
        common = {"channels": channels, "patch_size": patch_size, "latent_size": latent_size}

        # 1. one fixed Haar-random Q, fresh noise.
        t0 = time.perf_counter()
        q_fixed = haar_orthogonal(dim, generator=torch.Generator().manual_seed(seed))
        comp = GaussianityComparison(patch_size)
        _stream(
            comp,
            q_fixed,
            torch.Generator().manual_seed(seed + 1),
            num_samples,
            batch_size,
            shape,
            patch_size,
            "fixed random Q",
        )
        report = write_comparison(
            out,
            "fixed_random_q",
            comp,
            q=q_fixed,
            title="fixed Haar-random Q applied to fresh z ~ N(0, I)",
            extra={"case": "fixed_random_q", **common},
        )
        cases["fixed_random_q"] = report
        timings["fixed_random_q"] = time.perf_counter() - t0

        # 2. Q optimised on one fixed batch toward the target (data-dependent), fresh noise.
        t0 = time.perf_counter()
        fit_gen = torch.Generator().manual_seed(seed + 2)
        fit_batch = torch.randn((min(batch_size, 256), *shape), generator=fit_gen)
        module = PatchOrthogonal(
            channels, patch_size, parametrization, init="random", seed=seed + 3
        )
        losses = optimize_toward(module, fit_batch, target, opt_steps, lr)
        with torch.no_grad():
            q_opt = module.matrix().detach()
            fit_comp = GaussianityComparison(patch_size)
            fit_comp.update(fit_batch, module(fit_batch))
        fit_report = fit_comp.report(q_opt)
        comp = GaussianityComparison(patch_size)
        _stream(
            comp,
            q_opt,
            torch.Generator().manual_seed(seed + 4),
            num_samples,
            batch_size,
            shape,
            patch_size,
            "optimised shared Q",
        )
        report = write_comparison(
            out,
            "optimized_shared_q",
            comp,
            q=q_opt,
            title="Q optimised on a fixed batch, applied to fresh z ~ N(0, I)",
            extra={
                "case": "optimized_shared_q",
                **common,
                "fit_batch_size": fit_batch.shape[0],
                "opt_steps": opt_steps,
                "loss_first": losses[0],
                "loss_last": losses[-1],
                "on_fitting_batch": {
                    "z2_mean": fit_report["z2"]["mean"],
                    "z2_ks_statistic": fit_report["z2"]["ks_statistic"],
                    "z2_patch_cov_error_fro_over_d": fit_report["z2"]["patch_cov_error_fro_over_d"],
                },
            },
        )
        cases["optimized_shared_q"] = report
        timings["optimized_shared_q"] = time.perf_counter() - t0

        # 3. per-sample Q_i chosen after seeing z_i.
        t0 = time.perf_counter()
        count = min(per_sample_count, num_samples)
        gen = torch.Generator().manual_seed(seed + 5)
        comp = GaussianityComparison(patch_size)
        max_orth = 0.0
        first_losses, last_losses = [], []
        batches = math.ceil(count / batch_size)
        done = 0
        for i in progress(range(batches), desc="per-sample optimised Q", total=batches):
            b = min(batch_size, count - done)
            z = torch.randn((b, *shape), generator=gen)
            per = PatchOrthogonal(
                channels,
                patch_size,
                parametrization,
                init="random",
                num_transforms=b,
                seed=seed + 6 + i,
            )
            curve = optimize_toward(per, z, target, opt_steps, lr)
            first_losses.append(curve[0] * b)
            last_losses.append(curve[-1] * b)
            with torch.no_grad():
                comp.update(z, per(z))
                max_orth = max(max_orth, orthogonality_error(per.matrix()))
            done += b
        report = write_comparison(
            out,
            "per_sample_optimized_q",
            comp,
            title="per-sample Q_i optimised after seeing z_i: norms kept, not i.i.d. N(0, I)",
            extra={
                "case": "per_sample_optimized_q",
                **common,
                "num_transforms": count,
                "opt_steps": opt_steps,
                "orthogonality_error": max_orth,
                "loss_first": sum(first_losses) / count,
                "loss_last": sum(last_losses) / count,
            },
        )
        cases["per_sample_optimized_q"] = report
        timings["per_sample_optimized_q"] = time.perf_counter() - t0

        checks = {name: _checks(name, rep) for name, rep in cases.items()}
        summary = {
            "config": {
                **common,
                "patch_dim": dim,
                "num_samples": num_samples,
                "batch_size": batch_size,
                "seed": seed,
                "opt_steps": opt_steps,
                "per_sample_count": count,
                "lr": lr,
                "parametrization": parametrization,
            },
            "cases": {name: _headline(rep) for name, rep in cases.items()},
            "checks": checks,
            "all_checks_passed": all(all(c.values()) for c in checks.values()),
            "timings": timings,
        }
        write_json(out / "summary.json", summary)
        write_text(out / "theory.md", _theory_markdown(summary))
        return summary


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    z2 = report["z2"]
    keys = (
        "mean",
        "std",
        "skewness",
        "excess_kurtosis",
        "ks_statistic",
        "ks_pvalue",
        "patch_norm_sq_over_d_mean",
        "patch_norm_sq_over_d_std",
        "patch_norm_ks_statistic_vs_chi2",
        "patch_cov_error_fro_over_d",
        "patch_cov_error_max_abs",
    )
    out = {f"qz_{k}": z2[k] for k in keys}
    out.update(
        {
            "z_ks_statistic": report["z"]["ks_statistic"],
            "z_patch_cov_error_fro_over_d": report["z"]["patch_cov_error_fro_over_d"],
            "num_values": z2["num_values"],
            "patch_norm_max_abs_diff": report["patch_norm_max_abs_diff"],
            "patch_norm_max_rel_diff": report["patch_norm_max_rel_diff"],
            "orthogonality_error": report.get("orthogonality_error"),
            "expected_for_standard_normal": report["expected_for_standard_normal"],
        }
    )
    return out


def _theory_markdown(summary: dict[str, Any]) -> str:
    cfg = summary["config"]
    c = summary["cases"]
    rows = []
    for name in CASES:
        h = c[name]
        rows.append(
            f"| `{name}` | {h['num_values']:,} | {h['qz_mean']:+.4f} | {h['qz_std']:.4f} | "
            f"{h['qz_ks_statistic']:.2e} (z: {h['z_ks_statistic']:.2e}) | {h['qz_ks_pvalue']:.3g} | "
            f"{h['qz_patch_cov_error_fro_over_d']:.2e} (z: {h['z_patch_cov_error_fro_over_d']:.2e}) | "
            f"{h['patch_norm_max_abs_diff']:.1e} | {h['orthogonality_error']:.1e} |"
        )
    fixed = c["fixed_random_q"]["expected_for_standard_normal"]
    per = c["per_sample_optimized_q"]
    verdict = "all checks passed" if summary["all_checks_passed"] else "SOME CHECKS FAILED"
    return f"""# Orthogonal patch noise: what is exact and what is not

Latents `[{cfg["channels"]}, {cfg["latent_size"]}, {cfg["latent_size"]}]`, patch size {cfg["patch_size"]}
(patch vectors of length D = {cfg["patch_dim"]}), {cfg["num_samples"]:,} fresh latents for the
fixed-Q cases, {cfg["per_sample_count"]:,} latents with their own optimised Q_i, seed {cfg["seed"]}.
Checks: {verdict} (`summary.json` -> `checks`).

| case | values | mean | std | KS vs N(0,1) | KS p | cov err ‖C−I‖_F/D | max patch-norm diff | ‖QᵀQ−I‖_max |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Sampling scale of N(0, I) itself at this size: KS ≈ {fixed["ks_statistic_typical"]:.1e},
mean ± {fixed["mean_std_error"]:.1e}, covariance error ≈ {fixed["patch_cov_error_fro_over_d"]:.1e}.

## Exact

- **Fixed Q (random or optimised on other data): `Q z ~ N(0, I)` exactly** for fresh
  `z ~ N(0, I)`, because an isotropic Gaussian is invariant under any orthogonal map chosen
  independently of `z`. The measured statistics of `Q z` sit at the sampling scale, like those
  of `z` itself (the only error is float32 rounding, ‖QᵀQ−I‖ ≈ 1e-7).
- **Any orthogonal Q, even one chosen per sample after seeing it, keeps every patch norm**:
  `‖Q v‖ = ‖v‖`, so each patch's `‖v‖²` keeps its χ²_D law (max difference
  {per["patch_norm_max_abs_diff"]:.1e}, float rounding; KS of ‖Q v‖² vs χ²_D:
  {per["qz_patch_norm_ks_statistic_vs_chi2"]:.2e}).

## Not true

- **Per-sample optimised Q_i** (chosen after seeing z_i, here pushed toward a target pattern):
  the collection `{{Q_i z_i}}` is **not** i.i.d. N(0, I). Measured: mean {per["qz_mean"]:+.3f},
  KS {per["qz_ks_statistic"]:.2e} (p = {per["qz_ks_pvalue"]:.2g}), patch covariance error
  {per["qz_patch_cov_error_fro_over_d"]:.2e}, against the sampling scale above. Assigned
  noises from per-sample inversion should therefore not be described as standard Gaussian
  draws; they live on the orthogonal orbit of a Gaussian draw (same patch norms).
"""
