"""`diffalign noise theory` (spec N): small end-to-end run and bad-input paths."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.cli import main
from diffalign.noise.theory import target_pattern


def test_theory_cli_writes_files_and_a_good_summary(tmp_path, capsys):
    out = tmp_path / "theory"
    rc = main(
        [
            "noise", "theory", "--output_dir", str(out), "--channels", "2", "--patch_size", "2",
            "--num-samples", "2048", "--batch-size", "512", "--per-sample-count", "64",
            "--opt-steps", "40", "--seed", "1",
        ]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "all checks passed" in printed
    for case in ("fixed_random_q", "optimized_shared_q", "per_sample_optimized_q"):
        assert (out / f"{case}.png").stat().st_size > 10_000
        report = json.loads((out / f"{case}.json").read_text())
        assert report["case"] == case and report["patch_dim"] == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["all_checks_passed"] is True
    assert summary["config"]["latent_size"] == 8 and summary["config"]["per_sample_count"] == 64
    fixed = summary["cases"]["fixed_random_q"]
    assert fixed["num_values"] == 2048 * 2 * 8 * 8
    assert fixed["qz_ks_pvalue"] > 1e-3 and fixed["orthogonality_error"] < 1e-6
    per = summary["cases"]["per_sample_optimized_q"]
    assert per["patch_norm_max_rel_diff"] < 1e-5  # norms kept exactly (float rounding only)
    assert per["qz_ks_statistic"] > 10 * fixed["qz_ks_statistic"]  # ... but not N(0, I)
    assert per["qz_ks_pvalue"] < 1e-6
    assert set(summary["timings"]) == {
        "fixed_random_q", "optimized_shared_q", "per_sample_optimized_q",
    }  # fmt: skip
    text = (out / "theory.md").read_text()
    assert "exactly" in text and "not" in text and "| `per_sample_optimized_q` |" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--patch-size", "3"], "does not divide the latent size"),
        (["--patch-size", "0"], "--patch-size/--patch_size: '0' must be >= 1"),
        (["--num-samples", "0"], "'0' must be >= 1"),
        (["--batch-size", "-4"], "'-4' must be >= 1"),
        (["--latent-size", "6", "--patch-size", "4"], "does not divide"),
        (["--lr", "0"], "--lr: '0' must be > 0"),
    ],
)
def test_theory_bad_input_is_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "t"
    try:
        rc = main(["noise", "theory", "--output-dir", str(out), "--latent-size", "8", *args])
    except SystemExit as e:  # option types reject bad numbers while parsing
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffalign") and ": error: " in err and message in err
    assert len(err.splitlines()) == 1
    assert not out.exists()  # nothing half-written


def test_target_pattern_is_deterministic_unit_rms():
    t = target_pattern(3, 8)
    assert t.shape == (1, 3, 8, 8)
    assert torch.equal(t, target_pattern(3, 8))
    assert float(t.pow(2).mean()) == pytest.approx(1.0, rel=1e-6)
