"""`textstream calibrate` job identity and timestep buckets (spec E: Safety; spec T).

- The dataset is identified by the content read (prompts; with --xt-source image the images'
  bytes), not by how its path was typed: another spelling of the same dataset is the same job,
  changed captions or images at the same path are another.
- The model card's defaults (steps, tokens, guidance, the model's own size) are resolved once,
  before the identity: an explicit value equal to the default is the same job.
- Timestep buckets on FLUX.1 / Qwen-Image: the pipelines hand the transformer the timestep
  rounded to the model dtype; calibration plans and collects by the timestep as the transformer
  receives it, the rule generation looks the rotation up by.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from diffalign.textstream.calibrate import (
    calibrate,
    draw_bucket_steps,
    draw_train_timesteps,
    recorded_identity,
    schedule_buckets,
    train_timestep_candidates,
)
from diffalign.textstream.rotations import equal_bucket_edges, load_rotations


@pytest.fixture()
def run(tiny_model_dir, capsys):
    model = tiny_model_dir("sd3")

    def call(dataset, output, *extra):
        argv = ["textstream", "calibrate", "--model", model, "--dataset", str(dataset)]
        argv += ["--num-samples", "2", "--steps", "2", "--xt-source", "noise"]
        rc = main([*argv, "--output", str(output), *extra])
        err = capsys.readouterr().err.strip()
        return rc, (err.splitlines() or [""])[-1]

    return call


def test_dataset_by_content_not_by_spelling(run, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    prompts = data / "p.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "cal" / "rot.safetensors"
    assert run(prompts, out) == (0, "")
    ident = recorded_identity(out)
    assert ident["dataset"]["path"] == [str(prompts.resolve())]  # shown, not compared
    assert ident["dataset"]["samples"] == 2
    rotations = load_rotations(out).rotations

    monkeypatch.chdir(tmp_path)  # the same file by a relative path: the same job
    assert run("data/p.txt", out) == (0, "")
    assert run("./data/../data/p.txt", out) == (0, "")
    assert all(torch.equal(r, rotations[t]) for t, r in load_rotations(out).rotations.items())

    prompts.write_text("a cat\na bird\n")  # other captions at the same path: another job
    before = out.read_bytes()
    rc, last = run(prompts, out)
    assert rc == 2 and "dataset.sha256" in last and "--overwrite" in last
    assert out.read_bytes() == before
    assert run(prompts, out, "--overwrite") == (0, "")


def test_folder_dataset_with_trailing_slash_is_the_same(run, tmp_path):
    dpg = tmp_path / "dpg" / "prompts"
    dpg.mkdir(parents=True)
    for i, text in enumerate(["a red cube", "two cats"]):
        (dpg / f"p{i}.txt").write_text(text)
    out = tmp_path / "rot.safetensors"
    assert run(tmp_path / "dpg", out) == (0, "")
    assert run(f"{tmp_path / 'dpg'}/", out) == (0, "")
    (dpg / "p1.txt").write_text("three dogs")
    assert "dataset.sha256" in run(f"{tmp_path / 'dpg'}/", out)[1]


def test_image_source_identifies_the_images_by_their_bytes(tiny_model_dir, tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
        lines.append(json.dumps({"prompt": f"prompt {i}", "image": f"{i}.png"}))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "cal" / "rot.safetensors"
    argv = ["textstream", "calibrate", "--model", tiny_model_dir("sd3"), "--dataset", str(pairs)]
    argv += ["--num-samples", "2", "--xt-source", "image", "--output", str(out)]
    assert main(argv) == 0
    assert main(argv) == 0  # unchanged: the same job
    before = out.read_bytes()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "1.png")
    capsys.readouterr()
    assert main(argv) == 2  # the same captions and names, another image
    assert "dataset.sha256" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_image_digests_are_read_once_per_file_version(tmp_path, monkeypatch):
    """`--xt-source image` identifies the images by their bytes through the digest cache: an
    unchanged re-run reads no image to hash it, an image edited in place (same size, mtime set
    forward) is read again and makes another dataset, and the value is the one diffalign
    recorded before the cache (computed on f10e325 for these bytes), so old runs still resume."""
    import os

    import diffalign.engine.identity as ident
    from diffalign.textstream.calibrate import dataset_identity

    monkeypatch.setenv("DIFFALIGN_HASH_CACHE", str(tmp_path / "cache.json"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.png").write_bytes(b"image a")
    (tmp_path / "b.png").write_bytes(b"image b" * 3)
    reads = []
    real = ident.file_sha256
    monkeypatch.setattr(ident, "file_sha256", lambda p: reads.append(p) or real(p))
    prompts, images = ["a cat", "a dog"], ["a.png", "b.png"]
    first = dataset_identity(None, None, prompts, images, "image")
    assert first["sha256"] == "03acb3314b16c3b1a0427a02f9792e87d61904fe2bdeea93258c75c8155a2c54"
    assert len(reads) == 2
    reads.clear()
    assert dataset_identity(None, None, prompts, images, "image") == first
    assert reads == []  # unchanged: a stat per image, no read
    st = os.stat("b.png")
    (tmp_path / "b.png").write_bytes(b"image c" * 3)  # the same size
    os.utime("b.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    edited = dataset_identity(None, None, prompts, images, "image")
    assert edited["sha256"] != first["sha256"]
    assert [Path(p).name for p in reads] == ["b.png"]  # only the edited image is read


def test_explicit_model_card_values_are_the_defaults(run, tiny_model_dir, tmp_path):
    from diffalign.textstream.sizes import model_image_size

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "rot.safetensors"
    assert run(prompts, out) == (0, "")
    ident = recorded_identity(out)
    size = model_image_size(tiny_model_dir("sd3")).default
    assert (ident["height"], ident["width"], ident["max_sequence_length"]) == (size, size, 256)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["height"], summary["width"]) == (size, size)  # the run used what it recorded
    explicit = ["--height", str(size), "--width", str(size), "--max-sequence-length", "256"]
    assert run(prompts, out, *explicit) == (0, "")
    rc, last = run(prompts, out, "--height", str(size + 4), "--width", str(size + 4))
    assert rc == 2 and "(height, width)" in last


def test_pipeline_passed_in_takes_its_card_defaults_once(tiny_model_dir, tmp_path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_model_dir("flux-schnell"))
    out = tmp_path / "rot.safetensors"
    common = dict(pipe=pipe, prompts=["a", "b"], output=str(out), height=32, width=32)
    common.update(xt_source="noise", max_sequence_length=16, target_layers=[2, 3])
    first = calibrate(**common)
    assert (first["steps"], first["guidance"]) == (4, 0.0)  # FLUX.1-schnell's card
    assert recorded_identity(out)["steps"] == 4
    calibrate(**common, steps=4, guidance=0.0)  # the card's values given: the same job
    with pytest.raises(DiffalignError, match=r"\(steps\)"):
        calibrate(**common, steps=3)


# -- timestep buckets as the transformer receives the timestep --------------------------------


def flux_bf16(tiny_model_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_model_dir("flux-dev"), torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def received_per_step(pipe, steps: int) -> tuple[torch.Tensor, list[float]]:
    """The scheduler's timesteps and the transformer's `timestep` x 1000 at each step of a real
    bf16 pipeline run (what generation's hook reads)."""
    seen = []
    h = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(float(kw["timestep"].flatten()[0]) * 1000), with_kwargs=True
    )
    try:
        pipe(
            "a",
            num_inference_steps=steps,
            height=32,
            width=32,
            max_sequence_length=16,
            output_type="latent",
        )
    finally:
        h.remove()
    return pipe.scheduler.timesteps.clone(), seen


