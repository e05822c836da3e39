"""Generation warns when a bucketed rotation file was calibrated in another dtype and the
generation's schedule puts a step in another timestep bucket than calibration did (FLUX.1 and
Qwen-Image hand the transformer the timestep rounded to the model dtype)."""

from __future__ import annotations

import json

import torch

from diffalign.cli import main
from diffalign.textstream.adapters import StreamAdapter
from diffalign.textstream.rotations import equal_bucket_edges

FLUX = StreamAdapter("flux", (), 0, timestep_scale=1000.0)


def reference_bucket(t: float, edges: list[float], dtype) -> int:
    """Slow reference: the pipeline's `t.to(dtype) / 1000`, then the number of inner edges
    that arrive at or below it when handed over the same way (end buckets catch the rest)."""

    def received(v: float) -> float:
        return (torch.tensor([v]).to(dtype) / 1000).item()

    return len([e for e in edges[1:-1] if received(e) <= received(t)])


def test_mismatch_matches_reference():
    from diffalign.textstream.calibrate import bucket_dtype_mismatch

    ts = [1000.0, 798.294, 750.0, 499.2, 333.2984, 249.59, 199.65, 12.0]
    for n in (2, 3, 4, 5, 6):
        edges = equal_bucket_edges(n)
        want = [
            k
            for k, t in enumerate(ts)
            if reference_bucket(t, edges, torch.float32)
            != reference_bucket(t, edges, torch.bfloat16)
        ]
        got = bucket_dtype_mismatch(torch.tensor(ts), edges, FLUX, torch.float32, torch.bfloat16)
        assert got == want
    assert bucket_dtype_mismatch(
        torch.tensor([249.59]), [0.0, 250.0, 1000.0], FLUX, torch.float32, torch.bfloat16
    ) == [0]
    # one bucket, or the same dtype: nothing can differ
    assert (
        bucket_dtype_mismatch(torch.tensor(ts), [0, 1000], FLUX, torch.float32, torch.bfloat16)
        == []
    )
    edges = equal_bucket_edges(4)
    assert (
        bucket_dtype_mismatch(torch.tensor(ts), edges, FLUX, torch.bfloat16, torch.bfloat16) == []
    )


def test_generation_warns_on_dtype_bucket_mismatch(tiny_model_dir, tmp_path, capsys, monkeypatch):
    model = tiny_model_dir("flux-dev")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\ntwo dogs\n")
    rot = tmp_path / "cal" / "rot.safetensors"
    cal = ["textstream", "calibrate", "--model", model, "--dataset", str(prompts)]
    cal += ["--num-samples", "2", "--steps", "10", "--timestep-buckets", "5", "--dtype", "float32"]
    cal += ["--timestep-draw", "bucket", "--max-sequence-length", "16", "--output", str(rot)]
    assert main([*cal, "--height", "32", "--width", "32"]) == 0
    # FLUX.1-dev at 64x64, 7 steps: step 2 is timestep 798.29, 0.798 in bf16 -> 0.8 (bucket 4
    # of 5 in bf16, 3 in float32)
    gen = ["textstream", "generate", "--model", model, "--prompts", str(prompts), "--limit", "1"]
    gen += ["--residual-procrustes-path", str(rot), "--steps", "7", "--height", "64"]
    gen += ["--width", "64", "--max-sequence-length", "16"]
    capsys.readouterr()
    import safetensors

    opened, safe_open = [], safetensors.safe_open
    monkeypatch.setattr(
        safetensors, "safe_open", lambda f, *a, **k: opened.append(f) or safe_open(f, *a, **k)
    )
    assert main([*gen, "--output-dir", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert opened.count(str(rot)) == 1  # rotations, buckets and recorded dtype: one read
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "calibrated in float32" in line]
    assert len(lines) == 1, err
    assert "in bfloat16" in lines[0] and "step(s) 2 (timestep 798.29: bucket 4, not 3)" in lines[0]
    assert "--dtype bfloat16" in lines[0]
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert summary["bucket_dtype_mismatch_steps"] == [2]
    (folder,) = (tmp_path / "bf16").glob("00000_*")
    assert json.loads((folder / "settings.json").read_text())["bucket_dtype_mismatch_steps"] == [2]

    assert main([*gen, "--output-dir", str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0
    assert "calibrated in" not in capsys.readouterr().err
    summary = json.loads((tmp_path / "fp32" / "summary.json").read_text())
    assert "bucket_dtype_mismatch_steps" not in summary
