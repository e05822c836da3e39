"""The CUDA-only code of the GPU benches (bench/gpu_rows.sh, issue 18), checked on the CPU:
profiler sums on real torch profiler events, synchronisation around the clocks with a recorded
`torch.cuda.synchronize`, and a CPU rehearsal of the script's own command lines."""

from __future__ import annotations

import os
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
        i,
        name,
        7 if device == "cuda" else 1,
        start,
        end,
        use_device="cuda",
        stack=[],
        device_type=kind,
        is_legacy=legacy,
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


def test_fill_flux_size_keeps_the_options_given_beside_it(monkeypatch):
    # gpu_rows.sh's rehearsal appends small sizes to `--flux-size`: they must win
    import fill_train

    seen = {}

    def train_section(args, save=None):
        seen.update(vars(args))
        return {}

    monkeypatch.setattr(fill_train, "train_section", train_section)
    fill_train.main(["--flux-size"])
    assert (seen["train_layers"], seen["train_single_layers"], seen["train_heads"]) == (19, 38, 24)
    assert seen["train_panel"] == 512 and seen["train_checkpointing"] is True
    fill_train.main(["--flux-size", "--train-layers", "1", "--train-panel", "32"])
    assert (seen["train_layers"], seen["train_single_layers"], seen["train_panel"]) == (1, 38, 32)
    fill_train.main(["--train-heads", "2"])
    assert seen["train_layers"] == 2 and seen["train_checkpointing"] is False


# ---- the clocks synchronise the GPU around the timed work (torch.cuda recorded) ---------------


def _record_cuda(monkeypatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    return calls


def test_cuda_clocks_synchronise_before_start_and_before_stop(monkeypatch):
    import time

    import noise_optimize
    import timing

    calls = _record_cuda(monkeypatch)
    clock = []
    monkeypatch.setattr(time, "perf_counter", lambda: clock.append(len(calls)) or len(clock))
    # time_once: sync, start the wall clock, the work, sync, stop it
    assert timing.time_once(lambda: calls.append("work"), "cuda") == 1
    assert calls == ["sync", "work", "sync"] and clock == [1, 3]
    calls.clear(), clock.clear()
    assert timing.clock_for("cuda") is time.perf_counter
    times = timing.interleaved_times(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        reps=2,
        warmup=1,
        device=torch.device("cuda", 0),
    )
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}
    assert calls[::3] == ["sync"] * 6 and calls[2::3] == ["sync"] * 6
    calls.clear(), clock.clear()
    noise_optimize._time(lambda: calls.append("work"), "cuda")
    assert calls == ["sync", "work", "sync"] and clock == [1, 3]
    calls.clear()
    noise_optimize._time(lambda: calls.append("work"), "cpu")  # the CPU: no CUDA call
    assert calls == ["work"]


def test_noise_bench_cuda_branch_gives_the_row(tmp_path, monkeypatch):
    """bench/noise_realsize.py's measure() on its CUDA branch (peak memory, GPU kernel time;
    torch.cuda and the profiler recorded, the models on the CPU): the JSON fields rows.py reads
    are there and make the noise_b1_step row."""
    import noise_optimize
    import noise_realsize
    import rows

    calls = _record_cuda(monkeypatch)
    mem = iter(range(1, 1000))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 2**30 * (1 + next(mem)))
    profiled = []

    kernel = [0.06]

    def kernel_seconds(fn):
        fn()
        profiled.append(True)
        return kernel[0]

    monkeypatch.setattr(noise_realsize, "_kernel_seconds", kernel_seconds)
    gen, reward = noise_optimize._setup(tmp_path, 64, "cpu")
    run = noise_realsize.measure(gen, reward, "cuda", batch=1, steps=1, repeats=2)
    assert profiled == [True] and calls.count("reset") == 4
    assert run["kernel_s_per_step"] == pytest.approx(0.03)  # 2 evaluations per run
    assert run["step_over_kernel"] == pytest.approx(run["ours_s_per_step"] / 0.03, rel=1e-2)
    assert set(run["peak_cuda_gib"]) == {"bare", "ours"}
    assert len(run["ours_times"]) == 2
    res = {"device": "NVIDIA H100 80GB HBM3", "runs": [run]}
    row = rows.row_noise(res, "c", version_info={})
    assert row["value"] == pytest.approx(run["ours_s_per_step"] / 0.03, rel=1e-3)
    # a profiler that saw no kernels (no CUPTI): the timings survive, no ratio, no row
    kernel[0] = 0.0
    run = noise_realsize.measure(gen, reward, "cuda", batch=1, steps=1, repeats=1)
    assert "kernel_s_per_step" not in run and run["ours_s_per_step"] > 0
    assert rows.row_noise({"device": "NVIDIA H100", "runs": [run]}, "c", version_info={}) is None


