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


def test_repa_row_takes_the_compiled_run_and_keeps_the_eager_figures():
    eager_flops = {"lora": 3.0e14, "lora+align": 3.1e14}
    tr = {
        "device": "cuda",
        "device_name": "NVIDIA H100 80GB HBM3",
        "seconds_per_step": {"lora": 1.0, "lora+align": 1.05},
        "flops_per_step": eager_flops,
        "times": {"lora+align": [1.04, 1.05, 1.06]},
        "compiled": {
            "cold_start_s": 52.0,
            "seconds_per_step": {"lora": 0.6, "lora+align": 0.62},
            "flops_per_step": eager_flops,
            "times": {"lora+align": [0.61, 0.62, 0.63]},
        },
    }
    row = rows.row_repa({"train": tr}, "c", version_info={})
    assert row["value"] == pytest.approx(100 * 3.1e14 / 0.62 / 989.4e12, rel=1e-3)
    assert row["met"] is True and row["repeats"] == [0.61, 0.62, 0.63]
    assert row["details"]["measured"] == "compiled"
    assert row["details"]["seconds_per_step"]["lora+align"] == 1.05  # eager's, kept
    assert row["details"]["compiled"]["cold_start_s"] == 52.0
    # no compiled run (a limit hit while compiling): the eager row
    eager = {k: v for k, v in tr.items() if k != "compiled"}
    row = rows.row_repa({"train": eager}, "c", version_info={})
    assert row["value"] == pytest.approx(100 * 3.1e14 / 1.05 / 989.4e12, rel=1e-3)
    assert row["details"]["measured"] == "eager" and row["met"] is False


def test_fill_row_takes_the_compiled_run_and_keeps_the_eager_figures():
    flops = {"lora": 2.0e14, "lora+semantic": 2.0e14}
    tr = {
        "device_name": "NVIDIA H200",
        "median_s": {"lora": 0.90, "lora+semantic": 0.92},
        "flops_per_step": flops,
        "times": {"lora+semantic": [0.91, 0.92, 0.95]},
        "compiled": {
            "median_s": {"lora": 0.5, "lora+semantic": 0.55},
            "flops_per_step": flops,
            "times": {"lora+semantic": [0.55, 0.56, 0.54]},
        },
    }
    row = rows.row_fill({"train": tr}, "c", version_info={})
    assert row["value"] == pytest.approx(100 * 2.0e14 / 0.55 / 989.4e12, rel=1e-3)
    assert row["met"] is True and row["repeats"] == [0.55, 0.56, 0.54]
    assert row["details"]["measured"] == "compiled"
    assert row["details"]["median_s"]["lora+semantic"] == 0.92
    # a compiled run that did not time the row's variant: the eager row
    tr["compiled"] = {"median_s": {"lora": 0.5}, "flops_per_step": flops}
    row = rows.row_fill({"train": tr}, "c", version_info={})
    assert row["value"] == pytest.approx(100 * 2.0e14 / 0.92 / 989.4e12, rel=1e-3)
    assert row["details"]["measured"] == "eager" and row["repeats"] == [0.91, 0.92, 0.95]


# ---- bench/gpu_rows.sh: every bench command parses (a flag typo must not cost GPU time) -------

GPU_ROWS = Path(__file__).resolve().parents[1] / "bench" / "gpu_rows.sh"


def gpu_rows_commands(script: str) -> list[tuple[str, list[str]]]:
    """(bench module, its arguments) of each `$PY bench/<name>.py ...` in the script: lines
    joined at `\\`, `${VAR:-default}` replaced by its default, `$OUT` by a folder name,
    redirections dropped, the arguments ending at the first shell operator."""
    import re
    import shlex

    text = script.replace("\\\n", " ")
    text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text).replace("$OUT", "gpu-out")
    out = []
    for m in re.finditer(r"\$PY bench/(\w+)\.py([^\n]*)", text):
        rest = re.sub(r"\s\d*>>?&?\d*", " ", m.group(2))
        lex = shlex.shlex(rest, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        args = []
        for tok in lex:
            if tok in ("}", "{") or set(tok) <= set("();<>|&"):
                break
            args.append(tok)
        out.append((m.group(1), args))
    return out


class _Parsed(Exception):
    pass


def bench_refusal(name: str, args: list[str], monkeypatch) -> str | None:
    """Run bench/<name>.py's main(args) up to its argument parsing only: None when its parser
    accepts `args`, else why not."""
    import argparse
    import importlib

    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):  # the bench's own parser, then stop
        raise _Parsed(original(self, args, namespace))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_only)
        try:
            importlib.import_module(name).main(args)
        except _Parsed:
            return None
        except SystemExit as e:
            return f"bench/{name}.py {' '.join(args)}: argparse refused it (exit {e.code})"
    return f"bench/{name}.py main() returned without parsing its arguments"


