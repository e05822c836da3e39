"""Generation commands end to end on the tiny SD3 (spec T: Generation; FORMATS.md layouts)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from diffalign.textstream.generate import (
    image_seeds,
    model_short_name,
    normalize_dtype,
    sample_folder_names,
    shard_indices,
    slugify,
)
from folder_helpers import interrupted_on_call
from launch_helper import launch_two_cpu_processes

REPO = Path(__file__).resolve().parents[1]
TINY = ["--steps", "2", "--height", "32", "--width", "32"]
GENEVAL = [
    {
        "tag": "single_object",
        "include": [{"class": "bench", "count": 1}],
        "prompt": "a photo of a bench",
    },
    {
        "tag": "position",
        "include": [
            {"class": "dog", "count": 1},
            {"class": "cat", "count": 1, "position": ["left of", 0]},
        ],
        "prompt": "a photo of a cat left of a dog",
    },
]


@pytest.fixture(scope="module")
def sd3(tiny_model_dir):
    return tiny_model_dir("sd3")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("diffalign:")]


# ------------------------------------------------------------------------------------------------
# pure helpers


def test_helpers():
    assert slugify("A watercolor cat, in a garden!") == "a_watercolor_cat_in_a_garden"
    assert slugify("???") == "prompt"
    assert len(slugify("x " * 100)) <= 60
    assert model_short_name("sd3.5") == "sd3.5"
    assert model_short_name("models/sd3.5_large.safetensors") == "sd3.5_large"
    assert model_short_name("stabilityai/stable-diffusion-3-medium-diffusers/") == (
        "stable-diffusion-3-medium-diffusers"
    )
    assert image_seeds(10, 2, 4) == [18, 19, 20, 21]
    # every prompt lands on exactly one rank
    ranks = [shard_indices(7, r, 3) for r in range(3)]
    assert sorted(sum(ranks, [])) == list(range(7)) and ranks[1] == [1, 4]
    names = sample_folder_names(["sd3", "a/m.safetensors", "b/m.safetensors"], ["a cat", "A cat!"])
    assert names[0][0] != names[0][1] and names[0][0].startswith("sd3_a_cat_")
    assert len({n for row in names for n in row}) == 6
    assert normalize_dtype(None, "cuda:0") == "bf16" and normalize_dtype(None, "cpu") == "fp32"
    assert normalize_dtype("float16", "cpu") == "fp16"
    with pytest.raises(DiffalignError, match="unknown dtype"):
        normalize_dtype("int8", "cpu")


# ------------------------------------------------------------------------------------------------
# sample


def test_sample_folders_settings_and_summary(sd3, tmp_path):
    out = tmp_path / "outputs"
    argv = ["textstream", "sample", "--prompt", "a cat", "--prompt", "a red bus"]
    argv += ["--model", sd3, "--save_dir", str(out), "--n-samples", "2", "--seed", "5", *TINY]
    assert main(argv) == 0
    short = model_short_name(sd3)
    assert sorted(p.name for p in out.iterdir() if p.name != ".diffalign.lock") == sorted(
        [f"{short}_a_cat", f"{short}_a_red_bus", "summary.json"]
    )
    folder = out / f"{short}_a_red_bus"
    assert sorted(p.name for p in folder.iterdir()) == [
        "000.png",
        "001.png",
        "grid.png",
        "settings.json",
    ]
    assert Image.open(folder / "000.png").size == (32, 32)
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["prompt"] == "a red bus" and settings["seeds"] == [7, 8]
    assert settings["options"]["steps"] == 2 and settings["options"]["cfg"] == 7.0
    assert settings["residual"] == {"enabled": False}
    assert settings["diffalign_version"] and settings["model_source"]
    assert settings["dtype"] == "fp32" and settings["device"] == "cpu"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts_done"] == 2 and summary["images_written"] == 4
    # the same seeds give the same images, whatever the batch size
    again = tmp_path / "again"
    argv2 = ["textstream", "sample", "--prompt", "a red bus", "--model", sd3, "--seed", "7"]
    argv2 += ["--output-dir", str(again), "--n-samples", "1", *TINY]
    assert main(argv2) == 0
    a = pixels(folder / "000.png")
    b = pixels(again / f"{short}_a_red_bus" / "000.png")
    assert np.abs(a - b).max() <= 1


def test_residual_changes_images_and_empty_targets_are_bit_identical(sd3, tmp_path):
    def run(name, *extra):
        out = tmp_path / name
        argv = ["textstream", "sample", "--prompt", "a cat", "--model", sd3, "--output-dir"]
        assert main([*argv, str(out), *TINY, *extra]) == 0
        (folder,) = [p for p in out.iterdir() if p.is_dir()]
        return folder

    off = run("off")
    empty = run("empty", "--residual-target-layers", "")
    plain = run("plain", "--residual_origin_layer", "0", "--residual_target_layers", "2 3")
    ln = run(
        "ln",
        "--residual-target-layers",
        "1,2,3",
        "--residual-weights",
        "1.5",
        "--residual-mode",
        "ln",
    )
    assert (off / "000.png").read_bytes() == (empty / "000.png").read_bytes()
    assert np.array_equal(pixels(off / "000.png"), pixels(empty / "000.png"))
    assert not np.array_equal(pixels(off / "000.png"), pixels(plain / "000.png"))
    assert not np.array_equal(pixels(off / "000.png"), pixels(ln / "000.png"))
    s = json.loads((plain / "settings.json").read_text())["residual"]
    assert s["enabled"] and s["target_layers"] == [2, 3] and s["weights"] == [1.0, 1.0]
    assert s["mode"] == "plain"
    s = json.loads((ln / "settings.json").read_text())["residual"]
    assert s["mode"] == "ln" and s["weights"] == [1.5, 1.5, 1.5]


def test_rotation_file_sets_layers_and_ln_mode(sd3, tmp_path, capsys):
    import torch

    from diffalign.textstream import RotationSet, save_rotations

    cfg = json.loads((Path(sd3) / "transformer" / "config.json").read_text())
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    gen = torch.Generator().manual_seed(0)
    rots = {t: torch.linalg.qr(torch.randn(d, d, generator=gen))[0] for t in (2, 3)}
    path = tmp_path / "rot.safetensors"
    save_rotations(path, RotationSet(0, [2, 3], rots, d, num_valid_tokens=10, strategy="all"))
    out = tmp_path / "o"
    argv = ["textstream", "sample", "--prompt", "a cat", "--model", sd3, "--output-dir", str(out)]
    assert (
        main([*argv, *TINY, "--residual-procrustes-path", str(path), "--residual-weights", "0.5"])
        == 0
    )
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    res = json.loads((folder / "settings.json").read_text())["residual"]
    assert res["mode"] == "ln" and res["target_layers"] == [2, 3] and res["rotations"]
    assert res["weights"] == [0.5, 0.5] and res["procrustes"]["path"] == str(path)
    # a rotation file calibrated for another width: one line, nothing written
    small = {t: torch.eye(d // 2) for t in (2, 3)}
    save_rotations(tmp_path / "bad.safetensors", RotationSet(0, [2, 3], small, d // 2))
    out2 = tmp_path / "o2"
    argv = ["textstream", "sample", "--prompt", "a cat", "--model", sd3, "--output-dir", str(out2)]
    capsys.readouterr()
    assert (
        main([*argv, *TINY, "--residual-procrustes-path", str(tmp_path / "bad.safetensors")]) == 2
    )
    (line,) = error_lines(capsys)
    assert "feature size" in line and not out2.exists()


def test_sample_changed_settings_keep_old_folder(sd3, tmp_path):
    out = tmp_path / "o"
    base = ["textstream", "sample", "--prompt", "a cat", "--model", sd3, "--output-dir", str(out)]
    assert main([*base, *TINY]) == 0
    short = model_short_name(sd3)
    first = (out / f"{short}_a_cat" / "000.png").read_bytes()
    assert main([*base, *TINY, "--residual-target-layers", "2"]) == 0
    assert (out / f"{short}_a_cat" / "000.png").read_bytes() == first
    assert (out / f"{short}_a_cat_2" / "settings.json").is_file()
    # same settings again: both folders are finished, nothing is generated
    assert main([*base, *TINY, "--residual-target-layers", "2"]) == 0
    assert json.loads((out / "summary.json").read_text())["prompts_skipped"] == 1
    assert not (out / f"{short}_a_cat_3").exists()


# ------------------------------------------------------------------------------------------------
# generate


def test_generate_layout_and_resume(sd3, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog on a skateboard\n\na bird\n")
    out = tmp_path / "gen"
    argv = ["textstream", "generate", "--prompts", str(prompts), "--model", sd3]
    argv += ["--output-dir", str(out), *TINY]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir() if p.name != ".diffalign.lock")
    assert names == [
        "00000_a_cat",
        "00001_a_dog_on_a_skateboard",
        "00002_a_bird",
        "settings.json",
        "summary.json",
    ]
    rec = json.loads((out / "00001_a_dog_on_a_skateboard" / "prompt.json").read_text())
    assert rec["prompt"] == "a dog on a skateboard" and rec["seeds"] == [1]
    assert json.loads((out / "settings.json").read_text())["num_prompts"] == 3
    folder_settings = json.loads(
        (out / "00001_a_dog_on_a_skateboard" / "settings.json").read_text()
    )
    assert folder_settings["prompt"] == "a dog on a skateboard" and folder_settings["seeds"] == [1]
    assert "residual" in json.dumps(folder_settings)
    stamp = (out / "00000_a_cat" / "000.png").stat().st_mtime_ns

    # resume: finished prompts are skipped, a missing one is redone
    shutil.rmtree(out / "00002_a_bird")
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["prompts_done"], summary["prompts_skipped"]) == (1, 2)
    assert (out / "00000_a_cat" / "000.png").stat().st_mtime_ns == stamp
    assert (out / "00002_a_bird" / "000.png").is_file()
    # --overwrite redoes everything
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["prompts_done"] == 3


def test_generate_refuses_mixing_settings(sd3, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "gen"
    argv = ["textstream", "generate", "--prompts", str(prompts), "--model", sd3]
    argv += ["--output-dir", str(out), "--height", "32", "--width", "32"]
    assert main([*argv, "--steps", "2"]) == 0
    before = (out / "00000_a_cat" / "000.png").read_bytes()
    capsys.readouterr()
    assert main([*argv, "--steps", "3"]) == 2
    (line,) = error_lines(capsys)
    assert "other settings" in line and "steps" in line
    assert (out / "00000_a_cat" / "000.png").read_bytes() == before


# ------------------------------------------------------------------------------------------------
# GenEval


def test_geneval_layout_exact(sd3, tmp_path):
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("".join(json.dumps(x) + "\n" for x in GENEVAL))
    out = tmp_path / "geneval_out"
    argv = ["textstream", "geneval", "--metadata", str(meta), "--model", sd3]
    assert main([*argv, "--output-dir", str(out), "--n-samples", "2", *TINY]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name != ".diffalign.lock") == [
        "00000",
        "00001",
        "settings.json",
        "summary.json",
    ]
    for i, line in enumerate(GENEVAL):
        folder = out / f"{i:05d}"
        assert sorted(p.name for p in folder.iterdir()) == ["grid.png", "metadata.jsonl", "samples"]
        with open(folder / "metadata.jsonl") as f:
            assert json.load(f) == line  # the evaluator reads it with json.load
        samples = sorted(p.name for p in (folder / "samples").iterdir())
        assert samples == ["0000.png", "0001.png"]
        assert Image.open(folder / "samples" / "0000.png").size == (32, 32)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["options"]["n_samples"] == 2 and settings["command"] == "geneval"
    # a re-run skips both prompts
    assert main([*argv, "--output-dir", str(out), "--n-samples", "2", *TINY]) == 0
    assert json.loads((out / "summary.json").read_text())["prompts_skipped"] == 2


# ------------------------------------------------------------------------------------------------
# DPG-Bench


def test_dpg_grid_layout_exact(sd3, tmp_path):
    prompts = tmp_path / "dpg" / "prompts"
    prompts.mkdir(parents=True)
    (prompts / "partiprompts7.txt").write_text("a blue cube\n")
    (prompts / "12.txt").write_text("two cats on a sofa")
    out = tmp_path / "dpg_out"
    argv = ["textstream", "dpg", "--prompts-dir", str(prompts.parent), "--model", sd3]
    assert main([*argv, "--output-dir", str(out), "--resolution", "32", "--steps", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["12.png", "partiprompts7.png"]
    assert (tmp_path / "dpg_out.settings.json").is_file()
    assert (tmp_path / "dpg_out.summary.json").is_file()
    grid = pixels(out / "partiprompts7.png")
    assert grid.shape == (64, 64, 3)
    # ids sorted: "12" is prompt 0, "partiprompts7" prompt 1 -> seeds 4..7; the tiles, read
    # row-major, are those four samples
    ref = tmp_path / "ref"
    argv2 = ["textstream", "sample", "--prompt", "a blue cube", "--model", sd3, "--seed", "4"]
    argv2 += ["--n-samples", "4", "--output-dir", str(ref), *TINY]
    assert main(argv2) == 0
    (folder,) = [p for p in ref.iterdir() if p.is_dir()]
    tiles = [grid[:32, :32], grid[:32, 32:], grid[32:, :32], grid[32:, 32:]]
    for k, tile in enumerate(tiles):
        assert np.abs(tile - pixels(folder / f"{k:03d}.png")).max() <= 1


# ------------------------------------------------------------------------------------------------
# a re-run reads the same prompts: the identity's `prompts` is the whole set by content (before
# --limit), so other prompts are refused, another spelling of the same ones resumes, and a
# larger --limit extends


def files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".diffalign.lock"
    }


def refused_for_prompts(capsys, argv, *folders: Path) -> str:
    """Run `argv`: exit 2, one line naming `prompts`, nothing in `folders` changed."""
    before = [files(f) for f in folders]
    capsys.readouterr()
    assert main(argv) == 2
    (line,) = error_lines(capsys)
    assert "made with other settings (prompts" in line and "--overwrite" in line
    assert [files(f) for f in folders] == before
    return line


def test_geneval_rerun_with_other_prompts_is_refused(sd3, tmp_path, capsys):
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps(x) + "\n" for x in GENEVAL))
    b = tmp_path / "b.jsonl"  # as many prompts, other texts
    b.write_text(
        "".join(json.dumps({**x, "prompt": x["prompt"] + ", oil"}) + "\n" for x in GENEVAL)
    )
    out = tmp_path / "out"
    argv = ["textstream", "geneval", "--model", sd3, "--output-dir", str(out), "--n-samples", "1"]
    argv += TINY
    assert main([*argv, "--metadata", str(a), "--limit", "1"]) == 0
    stamp = (out / "00000" / "samples" / "0000.png").stat().st_mtime_ns
    refused_for_prompts(capsys, [*argv, "--metadata", str(b), "--limit", "1"], out)
    refused_for_prompts(capsys, [*argv, "--metadata", str(b)], out)
    # the same lines under another name and folder, all of them: prompt 0 is kept, 1 is added
    copy = tmp_path / "copy" / "evaluation_metadata.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(a.read_bytes())
    assert main([*argv, "--metadata", str(copy.parent)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["prompts_done"], summary["prompts_skipped"]) == (1, 1)
    assert (out / "00000" / "samples" / "0000.png").stat().st_mtime_ns == stamp
    assert json.loads((out / "00001" / "metadata.jsonl").read_text()) == GENEVAL[1]


def test_dpg_rerun_with_other_prompts_is_refused(sd3, tmp_path, capsys):
    a, b = tmp_path / "a" / "prompts", tmp_path / "b"
    a.mkdir(parents=True)
    b.mkdir()
    for folder, texts in ((a, ("a blue cube", "a red ball")), (b, ("two cats", "a green car"))):
        for pid, text in zip(("p1", "p2"), texts):  # the same ids: the same tile names
            (folder / f"{pid}.txt").write_text(text)
    out = tmp_path / "dpg_out"
    argv = ["textstream", "dpg", "--model", sd3, "--output-dir", str(out), "--resolution", "32"]
    argv += ["--steps", "2", "--limit", "1"]
    assert main([*argv, "--prompts-dir", str(a)]) == 0
    assert sorted(os.listdir(out)) == ["p1.png"]
    settings = tmp_path / "dpg_out.settings.json"
    recorded = settings.read_bytes()
    refused_for_prompts(capsys, [*argv, "--prompts-dir", str(b)], out)
    assert settings.read_bytes() == recorded
    # the same prompts through the parent folder: nothing left to do
    assert main([*argv, "--prompts-dir", str(a.parent)]) == 0
    assert json.loads((tmp_path / "dpg_out.summary.json").read_text())["prompts_skipped"] == 1


def test_generate_rerun_with_other_prompts_is_refused(sd3, tmp_path, capsys):
    from diffalign.engine.identity import samples_sha256

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a cat\na dog\n")
    b.write_text("A cat!\na bird\n")  # prompt 0 has prompt 0's folder name, 00000_a_cat
    out = tmp_path / "gen"
    argv = ["textstream", "generate", "--model", sd3, "--output-dir", str(out), *TINY]
    assert main([*argv, "--prompts", str(a), "--limit", "1"]) == 0
    identity = json.loads((out / "settings.json").read_text())["identity"]
    # the whole file, as the folders record each prompt (text, id), --limit aside
    assert identity["prompts"] == samples_sha256([["a cat", "00000"], ["a dog", "00001"]])
    refused_for_prompts(capsys, [*argv, "--prompts", str(b)], out)
    refused_for_prompts(capsys, [*argv, "--prompts", str(b), "--limit", "1"], out)
    assert main([*argv, "--prompts", f"txt:{tmp_path}/./a.txt", "--limit", "1"]) == 0
    assert json.loads((out / "summary.json").read_text())["prompts_skipped"] == 1
    # a folder recorded without the prompts (an older diffalign) is not added to
    record = json.loads((out / "settings.json").read_text())
    del record["identity"]["prompts"]
    (out / "settings.json").write_text(json.dumps(record))
    line = refused_for_prompts(capsys, [*argv, "--prompts", str(a)], out)
    assert "prompts: not recorded" in line


def test_sample_other_prompt_or_index_gets_another_folder(sd3, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["textstream", "sample", "--model", sd3, "--output-dir", str(out), *TINY]
    short = model_short_name(sd3)
    assert main([*base, "--prompt", "a cat"]) == 0
    first = files(out / f"{short}_a_cat")
    capsys.readouterr()
    # the same folder name, another prompt; then "a cat" as prompt 1 (seed 1, not 0)
    assert main([*base, "--prompt", "A cat!"]) == 0
    assert main([*base, "--prompt", "a dog", "--prompt", "a cat"]) == 0
    said = capsys.readouterr().out
    assert f"{short}_a_cat holds images made with other settings (prompts)" in said
    assert "(prompt_index: 0 -> 1)" in said
    assert files(out / f"{short}_a_cat") == first
    made = {
        name: json.loads((out / name / "settings.json").read_text())
        for name in (f"{short}_a_cat_2", f"{short}_a_cat_3")
    }
    assert [(s["prompt"], s["seeds"]) for s in made.values()] == [("A cat!", [0]), ("a cat", [1])]


# ------------------------------------------------------------------------------------------------
# bad input: one line, non-zero exit, nothing written


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--residual-target-layers", "9"], "out of range"),
        (["--residual-target-layers", "2,3", "--residual-weights", "1,2,3"], "weights"),
        (["--residual-target-layers", "2,x"], "not an integer"),
        (["--residual-target-layers", "0", "--residual-origin-layer", "1"], "origin layer"),
        (["--residual-procrustes-path", "missing.safetensors"], "not found"),
        (
            ["--residual-layernorm", "--residual-mode", "plain", "--residual-target-layers", "2"],
            "ln",
        ),
        (["--metadata", "nowhere.jsonl"], "not found"),
        (["--model", "/nonexistent/sd3-model"], "nonexistent"),
        (["--height", "33"], "multiple of"),
    ],
)
def test_bad_input_one_line_nothing_written(sd3, tmp_path, capsys, extra, match):
    meta = tmp_path / "m.jsonl"
    meta.write_text(json.dumps(GENEVAL[0]) + "\n")
    out = tmp_path / "out"
    argv = ["textstream", "geneval", "--metadata", str(meta), "--model", sd3, *TINY]
    argv += ["--output-dir", str(out), "--n-samples", "1", *extra]
    capsys.readouterr()
    assert main(argv) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("diffalign: error:") and match in line
    assert not out.exists()


def test_geneval_and_dpg_library_checks_in_order(sd3, tmp_path):
    """From Python (the CLI refuses --limit 0 itself): the sampling options are checked before
    the prompts are read, then --limit, then the output folder; nothing is written."""
    from diffalign.textstream.generate import (
        GenerationConfig,
        ResidualConfig,
        run_dpg,
        run_geneval,
    )

    meta = tmp_path / "m.jsonl"
    meta.write_text(json.dumps(GENEVAL[0]) + "\n")
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "1.txt").write_text("x")
    rc, out = ResidualConfig(), tmp_path / "out"
    good, bad = GenerationConfig(model=sd3), GenerationConfig(model=sd3, steps=0)
    with pytest.raises(DiffalignError, match="--steps must be at least 1"):
        run_geneval(tmp_path / "missing.jsonl", out, bad, rc)
    with pytest.raises(DiffalignError, match="--steps must be at least 1"):
        run_dpg(tmp_path / "missing", out, bad, rc, resolution=32)
    with pytest.raises(DiffalignError, match=r"^--limit must be at least 1 \(got 0\)$"):
        run_geneval(meta, out, good, rc, limit=0)
    with pytest.raises(DiffalignError, match=r"^--limit must be at least 1 \(got 0\)$"):
        run_dpg(prompts, out, good, rc, resolution=32, limit=0)
    out.write_text("a file")
    not_a_folder = "^" + re.escape(f"--output-dir {out} exists and is not a folder") + "$"
    with pytest.raises(DiffalignError, match=not_a_folder):
        run_geneval(meta, out, good, rc, limit=1)
    with pytest.raises(DiffalignError, match=not_a_folder):
        run_dpg(prompts, out, good, rc, resolution=32, limit=1)
    assert out.read_text() == "a file" and not (tmp_path / "out.settings.json").exists()


def test_bad_dpg_and_sample_input(sd3, tmp_path, capsys):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "1.txt").write_text("x")
    out = tmp_path / "out"
    argv = ["textstream", "dpg", "--prompts-dir", str(prompts), "--model", sd3]
    assert main([*argv, "--output-dir", str(out), "--resolution", "32", "--height", "64"]) == 2
    assert "--resolution" in error_lines(capsys)[0]
    assert main([*argv, "--output-dir", str(out), "--prompts-dir", str(tmp_path / "no")]) == 2
    assert "not found" in error_lines(capsys)[0]
    argv = ["textstream", "sample", "--prompt", "  ", "--model", sd3, "--output-dir", str(out)]
    assert main(argv) == 2
    assert error_lines(capsys)
    assert not out.exists() and not (tmp_path / "out.settings.json").exists()


def test_sample_refuses_a_model_given_twice(sd3, tmp_path, capsys):
    """`sample --model M M` wrote one folder named with a hash of M and reported the second
    model's prompt as skipped; now one line before anything loads or is written."""
    out = tmp_path / "out"
    argv = ["textstream", "sample", "--prompt", "a cat", "--model", sd3, sd3, *TINY]
    capsys.readouterr()
    assert main([*argv, "--output-dir", str(out)]) == 2
    (line,) = error_lines(capsys)
    assert line == f"diffalign: error: --model lists {sd3} twice: give each model once"
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# sharding under accelerate launch, and the shell launcher


