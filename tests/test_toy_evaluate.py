"""Held-out evaluation: the Frechet distance against hand cases and an independent reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffalign.engine.errors import DiffalignError
from diffalign.noise.toy.evaluate import (
    EvalSettings,
    evaluate_generator,
    format_table,
    frechet_distance,
    gaussian_stats,
)


def test_fd_known_cases():
    mu1, mu2 = np.array([0.0, 0.0]), np.array([3.0, 4.0])
    eye = np.eye(2)
    assert frechet_distance(mu1, eye, mu1, eye) == pytest.approx(0.0, abs=1e-12)
    assert frechet_distance(mu1, eye, mu2, eye) == pytest.approx(25.0)
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2
    a, b = np.diag([4.0, 9.0]), np.diag([1.0, 16.0])
    assert frechet_distance(mu1, a, mu1, b) == pytest.approx((2 - 1) ** 2 + (3 - 4) ** 2)
    # one-dimensional: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(
        np.array([1.0]), np.array([[4.0]]), np.array([2.0]), np.array([[1.0]])
    ) == pytest.approx(1.0 + 1.0)
    # a singular covariance is fine: N(0, diag(1, 0)) vs N(0, I) -> (1 - 0)^2 from the 2nd axis
    assert frechet_distance(mu1, np.diag([1.0, 0.0]), mu1, eye) == pytest.approx(1.0)


def test_fd_against_scipy_sqrtm_reference():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(0)
    for _ in range(3):
        a = rng.normal(size=(6, 6))
        b = rng.normal(size=(6, 6))
        s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
        m1, m2 = rng.normal(size=6), rng.normal(size=6)
        covmean = sqrtm(s1 @ s2).real
        ref = float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
        assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-6)
        # symmetric in its two arguments
        assert frechet_distance(m2, s2, m1, s1) == pytest.approx(ref, rel=1e-6)


def test_fd_errors_and_stats():
    with pytest.raises(DiffalignError, match="shapes differ"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(DiffalignError, match="at least 2"):
        gaussian_stats(np.zeros((1, 3)))
    x = np.random.default_rng(1).normal(size=(4000, 3)) * [1.0, 2.0, 3.0] + [1.0, 0.0, -1.0]
    mu, sig = gaussian_stats(x)
    assert np.allclose(mu, [1, 0, -1], atol=0.1) and np.allclose(np.diag(sig), [1, 4, 9], rtol=0.1)


def test_evaluate_generator_same_inputs_same_numbers():
    from diffalign.noise.toy.data import load_dataset
    from diffalign.noise.toy.models import ToyModelConfig, build_model

    torch.manual_seed(0)
    g = build_model(ToyModelConfig.for_dataset("generator", "digits"))
    c = build_model(ToyModelConfig.for_dataset("classifier", "digits"))
    test = load_dataset("digits", "test")
    s = EvalSettings(num_samples=50, recon_items=8, assign_steps=3)
    a = evaluate_generator(g, c, test, s)
    b = evaluate_generator(g, c, test, s)
    assert a == b
    assert a["recon_mse_after"] <= a["recon_mse_before"]
    assert 0.0 <= a["accuracy"] <= 1.0 and a["fd"] >= 0
    table = format_table({"base": a})
    assert "recon MSE" in table and table.splitlines()[-1].startswith("base")


def test_cli_evaluate_two_runs(tmp_path, capsys):
    from diffalign.cli import main
    from diffalign.noise.toy.models import ToyModelConfig, build_model, save_model

    for i in (0, 1):
        torch.manual_seed(i)
        save_model(
            build_model(ToyModelConfig.for_dataset("generator", "digits")), tmp_path / f"g{i}"
        )
    rc = main(
        [
            "noise", "toy", "evaluate", "--generator-ckpt", str(tmp_path / "g0"),
            str(tmp_path / "g1"), "--names", "a", "b", "--output-dir", str(tmp_path / "ev"),
            "--classifier-steps", "5", "--num-samples", "40", "--recon-items", "5",
            "--assign-steps", "2",
        ]
    )  # fmt: skip
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("a ") and lines[-1].startswith("b ")
    assert (tmp_path / "ev" / "summary.json").is_file()
    rc = main(
        [
            "noise", "toy", "evaluate", "--generator-ckpt", str(tmp_path / "g0"), "--names",
            "a", "b", "--output-dir", str(tmp_path / "ev2"),
        ]
    )  # fmt: skip
    assert rc == 2 and "--names has 2 entries" in capsys.readouterr().err