def test_every_bench_command_in_gpu_rows_parses(monkeypatch):
    commands = gpu_rows_commands(GPU_ROWS.read_text())
    names = [n for n, _ in commands]
    assert sorted(set(names)) == ["fill_train", "noise_realsize", "repa", "rows", "textstream"]
    # issue 18's compiled rows: the training and noise benches run their compiled step too
    compiled = ("repa", "fill_train", "noise_realsize")
    assert all("--compile" in args for n, args in commands if n in compiled)
    for name, args in commands:
        assert bench_refusal(name, args, monkeypatch) is None


def test_gpu_rows_check_catches_a_flag_typo(monkeypatch, capsys):
    script = (
        "run fill_train 110 $PY bench/fill_train.py --flux-size --device cuda \\\n"
        '    --compiel --json "$OUT/fill_train.json"\n'
        'run rows 5 $PY bench/rows.py --from "$OUT" --results "${RESULTS:-r}" 2>&1 | tee -a x\n'
    )
    (fill, fill_args), (rows_name, rows_args) = gpu_rows_commands(script)
    assert fill_args == [
        "--flux-size",
        "--device",
        "cuda",
        "--compiel",
        "--json",
        "gpu-out/fill_train.json",
    ]
    assert (rows_name, rows_args) == ("rows", ["--from", "gpu-out", "--results", "r"])
    assert "refused" in bench_refusal(fill, fill_args, monkeypatch)
    assert "--compiel" in capsys.readouterr().err
    assert bench_refusal(rows_name, rows_args, monkeypatch) is None


def test_fill_bench_writes_its_eager_json_before_it_compiles(tmp_path, monkeypatch):
    # a time limit hit while compiling (here: the compile raising) keeps the eager figures
    import diffalign.engine.compile as engine_compile
    import fill_train

    def limit_hit(*args, **kwargs):
        raise KeyboardInterrupt("time limit")

    monkeypatch.setattr(engine_compile, "speed_up_modules", limit_hit)
    out = tmp_path / "fill_train.json"
    # 1 + 1 blocks of one 128-wide head, 8 image + 8 text tokens, one round
    small = {
        "layers": 1,
        "single-layers": 1,
        "heads": 1,
        "panel": 32,
        "text-tokens": 8,
        "rounds": 1,
    }
    argv = [x for k, v in small.items() for x in (f"--train-{k}", str(v))] + ["--compile"]
    with pytest.raises(KeyboardInterrupt):
        fill_train.main([*argv, "--json", str(out)])
    train = json.loads(out.read_text())["train"]
    assert set(train["median_s"]) == {"lora", "lora+semantic"} and "compiled" not in train
    assert train["flops_per_step"]["lora+semantic"] > 0


def test_repa_row_measured_at_the_fallback_batch_says_so():
    # gpu_rows.sh reruns repa at batch 64 after an out-of-memory at 128: the row's command and
    # metric name the batch measured, and a batch-64 MFU does not meet the batch-128 goal
    tr = {
        "device": "cuda",
        "device_name": "NVIDIA H200",
        "batch_size": 64,
        "seconds_per_step": {"lora": 0.3, "lora+align": 0.31},
        "flops_per_step": {"lora": 1.5e14, "lora+align": 1.55e14},
        "times": {"lora+align": [0.31]},
    }
    command = rows.SOURCES["repa_train.json"][1]
    row = rows.row_repa({"train": tr}, command, version_info={})
    assert row["value"] == pytest.approx(100 * 1.55e14 / 0.31 / 989.4e12, rel=1e-3)  # 50.5 %
    assert "--train-batch-size 64" in row["command"] and "128" not in row["command"]
    assert "batch 64" in row["metric"] and row["met"] is False
    tr["batch_size"] = 128
    row = rows.row_repa({"train": tr}, command, version_info={})
    assert "--train-batch-size 128" in row["command"] and row["met"] is True
    assert row["metric"] == rows.GOALS["repa_step"][0]
