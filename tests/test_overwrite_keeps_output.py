"""`--overwrite` starts over only once the run is set up: a run with `--overwrite` refused while
it loads its model or checks its inputs is one error line (exit 2) and leaves the earlier output
byte for byte as it was (README: every command loses nothing already written)."""

from __future__ import annotations

import zipfile
from pathlib import Path

from diffalign.cli import main


def _one_line(capsys) -> str:
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (but output locks) by relative path, with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def _unloadable_copy(model: str, dest: Path, weights: str) -> str:
    """`model` copied to `dest` with the weights file `weights` cut short: its configs read
    (family, size, identity) and its load fails."""
    import shutil

    shutil.copytree(model, dest)
    path = dest / weights
    path.write_bytes(path.read_bytes()[:64])
    return str(dest)


# ---------------------------------------------------------------------------------------------
# repa preprocess dino / vae


def test_repa_dino_overwrite_with_an_unloadable_model_keeps_the_store(tmp_path, capsys):
    """A DINOv2 Hub id that is not in the cache (offline) passes the identity step and fails
    to load: the token store `--overwrite` would rebuild is still whole."""
    from test_repa_train import build_data_dir

    data = build_data_dir(tmp_path / "data")
    before = _snapshot(data / "dino_tokens.lmdb")
    argv = ["repa", "preprocess", "dino", "--data-dir", str(data), "--num-workers", "1"]
    assert main([*argv, "--dino-model", "someorg/dinov2-not-cached", "--overwrite"]) == 2
    assert "dinov2-not-cached" in _one_line(capsys)
    assert _snapshot(data / "dino_tokens.lmdb") == before


def test_repa_vae_overwrite_with_unreadable_images_keeps_the_store(
    tmp_path, tiny_model_dir, capsys
):
    """The VAE loads, then the images cannot be read (a damaged images.zip): the latent store
    is emptied only after that check, so it is still whole."""
    from test_repa_train import build_data_dir

    data = build_data_dir(tmp_path / "data")
    with zipfile.ZipFile(data / "images.zip") as zf:
        names = zf.namelist()
    with zipfile.ZipFile(data / "images.zip", "w") as zf:
        for name in names:
            zf.writestr(name, b"not a jpeg")
    before = _snapshot(data / "vae_latents.lmdb")
    argv = ["repa", "preprocess", "vae", "--data-dir", str(data), "--num-workers", "1"]
    assert main([*argv, "--model", tiny_model_dir("sd15"), "--overwrite"]) == 2
    assert "cannot read the first images" in _one_line(capsys)
    assert _snapshot(data / "vae_latents.lmdb") == before


def test_repa_clip_overwrite_with_a_damaged_text_encoder_keeps_the_embeddings(
    tmp_path, tiny_model_dir, capsys
):
    """A text encoder whose safetensors file is cut short is one line naming the file (it was an
    internal error: transformers passes safetensors' error on), and the embeddings are kept."""
    from diffalign.repa.images import write_classes
    from test_repa_train import CLASSES, build_data_dir

    data = build_data_dir(tmp_path / "data")
    write_classes(
        data / "classes.csv",
        [{"label": c, "wnid": f"n0000000{c}", "name": f"thing {c}"} for c in range(CLASSES)],
    )
    before = _snapshot(data)
    broken = _unloadable_copy(
        tiny_model_dir("sd15"), tmp_path / "broken", "text_encoder/model.safetensors"
    )
    argv = ["repa", "preprocess", "clip", "--data-dir", str(data), "--model", broken]
    assert main([*argv, "--overwrite"]) == 2
    assert "text_encoder/model.safetensors is damaged or incomplete" in _one_line(capsys)
    assert _snapshot(data) == before


# ---------------------------------------------------------------------------------------------
# textstream cache


def test_textstream_cache_overwrite_with_an_unloadable_model_keeps_the_cache(
    tmp_path, tiny_model_dir, capsys
):
    """A model whose configs read and whose weights do not load: the cache is emptied only once
    the model has loaded, so it is still whole; with the model it was made with, --overwrite
    rebuilds the same records."""
    from test_textstream_cache_reuse import _args, _coco, _raw_records

    sd3 = tiny_model_dir("sd3")
    ann, out = _coco(tmp_path / "coco"), tmp_path / "cache"
    assert main(_args(sd3, ann, out)) == 0
    before = _snapshot(out)
    broken = _unloadable_copy(
        sd3, tmp_path / "broken", "transformer/diffusion_pytorch_model.safetensors"
    )
    capsys.readouterr()
    assert main([*_args(broken, ann, out), "--overwrite"]) == 2
    assert "broken" in _one_line(capsys)
    assert _snapshot(out) == before
    records = _raw_records(out)
    assert main([*_args(sd3, ann, out), "--overwrite"]) == 0
    assert _raw_records(out) == records


