"""GPU benchmark rows as data: one JSON object per measured row in `bench/results/` (issue 18).

`bench/gpu_rows.sh` runs the benches, each writing its own JSON; this module turns those into
the committed row files, one per row, each an object with at least:

    row       noise_b1_step | textstream_overhead | repa_step | fill_step
    device    the card's name as torch reports it (`torch.cuda.get_device_name`)
    date      ISO date of the run
    versions  torch, cuda, diffusers, transformers, driver
    command   the bench command that measured it
    repeats   every timing of the measured variant (seconds)
    metric    what `value` is (e.g. "step_time / gpu_kernel_time")
    value     the number
    goal      {"op": "<=" | ">=" | "<", "value": x}
    met       value against goal (true / false)
    details   the bench's own figures for the row (ratios, seconds, memory, ...)

A row that was not measured has no file (a failed or skipped bench writes nothing), and
neither has a bench run off a GPU (`device` "cpu": e.g. the CPU rehearsal of gpu_rows.sh).
A bench run with `--compile` (noise_realsize, repa train, fill_train) has its compiled run
measured too: the row reports it (`details.measured`: "compiled" for repa / fill) and keeps the
eager figures in `details`; without it (a limit hit while compiling) the row is the eager one.

FLOPs and MFU: `count_flops` runs one full step under `torch.utils.flop_counter.FlopCounterMode`
and counts what it counts: matrix multiplies, convolutions and scaled-dot-product attention, at
2 FLOPs per multiply-accumulate, forward and backward (elementwise ops, norms and the optimizer
are not counted: the usual model-FLOPs convention, so MFU is a lower bound of the card's use).
MFU = FLOPs per step / seconds per step / the card's dense bf16 tensor peak (datasheet,
`PEAK_BF16_TFLOPS`; no sparsity).

    python bench/rows.py --from gpu-out [--results bench/results] [--command-prefix "..."]
    python bench/rows.py --write-run-info gpu-out/run_info.json   # on the GPU machine, first

`run_info.json` (`RUN_INFO`) in the `--from` folder, when there, gives the rows their `date` and
`versions`: gpu_rows.sh writes it on the GPU machine before the benches, so rows made later
elsewhere from the folder a device call brought back still name the machine's versions and
driver, not those of the machine that runs rows.py.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROWS = ("noise_b1_step", "textstream_overhead", "repa_step", "fill_step")
RUN_INFO = "run_info.json"  # the benches' machine: {"date": ..., "versions": {...}}

# Dense bf16 tensor-core peak, TFLOP/s, from the vendors' datasheets (no 2:4 sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,  # SXM (listed after the PCIe / NVL names so they match first)
    "A100": 312.0,
    "L40S": 362.1,
    "A10G": 70.0,
}

REPA_GOAL_BATCH = 128  # the batch of issue 18's row R (GOALS["repa_step"])

GOALS = {
    # issue 18: the batch-1 SDXL-Turbo step within 1.3x of its GPU kernel time
    "noise_b1_step": ("step_time / gpu_kernel_time (batch 1, SDXL-Turbo size, 512 px)", "<=", 1.3),
    # issue 18: ln + rotation on every block of SD3-medium at 1024 px, bf16, under 1%
    "textstream_overhead": ("forward overhead % (ln + rotation targets, SD3-medium)", "<", 1.0),
    # issue 18: U-REPA step at batch 128, SD 1.5 size, bf16: at least 40% MFU
    "repa_step": ("MFU % (batch 128, SD 1.5 U-Net, bf16, with alignment)", ">=", 40.0),
    # issue 18: FLUX.1-Fill-size LoRA step: at least 35% MFU
    "fill_step": ("MFU % (FLUX.1-Fill-dev size LoRA + semantic step, bf16)", ">=", 35.0),
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as `FlopCounterMode` counts them (module doc)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def peak_bf16_flops(device_name: str | None) -> float | None:
    """The card's dense bf16 peak in FLOP/s, or None for a card (or CPU) not in the table."""
    if not device_name:
        return None
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def mfu(flops_per_step: float | None, seconds_per_step: float, device_name: str | None):
    """Model FLOPs utilisation in percent, or None when the FLOPs or the card's peak are unknown."""
    peak = peak_bf16_flops(device_name)
    if not flops_per_step or not peak or seconds_per_step <= 0:
        return None
    return 100.0 * flops_per_step / seconds_per_step / peak


def goal_met(value: float, op: str, target: float) -> bool:
    if op == "<=":
        return value <= target
    if op == "<":
        return value < target
    if op == ">=":
        return value >= target
    if op == ">":
        return value > target
    raise ValueError(f"unknown goal operator {op!r}")


