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
