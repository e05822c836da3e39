"""bench/timing.py (the benches' interleaved timing) and bench/textstream.py's output difference
of the speed variants (issue 18), checked on the CPU."""

from __future__ import annotations

import contextlib
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import textstream as bench_textstream  # noqa: E402
import timing  # noqa: E402


def test_interleaved_times_warms_up_shuffles_rounds_and_sets_up_outside_each_call():
    log: list[tuple[str, str]] = []

    def variant(name):
        return lambda: log.append(("call", name))

    @contextlib.contextmanager
    def setup(name):
        log.append(("enter", name))
        yield
        log.append(("exit", name))

    names = ["a", "b", "c", "d"]
    times = timing.interleaved_times(
        {n: variant(n) for n in names}, reps=6, warmup=2, device="cpu", setup=setup
    )
    assert {n: len(t) for n, t in times.items()} == {n: 6 for n in names}
    assert all(t >= 0 for ts in times.values() for t in ts)
    # every call inside its own setup, (warm-up + timed rounds) x variants calls
    triples = [log[i : i + 3] for i in range(0, len(log), 3)]
    assert len(triples) == 8 * 4
    assert all(t == [("enter", n), ("call", n), ("exit", n)] for t in triples for n in [t[0][1]])
    order = [t[1][1] for t in triples]
    assert order[:8] == names * 2  # warm-up in the given order
    rounds = [order[8 + 4 * i : 12 + 4 * i] for i in range(6)]
    assert all(sorted(r) == names for r in rounds) and len({tuple(r) for r in rounds}) > 1


def test_summarize_medians_ratios_and_paired_ratios():
    times = {"base": [1.0, 2.0, 4.0], "x": [1.5, 2.0, 8.0]}
    s = timing.summarize(times, "base")
    assert s["base"] == {
        "median_s": 2.0,
        "ratio": 1.0,
        "paired_ratio": 1.0,
        "min_s": 1.0,
        "reps": 3,
    }
    assert s["x"]["median_s"] == 2.0 and s["x"]["ratio"] == 1.0 and s["x"]["min_s"] == 1.5
    assert s["x"]["paired_ratio"] == pytest.approx(statistics.median([1.5, 1.0, 2.0]))


def test_output_differences_of_speed_variants_against_the_reference_and_fp32():
    from diffalign.textstream import TextStreamResidual

    torch.manual_seed(0)
    tr, side = bench_textstream.build_transformer(4, 2, 32, 16, "cpu", torch.bfloat16)
    d = 64
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 16, side, side, generator=g),
        "encoder_hidden_states": torch.randn(1, 12, tr.config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, tr.config.pooled_projection_dim, generator=g),
        "timestep": torch.full((1,), 500.0),
    }
    inputs = {k: v.to(torch.bfloat16) for k, v in inputs.items()}
    rot = {
        t: torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].float()
        for t in (2, 3)
    }

    def ln(**kw):
        return TextStreamResidual(0, [2, 3], [0.5], mode="ln", rotations=rot, **kw)

    variants = {
        "ref": ln(),
        "ref_model_gemm": ln(rotation_precision="model"),
        "ref_batched": ln(batched_rotation=True),
        "ref_heavier": TextStreamResidual(0, [2, 3], [3.0], mode="ln", rotations=rot),
    }
    before = {k: v.clone() for k, v in tr.state_dict().items()}
    out = bench_textstream.output_differences(
        tr, inputs, variants, "ref", ["ref_model_gemm", "ref_batched", "ref_heavier"]
    )
    # the float32 round trip leaves the timed bf16 model exactly as it was
    after = tr.state_dict()
    assert all(
        after[k].dtype == torch.bfloat16 and torch.equal(after[k], v) for k, v in before.items()
    )

    def output(res, model=tr, feed=inputs):
        with torch.no_grad(), res.attach(model):
            return model(**feed, return_dict=False)[0].double()

    ref = output(variants["ref"])
    unit = 2.0**-8 * ref.abs().max().item()
    for name in ("ref_model_gemm", "ref_heavier"):
        diff = (output(variants[name]) - ref).abs()
        assert out["variants"][name]["max_abs"] == pytest.approx(diff.max().item())
        assert out["variants"][name]["mean_abs"] == pytest.approx(diff.mean().item())
        assert out["variants"][name]["bf16_units"] == pytest.approx(diff.max().item() / unit)
    ref32 = output(variants["ref"], tr.float(), {k: v.float() for k, v in inputs.items()})
    tr.to(torch.bfloat16)
    fp32 = out["fp32_reference"]
    assert (
        fp32["max_abs"] == pytest.approx((ref32 - ref).abs().max().item()) and fp32["max_abs"] > 0
    )
    assert out["reference_repeat_max_abs"] == 0.0
    v = out["variants"]
    # the bf16 rotation GEMM moves the output, by less than running the model in bf16 does
    assert 0 < v["ref_model_gemm"]["max_abs"] and v["ref_model_gemm"]["within_bf16_rounding"]
    assert v["ref_batched"]["within_bf16_rounding"]
    # a different residual weight is no rounding difference
    assert v["ref_heavier"]["bf16_units"] > max(1.0, fp32["bf16_units"])
    assert v["ref_heavier"]["within_bf16_rounding"] is False
    assert "2**-8" in out["metric"] and out["reference"] == "ref"
