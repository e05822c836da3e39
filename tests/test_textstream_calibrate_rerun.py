"""`textstream calibrate` re-runs (spec E: Safety): the rotation file records its settings, a
re-run with other settings or a foreign summary.json beside --output is refused before the model
loads (nothing written), `--overwrite` replaces, an identical re-run rewrites the same file."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.cli import main
from diffalign.textstream.calibrate import recorded_identity
from diffalign.textstream.rotations import RotationSet, save_rotations


@pytest.fixture()
def run(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    model = tiny_model_dir("sd3")

    def call(output, *extra):
        argv = ["textstream", "calibrate", "--model", model, "--dataset", str(prompts)]
        argv += ["--num-samples", "2", "--steps", "2", "--output", str(output), *extra]
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        return rc, (err.splitlines() or [""])[-1]

    return call


def test_rerun_identical_ok_other_seed_refused_overwrite_replaces(run, tmp_path):
    out = tmp_path / "cal" / "rot.safetensors"
    assert run(out) == (0, "")
    ident = recorded_identity(out)
    assert ident["seed"] == 0 and ident["steps"] == 2 and ident["model"]["weights"]
    assert run(out)[0] == 0  # the same settings: rewritten, no flag needed
    before = out.read_bytes()
    summary = (out.parent / "summary.json").read_bytes()

    rc, last = run(out, "--seed", "1")
    assert rc == 2 and "(seed)" in last and "--overwrite" in last and str(out) in last
    assert out.read_bytes() == before and (out.parent / "summary.json").read_bytes() == summary

    assert run(out, "--seed", "1", "--overwrite")[0] == 0
    assert recorded_identity(out)["seed"] == 1 and out.read_bytes() != before
    assert json.loads((out.parent / "summary.json").read_text())["seed"] == 1


def test_second_output_in_one_folder_refused_for_the_summary(run, tmp_path):
    first = tmp_path / "a.safetensors"
    assert run(first)[0] == 0
    summary = (tmp_path / "summary.json").read_bytes()
    plot = (tmp_path / "procrustes_errors.png").read_bytes()
    second = tmp_path / "b.safetensors"
    rc, last = run(second)
    assert rc == 2 and "summary.json" in last and "a.safetensors" in last and "--overwrite" in last
    assert not second.exists() and (tmp_path / "summary.json").read_bytes() == summary
    assert (tmp_path / "procrustes_errors.png").read_bytes() == plot
    assert run(second, "--overwrite")[0] == 0
    assert json.loads((tmp_path / "summary.json").read_text())["output"] == str(second)


def test_file_without_recorded_settings_refused(run, tmp_path):
    out = tmp_path / "old.safetensors"
    rs = RotationSet(0, [1], {1: torch.eye(4)}, 4, 10, "row_ln", metadata={"seed": 0})
    save_rotations(out, rs)  # what an older diffalign wrote: no identity
    before = out.read_bytes()
    rc, last = run(out)
    assert rc == 2 and "records no calibration settings" in last and "--overwrite" in last
    assert out.read_bytes() == before