def _env() -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        DIFFALIGN_NO_PROGRESS="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def test_geneval_two_processes_shard_and_merge(sd3, tmp_path):
    meta = tmp_path / "evaluation_metadata.jsonl"
    lines = [*GENEVAL, {**GENEVAL[0], "prompt": "a photo of a cow"}]
    meta.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "sharded"
    target = ["-m", "diffalign.cli", "textstream", "geneval", "--metadata", str(meta)]
    target += ["--model", sd3, "--output-dir", str(out), "--n-samples", "1", "--device", "cpu"]
    proc = launch_two_cpu_processes([*target, *TINY], env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["prompts_done"] == 3 and summary["images_written"] == 3
    for i, line in enumerate(lines):
        assert json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text()) == line
        assert (out / f"{i:05d}" / "samples" / "0000.png").is_file()
    # the sharded images equal the single-process ones (seeds depend on the prompt index only)
    single = tmp_path / "single"
    argv = ["textstream", "geneval", "--metadata", str(meta), "--model", sd3, "--limit", "2"]
    assert main([*argv, "--output-dir", str(single), "--n-samples", "1", *TINY]) == 0
    for i in range(2):
        a = pixels(out / f"{i:05d}" / "samples" / "0000.png")
        b = pixels(single / f"{i:05d}" / "samples" / "0000.png")
        assert np.abs(a - b).max() <= 1


