"""Engine primitives: output-folder lock, manifest containment, strict JSON, numeric options."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from diffalign.engine import cliutils
from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import (
    LOCK_NAME,
    append_jsonl,
    output_lock,
    resolve_inside,
    write_json,
)

_HOLDER = """
import sys, time
from diffalign.engine.io import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def _hold_lock(folder, env=None):
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_refuses_a_second_run_and_names_the_holder(tmp_path):
    folder = tmp_path / "out"
    proc = _hold_lock(folder)
    try:
        with pytest.raises(DiffalignError) as err:
            with output_lock(folder):
                pass
        message = str(err.value)
        assert str(folder) in message and f"pid {proc.pid}" in message
        assert "\n" not in message
    finally:
        proc.send_signal(signal.SIGKILL)  # kill -9: the OS drops the lock, nothing stale
        proc.wait()
    with output_lock(folder) as held:
        assert held == folder and (folder / LOCK_NAME).is_file()


def test_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    with output_lock(tmp_path / "a"):
        with output_lock(tmp_path / "a"):
            pass
        with output_lock(tmp_path / "a" / ".." / "a"):
            pass
    with output_lock(tmp_path / "a"):
        pass


def test_lock_on_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DiffalignError, match="not a folder"):
        with output_lock(tmp_path / "f"):
            pass


def test_ranks_of_one_launch_share_the_lock(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    launch = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}
    proc = _hold_lock(folder, {**launch, "RANK": "0"})
    try:
        for k, v in {**launch, "RANK": "1"}.items():
            monkeypatch.setenv(k, v)
        with output_lock(folder):  # same launch: rank 1 goes on
            pass
        monkeypatch.setenv("MASTER_PORT", "29556")  # another launch: rank 1 must not go on
        monkeypatch.setenv("DIFFALIGN_LOCK_WAIT", "0.3")
        with pytest.raises(DiffalignError, match="did not take the output lock"):
            with output_lock(folder):
                pass
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "a/../../x", "", "a\x00b"])
def test_resolve_inside_refuses_paths_outside(tmp_path, bad):
    with pytest.raises(DiffalignError):
        resolve_inside(tmp_path, bad, "noise_file")


def test_resolve_inside_follows_symlinks_and_accepts_inside(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sub").mkdir()
    assert (
        resolve_inside(tmp_path / "data", "sub/x.safetensors")
        == (tmp_path / "data" / "sub" / "x.safetensors").resolve()
    )
    os.symlink(tmp_path, tmp_path / "data" / "escape")
    with pytest.raises(DiffalignError, match="outside"):
        resolve_inside(tmp_path / "data", "escape/secret")


def test_json_written_is_strict(tmp_path):
    obj = {"a": float("nan"), "b": [float("inf"), 1.5], "t": torch.tensor([1.0, float("nan")])}
    write_json(tmp_path / "s.json", obj)
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "t": [1.0, None]}
    append_jsonl(tmp_path / "l.jsonl", {"x": -math.inf})
    assert json.loads((tmp_path / "l.jsonl").read_text()) == {"x": None}


@pytest.mark.parametrize(
    ("fn", "good", "bad"),
    [
        (cliutils.finite_float, ["1.5", "-2", "0"], ["nan", "inf", "-inf", "x"]),
        (cliutils.positive_float, ["0.1"], ["0", "-1", "nan"]),
        (cliutils.nonneg_float, ["0", "3"], ["-0.1", "inf"]),
        (cliutils.unit_float, ["0", "1", "0.5"], ["1.01", "-0.1", "nan"]),
        (cliutils.positive_int, ["1", "7"], ["0", "-1", "1.5", "x"]),
        (cliutils.nonneg_int, ["0"], ["-1"]),
        (cliutils.seed_int, ["0", str(2**63 - 1)], ["-1", str(2**63), "1e3"]),
    ],
)
def test_numeric_option_types(fn, good, bad):
    for text in good:
        fn(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            fn(text)


def test_numeric_type_gives_one_line_exit_2(capsys):
    parser = cliutils.ArgumentParser(prog="x")
    parser.add_argument("--cfg", type=cliutils.finite_float)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--cfg", "nan"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--cfg" in err and "finite" in err


def test_float_list_rejects_non_finite():
    assert cliutils.parse_float_list("0.5, 1") == [0.5, 1.0]
    with pytest.raises(DiffalignError):
        cliutils.parse_float_list("0.5,nan")


def test_check_device_names_the_device():
    from diffalign.engine.distributed import check_device
    from diffalign.fill.infer import check_device as fill_check_device

    assert check_device(None) is None and check_device(" cpu ") == "cpu"
    assert fill_check_device("cpu") == torch.device("cpu")
    with pytest.raises(DiffalignError, match=r"--device: unknown device 'tpu9' \(use cpu"):
        fill_check_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(DiffalignError, match="--device cuda:0: no CUDA device"):
            check_device("cuda:0")
    else:
        n = torch.cuda.device_count()
        with pytest.raises(DiffalignError, match=f"--device cuda:{n}: only {n} CUDA"):
            check_device(f"cuda:{n}")


def test_pil_to_tensor_inverts_tensor_to_pil():
    from PIL import Image

    from diffalign.engine.reports import pil_to_tensor, tensor_to_pil

    x = torch.arange(3 * 4 * 5, dtype=torch.float32).reshape(3, 4, 5) / 59.0
    back = pil_to_tensor(tensor_to_pil(x, (0.0, 1.0)))
    assert back.shape == (3, 4, 5) and back.dtype == torch.float32
    assert torch.allclose(back, x, atol=0.5 / 255 + 1e-6)
    gray = pil_to_tensor(Image.new("L", (2, 3), 255))
    assert gray.shape == (3, 3, 2) and torch.all(gray == 1.0)
