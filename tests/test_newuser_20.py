"""A new user's walk through README (session 20): text-stream learned weights on Qwen-Image /
FLUX.1, few-step transformer noise verbs. Logged weights, model-card defaults of `cache` and
`train-weights`, refusal hints that name only options the verb has, FLUX.1-dev folders."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from noise_data_helpers import write_pairs


def _err_lines(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x.strip()]


# ------------------------------------------------------------------ learned residual weights


def test_qwen_cache_and_train_weights_follow_the_model_card(tiny_model_dir, tmp_path, capsys):
    """No --max-sequence-length / --eval-steps / --eval-cfg: Qwen-Image's card (512 tokens,
    50 steps, true CFG 4), not SD3's 256 / 28 / 7; the logged weights are the weights after the
    logged step (the last one equals the learned weights), not a window mean of earlier ones;
    the weights file names its family, and another family's model refuses it."""
    qwen = tiny_model_dir("qwen-image")
    data = write_pairs(tmp_path / "data", n=3)
    cache = tmp_path / "cache"
    argv = ["textstream", "cache", "--model", qwen, "--dataset", str(data / "pairs.jsonl")]
    assert main([*argv, "--resolution", "32", "--output-dir", str(cache)]) == 0
    assert json.loads((cache / "job.json").read_text())["max_sequence_length"] == 512

    run = tmp_path / "run"
    argv = ["textstream", "train-weights", "--cache", str(cache), "--output-dir", str(run)]
    argv += ["--residual-target-layers", "2,3", "--max-steps", "2", "--batch-size", "2"]
    argv += ["--log-every", "1", "--eval-samples", "1", "--tracker", "none", "--lr", "0.1"]
    assert main(argv) == 0
    config = json.loads((run / "run_config.json").read_text())
    config = config.get("task", config)
    assert (config["eval_steps"], config["eval_cfg"]) == (50, 4.0)
    summary = json.loads((run / "summary.json").read_text())
    learned = summary["residual_weights"]["learned"]
    logged = [summary["final_train"][f"weight/{t}"] for t in (2, 3)]
    assert learned != [1.0, 1.0]
    assert logged == pytest.approx(learned, abs=1e-7), (logged, learned)

    # the file records its family: FLUX.1 (same block count, plain mode) refuses it up front
    capsys.readouterr()
    out = tmp_path / "flux"
    argv = ["textstream", "sample", "--prompt", "a cat", "--model", tiny_model_dir("flux-dev")]
    argv += ["--residual-weights-file", str(run / "residual_weights.safetensors")]
    assert main([*argv, "--output-dir", str(out), "--steps", "1"]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "was trained on a qwen-image model" in err[0], err
    assert "this is a flux model" in err[0] and not out.exists()


def test_train_weights_help_names_the_model_card_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["textstream", "train-weights", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "FLUX.1-schnell 4, Qwen-Image 50" in out and "SD3 7, Qwen-Image 4" in out
    for default in ("optimizer steps (default: 1000)", "pairs per step (default: 4)"):
        assert default in out  # a bare run trains 1000 steps: the help must say so
    # and a killed bare run has a checkpoint to resume from
    assert "--resume latest); 0 = only the final one (default: 250)" in out
    with pytest.raises(SystemExit):
        main(["textstream", "cache", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "FLUX.1-dev 512" in out and "(default: 256)" not in out


# ------------------------------------------------------------------ noise verbs


def test_toy_assignment_refusal_names_only_options_it_has(tmp_path):
    """`noise toy assign` / `noise toy em` have no --overwrite: their 'other settings' refusal
    must not tell the user to pass it."""
    from diffalign.noise.toy.assignment import assign
    from diffalign.noise.toy.data import load_dataset
    from diffalign.noise.toy.models import ToyModelConfig, build_model, save_model

    torch.manual_seed(0)
    save_model(build_model(ToyModelConfig.for_dataset("generator", "digits")), tmp_path / "g")
    data = load_dataset("digits", "train").subset(range(2))
    common = dict(data=data, write_plots=False)
    assign(tmp_path / "g", tmp_path / "asg", assign_steps=1, **common)
    with pytest.raises(DiffalignError) as e:
        assign(tmp_path / "g", tmp_path / "asg", assign_steps=2, **common)
    msg = str(e.value)
    assert "holds an assignment made with other settings (assign_steps)" in msg, msg
    assert "--overwrite" not in msg and "another --output-dir" in msg


def test_build_dataset_refusal_still_offers_overwrite():
    from diffalign.noise.dataset import PairsJob

    assert "--overwrite" in PairsJob.restart_hint


def test_a_flux_dev_folder_is_not_offered_to_flux_schnell(tiny_model_dir):
    from diffalign.noise.recipes import generator_recipe

    dev = tiny_model_dir("flux-dev")
    with pytest.raises(DiffalignError) as e:
        generator_recipe(dev)
    msg = str(e.value)
    assert "is FLUX.1 [dev]" in msg and "no generator kind runs it" in msg, msg
    assert "--generator flux-schnell" not in msg
    with pytest.raises(DiffalignError, match="which generator flux-schnell does not run"):
        generator_recipe(dev, "flux-schnell")
    # FLUX.1-schnell itself is still recognised by its card
    assert generator_recipe(tiny_model_dir("flux-schnell")).spec.name == "flux-schnell"


@pytest.mark.parametrize(
    ("verb", "expect"),
    [
        (["noise", "optimize"], "published size"),
        (["noise", "build-dataset"], "published size"),
        (["noise", "sft"], "dataset_config.json records, else the generator's published size"),
        (["noise", "em"], "first dataset records, else the generator's published size"),
    ],
)
def test_noise_size_help_says_where_the_default_comes_from(verb, expect, capsys):
    with pytest.raises(SystemExit):
        main([*verb, "--help"])
    out = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    assert expect in out and "image height (default: the model's)" not in out


def test_em_starts_a_new_m_step_without_the_resume_notice(tmp_path, monkeypatch):
    """A fresh M-step is started without --resume latest (whose 'no checkpoint under ...;
    starting a new run' notice the user never asked for); one with a checkpoint resumes."""
    import diffalign.noise.dataset as dataset_mod
    import diffalign.noise.sft as sft_mod
    from diffalign.noise.em import em

    seen = []

    def fake_sft(gen, manifest, out_dir, **kw):
        seen.append(kw["resume"])
        return {"model": str(out_dir / "checkpoint-final"), "steps": 1}

    monkeypatch.setattr(sft_mod, "sft", fake_sft)
    monkeypatch.setattr(dataset_mod, "build_dataset", lambda *a, **k: {"finished": 1})

    import dataclasses

    Settings = dataclasses.make_dataclass("Settings", [("seed", int, 0)])
    kwargs = dict(load=lambda m, first: object(), assign_kwargs={"settings": Settings()})
    em("base", tmp_path / "data", tmp_path / "em", num_cycles=2, sft_kwargs={}, **kwargs)
    assert seen == [None, None]
    ckpt = tmp_path / "em2" / "cycle-000" / "sft" / "checkpoints" / "checkpoint-5"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    seen.clear()
    em("base", tmp_path / "data", tmp_path / "em2", num_cycles=1, sft_kwargs={}, **kwargs)
    assert seen == ["latest"]


def test_sft_samples_at_the_steps_its_dataset_was_assigned_with(tiny_model_dir, tmp_path, capsys):
    """A dataset assigned with flux-schnell at 2 steps: sft without --num-steps trains the 2-step
    sampler (it used to fall back to the kind's 1); another --num-steps is refused like another
    model, and only warned about with --allow-other-generator."""
    flux = tiny_model_dir("flux-schnell")
    margs = ["--model", flux, "--height", "32", "--width", "32"]
    data = write_pairs(tmp_path / "data", n=1)
    ds = tmp_path / "ds"
    argv = ["noise", "build-dataset", "--data-root", str(data), "--output-dir", str(ds)]
    argv += ["--steps", "1", "--no-plots", "--num-intermediates", "0", "--num-steps", "2"]
    assert main([*argv, *margs]) == 0, capsys.readouterr().err
    base = ["noise", "sft", "--manifest-path", str(ds), "--max-steps", "1", "--lora-rank", "2"]
    base += ["--tracker", "none", *margs]
    assert main([*base, "--output-dir", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    recipe = json.loads((tmp_path / "a/checkpoint-final/diffalign_generator.json").read_text())
    assert recipe["num_steps"] == 2
    capsys.readouterr()
    assert main([*base, "--output-dir", str(tmp_path / "b"), "--num-steps", "1"]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "2 steps), this run trains flux-schnell" in err[0], err
    assert "(differs: num_steps)" in err[0] and "--allow-other-generator" in err[0]
    assert not (tmp_path / "b" / "checkpoint-final").exists()


def test_assign_refuses_a_used_folder_and_overwrite_leaves_no_stale_steps(
    tiny_model_dir, tmp_path, capsys
):
    """A second `noise assign` into a folder silently replaced its noise and left the first
    run's step_NNNN.png beside the new ones; now it is refused, and --overwrite replaces it."""
    flux = tiny_model_dir("flux-schnell")
    target = write_pairs(tmp_path / "data", n=1) / "images" / "0000.png"
    out = tmp_path / "o"
    argv = ["noise", "assign", "--prompt", "a cat", "--target-image", str(target)]
    argv += ["--output-dir", str(out), "--model", flux, "--height", "32", "--width", "32"]
    assert main([*argv, "--steps", "3", "--num-intermediates", "3"]) == 0
    assert (out / "step_0003.png").is_file()
    noise = (out / "best_input_noise.safetensors").read_bytes()
    capsys.readouterr()
    assert main([*argv, "--steps", "1"]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "already holds an assignment" in err[0] and "--overwrite" in err[0]
    assert (out / "best_input_noise.safetensors").read_bytes() == noise
    assert main([*argv, "--steps", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("step_*.png")) == ["step_0000.png", "step_0001.png"]
    assert json.loads((out / "summary.json").read_text())["settings"]["steps"] == 1
