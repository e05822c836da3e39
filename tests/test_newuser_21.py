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
