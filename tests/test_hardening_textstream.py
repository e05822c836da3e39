"""Issue 6 on the text stream: residual weights without targets (item 9), where `sample` puts
a rerun with other settings (item 10), DPG sizes (item 11), no model load when a resume has
nothing left (item 12) and GenEval's own option spellings (item 15)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import diffalign.textstream.generate as gen_mod
from diffalign.cli import main

TINY = ["--steps", "2", "--height", "32", "--width", "32"]
GENEVAL_LINE = {
    "tag": "single_object",
    "include": [{"class": "bench", "count": 1}],
    "prompt": "a photo of a bench",
}


@pytest.fixture(scope="module")
def sd3(tiny_model_dir):
    return tiny_model_dir("sd3")


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("diffalign: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------- item 9


@pytest.mark.parametrize(
    "extra",
    [["--residual-weights", "0.5"], ["--residual-weights", "0.5", "--residual-target-layers", ""]],
)
def test_residual_weights_without_targets_are_refused(sd3, tmp_path, capsys, extra):
    out = tmp_path / "o"
    argv = ["textstream", "sample", "--prompt", "a cat", "--model", sd3, *TINY]
    assert main([*argv, "--output-dir", str(out), *extra]) == 2
    line = _error(capsys)
    assert "--residual-weights does nothing" in line and "--residual-target-layers" in line
    assert not out.exists()


# ---------------------------------------------------------------------------- items 10, 12


def test_sample_rerun_with_other_settings_says_where_the_images_went(
    sd3, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "o"
    argv = ["textstream", "sample", "--prompt", "a cat", "--model", sd3, *TINY]
    argv += ["--output-dir", str(out)]
    assert main(argv) == 0
    (first,) = [p for p in out.iterdir() if p.is_dir()]
    capsys.readouterr()
    assert main([*argv, "--cfg", "3"]) == 0
    stdout = capsys.readouterr().out
    second = first.with_name(first.name + "_2")
    assert second.is_dir() and f"{first} holds images made with other settings" in stdout
    assert "cfg: 7.0 -> 3.0" in stdout and f"these images go to {second}" in stdout
    # a resume of either, with nothing left to do, does not load the model
    monkeypatch.setattr(gen_mod, "ResidualGenerator", _refuse)
    assert main([*argv, "--cfg", "3"]) == 0
    assert "0 prompts generated, 1 skipped" in capsys.readouterr().out


def _refuse(*a, **k):
    from diffalign.engine.errors import DiffalignError

    raise DiffalignError("MODEL LOADED")  # what a resume with nothing left must not do


@pytest.mark.parametrize("command", ["generate", "geneval", "dpg", "compbench"])
def test_resume_with_everything_done_does_not_load_the_model(
    sd3, tmp_path, capsys, monkeypatch, command
):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    meta = tmp_path / "m.jsonl"
    meta.write_text(json.dumps(GENEVAL_LINE) + "\n")
    dpg = tmp_path / "dpg"
    dpg.mkdir()
    (dpg / "5.txt").write_text("a red bus")
    out = tmp_path / "o"
    argv = {
        "generate": ["textstream", "generate", "--prompts", str(prompts), *TINY],
        "geneval": ["textstream", "geneval", "--metadata", str(meta), "--n-samples", "1", *TINY],
        "dpg": ["textstream", "dpg", "--prompts-dir", str(dpg), "--steps", "2",
                "--resolution", "32"],
        "compbench": ["textstream", "compbench", "--prompts", str(prompts), "--n-samples", "1",
                      *TINY],
    }[command] + ["--model", sd3, "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    settings = tmp_path / "o.settings.json" if command == "dpg" else out / "settings.json"
    before = settings.read_text()
    monkeypatch.setattr(gen_mod, "ResidualGenerator", _refuse)
    capsys.readouterr()
    assert main(argv) == 0
    assert "0 prompts generated" in capsys.readouterr().out
    assert settings.read_text() == before  # the run's record (dtype, residual) is kept
    assert main([*argv, "--overwrite"]) == 2  # with work left the model is loaded (refused here)
    assert "MODEL LOADED" in capsys.readouterr().err


# ---------------------------------------------------------------------------- item 11


def test_dpg_square_height_and_width_set_the_resolution(sd3, tmp_path, capsys):
    prompts = tmp_path / "dpg"
    prompts.mkdir()
    (prompts / "12.txt").write_text("a cat")
    out = tmp_path / "o"
    argv = ["textstream", "dpg", "--prompts-dir", str(prompts), "--model", sd3, "--steps", "2"]
    assert main([*argv, "--output-dir", str(out), "--height", "32", "--width", "32"]) == 0
    assert Image.open(out / "12.png").size == (64, 64)  # 2x2 tiles of 32
    assert main([*argv, "--output-dir", str(out), "--height", "32", "--width", "64"]) == 2
    assert "square" in _error(capsys)
    from diffalign.textstream.cli_generate import dpg_resolution

    assert dpg_resolution(None, None, None) is None  # the model's own size
    assert dpg_resolution(None, 512, 512) == 512 and dpg_resolution(256, 256, None) == 256


# ---------------------------------------------------------------------------- item 15


def test_geneval_accepts_genevals_own_spellings(sd3, tmp_path):
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text(json.dumps(GENEVAL_LINE) + "\n")
    out = tmp_path / "geneval"
    argv = ["textstream", "geneval", str(meta), "--outdir", str(out), "--n_samples", "2"]
    argv += ["--H", "32", "--W", "32", "--scale", "3", "--steps", "2", "--batch_size", "1"]
    argv += ["--skip_grid", "--seed", "1", "--model", sd3]
    assert main(argv) == 0
    folder = out / "00000"
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.jsonl", "samples"]
    assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
    assert Image.open(folder / "samples" / "0000.png").size == (32, 32)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["options"]["cfg"] == 3.0 and settings["options"]["n_samples"] == 2


def test_geneval_metadata_given_twice_or_never(sd3, tmp_path, capsys):
    meta = tmp_path / "m.jsonl"
    meta.write_text(json.dumps(GENEVAL_LINE) + "\n")
    base = ["textstream", "geneval", "--outdir", str(tmp_path / "o"), "--model", sd3, *TINY]
    assert main(base) == 2
    assert "metadata" in _error(capsys)
    assert main([*base, str(meta), "--metadata", str(tmp_path / "other.jsonl")]) == 2
    assert "two metadata files" in _error(capsys)


def test_per_prompt_grid_is_labelled(sd3, tmp_path):
    out = tmp_path / "o"
    argv = ["textstream", "sample", "--prompt", "a cat", "--model", sd3, *TINY]
    assert main([*argv, "--output-dir", str(out), "--n-samples", "2", "--seed", "3"]) == 0
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    grid = Image.open(folder / "grid.png")
    assert grid.width > 64 and grid.height > 32  # margins for "seed 3" and "+0 +1"
    arr = np.asarray(grid.convert("L"))
    assert (arr[:, : grid.width - 64] < 100).any()


# ---------------------------------------------------------------------------- item 13


def test_run_inference_sh_names_the_folder_it_searched_and_dir(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.endswith("_MODEL_PATH")}
    env.pop("DIFFALIGN_MODELS_DIR", None)
    env.update(
        MODEL_DIR=str(tmp_path / "my-models"),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(repo / "src") + os.pathsep + env.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        ["bash", str(repo / "run_inference.sh"), "sd3.5", "a cat"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    note = [line for line in proc.stderr.splitlines() if line.startswith("run_inference.sh:")]
    assert len(note) == 1
    assert f"{tmp_path / 'my-models'}/sd3.5/" in note[0]
    assert f"{tmp_path / 'my-models'}/sd3.5_large.safetensors" in note[0]
    assert f"diffalign download --only sd3.5 --dir {tmp_path / 'my-models'}" in note[0]
    assert "SD35_MODEL_PATH" in note[0]
