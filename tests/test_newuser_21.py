"""A new user's walk through README (session 21): the quick-start commands of each capability
run literally on tiny models; what they wrote or refused that README did not say."""

from __future__ import annotations

import json

from diffalign.cli import main
from noise_data_helpers import write_pairs


def test_train_weights_with_bf16_mixed_precision_on_the_cpu(tiny_model_dir, tmp_path):
    """README's `train-weights ... --mixed-precision bf16` with held-out pairs: the initial
    held-out loss is computed inside the first training step, under the loop's autocast, where
    collating the cache's fp16 records failed on the CPU (`internal error: Unexpected floating
    ScalarType in at::autocast::prioritize`)."""
    sd3 = tiny_model_dir("sd3")
    data = write_pairs(tmp_path / "data", n=4)
    cache = tmp_path / "cache"
    argv = ["textstream", "cache", "--model", sd3, "--dataset", str(data / "pairs.jsonl")]
    assert main([*argv, "--resolution", "32", "--output-dir", str(cache)]) == 0
    run = tmp_path / "run"
    argv = ["textstream", "train-weights", "--cache", str(cache), "--output-dir", str(run)]
    argv += ["--residual-target-layers", "2,3", "--max-steps", "1", "--batch-size", "2"]
    argv += ["--num-val", "2", "--eval-samples", "1", "--eval-steps", "1", "--tracker", "none"]
    assert main([*argv, "--mixed-precision", "bf16"]) == 0
    record = json.loads((run / "summary.json").read_text())["residual_weights"]
    assert record["val_pairs"] == 2 and record["val_loss_initial"] is not None


def test_cache_defaults_to_the_models_own_size_and_refuses_one_it_cannot_make(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """`textstream cache` without --resolution used a fixed 1024 px whatever the model (a tiny
    model's cache took minutes of VAE encoding on the CPU); now the model's own sample size, as
    every generation verb and `calibrate` use (1024 on the real SD3 / FLUX.1 / Qwen-Image). A
    size the transformer cannot take (not a multiple of its patch) is one error line naming
    --resolution before anything is written."""
    from diffalign.textstream import cache as cache_mod
    from diffalign.textstream.sizes import model_image_size

    sd3 = tiny_model_dir("sd3")
    data = write_pairs(tmp_path / "data", n=2)
    jobs = []

    def build(out, job, *args, **kwargs):  # the job the cache would be built under
        jobs.append(job)
        return dict.fromkeys(("pairs", "written", "images_encoded", "already_present", "failed"), 0)

    monkeypatch.setattr(cache_mod, "_build_locked", build)
    argv = ["textstream", "cache", "--model", sd3, "--dataset", str(data / "pairs.jsonl")]
    assert main([*argv, "--output-dir", str(tmp_path / "c")]) == 0
    size = model_image_size(sd3)
    assert jobs[0]["resolution"] == size.default != 1024

    capsys.readouterr()
    out = tmp_path / "bad"
    bad = size.default + size.multiple // 2
    assert main([*argv, "--output-dir", str(out), "--resolution", str(bad)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and f"--resolution {bad} must be a multiple of {size.multiple}" in err[0]
    assert not out.exists() and len(jobs) == 1


def test_the_textstream_command_names_every_family_it_runs():
    """`diffalign --help` and `diffalign textstream --help` said "SD3/SD3.5" only, while the
    verbs run FLUX.1 and Qwen-Image too (README, feature table T)."""
    import argparse

    from diffalign.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    listed = {c.dest: c.help for c in sub._choices_actions}
    description = sub.choices["textstream"].description
    for text in (listed["textstream"], description):
        assert "FLUX.1" in text and "Qwen-Image" in text, text
