"""bench/rows.py: the GPU rows' JSON (issue 18), FLOP counting and MFU, checked on the CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import rows  # noqa: E402

KEYS = {"row", "device", "date", "versions", "command", "repeats", "metric", "value", "goal", "met"}


def test_count_flops_matches_the_matmul_count_forward_and_backward():
    lin = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16, requires_grad=True)
    fwd = 2 * 4 * 16 * 8
    assert rows.count_flops(lambda: lin(x)) == fwd
    # backward: grad of the input and of the weight, one matmul of the same size each
    assert rows.count_flops(lambda: lin(x).sum().backward()) == 3 * fwd


def test_mfu_uses_the_cards_dense_bf16_peak():
    assert rows.peak_bf16_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert rows.peak_bf16_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert rows.peak_bf16_flops("cpu") is None
    assert rows.mfu(989.4e12 * 0.5, 1.0, "NVIDIA H100 80GB HBM3") == pytest.approx(50.0)
    assert rows.mfu(1e12, 1.0, "cpu") is None


def test_make_row_has_the_required_keys_and_computes_met():
    r = rows.make_row(
        "repa_step", device="NVIDIA H200", value=41.0, repeats=[1, 2], command="c", version_info={}
    )
    assert KEYS <= set(r) and r["met"] is True and r["goal"] == {"op": ">=", "value": 40.0}
    r = rows.make_row(
        "noise_b1_step", device="x", value=4.8, repeats=[0.46], command="c", version_info={}
    )
    assert r["met"] is False
    with pytest.raises(ValueError, match="unknown row"):
        rows.make_row("nope", device="x", value=1.0, repeats=[], command="c", version_info={})
    with pytest.raises(ValueError, match="finite"):
        rows.make_row("fill_step", device="x", value=float("nan"), repeats=[], command="c")


def _textstream_bench(all_within: bool | None) -> dict:
    """bench/textstream.py's JSON shape: the reference, its speed variants, their output diff."""

    def timing(overhead: float) -> dict:
        return {"overhead_pct": overhead, "times_s": [1 + overhead / 100] * 3}

    ref = "ln_rot_22_targets"
    res = {
        "machine": {"device": "cuda", "cuda": "NVIDIA H200"},
        "forward": {
            "shape": {"model": "sd3", "dtype": "bfloat16"},
            "variants": {
                "vanilla": timing(0.0),
                "plain_1_target": timing(0.2),
                ref: timing(6.5),
                f"{ref}_batched": timing(3.0),
                f"{ref}_all": timing(0.8),
            },
        },
    }
    if all_within is not None:
        units = 0.4 if all_within else 9.0
        res["forward"]["output_diff"] = {
            "metric": "max |variant - reference| ...",
            "reference": ref,
            "fp32_reference": {"max_abs": 0.05, "bf16_units": 2.5},
            "variants": {
                f"{ref}_all": {
                    "max_abs": units * 0.02,
                    "bf16_units": units,
                    "within_bf16_rounding": all_within,
                }
            },
        }
    return res


def test_textstream_row_reports_every_speed_option_when_its_output_is_within_bf16_rounding():
    row = rows.row_textstream(_textstream_bench(True), "c", version_info={})
    d = row["details"]
    assert row["value"] == pytest.approx(0.8) and row["met"] is True
    assert row["repeats"] == [1.008] * 3
    assert d["variant"] == "ln_rot_22_targets_all" and "ln_rot_22_targets_all" in row["metric"]
    assert d["reference_variant"] == "ln_rot_22_targets"
    assert d["reference_overhead_pct"] == pytest.approx(6.5)
    assert d["output_diff"]["bf16_units"] == pytest.approx(0.4)
    assert d["fp32_reference"]["bf16_units"] == pytest.approx(2.5)


@pytest.mark.parametrize("all_within", [False, None])
def test_textstream_row_falls_back_to_the_reference_arithmetic(all_within):
    # the fast variant's output too far from the reference's, or no difference measured
    res = _textstream_bench(all_within)
    row = rows.row_textstream(res, "c", version_info={})
    assert row["details"]["variant"] == "ln_rot_22_targets"
    assert row["metric"].endswith("variant ln_rot_22_targets")
    assert row["value"] == pytest.approx(6.5) and row["met"] is False
    assert (row["details"]["output_diff"] is None) == (all_within is None)
    # no reference variant at all (e.g. only the plain residual measured): no row
    del res["forward"]["variants"]["ln_rot_22_targets"]
    assert rows.row_textstream(res, "c", version_info={}) is None


def test_rows_from_bench_outputs_one_file_per_measured_row(tmp_path):
    src = tmp_path / "gpu-out"
    src.mkdir()
    (src / "noise_realsize.json").write_text(
        json.dumps(
            {
                "device": "NVIDIA H200",
                "runs": [
                    {
                        "batch": 1,
                        "ours_s_per_step": 0.46,
                        "kernel_s_per_step": 0.095,
                        "ours_times": [0.45, 0.46, 0.47],
                    },
                    {"batch": 4, "ours_s_per_step": 0.6, "kernel_s_per_step": 0.3},
                ],
            }
        )
    )
    (src / "repa_train.json").write_text(
        json.dumps(
            {
                "train": {
                    "device": "cuda",
                    "device_name": "NVIDIA H200",
                    "seconds_per_step": {"lora": 1.0, "lora+align": 1.05},
                    "flops_per_step": {"lora": 3.0e14, "lora+align": 3.1e14},
                    "times": {"lora+align": [1.04, 1.05, 1.06]},
                }
            }
        )
    )
    # a CPU run of the fill bench has no peak: no row, no file
    (src / "fill_train.json").write_text(
        json.dumps(
            {
                "train": {
                    "device_name": "cpu",
                    "median_s": {"lora+semantic": 0.2},
                    "flops_per_step": {"lora+semantic": 7e9},
                }
            }
        )
    )
    (src / "textstream.json").write_text("{not json")
    got = {r["row"]: r for r in rows.rows_from_bench(src, version_info={})}
    assert set(got) == {"noise_b1_step", "repa_step"}
    assert got["noise_b1_step"]["value"] == pytest.approx(0.46 / 0.095, rel=1e-3)
    assert got["noise_b1_step"]["repeats"] == [0.45, 0.46, 0.47]
    assert got["repa_step"]["value"] == pytest.approx(100 * 3.1e14 / 1.05 / 989.4e12, rel=1e-3)
    out = tmp_path / "results"
    assert rows.main(["--from", str(src), "--results", str(out)]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["noise_b1_step.json", "repa_step.json"]
    for f in files:
        data = json.loads((out / f).read_text())
        assert KEYS <= set(data) and isinstance(data["met"], bool)


def test_noise_row_takes_the_compiled_run_when_there_is_one():
    eager = {"batch": 1, "ours_s_per_step": 0.46, "kernel_s_per_step": 0.095, "ours_times": [0.46]}
    fast = {"batch": 1, "ours_s_per_step": 0.11, "kernel_s_per_step": 0.09, "ours_times": [0.11]}
    res = {
        "device": "NVIDIA H200",
        "runs": [eager],
        "compiled": {"cold_start_s": 41.0, "break_even_steps": 118.0, "runs": [fast]},
    }
    row = rows.row_noise(res, "c", version_info={})
    assert row["value"] == pytest.approx(0.11 / 0.09, rel=1e-3) and row["met"] is True
    assert row["details"]["cold_start_s"] == 41.0
    assert rows.row_noise({"runs": [eager]}, "c", version_info={})["met"] is False
