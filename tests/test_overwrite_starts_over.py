"""`--overwrite` starts over: once the model has loaded and before the new settings are
recorded, the earlier run's units go. A `--overwrite` run killed after its first unit left the
earlier run's other units beside the new settings record, and a plain re-run (a resume) then
counted them as done under the new settings: a mix of two runs' outputs."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from diffalign.cli import main
from folder_helpers import interrupted_on_call


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_fill_infer_overwrite_killed_partway_leaves_no_earlier_image(
    tmp_path, tiny_model_dir, monkeypatch
):
    import diffalign.engine.reports as reports
    from fill_helpers import write_image

    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    for i, name in enumerate("abc"):
        write_image(inputs / f"{name}_visible.jpg", (16, 16), seed=i)
        (inputs / f"{name}.txt").write_text(f"prompt {name}\n")
    argv = ["fill", "infer", "--model", tiny_model_dir("flux-fill"), "--steps", "1"]
    argv += ["--max-sequence-length", "8", "--input-dir", str(inputs), "--output", str(out)]
    assert main([*argv, "--save-diptych"]) == 0
    old = {n: _pixels(out / f"{n}.png") for n in "abc"}
    real = reports.save_image
    monkeypatch.setattr(reports, "save_image", interrupted_on_call(real))  # on the 2nd image
    assert main([*argv, "--seed", "5", "--overwrite"]) != 0
    monkeypatch.setattr(reports, "save_image", real)
    # only the image the new run finished; none of the earlier run's (nor its diptychs)
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png"]
    assert not (out / "summary.json").exists()
    assert json.loads((out / "infer_settings.json").read_text())["seed"] == 5
    assert main([*argv, "--seed", "5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["kept_existing"], summary["written"]) == (1, 2)
    for n in "abc":
        assert not np.array_equal(_pixels(out / f"{n}.png"), old[n]), n
    fresh = tmp_path / "fresh"
    assert main([*argv[:-1], str(fresh), "--seed", "5"]) == 0
    for n in "abc":
        assert np.array_equal(_pixels(out / f"{n}.png"), _pixels(fresh / f"{n}.png")), n


def test_build_dataset_overwrite_killed_partway_leaves_no_earlier_sample(
    tmp_path, tiny_model_dir, monkeypatch
):
    import diffalign.noise.dataset as dataset
    from noise_data_helpers import model_args, write_pairs

    data = write_pairs(tmp_path / "data", n=3)
    out = tmp_path / "ds"
    argv = ["noise", "build-dataset", "--data-root", str(data), "--output-dir", str(out)]
    argv += ["--batch-size", "1", *model_args(tiny_model_dir("sdxl"))]
    assert main([*argv, "--steps", "1"]) == 0
    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert len(samples) == 3 and (out / "orthogonal_gaussian_final.json").is_file()
    real = dataset._write_sample
    monkeypatch.setattr(dataset, "_write_sample", interrupted_on_call(real))  # 2nd sample
    assert main([*argv, "--steps", "2", "--no-plots", "--overwrite"]) != 0
    monkeypatch.setattr(dataset, "_write_sample", real)
    # only the sample the new run finished; none of the earlier run's, nor its diagnostics
    assert sorted(p.name for p in (out / "samples").iterdir()) == samples[:1]
    assert not list(out.glob("orthogonal_gaussian_*"))
    assert json.loads((out / "dataset_config.json").read_text())["steps"] == 2
    assert main([*argv, "--steps", "2", "--no-plots"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["skipped_finished"], summary["written_this_run"]) == (1, 2)
    assert sorted(p.name for p in (out / "samples").iterdir()) == samples
    fresh = tmp_path / "fresh"
    assert main([*argv[:5], str(fresh), *argv[6:], "--steps", "2", "--no-plots"]) == 0
    for name in samples:  # every sample as a fresh 2-step build makes it
        for rel in ("run_outputs/loss_curve.json", "meta.json"):
            a, b = (d / "samples" / name / rel for d in (out, fresh))
            assert a.read_bytes() == b.read_bytes(), (name, rel)


def test_removing_a_symlinked_unit_removes_the_link_only(tmp_path):
    """An earlier unit that is a symlink to a folder is unlinked, never followed: what it points
    at is kept (shutil.rmtree raised on the link, an internal error mid --overwrite); a stale
    temporary that is a link goes the same way."""
    from diffalign.engine.io import clean_stale_temporaries, earlier_units, remove_units

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_bytes(b"x")
    out = tmp_path / "samples"
    out.mkdir()
    (out / "000000_a").mkdir()
    (out / "000001_b").symlink_to(elsewhere, target_is_directory=True)
    (out / ".x.abcdefgh.tmp").symlink_to(elsewhere, target_is_directory=True)
    units = earlier_units(out, r"\d{6}_.*", folders=True)
    assert [p.name for p in units] == ["000000_a", "000001_b"]
    remove_units(units)
    assert clean_stale_temporaries(out) == [out / ".x.abcdefgh.tmp"]
    assert list(out.iterdir()) == [] and (elsewhere / "keep.png").read_bytes() == b"x"