def test_schedule_buckets_are_those_of_the_received_timesteps(tiny_model_dir):
    """Reference: a real bf16 FLUX.1 run; step 19 (t = 249.59) reaches the transformer as
    250.0, so generation looks it up in bucket 1, not 0, and calibration plans it there."""
    from diffalign.textstream.adapters import stream_adapter

    pipe = flux_bf16(tiny_model_dir)
    timesteps, seen = received_per_step(pipe, 23)
    edges = equal_bucket_edges(4)
    by_generation = [sum(t >= e for e in edges[1:-1]) for t in seen]  # slow, obvious
    plan = schedule_buckets(timesteps, edges, stream_adapter(pipe.transformer), torch.bfloat16)
    assert [next(b for b, c in enumerate(plan) if i in c) for i in range(23)] == by_generation
    assert abs(float(timesteps[19]) - 249.59) < 0.01 and seen[19] == 250.0
    assert 19 in plan[1] and 19 in schedule_buckets(timesteps, edges)[0]  # unrounded: bucket 0


def test_bucket_draw_collects_every_sample_once_per_bucket_in_bf16(tiny_model_dir, tmp_path):
    """Seed 0 draws step 19 for bucket 0 among the unrounded timesteps (the old plan); the
    transformer gets it in bucket 1, which left bucket 0 empty. Drawn by the received
    timestep, each bucket gets the one sample once."""
    pipe = flux_bf16(tiny_model_dir)
    timesteps, _ = received_per_step(pipe, 23)
    edges = equal_bucket_edges(4)
    assert draw_bucket_steps(0, 0, schedule_buckets(timesteps, edges))[0] == 19
    summary = calibrate(
        pipe=pipe,
        prompts=["a red cube"],
        output=str(tmp_path / "r.safetensors"),
        seed=0,
        steps=23,
        height=32,
        width=32,
        max_sequence_length=16,
        xt_source="noise",
        timestep_buckets=4,
        timestep_draw="bucket",
        token_strategy="all",
        dtype="bfloat16",
    )
    assert summary["bucket_tokens"] == [16] * 4


