"""DIFFALIGN_NO_PROGRESS silences the libraries' own bars too (diffusers, transformers, pipelines)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import diffalign
from diffalign.cli import main

# What a command does, in the order `diffalign` does it: the CLI's start, a transformers model
# loaded before diffusers is imported (a reward), a pipeline built by the engine and called.
_LOAD = """
import sys
from diffalign.engine.progress import quiet_library_bars
quiet_library_bars()
from transformers import CLIPModel
CLIPModel.from_pretrained(sys.argv[2])
from diffusers import StableDiffusionPipeline
from diffalign.engine.loading import load_pipeline
pipe = load_pipeline(sys.argv[1], StableDiffusionPipeline, "sd15", safety_checker=None)
pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="latent")
print("loaded and sampled")
"""

# text a tqdm bar writes: its description, the fraction, the rate
_BAR_SIGNS = ("Loading pipeline components", "Loading weights", "%|", "it/s]")


def _run_load(sd15: str, clip: str, no_progress: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for name in ("DIFFALIGN_NO_PROGRESS", "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        env.pop(name, None)
    if no_progress:
        env["DIFFALIGN_NO_PROGRESS"] = "1"
    src = str(Path(diffalign.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD, sd15, clip],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "loaded and sampled" in proc.stdout, proc.stderr[-2000:]
    return proc


@pytest.mark.parametrize("no_progress", [True, False], ids=["NO_PROGRESS=1", "unset"])
def test_no_progress_silences_library_bars(tiny_model_dir, no_progress):
    proc = _run_load(tiny_model_dir("sd15"), tiny_model_dir("clip"), no_progress)
    shown = [sign for sign in _BAR_SIGNS if sign in proc.stderr]
    if no_progress:
        assert not shown, proc.stderr[-2000:]
    else:  # the control: the same run draws diffusers' bars without the variable
        assert "Loading pipeline components" in shown, proc.stderr[-2000:]


def test_cli_start_quiets_libraries_imported_later(monkeypatch):
    monkeypatch.setenv("DIFFALIGN_NO_PROGRESS", "1")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    with pytest.raises(SystemExit):
        main(["--version"])
    # transformers and huggingface_hub read it when they are first imported
    assert os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1"


def test_without_the_variable_nothing_changes(monkeypatch):
    from diffalign.engine.progress import quiet_library_bars

    monkeypatch.delenv("DIFFALIGN_NO_PROGRESS", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)

    class Pipe:
        def set_progress_bar_config(self, **kwargs):
            raise AssertionError("the pipeline's bar must be left alone")

    quiet_library_bars(Pipe())
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
