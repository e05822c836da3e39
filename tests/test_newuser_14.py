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


# ------------------------------------------------------------------ items 13, 14: text stream


@pytest.fixture(scope="module")
def sd3(tiny_model_dir):
    return tiny_model_dir("sd3")  # transformer sample_size 16, VAE factor 2: its own size 32


def test_textstream_defaults_to_the_model_size_and_refuses_one_it_cannot_make(
    sd3, tmp_path, capsys
):
    from PIL import Image

    out = tmp_path / "s"
    argv = ["textstream", "sample", "--prompt", "a cat", "--model", sd3, "--steps", "1"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert Image.open(folder / "000.png").size == (32, 32)
    assert json.loads((folder / "settings.json").read_text())["options"]["height"] == 32
    capsys.readouterr()
    # 96 (pos_embed_max_size) x 2 (patch) x 2 (VAE) = 384 px at most
    (tmp_path / "p.txt").write_text("a cat\n")
    for verb in ("sample", "generate"):
        cmd = ["textstream", verb, "--model", sd3, "--steps", "1", "--height", "512"]
        cmd += ["--prompt", "a cat"] if verb == "sample" else ["--prompts", str(tmp_path / "p.txt")]
        assert main([*cmd, "--output-dir", str(tmp_path / verb)]) == 2
        err = _err_lines(capsys)
        assert len(err) == 1 and err[0].startswith("diffalign: error: --height 512"), err
        assert "at most 384 px" in err[0] and "its own size, 32 px" in err[0]


def test_textstream_failed_run_does_not_block_and_dpg_names_its_folder(
    sd3, tmp_path, capsys, monkeypatch
):
    import diffalign.textstream.generate as gen_mod

    prompts = tmp_path / "dpg"
    prompts.mkdir()
    (prompts / "7.txt").write_text("a red bus")
    out = tmp_path / "o"
    argv = ["textstream", "dpg", "--prompts-dir", str(prompts), "--model", sd3]
    argv += ["--output-dir", str(out)]

    def broken(self, prompt, seeds):
        raise gen_mod.DiffalignError("the run fails before its first image")

    with monkeypatch.context() as m:
        m.setattr(gen_mod.ResidualGenerator, "images", broken)
        assert main([*argv, "--steps", "1"]) == 2
    assert (tmp_path / "o.settings.json").is_file() and not list(out.glob("*.png"))
    assert main([*argv, "--steps", "2"]) == 0  # corrected rerun: other settings, not refused
    assert (out / "7.png").is_file()
    capsys.readouterr()
    assert main([*argv, "--steps", "1"]) == 2  # now the folder holds images: refused
    err = _err_lines(capsys)
    assert f"{out} holds images made with other settings (steps: 2 -> 1)" in err[-1], err


# ------------------------------------------------------------------ item 15


FOLDER_VERBS = [
    ["make-tiny"],
    ["fill", "make-triptychs"],
    ["fill", "infer"],
    ["repa", "extract"],
    ["repa", "probe"],
    ["noise", "em"],
    ["noise", "build-dataset"],
    ["textstream", "generate"],
]


@pytest.mark.parametrize("verb", FOLDER_VERBS, ids=lambda v: " ".join(v))
def test_every_folder_verb_spells_output_dir(verb, capsys):
    with pytest.raises(SystemExit):
        main([*verb, "--help"])
    assert "--output-dir DIR" in capsys.readouterr().out or verb[0] in ("noise", "textstream")
    # a parse error is one line beginning like every other error
    with pytest.raises(SystemExit) as e:
        main([*verb, "--no-such-option"])
    assert e.value.code == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and err[0].startswith("diffalign: error: "), err


def test_a_verb_parse_error_begins_like_every_other_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["make-tiny"])
    assert e.value.code == 2
    err = _err_lines(capsys)
    assert len(err) == 1, err
    assert err[0].startswith("diffalign: error: make-tiny: the following arguments are required:")
    assert "--output-dir" in err[0]