def test_bucket_empty_after_rounding_refused_at_the_first_forward(tiny_model_dir, tmp_path):
    """20 steps reach all 13 buckets by the scheduler's timesteps, but the last one (76.77,
    the only one below the edge 76.92) reaches the transformer in bf16 as 77.15: bucket 0 gets
    no step, refused before any sample runs (not after all of them), naming --steps."""
    pipe = flux_bf16(tiny_model_dir)
    timesteps, seen = received_per_step(pipe, 20)
    edges = equal_bucket_edges(13)
    schedule_buckets(timesteps, edges)  # every bucket holds a step before rounding
    assert float(timesteps[-1]) < edges[1] < seen[-1]
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)
    out = tmp_path / "r.safetensors"
    with pytest.raises(DiffalignError, match=r"bucket\(s\) \[0\].*bfloat16.*more --steps"):
        calibrate(
            pipe=pipe,
            prompts=["a", "b"],
            output=str(out),
            steps=20,
            height=32,
            width=32,
            max_sequence_length=16,
            xt_source="noise",
            timestep_buckets=13,
            dtype="bfloat16",
        )
    assert calls == [] and not out.exists()


def test_image_source_draws_by_the_received_timestep(tiny_model_dir, tmp_path):
    """`--xt-source image`, bucket draw, bf16: seed 123's draw for bucket 2 among 500..749 is
    749, which the old forward (t / 1000 rounded once) gave the transformer as 0.75, bucket 3.
    Now the timestep reaches the transformer as the pipeline gives it and the draws are among
    the integers the transformer gets in each bucket: every bucket gets the sample once."""
    from PIL import Image

    from diffalign.textstream.adapters import stream_adapter

    edges = equal_bucket_edges(4)
    assert draw_train_timesteps(123, 0, train_timestep_candidates(edges))[2] == 749
    pipe = flux_bf16(tiny_model_dir)
    received = train_timestep_candidates(edges, stream_adapter(pipe.transformer), torch.bfloat16)
    assert 499 in received[2] and 499 not in received[1]  # bf16(499) = 500 -> 0.5
    image = tmp_path / "i.png"
    Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8)).save(image)
    summary = calibrate(
        pipe=pipe,
        prompts=["a red cube"],
        images=[str(image)],
        output=str(tmp_path / "r.st"),
        seed=123,
        steps=4,
        height=32,
        width=32,
        max_sequence_length=16,
        xt_source="image",
        timestep_buckets=4,
        timestep_draw="bucket",
        token_strategy="all",
        dtype="bfloat16",
    )
    assert summary["bucket_tokens"] == [16] * 4


