"""A refused run leaves the file system as it found it (spec E: bad input -> one line, exit 2,
nothing lost): no new empty output folder (nor its new parents), no lock file of its own, and an
output folder that existed before is untouched. The refusals here all come after the job took its
output folder's lock (`engine.io.output_lock`) and before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import LOCK_NAME, atomic_dir, output_lock, undo_new_folders
from fill_helpers import write_triptychs
from noise_data_helpers import write_pairs


def _inputs(root: Path) -> dict[str, Path]:
    """Bad or valid inputs the refused runs below point at (none of them a real model)."""
    triptychs = write_triptychs(root / "triptychs", n=1)
    no_triptychs = root / "no-triptychs"
    no_triptychs.mkdir()
    (no_triptychs / "captions.jsonl").write_text("\n")
    uncaptioned = root / "uncaptioned"  # a triptych folder whose triptych has no caption
    uncaptioned.mkdir()
    for panel in ("visible", "target", "semantic"):
        (uncaptioned / f"x_{panel}.png").write_bytes((triptychs / "t0.png").read_bytes())
    prompts = root / "prompts.jsonl"
    prompts.write_text('{"prompt": "a cat"}\n')
    not_sd3 = root / "sd15"  # a pipeline folder of another family
    not_sd3.mkdir()
    (not_sd3 / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline"})
    )
    return {
        "triptychs": triptychs,
        "no_triptychs": no_triptychs,
        "uncaptioned": uncaptioned,
        "prompts": prompts,
        "pairs": write_pairs(root / "pairs", n=1),
        "not_sd3": not_sd3,
        "missing": root / "missing",
    }


# (job, argv with {out} for the output folder and {name} for an input of `_inputs`)
REFUSED = [
    (
        "fill-train-bad-dataset",
        "fill train --model {missing} --data {no_triptychs} --output-dir {out}",
    ),
    (
        "fill-train-missing-model",
        "fill train --model {missing} --data {triptychs} --panel 16 --output-dir {out}",
    ),
    ("fill-make-triptychs", "fill make-triptychs --input {uncaptioned} --output-dir {out}"),
    ("repa-preprocess-images", "repa preprocess images --source {missing} --data-dir {out}"),
    (
        "textstream-train-weights",
        "textstream train-weights --cache {missing} --model {missing} --output-dir {out}",
    ),
    (
        "textstream-calibrate",
        "textstream calibrate --model {missing} --dataset {prompts} --output {out}/rot.safetensors",
    ),
    (
        "textstream-cache",
        "textstream cache --model {not_sd3} --dataset {pairs}/pairs.jsonl --output-dir {out}",
    ),
    ("noise-em", "noise em --data-root {pairs} --model {missing} --output-dir {out}"),
    ("noise-toy-evaluate", "noise toy evaluate --generator-ckpt {missing} --output-dir {out}"),
    ("noise-toy-optimize", "noise toy optimize --generator-ckpt {missing} --output-dir {out}"),
]


def _refuse(argv: str, out: Path, inputs: dict[str, Path], capsys) -> str:
    args = [a.format(out=out, **inputs) for a in argv.split()]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffalign: error: "), err
    return lines[0]


@pytest.mark.parametrize("argv", [a for _, a in REFUSED], ids=[j for j, _ in REFUSED])
def test_refused_run_leaves_no_new_folder(argv, tmp_path, capsys):
    inputs = _inputs(tmp_path / "in")
    out = tmp_path / "new" / "run"  # neither folder exists
    _refuse(argv, out, inputs, capsys)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("argv", [a for _, a in REFUSED], ids=[j for j, _ in REFUSED])
def test_refused_run_leaves_an_existing_folder_untouched(argv, tmp_path, capsys):
    inputs = _inputs(tmp_path / "in")
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _refuse(argv, out, inputs, capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # no lock file left either
    assert (out / "notes.txt").read_text() == "mine"


def test_failed_download_leaves_no_models_folder(tmp_path, monkeypatch, capsys):
    """A fetch that fails (here: offline) is not bad input (exit 1, a line per asset), but the
    --dir it would have filled is not left behind empty."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["download", "--only", "sd15", "--dir", str(tmp_path / "new" / "models")]) == 1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------