def test_run_inference_sh(sd3, tmp_path):
    script = REPO / "run_inference.sh"
    env = _env()
    env.update(MODEL_DIR=str(tmp_path / "models"), SD3_MODEL_PATH=sd3)
    bad = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "usage" in bad.stderr.lower()
    bad = subprocess.run(
        ["bash", str(script), "sdxl", "a cat"], env=env, capture_output=True, text=True
    )
    assert bad.returncode != 0 and "usage" in bad.stderr.lower()
    out = tmp_path / "outputs"
    cmd = ["bash", str(script), "sd3", "a watercolor cat", *TINY]
    cmd += ["--save_dir", str(out), "--residual_target_layers", "2,3", "--residual_weights", "0.5"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert folder.name == f"{model_short_name(sd3)}_a_watercolor_cat"
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["residual"]["target_layers"] == [2, 3]
    assert settings["options"]["vae"] is None  # no VAE file under MODEL_DIR: not passed


def _launcher_env(tmp_path) -> dict:
    env = _env()
    for name in ("SD3_MODEL_PATH", "SD35_MODEL_PATH", "VAE_PATH", "DIFFALIGN_MODELS_DIR"):
        env.pop(name, None)
    env["MODEL_DIR"] = str(tmp_path / "models")
    return env


def test_run_inference_sh_uses_downloaded_folder_and_set_vae(sd3, tmp_path):
    """Without the seed's sd3_medium.safetensors, the folder `diffalign download --only sd3`
    writes (MODEL_DIR/sd3) is used; a VAE_PATH that is set is passed even when it is a folder."""
    (tmp_path / "models").mkdir()
    os.symlink(sd3, tmp_path / "models" / "sd3")
    env = _launcher_env(tmp_path)
    env["VAE_PATH"] = str(Path(sd3) / "vae")
    out = tmp_path / "outputs"
    cmd = ["bash", str(REPO / "run_inference.sh"), "sd3", "a cat", *TINY, "--save_dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["model_source"]["preset"] == "sd3"
    assert Path(settings["model_source"]["source"]) == (tmp_path / "models" / "sd3").absolute()
    assert settings["options"]["vae"] == str(Path(sd3) / "vae")


def test_run_inference_sh_missing_weights_are_one_line_errors(sd3, tmp_path):
    script = str(REPO / "run_inference.sh")
    env = _launcher_env(tmp_path)
    proc = subprocess.run(
        ["bash", script, "sd3.5", "a cat"], env=env, capture_output=True, text=True
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("diffalign:")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and "diffalign download --only sd3.5" in lines[0]
    env.update(SD3_MODEL_PATH=sd3, VAE_PATH=str(tmp_path / "no_vae.safetensors"))
    out = tmp_path / "outputs"
    cmd = ["bash", script, "sd3", "a cat", *TINY, "--save_dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("diffalign:")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and "no_vae.safetensors" in lines[0] and not out.exists()


def units(folder: Path) -> list[str]:
    """What a layout folder holds, less its run files and lock."""
    run_files = {"settings.json", "summary.json", ".diffalign.lock"}
    return sorted(n for n in os.listdir(folder) if n not in run_files)


def test_overwrite_leaves_no_earlier_image_beside_new_ones(sd3, tmp_path, monkeypatch):
    """`--overwrite` redid units one by one: a smaller prompt set kept the earlier run's extra
    folders / tiles (GenEval and DPG-Bench score every one), and a killed `--overwrite` run
    finished by a plain re-run kept earlier images as done under the new settings. The earlier
    units go once the model has loaded."""
    import diffalign.textstream.generate as generate

    meta = tmp_path / "m.jsonl"
    meta.write_text("".join(json.dumps(x) + "\n" for x in GENEVAL))
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(GENEVAL[0]) + "\n")
    out = tmp_path / "g"
    argv = ["textstream", "geneval", "--model", sd3, "--output-dir", str(out), "--n-samples", "1"]
    argv += ["--height", "32", "--width", "32"]
    assert main([*argv, "--steps", "1", "--metadata", str(meta)]) == 0
    assert units(out) == ["00000", "00001"]
    assert main([*argv, "--steps", "1", "--metadata", str(one), "--overwrite"]) == 0
    assert units(out) == ["00000"]
    # a killed --overwrite run (other steps): no unit of the earlier run survives it
    assert main([*argv, "--steps", "1", "--metadata", str(meta), "--overwrite"]) == 0
    old = pixels(out / "00001" / "samples" / "0000.png")
    real = generate._write_folder
    monkeypatch.setattr(generate, "_write_folder", interrupted_on_call(real))  # 2nd prompt
    assert main([*argv, "--steps", "2", "--metadata", str(meta), "--overwrite"]) != 0
    monkeypatch.setattr(generate, "_write_folder", real)
    assert not (out / "00001").exists()
    assert main([*argv, "--steps", "2", "--metadata", str(meta)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["prompts_done"], summary["prompts_skipped"]) == (1, 1)
    assert not np.array_equal(pixels(out / "00001" / "samples" / "0000.png"), old)
    # DPG-Bench: a tile of a prompt the new set lacks goes too
    prompts = tmp_path / "dpg"
    prompts.mkdir()
    for pid, text in (("p1", "a blue cube"), ("p2", "a red ball")):
        (prompts / f"{pid}.txt").write_text(text)
    dpg = tmp_path / "dpg_out"
    argv = ["textstream", "dpg", "--model", sd3, "--output-dir", str(dpg), "--resolution", "32"]
    argv += ["--steps", "1"]
    assert main([*argv, "--prompts-dir", str(prompts)]) == 0
    (prompts / "p2.txt").unlink()
    (dpg / "notes.txt").write_text("mine")  # not a tile: kept
    assert main([*argv, "--prompts-dir", str(prompts), "--overwrite"]) == 0
    assert units(dpg) == ["notes.txt", "p1.png"]


def test_dpg_overwrite_of_a_folder_no_run_recorded_keeps_its_pngs(sd3, tmp_path):
    """`--overwrite` removed every `*.png` of `--output-dir` though no `OUT.settings.json`
    said a dpg run made them: a mistaken folder of the user's own images lost them."""
    prompts = tmp_path / "dpg"
    prompts.mkdir()
    (prompts / "p1.txt").write_text("a blue cube")
    out = tmp_path / "photos"
    out.mkdir()
    for name in ("holiday.png", "cat.png"):
        Image.new("RGB", (8, 8), "red").save(out / name)
    argv = ["textstream", "dpg", "--model", sd3, "--output-dir", str(out), "--resolution", "32"]
    assert main([*argv, "--steps", "1", "--prompts-dir", str(prompts), "--overwrite"]) == 0
    assert units(out) == ["cat.png", "holiday.png", "p1.png"]


def test_a_config_recorded_by_path_reads_not_recorded():
    """A folder made with --single-file-config before its identity was recorded (the option
    held the path) read as if the config had changed (`single_file_config.weights: None -> ..`);
    an older record lacking a nested key says so, once; real changes still read as before."""
    from diffalign.textstream.generate import _settings_diff

    def record(**options):
        return {"identity": {"options": {"steps": 2, **options}, "residual_options": {}}}

    new = record(single_file_config={"path": "/c", "weights": "ab", "config": "cd"})
    old = record(single_file_config="/c")
    assert _settings_diff(old, new) == [
        "single_file_config: not recorded (made by an older diffalign)"
    ]
    assert _settings_diff(record(), new) == [
        "single_file_config: not recorded (made by an older diffalign)"
    ]
    changed = record(single_file_config={"path": "/c", "weights": "00", "config": "cd"})
    assert _settings_diff(changed, new) == ["single_file_config.weights: '00' -> 'ab'"]
    assert _settings_diff(record(), record(steps=3)) == ["steps: 2 -> 3"]
    # an option not given then (recorded None) and given now is a change, not an older record
    without = record(single_file_config=None, vae=None)
    given = record(single_file_config=None, vae={"path": "/v", "weights": "ab"})
    diffs = _settings_diff(without, given)
    assert "vae.path: None -> '/v'" in diffs and not any("not recorded" in d for d in diffs)
    old_prompts = {"identity": {**new["identity"]}}
    new_prompts = {"identity": {**new["identity"], "prompts": "d1"}}
    assert _settings_diff(old_prompts, new_prompts) == [
        "prompts: not recorded (made by an older diffalign)"
    ]