def test_prompt_set_paths_resolve_names_and_spellings(tmp_path, monkeypatch):
    from diffalign.engine.prompts import prompt_set_paths

    ann = tmp_path / "data" / "coco" / "annotations"
    ann.mkdir(parents=True)
    (ann / "captions_val2017.json").write_text("{}")
    (tmp_path / "p.txt").write_text("a\n")
    monkeypatch.chdir(tmp_path)
    got = prompt_set_paths("coco,txt:p.txt,./data/../p.txt", "data/")
    assert got == [
        str((ann / "captions_val2017.json").resolve()),
        *[str((tmp_path / "p.txt").resolve())] * 2,
    ]


def test_the_printed_count_includes_the_timestep_buckets(tiny_model_dir, tmp_path, capsys):
    """With 2 buckets it printed "N rotations" for N layers (half of what the file holds)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    argv = ["textstream", "calibrate", "--model", tiny_model_dir("sd3"), "--dataset", str(prompts)]
    argv += ["--num-samples", "2", "--steps", "4", "--xt-source", "noise"]
    argv += ["--timestep-buckets", "2", "--timestep-draw", "bucket"]
    argv += ["--output", str(tmp_path / "rot.safetensors")]
    assert main(argv) == 0
    rotations = load_rotations(tmp_path / "rot.safetensors").rotations
    layers = len(rotations)
    assert next(iter(rotations.values())).shape[0] == 2  # [N, d, d]
    out = capsys.readouterr().out
    assert f"{2 * layers} rotations ({layers} layers x 2 timestep buckets)" in out, out


def test_pairs_field_names_are_options(tiny_model_dir, tmp_path):
    """SPEC E (pairs.jsonl, field names configurable): --prompt-field / --image-field read a
    pairs file with other keys; the rotations equal those of the same pairs under the default
    keys (the images are used: --xt-source image)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    plain, renamed = [], []
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
        plain.append(json.dumps({"prompt": f"prompt {i}", "image": f"{i}.png"}))
        renamed.append(json.dumps({"caption": f"prompt {i}", "file": f"{i}.png"}))
    (tmp_path / "plain.jsonl").write_text("\n".join(plain) + "\n")
    (tmp_path / "renamed.jsonl").write_text("\n".join(renamed) + "\n")
    common = ["textstream", "calibrate", "--model", tiny_model_dir("sd3"), "--num-samples", "2"]
    common += ["--xt-source", "image"]
    a, b = tmp_path / "a" / "rot.safetensors", tmp_path / "b" / "rot.safetensors"
    assert main([*common, "--dataset", str(tmp_path / "plain.jsonl"), "--output", str(a)]) == 0
    argv = [*common, "--dataset", str(tmp_path / "renamed.jsonl"), "--output", str(b)]
    assert main([*argv, "--prompt_field", "caption", "--image-field", "file"]) == 0
    ra, rb = load_rotations(a), load_rotations(b)
    assert ra.target_layers == rb.target_layers and ra.num_valid_tokens == rb.num_valid_tokens
    for layer in ra.target_layers:
        assert torch.equal(ra.rotations[layer], rb.rotations[layer])