def versions() -> dict:
    """torch / CUDA / diffusers / transformers / peft / accelerate / lmdb versions (None: not
    installed) and the NVIDIA driver (None off a GPU)."""
    out: dict = {}
    try:
        import torch

        out["torch"] = torch.__version__
        out["cuda"] = torch.version.cuda
    except ImportError:  # pragma: no cover - torch is a dependency
        out["torch"] = None
    for name in ("diffusers", "transformers", "peft", "accelerate", "lmdb"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    out["driver"] = _driver_version()
    return out


def _driver_version() -> str | None:
    try:
        res = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    line = res.stdout.strip().splitlines()
    return line[0].strip() if res.returncode == 0 and line else None


def make_row(
    row: str,
    *,
    device: str,
    value: float,
    repeats: list[float],
    command: str,
    details: dict | None = None,
    date: str | None = None,
    version_info: dict | None = None,
) -> dict:
    """One row object (module doc); ``met`` is computed from the row's goal."""
    if row not in GOALS:
        raise ValueError(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
    metric, op, target = GOALS[row]
    if not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"row {row}: value must be a finite number, got {value!r}")
    return {
        "row": row,
        "device": device,
        "date": date or _dt.date.today().isoformat(),
        "versions": version_info if version_info is not None else versions(),
        "command": command,
        "repeats": [float(x) for x in repeats],
        "metric": metric,
        "value": float(value),
        "goal": {"op": op, "value": target},
        "met": goal_met(float(value), op, target),
        "details": details or {},
    }


def write_row(results_dir: str | os.PathLike, row: dict) -> Path:
    """Write ``row`` to ``results_dir/<row>.json`` atomically (a reader never sees half a file)."""
    folder = Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{row['row']}.json"
    write_row_file(path, row)
    return path


def write_row_file(path: Path, data: dict) -> None:
    """JSON to ``path`` atomically."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- the benches' own JSON -> rows ------------------------------------------------------------


def row_noise(res: dict, command: str, **kw) -> dict | None:
    """bench/noise_realsize.py: the B=1 run's step time over its GPU kernel time (the compiled
    run's when the bench ran with --compile: issue 18's target is `noise optimize --compile`)."""
    compiled = res.get("compiled") or {}
    runs = compiled.get("runs") or res.get("runs", [])
    run = next((r for r in runs if r.get("batch") == 1), None)
    if not run or not run.get("kernel_s_per_step"):
        return None
    if compiled:
        run = {**run, **{k: v for k, v in compiled.items() if k != "runs"}}
    value = run["ours_s_per_step"] / run["kernel_s_per_step"]
    return make_row(
        "noise_b1_step",
        device=res.get("device", "?"),
        value=round(value, 4),
        repeats=run.get("ours_times", []),
        command=command,
        details=run,
        **kw,
    )


def row_textstream(res: dict, command: str, **kw) -> dict | None:
    """bench/textstream.py --sd3-medium: overhead of the ln + rotation residual on every block.

    The `_all` variant (every speed option of issue 18: rotation GEMM in the model's dtype, one
    batched GEMM, compiled mix) when it was measured and the bench found its output within bf16
    rounding of the reference's (`output_diff`, bench/textstream.py); else the reference
    arithmetic (`ln_rot_<N>_targets`)."""
    fwd = res.get("forward") or {}
    variants = fwd.get("variants") or {}
    reference = next((n for n in variants if re.fullmatch(r"ln_rot_\d+_targets", n)), None)
    if reference is None:
        return None
    fast = f"{reference}_all"
    diff = ((fwd.get("output_diff") or {}).get("variants") or {}).get(fast)
    name = (
        fast
        if fast in variants and diff and diff.get("within_bf16_rounding") is True
        else reference
    )
    v = variants[name]
    device = (res.get("machine") or {}).get("cuda") or (res.get("machine") or {}).get("device")
    row = make_row(
        "textstream_overhead",
        device=device or "?",
        value=round(v["overhead_pct"], 3),
        repeats=v.get("times_s", []),
        command=command,
        details={
            "variant": name,
            "reference_variant": reference,
            "reference_overhead_pct": variants[reference]["overhead_pct"],
            # the `_all` variant's output against the reference's (whichever was chosen)
            "output_diff": {"variant": fast, **diff} if diff else None,
            "output_diff_metric": (fwd.get("output_diff") or {}).get("metric"),
            "fp32_reference": (fwd.get("output_diff") or {}).get("fp32_reference"),
            "shape": fwd.get("shape"),
            "variants": variants,
        },
        **kw,
    )
    row["metric"] += f"; variant {name}"
    return row


def _measured(tr: dict, variant: str, seconds_key: str) -> tuple[dict, str]:
    """The run a training row reports: the compiled one (`--compile`) when it measured the
    variant, else the eager one; with its name."""
    compiled = tr.get("compiled") or {}
    if (compiled.get(seconds_key) or {}).get(variant) and (
        compiled.get("flops_per_step") or {}
    ).get(variant):
        return compiled, "compiled"
    return tr, "eager"


def _mfu_row(
    row: str, tr: dict, variant: str, seconds_key: str, device, command: str, **kw
) -> dict | None:
    """The MFU row of a training bench's `train` section for `variant`: the compiled run's
    figures when it measured the variant (`_measured`), eager's kept in the details; None
    where MFU is unknown (no FLOPs or seconds, a card not in the peak table)."""
    run, measured = _measured(tr, variant, seconds_key)
    flops = (run.get("flops_per_step") or {}).get(variant)
    sec = (run.get(seconds_key) or {}).get(variant)
    value = mfu(flops, sec or 0.0, device)
    if value is None:
        return None
    return make_row(
        row,
        device=device,
        value=round(value, 2),
        repeats=(run.get("times") or {}).get(variant, []),
        command=command,
        details={"measured": measured, **tr},
        **kw,
    )


def row_repa(res: dict, command: str, **kw) -> dict | None:
    """bench/repa.py --section train --train-size real: MFU of the step with alignment (the
    compiled run's when the bench ran with --compile; eager's figures stay in the details). A
    run at another batch (gpu_rows.sh's batch-64 retry) says so in `command` and `metric` and
    does not meet the batch-128 goal."""
    tr = res.get("train") or {}
    batch = tr.get("batch_size")
    if batch is not None:  # gpu_rows.sh reruns at batch 64 after an out-of-memory at 128
        command = re.sub(r"--train-batch-size \d+", f"--train-batch-size {int(batch)}", command)
    device = tr.get("device_name") or tr.get("device")
    row = _mfu_row("repa_step", tr, "lora+align", "seconds_per_step", device, command, **kw)
    if row is not None and batch is not None and int(batch) != REPA_GOAL_BATCH:
        row["metric"] += f"; measured at batch {int(batch)}, not the goal's {REPA_GOAL_BATCH}"
        row["met"] = False  # the goal is at batch 128
    return row


def row_fill(res: dict, command: str, **kw) -> dict | None:
    """bench/fill_train.py --flux-size: MFU of the LoRA + semantic step (the compiled run's when
    the bench ran with --compile; eager's figures stay in the details)."""
    tr = res.get("train") or {}
    device = tr.get("device_name") or (tr.get("config") or {}).get("device")
    return _mfu_row("fill_step", tr, "lora+semantic", "median_s", device, command, **kw)


# bench output file (as gpu_rows.sh names it) -> (converter, the command that wrote it)
SOURCES = {
    "noise_realsize.json": (row_noise, "python bench/noise_realsize.py --device cuda"),
    "textstream.json": (row_textstream, "python bench/textstream.py --sd3-medium --device cuda"),
    "repa_train.json": (
        row_repa,
        "python bench/repa.py --section train --train-size real --train-batch-size 128 "
        "--no-online --compile --channels-last",
    ),
    "fill_train.json": (
        row_fill,
        "python bench/fill_train.py --flux-size --device cuda --dtype bfloat16 --compile",
    ),
}


def rows_from_bench(out_dir: str | os.PathLike, commands: dict | None = None, **kw) -> list[dict]:
    """The rows the bench JSONs in ``out_dir`` measured (a missing or unusable one: no row)."""
    rows = []
    for name, (convert, command) in SOURCES.items():
        path = Path(out_dir) / name
        if not path.is_file():
            continue
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"rows: skipping {path}: {e}", file=sys.stderr)
            continue
        row = convert(res, (commands or {}).get(name, command), **kw)
        if row is not None and not on_gpu(row["device"]):
            print(f"rows: {path} was measured on {row['device']!r}, not a GPU: no row")
            continue
        if row is not None:
            rows.append(row)
    return rows


def on_gpu(device: str | None) -> bool:
    """Whether a bench's device is a card (its name, as torch reports it), not the CPU."""
    return bool(device) and device.strip().lower() not in ("cpu", "?")


def run_info() -> dict:
    """This machine's date and versions, as the rows record them (`RUN_INFO`)."""
    return {"date": _dt.date.today().isoformat(), "versions": versions()}


def load_run_info(src: str | os.PathLike) -> dict:
    """`make_row` keywords (date, version_info) from `src/RUN_INFO`, or {} without one."""
    path = Path(src) / RUN_INFO
    if not path.is_file():
        return {}
    info = json.loads(path.read_text())
    return {"date": info["date"], "version_info": info["versions"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="src", help="folder of the benches' JSON files")
    p.add_argument("--results", default="bench/results", help="where the row files go")
    p.add_argument(
        "--write-run-info", metavar="PATH", help=f"only write this machine's {RUN_INFO} to PATH"
    )
    args = p.parse_args(argv)
    if args.write_run_info:
        Path(args.write_run_info).parent.mkdir(parents=True, exist_ok=True)
        info = run_info()
        write_row_file(Path(args.write_run_info), info)
        print(json.dumps(info))
        return 0
    if not args.src:
        p.error("--from is required")
    rows = rows_from_bench(args.src, **load_run_info(args.src))
    for row in rows:
        path = write_row(args.results, row)
        print(
            f"{row['row']}: {row['metric']} = {row['value']} (goal {row['goal']['op']} "
            f"{row['goal']['value']}: {'met' if row['met'] else 'not met'}) -> {path}"
        )
    missing = [r for r in ROWS if r not in {x["row"] for x in rows}]
    if missing:
        print(f"not measured (no file): {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
