"""Issue 14 items 12-18: what a new user trips on (dataset image size, failed runs that must not
block the corrected rerun, default sample sizes, one --output-dir spelling, fill resume latest,
wording, README and plots)."""

from __future__ import annotations

import json

import pytest

from diffalign.cli import main
from noise_data_helpers import SIZE, write_pairs

TRAIN = ["--tracker", "none", "--batch-size", "2", "--max-steps", "1", "--no-plots"]


@pytest.fixture(scope="module")
def sdxl(tiny_model_dir):
    return tiny_model_dir("sdxl")


@pytest.fixture(scope="module")
def dataset(sdxl, tmp_path_factory):
    from diffalign.noise.dataset import AssignSettings, build_dataset
    from diffalign.noise.generators import load_generator

    root = tmp_path_factory.mktemp("nu_ds")
    data = write_pairs(root / "data", n=2)
    gen = load_generator(sdxl, height=SIZE, width=SIZE, device="cpu")
    build_dataset(gen, data, root / "ds", AssignSettings(steps=1), batch_size=2, plots=False)
    return root / "ds"


def _err_lines(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x.strip()]


# ------------------------------------------------------------------ item 12


def test_sft_takes_the_dataset_image_size(sdxl, dataset, tmp_path, capsys):
    """No --height/--width: the size dataset_config.json records (32), not the model's (64)."""
    base = ["noise", "sft", "--manifest-path", str(dataset), "--model", sdxl, *TRAIN[:6]]
    assert main([*base, "--output-dir", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "checkpoint-final").is_dir()
    capsys.readouterr()
    # an explicit size that contradicts the dataset: one clear line, exit 2
    assert main([*base, "--output-dir", str(tmp_path / "x"), "--height", "64"]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and err[0].startswith("diffalign: error:"), err
    assert "64x32 contradict the image size 32x32" in err[0] and "dataset_config.json" in err[0]


def test_sft_api_names_the_size_not_a_broken_noise_file(sdxl, dataset, tmp_path):
    from diffalign.engine.errors import DiffalignError
    from diffalign.noise.generators import load_generator
    from diffalign.noise.sft import sft

    gen = load_generator(sdxl, device="cpu")  # the model's default size: 512
    with pytest.raises(DiffalignError, match="holds 32x32 images and noises.*makes 512x512"):
        sft(gen, dataset, tmp_path / "run", max_steps=1, tracker="none", progress=False)


# ------------------------------------------------------------------ item 13


def test_build_dataset_failed_run_does_not_block_the_corrected_rerun(sdxl, tmp_path, capsys):
    """Every target of the wrong size: zero samples; the rerun with --resize is not refused, and
    --overwrite starts a finished dataset over under other settings."""
    data = write_pairs(tmp_path / "data", n=2, size=48)
    out = tmp_path / "ds"
    argv = ["noise", "build-dataset", "--data-root", str(data), "--output-dir", str(out)]
    argv += ["--model", sdxl, "--height", "32", "--width", "32", "--steps", "1"]
    argv += ["--no-plots", "--num-intermediates", "0"]
    assert main(argv) == 2  # "no sample could be assigned"
    assert json.loads((out / "summary.json").read_text())["finished"] == 0
    assert main([*argv, "--resize"]) == 0  # other settings, but nothing was written under them
    s = json.loads((out / "summary.json").read_text())
    assert s["finished"] == 2 and s["failed"] == 0
    assert not (out / "failures.jsonl").read_text().strip()
    capsys.readouterr()
    assert main([*argv, "--resize", "--steps", "2"]) == 2  # a finished dataset binds
    err = _err_lines(capsys)
    assert "other settings (steps)" in err[-1] and "--overwrite" in err[-1]
    assert main([*argv, "--resize", "--steps", "2", "--overwrite"]) == 0
    assert json.loads((out / "dataset_config.json").read_text())["steps"] == 2


def test_em_names_failures_and_overwrite_starts_over(sdxl, tmp_path, capsys):
    data = write_pairs(tmp_path / "data", n=2, size=48)
    work = tmp_path / "em"
    argv = ["noise", "em", "--data-root", str(data), "--output-dir", str(work), "--model", sdxl]
    argv += ["--height", "32", "--width", "32", "--num-cycles", "1", "--assign-steps", "1"]
    argv += ["--train-max-steps", "1", "--tracker", "none", "--no-plots"]
    argv += ["--num-intermediates", "0"]
    assert main(argv) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "no finished samples; 2 failed, item 0 first:" in err[0], err
    assert "48x48" in err[0] and "failures.jsonl" in err[0]
    assert main([*argv, "--resize"]) == 0  # the failed E-step does not block the rerun
    final = work / "cycle-000" / "sft" / "checkpoint-final"
    assert final.is_dir()
    marker = work / "cycle-000" / "marker"
    marker.write_text("old")
    # without --height the rerun goes on at the size its first dataset records (item 12)
    rerun = [a for a in argv if a not in ("--height", "--width", "32")]
    assert main([*rerun, "--resize"]) == 0 and marker.is_file()  # resumed: cycle kept
    assert main([*argv, "--resize", "--overwrite"]) == 0
    assert not marker.exists() and final.is_dir()  # started over
    # the seed's spelling of the folder still works
    assert main([*[a if a != "--output-dir" else "--work-dir" for a in argv], "--resize"]) == 0