# the engine's rule, directly


class Refused(Exception):
    pass


def test_output_lock_removes_only_what_a_refused_run_created(tmp_path):
    with pytest.raises(Refused):
        with output_lock(tmp_path / "a" / "b" / "c"):
            raise Refused
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(Refused):  # the run wrote a file: the folder stays, its lock does not
        with output_lock(tmp_path / "a" / "b") as folder:
            (folder / "failures.jsonl").write_text("{}\n")
            raise Refused
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["failures.jsonl"]

    kept = tmp_path / "kept"  # an empty folder that existed before stays
    kept.mkdir()
    with pytest.raises(Refused):
        with output_lock(kept / "x" / "y"):
            raise Refused
    assert kept.is_dir() and list(kept.iterdir()) == []

    old_lock = tmp_path / "old"  # a lock file left by an earlier run is not this run's to remove
    old_lock.mkdir()
    (old_lock / LOCK_NAME).write_text("{}")
    with pytest.raises(Refused):
        with output_lock(old_lock):
            raise Refused
    assert [p.name for p in old_lock.iterdir()] == [LOCK_NAME]


def test_output_lock_keeps_a_finished_run_and_the_reentrant_holder_folder(tmp_path):
    with output_lock(tmp_path / "done"):
        pass
    assert [p.name for p in (tmp_path / "done").iterdir()] == [LOCK_NAME]  # as before

    outer = tmp_path / "em"
    with output_lock(outer):
        with pytest.raises(Refused):
            with output_lock(tmp_path / "em"):  # re-entered: the outer run still owns it
                raise Refused
        assert (outer / LOCK_NAME).is_file()
        with pytest.raises(Refused):
            with output_lock(outer / "cycle-1"):  # a refused inner run cleans only its own
                raise Refused
        assert [p.name for p in outer.iterdir()] == [LOCK_NAME]


def test_atomic_writers_and_undo_new_folders_remove_new_empty_parents(tmp_path):
    with pytest.raises(Refused):
        with atomic_dir(tmp_path / "a" / "b" / "model"):
            raise Refused
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(DiffalignError):
        with undo_new_folders(tmp_path / "x" / "y"):
            (tmp_path / "x" / "y").mkdir(parents=True)
            (tmp_path / "x" / "keep.txt").write_text("k")
            raise DiffalignError("refused")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["keep.txt"]  # y removed, x kept


def test_overwrite_refused_while_setting_up_keeps_the_previous_run(tmp_path):
    """overwrite=True clears the previous run only once models and data are set up: a run
    refused there (its data loader finds no usable item) loses nothing already written."""
    from diffalign.engine.train import TrainConfig, train
    from train_worker import RegressionTask

    class NoUsableData(RegressionTask):
        def train_dataloader(self):
            raise DiffalignError("no usable training items")

    cfg = dict(output_dir=str(tmp_path), tracker="none", progress=False, max_steps=1)
    train(RegressionTask(), TrainConfig(**cfg))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(DiffalignError, match="no usable training items"):
        train(NoUsableData(), TrainConfig(**cfg, overwrite=True))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_noise_em_overwrite_refused_keeps_the_earlier_cycles(tmp_path, capsys):
    """--overwrite removes the earlier cycles only once the pairs and the initial model load."""
    inputs = _inputs(tmp_path / "in")
    out = tmp_path / "em"
    (out / "cycle-000").mkdir(parents=True)
    (out / "cycle-000" / "kept.txt").write_text("k")
    (out / "summary.json").write_text("{}")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for argv in (
        "noise em --data-root {pairs} --model {missing} --output-dir {out} --overwrite",
        "noise em --data-root {missing} --model {missing} --output-dir {out} --overwrite",
    ):
        _refuse(argv, out, inputs, capsys)
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