def test_old_output_spellings_stay_aliases(tmp_path):
    from diffalign.cli import build_parser

    parser = build_parser()
    for verb, old, dest in (
        (["make-tiny", "sd3"], "--out", "out"),
        (["fill", "make-triptychs", "--input", "x"], "--out", "out"),
        (["fill", "infer", "--model", "m"], "--output", "output"),
        (["repa", "probe", "--features", "f"], "--out", "out"),
        (["noise", "em", "--data-root", "d"], "--work-dir", "output_dir"),
    ):
        for spelling in ("--output-dir", old):
            args = parser.parse_args([*verb, spelling, str(tmp_path / "o")])
            assert getattr(args, dest) == str(tmp_path / "o"), (verb, spelling)
    assert main(["make-tiny", "sd3", "--output-dir", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "model_index.json").is_file()


# ------------------------------------------------------------------ item 16


def test_fill_resume_latest_without_checkpoint_starts_fresh_and_says_so(
    tiny_model_dir, tmp_path, capsys
):
    from fill_helpers import tiny_train_args, write_triptychs

    flux = tiny_model_dir("flux-fill")
    data = write_triptychs(tmp_path / "trip", n=2)
    out = tmp_path / "run"
    args = tiny_train_args(
        flux, data, out, max_steps=1, num_validation=0, resume="latest", checkpoint_every=0
    )
    assert main(args) == 0
    said = [x for x in capsys.readouterr().out.splitlines() if "--resume latest" in x]
    assert said == [f"diffalign: --resume latest: no checkpoint under {out}; starting a new run"], (
        said
    )
    assert (out / "checkpoint-final").is_dir()
    # a finished run whose resumable checkpoints were removed is not silently trained over
    import shutil

    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    assert main(args) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "finished run without a resumable checkpoint" in err[0], err


# ------------------------------------------------------------------ item 17


SEED_SECTION = r"seed (00\d|§|\d+\.\d)|seed's section"  # reads like --seed


def _help_texts(parser) -> list[str]:
    import argparse

    texts = [parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                texts += _help_texts(sub)
    return texts


def test_user_facing_text_names_the_recipe_not_a_seed_section():
    import re
    from pathlib import Path

    from diffalign.cli import build_parser

    parser = build_parser()
    (repa,) = [
        a.choices["repa"]
        for a in parser._actions
        if getattr(a, "choices", None) and "repa" in a.choices
    ]
    for text in _help_texts(repa):
        assert not re.search(SEED_SECTION, text), re.search(SEED_SECTION, text)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    hits = [line for line in readme.splitlines() if re.search(SEED_SECTION, line)]
    assert not hits, hits


# ------------------------------------------------------------------ item 18: plots, summary


def test_plot_curves_integer_ticks_markers_and_no_empty_legend(tmp_path, monkeypatch):
    import matplotlib.figure
    from matplotlib.ticker import MaxNLocator

    from diffalign.engine.reports import plot_curves

    figs = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure,
        "savefig",
        lambda self, *a, **k: (figs.append(self), save(self, *a, **k)),
    )
    plot_curves(
        tmp_path / "procrustes_errors.png",
        {
            "before rotation": ([1, 2, 3], [0.9, 0.7, 0.8]),
            "after rotation": ([1, 2, 3], [0.3, 0.2, 0.25]),
            "no data": [],
            "only NaN": [float("nan")],
        },
        xlabel="target layer",
    )
    (ax,) = figs[-1].axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "before rotation",
        "after rotation",
    ]
    assert all(line.get_marker() == "o" for line in ax.get_lines())  # 3 points: markers
    assert list(ax.get_xticks()) == [1, 2, 3]  # one integer tick per layer
    plot_curves(tmp_path / "one.png", {"val/loss": ([1], [0.5])})  # one step: tick 1 only
    assert list(figs[-1].axes[0].get_xticks()) == [1]
    plot_curves(tmp_path / "long.png", {"train/loss": list(range(100))})
    (ax,) = figs[-1].axes
    assert ax.get_lines()[0].get_marker() in (None, "None", "")  # many points: a plain line
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
    assert all(float(t).is_integer() for t in ax.get_xticks())
    plot_curves(tmp_path / "empty.png", {"val/loss": []})
    assert figs[-1].axes[0].get_legend() is None


def test_fill_infer_failed_run_does_not_block_the_corrected_rerun(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    import diffalign.fill.infer as infer_mod
    from diffalign.engine.errors import DiffalignError
    from fill_helpers import write_image

    flux = tiny_model_dir("flux-fill")
    vis = write_image(tmp_path / "v.png", (16, 16), seed=1)
    out = tmp_path / "out"
    argv = ["fill", "infer", "--model", flux, "--visible", str(vis), "--prompt", "a photo"]
    argv += ["--output-dir", str(out), "--max-sequence-length", "8"]

    def fails(*a, **k):
        raise DiffalignError("the run fails before its first image")

    with monkeypatch.context() as m:
        m.setattr(infer_mod, "sample_panels", fails)
        assert main([*argv, "--steps", "1"]) == 2
    assert not list(out.glob("*.png"))
    assert main([*argv, "--steps", "2"]) == 0  # other settings: nothing written under them
    assert (out / "v.png").is_file()
    capsys.readouterr()
    assert main([*argv, "--steps", "1"]) == 2  # now an image binds its settings
    assert "other settings (steps)" in _err_lines(capsys)[-1]