# ---- the CPU rehearsal of bench/gpu_rows.sh ---------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
BENCH_JSONS = ("repa_train", "noise_realsize", "textstream", "fill_train")


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("DIFFALIGN_TEST_CUDA") == "1",
    reason="the CPU rehearsal of the GPU run: not inside that run (gpu_rows.sh's suite)",
)
def test_gpu_rows_rehearsal_runs_every_bench_on_the_cpu(tmp_path):
    """`GPU_ROWS_REHEARSAL=1 bash bench/gpu_rows.sh`: the script's own command lines with each
    bench's small sizes and --device cpu (2-5 min on a loaded 2-core machine): every bench
    ends with rc 0 and writes its JSON with the compiled run; rows.py writes no row for a CPU
    run, and the same JSONs labelled with a card's name (and a kernel time: the profiler's
    CUDA events are the one thing a CPU cannot give) make all four rows."""
    import json
    import subprocess

    import rows

    out = tmp_path / "out"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ONLY", "RESULTS", "CALL_LIMIT", "OUT", "TORCH_COMPILE_DISABLE")
        and not k.endswith("_LIMIT")
    }
    env.update(
        GPU_ROWS_REHEARSAL="1",
        OUT=str(out),
        RESULTS=str(tmp_path / "results"),
        PYTHON=sys.executable,
        GPU_TMPDIR=str(tmp_path / "tmp"),
    )
    res = subprocess.run(
        ["bash", "bench/gpu_rows.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1700,
    )
    log = (out / "gpu.log").read_text()
    assert res.returncode == 0, log[-3000:]
    for name in BENCH_JSONS:
        assert f"== {name} rc=0" in log, log[-3000:]
    assert "--device cpu" in log and "== pytest" not in log
    assert "not measured (no file): noise_b1_step, textstream_overhead, repa_step, fill_step" in log
    assert not (tmp_path / "results").exists()
    # what a device call brings back (at most 8 files; pytest.log would be the 7th)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["gpu.log", "run_info.json", *(f"{n}.json" for n in BENCH_JSONS)]
    )
    data = {n: json.loads((out / f"{n}.json").read_text()) for n in BENCH_JSONS}
    # each bench's compiled run (torch.compile off: its code path, run eagerly)
    assert data["repa_train"]["train"]["compiled"]["seconds_per_step"]["lora+align"] > 0
    assert data["repa_train"]["train"]["batch_size"] == 2
    assert data["noise_realsize"]["compiled"]["runs"][0]["batch"] == 1
    assert data["fill_train"]["train"]["compiled"]["median_s"]["lora+semantic"] > 0
    assert data["fill_train"]["train"]["config"]["gradient_checkpointing"] is True
    assert "ln_rot_2_targets_all" in data["textstream"]["forward"]["output_diff"]["variants"]
    # the same JSONs as a card would label them: rows.py reads every field it needs
    card = "NVIDIA H100 80GB HBM3"
    data["repa_train"]["train"]["device_name"] = card
    data["fill_train"]["train"]["device_name"] = card
    data["textstream"]["machine"]["cuda"] = card
    noise = data["noise_realsize"]
    noise["device"] = card
    for run in [*noise["runs"], *noise["compiled"]["runs"]]:
        run["kernel_s_per_step"] = run["ours_s_per_step"] / 2
    relabelled = tmp_path / "relabelled"
    relabelled.mkdir()
    for n, d in data.items():
        (relabelled / f"{n}.json").write_text(json.dumps(d))
    got = {r["row"]: r for r in rows.rows_from_bench(relabelled, version_info={})}
    assert set(got) == set(rows.ROWS)
    assert got["noise_b1_step"]["value"] == pytest.approx(2.0, rel=1e-3)
    assert got["repa_step"]["details"]["measured"] == "compiled"
    assert got["fill_step"]["details"]["measured"] == "compiled"
    assert "--train-batch-size 2" in got["repa_step"]["command"]
    assert all(r["device"] == card and r["repeats"] for r in got.values())


@pytest.mark.slow  # three interpreters importing torch and diffusers: ~20 s
def test_gpu_rows_run_info_gives_rows_made_later_the_gpu_machines_versions(tmp_path):
    """A device call brings back only $OUT (at most 8 files): the script leaves there the bench
    JSONs, its log and run_info.json (the machine's date and versions), which rows.py uses for
    rows made from that folder on another machine. ONLY=none: no bench runs, the row comes from
    a bench JSON already in $OUT."""
    import json
    import subprocess

    import rows

    out, committed = tmp_path / "out", tmp_path / "committed"
    out.mkdir()
    variant = {"overhead_pct": 0.5, "times_s": [1.0, 1.01]}
    bench = {
        "machine": {"device": "cuda", "cuda": "NVIDIA H200"},
        "forward": {"variants": {"vanilla": variant, "ln_rot_2_targets": variant}},
    }
    (out / "textstream.json").write_text(json.dumps(bench))
    env = {k: v for k, v in os.environ.items() if k != "CALL_LIMIT"}
    env.update(
        GPU_ROWS_REHEARSAL="1",  # as on the GPU, but without installing .whl/ (Python 3.12's)
        ONLY="none",
        OUT=str(out),
        RESULTS=str(committed),
        PYTHON=sys.executable,
        GPU_TMPDIR=str(tmp_path / "tmp"),
    )
    res = subprocess.run(
        ["bash", "bench/gpu_rows.sh"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu.log", "run_info.json", "textstream.json"]
    assert sorted(p.name for p in committed.iterdir()) == ["textstream_overhead.json"]
    info = json.loads((out / "run_info.json").read_text())
    assert info["versions"]["torch"] == torch.__version__ and info["date"]
    # rows made later elsewhere from the folder keep the benches' machine
    info = {"date": "2026-01-02", "versions": {"torch": "9.9", "driver": "570.1"}}
    (out / "run_info.json").write_text(json.dumps(info))
    assert rows.main(["--from", str(out), "--results", str(tmp_path / "later")]) == 0
    row = json.loads((tmp_path / "later" / "textstream_overhead.json").read_text())
    assert row["date"] == "2026-01-02" and row["versions"] == info["versions"]
