"""Issue 6 on the toy branch: manifest containment and item ownership (item 3), checkpoints and
resume on every training verb (item 5), bit-exact assignment resume (item 6), hostile manifest
ids (item 7) and labelled grids (item 14)."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import load_tensors, read_jsonl, save_tensors
from diffalign.engine.reports import make_grid
from diffalign.noise.toy.assignment import assign
from diffalign.noise.toy.data import load_dataset
from diffalign.noise.toy.models import ToyModelConfig, build_model, save_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An untrained digits generator and an 8-item assignment made in batches of 4."""
    root = tmp_path_factory.mktemp("hardtoy")
    torch.manual_seed(0)
    save_model(build_model(ToyModelConfig.for_dataset("generator", "digits")), root / "gen")
    data = load_dataset("digits", "train").subset(range(8))
    assign(root / "gen", root / "asg", data=data, assign_steps=3, batch_size=4, write_plots=False)
    return root, data


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _noise_files(folder):
    return sorted((folder / "samples").glob("*/noise.safetensors"))


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("diffalign: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _rewrite_manifest(folder, edit) -> None:
    recs = read_jsonl(folder / "manifest.jsonl")
    edit(recs)
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


# ---------------------------------------------------------------------------- item 6


def test_resumed_assignment_is_bit_identical(setup, tmp_path):
    root, data = setup
    straight = root / "asg"
    resumed = tmp_path / "asg"
    shutil.copytree(straight, resumed)
    # a kill in the middle of the second batch: items 5 and 6 never finished
    _rewrite_manifest(resumed, lambda recs: recs.__setitem__(slice(None), recs[:5] + recs[7:]))
    for i in (5, 6):
        shutil.rmtree(resumed / "samples" / f"{i:06d}")
    # and the temporary a kill inside save_tensors leaves
    (resumed / "samples" / "000005").mkdir()
    (resumed / "samples" / "000005" / ".noise.safetensors.k3j4h5g6.tmp").write_bytes(b"half")
    s = assign(root / "gen", resumed, data=data, assign_steps=3, batch_size=4, write_plots=False)
    assert s["finished"] == 8 and s["skipped_finished"] == 6
    assert sorted(p.name for p in (resumed / "samples" / "000005").iterdir()) == [
        "meta.json",
        "noise.safetensors",
    ]
    a, b = _noise_files(straight), _noise_files(resumed)
    assert [p.parent.name for p in a] == [p.parent.name for p in b]
    for pa, pb in zip(a, b):
        ta, _ = load_tensors(pa)
        tb, _ = load_tensors(pb)
        assert all(torch.equal(ta[k], tb[k]) for k in ta), pa.parent.name
        assert _sha(pa) == _sha(pb), pa.parent.name  # identical tensors, identical files


# ---------------------------------------------------------------------------- item 3


def test_manifest_paths_must_stay_inside_the_dataset(setup, tmp_path, capsys):
    root, _ = setup
    asg = tmp_path / "asg"
    shutil.copytree(root / "asg", asg)
    outside = tmp_path / "elsewhere.safetensors"  # a perfectly valid noise file, outside
    shutil.copyfile(asg / "samples" / "000001" / "noise.safetensors", outside)
    gen = str(root / "gen")
    for bad, words in ((str(outside), "must be relative"), ("../elsewhere.safetensors", "outside")):
        _rewrite_manifest(asg, lambda recs, bad=bad: recs[1].update(noise_file=bad))
        for argv in (
            ["noise", "toy", "sft", "--generator-ckpt", gen, "--manifest-path", str(asg)],
            ["noise", "toy", "direct-sft", "--generator-ckpt", gen, "--manifest-path", str(asg)],
        ):
            out = tmp_path / "run"
            assert main([*argv, "--output-dir", str(out), "--max-steps", "1"]) == 2
            line = _one_error(capsys)
            assert "noise_file" in line and words in line and not out.exists()
        # an assignment resume refuses it too, before touching anything
        assert main(["noise", "toy", "assign", "--generator-ckpt", gen, "--output-dir", str(asg),
                     "--max-items", "8", "--assign-steps", "3", "--batch-size", "4"]) == 2  # fmt: skip
        assert "noise_file" in _one_error(capsys)


def test_a_record_must_own_its_noise_file(setup, tmp_path, capsys):
    root, data = setup
    asg = tmp_path / "asg"
    shutil.copytree(root / "asg", asg)
    labels = [r["label"] for r in read_jsonl(asg / "manifest.jsonl")]
    a, b = next((i, j) for i in range(8) for j in range(8) if labels[i] != labels[j])

    def swap(recs):
        recs[a]["noise_file"], recs[b]["noise_file"] = recs[b]["noise_file"], recs[a]["noise_file"]

    _rewrite_manifest(asg, swap)
    gen = str(root / "gen")
    argv = ["noise", "toy", "sft", "--generator-ckpt", gen, "--manifest-path", str(asg)]
    assert main([*argv, "--output-dir", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    assert "belongs to item" in _one_error(capsys)
    # a resume re-assigns both items instead of pairing a target with another item's label
    s = assign(root / "gen", asg, data=data, assign_steps=3, batch_size=4, write_plots=False)
    assert s["finished"] == 8 and s["skipped_finished"] == 6
    for r in read_jsonl(asg / "manifest.jsonl"):
        tensors, meta = load_tensors(asg / r["noise_file"])
        assert meta["id"] == str(r["id"]) and meta["label"] == str(r["label"])
        assert torch.equal(tensors["target"], data.images[r["id"]])


@pytest.mark.parametrize("bad_id", ["../../x", -3, "1e9", None])
def test_hostile_manifest_ids(setup, tmp_path, capsys, bad_id):
    root, data = setup
    asg = tmp_path / "asg"
    shutil.copytree(root / "asg", asg)
    _rewrite_manifest(asg, lambda recs: recs[2].update(id=bad_id))
    gen = str(root / "gen")
    argv = ["noise", "toy", "sft", "--generator-ckpt", gen, "--manifest-path", str(asg)]
    assert main([*argv, "--output-dir", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    line = _one_error(capsys)
    assert "id" in line
    # a resume treats the record as no item of ours: item 2 is simply assigned again
    s = assign(root / "gen", asg, data=data, assign_steps=3, batch_size=4, write_plots=False)
    assert s["finished"] == 8 and not list(tmp_path.glob("x*"))


# ---------------------------------------------------------------------------- item 5


def _interrupt_at(monkeypatch, cls, step_to_kill):
    real = cls.training_step

    def step(self, batch, step, ctx):
        if step == step_to_kill:
            raise KeyboardInterrupt  # what a kill does to the run, minus the process
        return real(self, batch, step, ctx)

    monkeypatch.setattr(cls, "training_step", step)


@pytest.mark.parametrize("verb", ["train-gan", "sft", "direct-sft"])
def test_training_verbs_checkpoint_during_the_run_and_resume(setup, tmp_path, monkeypatch, verb):
    from diffalign.noise.toy.finetune import SftTask
    from diffalign.noise.toy.gan import GanTask

    root, _ = setup
    out = tmp_path / verb
    gen = str(root / "gen")
    argv = {
        "train-gan": ["noise", "toy", "train-gan", "--max-items", "16", "--batch-size", "4"],
        "sft": ["noise", "toy", "sft", "--generator-ckpt", gen, "--manifest-path",
                str(root / "asg"), "--batch-size", "4"],
        "direct-sft": ["noise", "toy", "direct-sft", "--generator-ckpt", gen, "--max-items", "8",
                       "--batch-size", "4"],
    }[verb] + ["--output-dir", str(out), "--max-steps", "5", "--checkpoint-every", "2"]  # fmt: skip
    _interrupt_at(monkeypatch, GanTask if verb == "train-gan" else SftTask, 4)
    assert main(argv) == 130  # "diffalign: interrupted"
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-2", "checkpoint-4"]  # the work up to the kill is kept
    monkeypatch.undo()
    assert main([*argv, "--resume", "latest"]) == 0
    run = json.loads((out / "run_config.json").read_text())
    assert run["resumed_from"].endswith("checkpoint-4")
    assert (out / "checkpoint-final" / "generator.safetensors").is_file()


def test_em_resumes_an_unfinished_m_step_from_its_checkpoint(setup, tmp_path, monkeypatch):
    from diffalign.noise.toy.em_loop import em
    from diffalign.noise.toy.finetune import SftTask

    root, data = setup
    kw = dict(data=data, num_cycles=1, assign_steps=1, max_steps=4, batch_size=4)
    kw.update(write_plots=False, checkpoint_every=2, progress=False)
    _interrupt_at(monkeypatch, SftTask, 3)
    with pytest.raises(KeyboardInterrupt):
        em(root / "gen", tmp_path / "em", **kw)
    monkeypatch.undo()
    em(root / "gen", tmp_path / "em", **kw)
    run = json.loads((tmp_path / "em" / "cycle-000" / "sft" / "run_config.json").read_text())
    assert run["resumed_from"].endswith("checkpoint-2")
    # --resume restart starts an unfinished M-step over instead
    shutil.rmtree(tmp_path / "em" / "cycle-000" / "sft" / "checkpoint-final")
    em(root / "gen", tmp_path / "em", resume="restart", **kw)
    run = json.loads((tmp_path / "em" / "cycle-000" / "sft" / "run_config.json").read_text())
    assert run["resumed_from"] is None


# ---------------------------------------------------------------------------- item 14


def test_label_grid_labels_rows_and_columns():
    from diffalign.engine.reports import label_grid

    cells = [Image.new("L", (16, 16), 128) for _ in range(6)]
    plain = make_grid(cells, ncols=3)
    labelled = label_grid(plain, 2, 3, ["target", "G(Q eps)"], ["a", "b", "c"], "title")
    assert labelled.width > plain.width and labelled.height > plain.height
    arr = np.asarray(labelled.convert("L"))
    left = arr[:, : labelled.width - plain.width]
    top = arr[: labelled.height - plain.height, labelled.width - plain.width :]
    assert (left < 100).any() and (top < 100).any()  # text drawn in both margins
    with pytest.raises(ValueError):
        label_grid(plain, 2, 3, ["only one"])


def test_assign_examples_grid_has_row_and_column_labels(setup, tmp_path):
    root, data = setup
    assign(root / "gen", tmp_path / "a", data=data.subset(range(3)), assign_steps=1)
    img = Image.open(tmp_path / "a" / "assign_examples.png")
    cell = 8 * 8  # 8x8 digits upscaled 8x
    plain_w, plain_h = 3 * cell + 2 * 8, 3 * cell + 2 * 8
    assert img.width > plain_w and img.height > plain_h
    arr = np.asarray(img.convert("L"))
    margin = arr[img.height - plain_h :, : img.width - plain_w]
    assert (margin < 100).sum() > 20  # the row labels target / G(eps) / G(Q eps)


def test_library_refuses_bad_patch_size_and_numbers(setup, tmp_path):
    root, data = setup
    for kw, match in (
        ({"patch_size": 0}, "--patch-size"),
        ({"l1_weight": float("nan")}, "--l1-weight"),
        ({"seed": -1}, "--seed"),
    ):
        with pytest.raises(DiffalignError, match=match):
            assign(root / "gen", tmp_path / "x", data=data, write_plots=False, **kw)
    assert not (tmp_path / "x").exists()


def test_noise_file_metadata_is_written_sorted(setup, tmp_path):
    root, _ = setup
    path = _noise_files(root / "asg")[0]
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert list(header)[0] == "__metadata__"
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    tensors, meta = load_tensors(path)
    save_tensors(tmp_path / "copy.safetensors", tensors, meta)  # metadata read back unordered
    assert _sha(tmp_path / "copy.safetensors") == _sha(path)
