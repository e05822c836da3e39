"""Bad-input audit (session 21): each case answered with one `diffalign: error:` line and exit 2
before anything is written or a big model loads, never an internal error, a crash or a silent
result. Cases: truncated LMDB stores (were SIGBUS), non-UTF-8 JSON / class / caption files,
damaged resume checkpoints, a --vae of another model family, `make-tiny --set` values of the
wrong type, pickled `.pt` files, a DINOv2 token grid finer than the teacher's, and `fill infer`
inputs.jsonl paths outside --input-dir."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import load_pt, read_json
from diffalign.engine.train import TrainConfig, train
from train_worker import RegressionTask

SRC = str(Path(__file__).resolve().parents[1] / "src")
MISSING_MODEL = "/nonexistent/diffalign-model"  # every refusal here comes before a model load
LATIN1 = "caf\xe9 au lait\n".encode("latin-1")  # not UTF-8


def run_cli(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("diffalign: error: "), err
    assert "internal error" not in err and "Traceback" not in err, err
    return lines[0]


def _image(path: Path, side: int = 32) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------- LMDB stores


def _truncated_store(path: Path) -> None:
    from diffalign.engine.lmdb_store import TensorLMDBWriter

    with TensorLMDBWriter(path, shape=(256,)) as w:
        for i in range(64):
            w.put(f"k{i}", torch.full((256,), float(i)))
    data = path / "data.mdb"
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 3])  # an interrupted copy


def test_truncated_lmdb_store_is_refused_not_a_crash(tmp_path):
    """LMDB maps data.mdb: a page past the end of a truncated file killed the process with
    SIGBUS (exit -7, no message) in readers and writers alike. Run in a child process so the
    old behaviour fails this test instead of killing pytest."""
    store = tmp_path / "latents.lmdb"
    _truncated_store(store)
    code = f"""
from diffalign.engine.errors import DiffalignError
from diffalign.engine.lmdb_store import TensorLMDB, TensorLMDBWriter
try:
    TensorLMDB({str(store)!r}).get("k0")
    print("read")
except DiffalignError as e:
    print("reader:", e)
try:
    with TensorLMDBWriter({str(store)!r}, shape=(256,)) as w:
        w.put("k99", __import__("torch").zeros(256))
    print("written")
except DiffalignError as e:
    print("writer:", e)
"""
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2, res.stdout
    assert lines[0].startswith("reader:") and "is truncated" in lines[0]
    assert lines[1].startswith("writer:") and "is truncated" in lines[1]


def test_corrupt_lmdb_pages_are_one_line(tmp_path):
    """Pages overwritten with garbage: py-lmdb's CorruptedError was an internal error."""
    from diffalign.engine.lmdb_store import TensorLMDB, TensorLMDBWriter

    store = tmp_path / "tokens.lmdb"
    with TensorLMDBWriter(store, shape=(256,)) as w:
        for i in range(64):
            w.put(f"k{i}", torch.full((256,), float(i)))
    raw = bytearray((store / "data.mdb").read_bytes())
    raw[8192:] = b"\x5a" * (len(raw) - 8192)  # every page after the two meta pages
    (store / "data.mdb").write_bytes(bytes(raw))
    with pytest.raises(DiffalignError, match="is damaged"):
        TensorLMDB(store).get("k3")


# ---------------------------------------------------------------------------- non-UTF-8 files


def test_read_json_of_a_non_utf8_file_is_one_line(tmp_path):
    bad = tmp_path / "weights.json"
    bad.write_bytes(b"\xff\xfe{}")
    with pytest.raises(DiffalignError, match="not UTF-8 text"):
        read_json(bad)


def test_cache_job_json_not_utf8(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "job.json").write_bytes(b"\xff\xfe{}")
    (cache / "pairs.jsonl").write_text("{}\n")
    argv = ["textstream", "train-weights", "--cache", str(cache), "--model", MISSING_MODEL]
    argv += ["--output-dir", str(tmp_path / "o"), "--residual-origin-layer", "1"]
    argv += ["--residual-target-layers", "2"]
    assert run_cli(argv) == 2
    assert "job.json: not UTF-8 text" in one_line(capsys)


