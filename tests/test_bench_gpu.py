"""The CUDA-only code of the GPU benches (bench/gpu_rows.sh, issue 18), checked on the CPU:
profiler sums on real torch profiler events, synchronisation around the clocks with a recorded
`torch.cuda.synchronize`, and a CPU rehearsal of the script's own command lines."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def _event(i, name, start, end, device="cpu", kernel_us=None, legacy=False):
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    kind = DeviceType.CUDA if device == "cuda" else DeviceType.CPU
    ev = FunctionEvent(
        i, name, 7 if device == "cuda" else 1, start, end, use_device="cuda", stack=[],
        device_type=kind, is_legacy=legacy,
    )
    if kernel_us is not None:
        ev.append_kernel(name, 0, kernel_us)
    return ev


def _profile_events():
    """What kineto hands torch for a GEMM under `aten::linear` and a copy on a GPU: the CPU
    ops (each kernel appended to the op that launched it) and the kernels' own CUDA events."""
    from torch.autograd.profiler_util import EventList

    events = EventList(
        [
            _event(0, "aten::linear", 0.0, 100.0),
            _event(1, "aten::mm", 5.0, 90.0, kernel_us=40.0),
            _event(2, "aten::copy_", 100.0, 110.0, kernel_us=3.0),
            _event(3, "sm90_gemm", 10.0, 50.0, device="cuda"),
            _event(4, "Memcpy HtoD", 101.0, 104.0, device="cuda"),
        ],
        use_device="cuda",
    )
    events._build_tree()  # as the profiler does: aten::mm nests in aten::linear by time
    return events


def test_kernel_time_counts_each_kernel_once():
    from noise_realsize import device_seconds

    events = _profile_events()
    # 40 us GEMM + 3 us copy; the CPU ops' self device time is the same kernels again
    assert device_seconds(events.key_averages()) == pytest.approx(43e-6)
    assert device_seconds(events) == pytest.approx(43e-6)
    # torch's own profiler table prints the same total
    assert "Self CUDA time total: 43.000us" in events.key_averages().table()
    # a legacy CPU event carries its kernel time alone (no device event beside it)
    legacy = _event(9, "aten::mm", 0.0, 9.0, kernel_us=7.0, legacy=True)
    assert device_seconds([legacy]) == pytest.approx(7e-6)


def test_rows_come_only_from_benches_run_on_a_gpu(tmp_path, capsys):
    # a textstream bench run on the CPU (gpu_rows.sh's rehearsal) measures an overhead too, but
    # it is no GPU row: no file; the same JSON from a card gives the row
    import json

    import rows

    variant = {"overhead_pct": 0.5, "times_s": [1.0, 1.01]}
    res = {
        "machine": {"device": "cpu", "cuda": None},
        "forward": {"variants": {"vanilla": variant, "ln_rot_2_targets": variant}},
    }
    src = tmp_path / "out"
    src.mkdir()
    (src / "textstream.json").write_text(json.dumps(res))
    assert rows.rows_from_bench(src, version_info={}) == []
    assert "measured on 'cpu', not a GPU" in capsys.readouterr().out
    res["machine"] = {"device": "cuda", "cuda": "NVIDIA H100 80GB HBM3"}
    (src / "textstream.json").write_text(json.dumps(res))
    (got,) = rows.rows_from_bench(src, version_info={})
    assert got["row"] == "textstream_overhead" and got["device"] == "NVIDIA H100 80GB HBM3"
