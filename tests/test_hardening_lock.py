"""Issue 6, item 1: every resumable job and training run holds its output folder's lock; a
second run into the same folder is one line naming the folder and the running process, and a
killed run (kill -9) leaves no stale lock."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffalign.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--steps", "2", "--height", "32", "--width", "32"]

_HOLD = """
import sys, time
sys.path.insert(0, {src!r})
from diffalign.engine.io import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture(scope="module")
def sd3(tiny_model_dir):
    return tiny_model_dir("sd3")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from diffalign.noise.toy.assignment import assign
    from diffalign.noise.toy.data import load_dataset
    from diffalign.noise.toy.models import ToyModelConfig, build_model, save_model

    root = tmp_path_factory.mktemp("locktoy")
    torch.manual_seed(0)
    save_model(build_model(ToyModelConfig.for_dataset("generator", "digits")), root / "gen")
    data = load_dataset("digits", "train").subset(range(4))
    assign(root / "gen", root / "asg", data=data, assign_steps=1, write_plots=False)
    return root


class HeldHere:
    """The lock of `folder` held through a separate open file (flock locks belong to the open
    file, so this conflicts with `output_lock` in this process just as another process does)."""

    def __init__(self, folder: Path):
        import fcntl
        import os

        from diffalign.engine.io import LOCK_NAME

        folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": 4242, "host": "here", "command": "x"}).encode(), 0)

    def kill(self) -> None:
        import os

        os.close(self.fd)  # closing the file drops the lock


class Holder:
    """Another process holding the lock of `folder` (as a running diffalign job would)."""

    def __init__(self, folder: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLD.format(src=SRC), str(folder)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "locked"

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: the OS drops the lock, nothing to clean up
        self.proc.wait()


def _commands(sd3, toy, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    meta = tmp_path / "m.jsonl"
    line = {
        "tag": "single_object",
        "include": [{"class": "bench", "count": 1}],
        "prompt": "a bench",
    }
    meta.write_text(json.dumps(line) + "\n")
    dpg = tmp_path / "dpg"
    dpg.mkdir()
    (dpg / "7.txt").write_text("a red bus")
    gen = str(toy / "gen")
    out = tmp_path / "out"
    return {
        "generate": (
            out,
            ["textstream", "generate", "--prompts", str(prompts), "--model", sd3, *TINY,
             "--output-dir", str(out)],
        ),
        "geneval": (
            out,
            ["textstream", "geneval", "--metadata", str(meta), "--model", sd3, *TINY,
             "--n-samples", "1", "--output-dir", str(out)],
        ),
        "compbench": (
            out,
            ["textstream", "compbench", "--prompts", str(prompts), "--model", sd3, *TINY,
             "--n-samples", "1", "--output-dir", str(out)],
        ),
        "dpg": (
            Path(str(out) + ".lock"),
            ["textstream", "dpg", "--prompts-dir", str(dpg), "--model", sd3, "--steps", "2",
             "--resolution", "32", "--output-dir", str(out)],
        ),
        "sample": (
            out,
            ["textstream", "sample", "--prompt", "a cat", "--model", sd3, *TINY,
             "--output-dir", str(out)],
        ),
        "calibrate": (
            out,
            ["textstream", "calibrate", "--dataset", str(prompts), "--model", sd3,
             "--steps", "2", "--num-samples", "1", "--output", str(out / "rot.safetensors")],
        ),
        "assign": (
            out,
            ["noise", "toy", "assign", "--generator-ckpt", gen, "--max-items", "2",
             "--assign-steps", "1", "--output-dir", str(out)],
        ),
        "train-gan": (
            out,
            ["noise", "toy", "train-gan", "--max-items", "8", "--max-steps", "1",
             "--batch-size", "4", "--output-dir", str(out)],
        ),
        "sft": (
            out,
            ["noise", "toy", "sft", "--generator-ckpt", gen, "--manifest-path",
             str(toy / "asg"), "--max-steps", "1", "--output-dir", str(out)],
        ),
        "direct-sft": (
            out,
            ["noise", "toy", "direct-sft", "--generator-ckpt", gen, "--max-items", "4",
             "--max-steps", "1", "--output-dir", str(out)],
        ),
        "evaluate": (
            out,
            ["noise", "toy", "evaluate", "--generator-ckpt", gen, "--classifier-steps", "1",
             "--num-samples", "10", "--recon-items", "2", "--assign-steps", "1",
             "--output-dir", str(out)],
        ),
        "em": (
            out,
            ["noise", "toy", "em", "--generator-ckpt", gen, "--max-items", "2", "--num-cycles",
             "1", "--assign-steps", "1", "--max-steps", "1", "--output-dir", str(out)],
        ),
    }  # fmt: skip


@pytest.mark.parametrize(
    "command",
    [
        "generate",
        "geneval",
        "dpg",
        "compbench",
        "sample",
        "calibrate",
        "assign",
        "train-gan",
        "sft",
        "direct-sft",
        "em",
        "evaluate",
    ],
)
def test_second_run_into_a_locked_folder_is_refused(sd3, toy, tmp_path, capsys, command):
    lock_dir, argv = _commands(sd3, toy, tmp_path)[command]
    holder = HeldHere(lock_dir)
    try:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("diffalign:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert str(lock_dir) in lines[0] and "in use by another diffalign run" in lines[0]
        assert "pid 4242" in lines[0]
    finally:
        holder.kill()
    assert main(argv) == 0  # once the other run is gone the same command runs


def test_two_generate_runs_with_other_settings_never_mix(sd3, tmp_path, capsys):
    """The issue's case: `--cfg 7` and `--cfg 3` into one folder. The second is refused while
    the first runs, and refused afterwards for its other settings."""
    lock_dir, argv = _commands(sd3, Path("unused"), tmp_path)["generate"]
    holder = Holder(lock_dir)  # a real second process, killed with SIGKILL afterwards
    try:
        assert main([*argv, "--cfg", "3"]) == 2
        assert f"pid {holder.proc.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
    assert main([*argv, "--cfg", "7"]) == 0  # kill -9 left no stale lock
    assert main([*argv, "--cfg", "3"]) == 2
    settings = json.loads((lock_dir / "settings.json").read_text())
    assert settings["options"]["cfg"] == 7.0


def test_demo_into_a_locked_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "demo"
    holder = HeldHere(out)
    try:
        assert main(["demo", "--quick", "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert "in use by another diffalign run" in err and str(out) in err
        assert [p.name for p in out.iterdir()] == [".diffalign.lock"]  # nothing else written
    finally:
        holder.kill()