def test_fill_infer_caption_not_utf8(tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _image(inputs / "a_visible.png")
    (inputs / "a.txt").write_bytes(LATIN1)
    argv = ["fill", "infer", "--model", MISSING_MODEL, "--input-dir", str(inputs)]
    argv += ["--output-dir", str(tmp_path / "o"), "--steps", "1"]
    assert run_cli(argv) == 2
    assert "a.txt: not UTF-8 text" in one_line(capsys)


@pytest.mark.parametrize("option", ["--class-names", "--val-labels"])
def test_repa_class_and_label_files_not_utf8(tmp_path, capsys, option):
    source = tmp_path / "imagenet"
    for wnid in ("n01", "n02"):
        (source / "train" / wnid).mkdir(parents=True)
        _image(source / "train" / wnid / f"{wnid}_0.JPEG")
    (source / "val").mkdir()
    _image(source / "val" / "ILSVRC2012_val_00000001.JPEG")
    bad = tmp_path / ("LOC_synset_mapping.txt" if option == "--class-names" else "val.txt")
    bad.write_bytes(LATIN1)
    split = "train" if option == "--class-names" else "val"
    argv = ["repa", "preprocess", "images", "--source", str(source), "--split", split]
    argv += ["--data-dir", str(tmp_path / "d"), "--resolution", "32", option, str(bad)]
    assert run_cli(argv) == 2
    assert f"{bad}: not UTF-8 text" in one_line(capsys)
    assert not (tmp_path / "d" / "manifest.csv").exists()


# ---------------------------------------------------------------------------- resume checkpoints


def _damage(ckpt: Path, part: str) -> None:
    if part == "state-list":
        (ckpt / "state.json").write_text("[1, 2]")
    elif part == "state-step":
        state = json.loads((ckpt / "state.json").read_text())
        state["step"] = "two"
        (ckpt / "state.json").write_text(json.dumps(state))
    elif part == "rng":
        torch.save([1, 2], ckpt / "rng.pt")
    elif part == "optimizer":
        opt = next(ckpt.glob("optimizer-*.pt"))
        torch.save([1, 2], opt)


@pytest.mark.parametrize("part", ["state-list", "state-step", "rng", "optimizer"])
def test_resume_from_a_damaged_checkpoint_is_one_line(tmp_path, part):
    """A checkpoint whose state.json / rng.pt / optimizer state holds the wrong structure (an
    edited or mixed-up file) was a TypeError / AttributeError (exit 1)."""

    def cfg(out, **kw):
        return TrainConfig(output_dir=str(out), tracker="none", progress=False, **kw)

    train(RegressionTask(), cfg(tmp_path / "a", max_steps=2, checkpoint_every=1))
    ckpt = tmp_path / "a" / "checkpoints" / "checkpoint-1"
    _damage(ckpt, part)
    with pytest.raises(DiffalignError, match=f"cannot resume from {ckpt}"):
        train(RegressionTask(), cfg(tmp_path / "b", max_steps=2, resume=str(ckpt)))


# ---------------------------------------------------------------------------- model files


def test_vae_of_another_family_is_refused(tiny_model_dir, tmp_path):
    """An SD 1.5 VAE (4 latent channels) for SD3 (16) was an internal error deep in sampling;
    a FLUX VAE for SD3 (16 channels, other scaling) would decode noise."""
    from diffalign.engine.loading import load_sd3_pipeline, load_vae

    sd3 = tiny_model_dir("sd3")
    with pytest.raises(DiffalignError, match="latent_channels is 4, the VAE of .* has 16"):
        load_sd3_pipeline(sd3, vae=str(Path(tiny_model_dir("sd15")) / "vae"))
    with pytest.raises(DiffalignError, match="scaling_factor"):
        load_vae(tiny_model_dir("flux-dev"), config=sd3)
    assert load_vae(str(Path(sd3) / "vae"), config=sd3) is not None  # its own VAE still loads


def test_generate_with_a_vae_of_another_family_is_one_line(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "o"
    argv = ["textstream", "generate", "--model", tiny_model_dir("sd3"), "--prompts", str(prompts)]
    argv += ["--output-dir", str(out), "--vae", str(Path(tiny_model_dir("sd15")) / "vae")]
    argv += ["--steps", "1"]
    assert run_cli(argv) == 2
    assert "--vae" in one_line(capsys)
    assert not list(out.rglob("*.png"))


@pytest.mark.parametrize(
    ("kind", "item", "want"),
    [
        ("clip", "projection_dim=abc", "projection_dim must be an integer, got 'abc'"),
        ("clip", "projection_dim=1.5", "projection_dim must be an integer, got 1.5"),
        ("sd15", "block_out_channels=abc", "block_out_channels must be a comma-separated"),
        ("sd15", "block_out_channels=8.5,16", "block_out_channels must be a comma-separated"),
        ("flux-dev", "num_layers=two", "num_layers must be an integer, got 'two'"),
    ],
)
def test_make_tiny_set_of_the_wrong_type(tmp_path, capsys, kind, item, want):
    """`--set NAME=text` was a ValueError (exit 1); `projection_dim=1.5` made a model silently."""
    out = tmp_path / "m"
    assert run_cli(["make-tiny", kind, "--out", str(out), "--set", item]) == 2
    assert want in one_line(capsys)
    assert not out.exists()


class _Marker:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (print, (self.path,))


def test_pickled_pt_is_one_clear_line_without_warnings(tmp_path):
    """torch's UserWarning about the pickle protocol printed two lines before ours."""
    path = tmp_path / "weights.pt"
    path.write_bytes(pickle.dumps({"w": _Marker("x")}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DiffalignError, match="pickled Python objects.*never loaded") as e:
            load_pt(path)
    assert "\n" not in str(e.value)
    assert not caught, [str(w.message) for w in caught]


def test_dino_grid_finer_than_the_teacher_is_refused(tiny_model_dir, tmp_path, capsys):
    """--grid 1000 wrote 367 MB of repeated tokens for 6 tiny images; the teacher's patch grid
    at 518 px is 37x37."""
    source = tmp_path / "src"
    for wnid in ("n01", "n02"):
        (source / wnid).mkdir(parents=True)
        _image(source / wnid / f"{wnid}_0.JPEG")
    data = tmp_path / "d"
    argv = ["repa", "preprocess", "images", "--source", str(source), "--data-dir", str(data)]
    assert run_cli([*argv, "--resolution", "32"]) == 0
    capsys.readouterr()
    argv = ["repa", "preprocess", "dino", "--data-dir", str(data)]
    argv += ["--dino-model", tiny_model_dir("dinov2"), "--grid", "38"]
    assert run_cli(argv) == 2
    assert "--grid 38 is finer than the teacher's 37x37 patch grid" in one_line(capsys)
    assert not (data / "dino_tokens.lmdb" / "data.mdb").exists()


# ---------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_fill_infer_inputs_jsonl_stays_inside_the_input_dir(tmp_path, capsys, where):
    inputs = tmp_path / "in"
    inputs.mkdir()
    outside = _image(tmp_path / "outside.png")
    path = "../outside.png" if where == "parent" else str(outside)
    (inputs / "inputs.jsonl").write_text(json.dumps({"visible": path, "prompt": "a"}) + "\n")
    argv = ["fill", "infer", "--model", MISSING_MODEL, "--input-dir", str(inputs)]
    argv += ["--output-dir", str(tmp_path / "o"), "--steps", "1"]
    assert run_cli(argv) == 2
    line = one_line(capsys)
    assert "inputs.jsonl:1: 'visible'" in line
    assert ("points outside" in line) if where == "parent" else ("not absolute" in line)


# ---------------------------------------------------------------------------- cheap checks first


@pytest.fixture(scope="module")
def toy_gan(tmp_path_factory) -> Path:
    gan = tmp_path_factory.mktemp("toy") / "gan"
    argv = ["noise", "toy", "train-gan", "--output-dir", str(gan), "--max-items", "8"]
    assert run_cli([*argv, "--batch-size", "4", "--max-steps", "1", "--tracker", "none"]) == 0
    return gan


def test_toy_optimize_refuses_a_bad_class_before_training_the_classifier(toy_gan, tmp_path, capsys):
    """`--classes 99` was refused only after the evaluation classifier had been trained (25 s
    with the default 600 steps) and written into the output folder."""
    gan = toy_gan
    capsys.readouterr()
    out = tmp_path / "opt"
    argv = ["noise", "toy", "optimize", "--generator-ckpt", str(gan), "--output-dir", str(out)]
    argv += ["--classes", "3", "99", "--steps", "1", "--classifier-steps", "1"]
    assert run_cli(argv) == 2
    assert "toy prompt '99' is not a class" in one_line(capsys)
    assert not (out / "classifier").exists()


# ---------------------------------------------------------------------------- records we wrote


def test_toy_train_gan_resume_with_a_damaged_run_config(tmp_path, capsys):
    """A run_config.json / features.json holding a list (an edited or mixed-up file) was an
    AttributeError on `.get` (exit 1)."""
    out = tmp_path / "gan"
    out.mkdir()
    (out / "run_config.json").write_text("[1]")
    argv = ["noise", "toy", "train-gan", "--output-dir", str(out), "--resume", "latest"]
    assert run_cli([*argv, "--max-items", "8", "--max-steps", "1"]) == 2
    assert "run_config.json: not a JSON object (list)" in one_line(capsys)


def test_repa_probe_with_a_damaged_features_json(tmp_path, capsys):
    from diffalign.engine.io import save_tensors

    feats = tmp_path / "features"
    feats.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {"teacher": torch.randn(8, 4, generator=g), "labels": torch.arange(8) % 2}
    save_tensors(feats / "features.safetensors", tensors)
    (feats / "features.json").write_text("[1]")
    out = tmp_path / "probe"
    argv = ["repa", "probe", "--features", str(feats), "--output-dir", str(out)]
    assert run_cli(argv) == 2
    assert "features.json: not a JSON object (list)" in one_line(capsys)
    assert not (out / "probe.png").exists()


def test_toy_assign_rerun_with_a_damaged_assign_config(toy_gan, tmp_path, capsys):
    """The noise job runner (build-dataset, toy assign) compared a list config with `.get`."""
    out = tmp_path / "assign"
    argv = ["noise", "toy", "assign", "--generator-ckpt", str(toy_gan), "--output-dir", str(out)]
    argv += ["--max-items", "2", "--assign-steps", "1"]
    assert run_cli(argv) == 0
    manifest = (out / "manifest.jsonl").read_bytes()
    (out / "assign_config.json").write_text("[1]")
    capsys.readouterr()
    assert run_cli(argv) == 2
    assert "assign_config.json: not a JSON object (list)" in one_line(capsys)
    assert (out / "manifest.jsonl").read_bytes() == manifest  # nothing lost


def test_make_tiny_sizes_the_model_cannot_take(tmp_path, capsys):
    """Sizes diffusers refuses to build (an odd embedding width) were an internal error (exit 1)."""
    out = tmp_path / "m"
    argv = ["make-tiny", "sd3", "--out", str(out), "--num-attention-heads", "3"]
    assert run_cli([*argv, "--attention-head-dim", "5"]) == 2
    line = one_line(capsys)
    assert "cannot be built with attention_head_dim=5, num_attention_heads=3" in line, line
    assert not out.exists()


def test_vae_of_another_family_is_refused_for_a_preset_model(tiny_model_dir, tmp_path, monkeypatch):
    """With the model named by a preset (`sd3`, found in the models folder), the family check
    read the preset name as a path, found no config and was skipped."""
    from diffalign.engine.loading import load_vae

    models = tmp_path / "models"
    models.mkdir()
    (models / "sd3").symlink_to(tiny_model_dir("sd3"), target_is_directory=True)
    monkeypatch.setenv("DIFFALIGN_MODELS_DIR", str(models))
    with pytest.raises(DiffalignError, match="VAE of another model family"):
        load_vae(str(Path(tiny_model_dir("sd15")) / "vae"), config="sd3")
    assert load_vae(str(Path(tiny_model_dir("sd3")) / "vae"), config="sd3") is not None