# ---------------------------------------------------------------------------------------------
# noise optimize


def test_noise_optimize_overwrite_with_a_patch_size_the_latent_refuses_keeps_the_run(
    tmp_path, tiny_model_dir, capsys
):
    """--patch-size 3 does not divide the 4 x 4 latent, known once the model has loaded: the
    earlier run's step images and files are still there."""
    out = tmp_path / "run"
    argv = [
        "noise", "optimize", "--prompt", "a cat", "--model", tiny_model_dir("sdxl"),
        "--clip-model", tiny_model_dir("clip"), "--output-dir", str(out),
        "--height", "32", "--width", "32", "--steps", "1",
    ]  # fmt: skip
    assert main(argv) == 0
    before = _snapshot(out)
    assert "step_001.png" in before
    capsys.readouterr()
    assert main([*argv, "--patch-size", "3", "--overwrite"]) == 2
    assert "--patch-size 3" in _one_line(capsys)
    assert _snapshot(out) == before


def test_noise_toy_optimize_overwrite_with_a_bad_patch_size_keeps_the_run(tmp_path, capsys):
    """The toy run trains its classifier into the folder: a --patch-size the latent refuses is
    told before that, so the earlier classifier and step images are still there."""
    import torch

    from diffalign.noise.toy.models import ToyModelConfig, build_model, save_model

    torch.manual_seed(0)
    gen = tmp_path / "gen"
    save_model(build_model(ToyModelConfig.for_dataset("generator", "digits")), gen)
    out = tmp_path / "run"
    argv = [
        "noise", "toy", "optimize", "--generator-ckpt", str(gen), "--output-dir", str(out),
        "--classifier-steps", "2", "--classes", "1", "--steps", "1", "--images-per-prompt", "2",
        "--heldout-noise", "4",
    ]  # fmt: skip
    assert main(argv) == 0
    before = _snapshot(out)
    assert "step_001.png" in before and any(k.startswith("classifier/") for k in before)
    capsys.readouterr()
    assert main([*argv, "--patch-size", "3", "--overwrite"]) == 2
    assert "--patch-size 3" in _one_line(capsys)
    assert _snapshot(out) == before


# ---------------------------------------------------------------------------------------------
# fill make-triptychs


def _triples(src: Path, seed: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    src.mkdir(exist_ok=True)
    for name in ("a", "b"):
        for role in ("visible", "target", "semantic"):
            pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(src / f"{name}_{role}.jpg")
        (src / f"{name}.txt").write_text(f"a photo of {name}")


def test_fill_make_triptychs_overwrite_with_a_truncated_image_keeps_the_output(tmp_path, capsys):
    """b's target JPEG is cut short: its header checks out, its pixels fail to decode after a's
    triptych is made. The earlier images/a.png (which captions.jsonl describes) is kept."""
    src, out = tmp_path / "src", tmp_path / "out"
    _triples(src, 0)
    argv = ["fill", "make-triptychs", "--input", str(src), "--output-dir", str(out)]
    argv += ["--panel-size", "16"]
    assert main(argv) == 0
    before = _snapshot(out)
    _triples(src, 1)
    target = src / "b_target.jpg"
    target.write_bytes(target.read_bytes()[:-10])
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == 2
    assert "b_target.jpg: cannot read image" in _one_line(capsys)
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".images.")) == []


# ---------------------------------------------------------------------------------------------
# fill infer


def test_fill_infer_overwrite_with_a_truncated_input_keeps_the_output(
    tmp_path, tiny_model_dir, capsys
):
    """b's visible JPEG is cut short (its header reads): it fails before the model loads, not
    after a.png and infer_settings.json were replaced."""
    from fill_helpers import write_image

    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    for i, name in enumerate("ab"):
        write_image(inputs / f"{name}_visible.jpg", (16, 16), seed=i)
        (inputs / f"{name}.txt").write_text(f"prompt {name}\n")
    argv = ["fill", "infer", "--model", tiny_model_dir("flux-fill"), "--steps", "1"]
    argv += ["--max-sequence-length", "8", "--input-dir", str(inputs), "--output", str(out)]
    assert main(argv) == 0
    before = _snapshot(out)
    assert {"a.png", "b.png", "infer_settings.json"} <= set(before)
    bad = inputs / "b_visible.jpg"
    bad.write_bytes(bad.read_bytes()[:-10])
    capsys.readouterr()
    assert main([*argv, "--seed", "5", "--overwrite"]) == 2
    assert "b_visible.jpg" in _one_line(capsys)
    assert _snapshot(out) == before
