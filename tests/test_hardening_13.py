"""Issue 13, items 12, 14, 15 and 16a: degenerate settings and all-NaN runs refused, Fill's
captions.jsonl contained in --data, internal errors turned into one clean line (exit 2) with no
library lines before it, and a Fill LoRA whose bytes do not depend on the process."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import load_tensors, save_tensors
from diffalign.engine.train import TrainConfig, train
from noise_data_helpers import model_args, write_pairs
from train_worker import RegressionTask

SRC = str(Path(__file__).resolve().parents[1] / "src")
MISSING_MODEL = "/nonexistent/diffalign-model"  # old code got past our checks only to fail here


def run_cli(argv) -> int:
    """`main(argv)` with argparse's exit (bad option values) turned into its exit code."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def one_line(capsys) -> str:
    """The one stderr line of a refused command: nothing else on stderr, no internal error."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("diffalign") and ": error: " in lines[0], err
    assert "internal error" not in lines[0] and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def sd21(tiny_model_dir):
    return tiny_model_dir("sd21")


def sd21_args(model: str) -> list[str]:
    return [*model_args(model), "--generator", "sd-turbo"]


# ---------------------------------------------------------------------------- item 12


@pytest.mark.parametrize("verb", ["assign", "build-dataset", "em"])
def test_zero_assignment_steps_are_refused(sd21, tmp_path, capsys, verb):
    data = write_pairs(tmp_path / "data", n=1)
    out = tmp_path / "out"
    argv = {
        "assign": ["noise", "assign", "--prompt", "a cat", "--target-image",
                   str(data / "images" / "0000.png"), "--output-dir", str(out), "--steps", "0"],
        "build-dataset": ["noise", "build-dataset", "--data-root", str(data), "--output-dir",
                          str(out), "--steps", "0"],
        "em": ["noise", "em", "--data-root", str(data), "--work-dir", str(out),
               "--assign-steps", "0", "--train-max-steps", "1", "--tracker", "none"],
    }[verb]  # fmt: skip
    assert run_cli([*argv, *sd21_args(sd21)]) == 2
    assert "steps: '0' must be >= 1" in one_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("verb", ["assign", "em"])
def test_zero_assignment_steps_are_refused_by_the_toy_verbs(tmp_path, capsys, verb):
    argv = ["noise", "toy", verb, "--generator-ckpt", str(tmp_path / "gen")]
    assert run_cli([*argv, "--output-dir", str(tmp_path / "o"), "--assign-steps", "0"]) == 2
    assert "--assign_steps: '0' must be >= 1" in one_line(capsys)


def test_zero_assignment_steps_are_refused_by_the_library():
    from diffalign.noise.assign import _check_settings

    with pytest.raises(DiffalignError, match="--steps must be >= 1"):
        _check_settings(0, 1e-3, 2, 1.0, 0.1, (4, 4, 4))


@pytest.mark.parametrize("spec", ["clip:0", "hpsv2:5,clip:0.0", "hybrid:-0"])
def test_a_reward_weight_of_zero_is_refused(tmp_path, capsys, spec):
    argv = ["noise", "optimize", "--prompt", "a cat", "--reward", spec, "--model", MISSING_MODEL]
    assert run_cli([*argv, "--output-dir", str(tmp_path / "o")]) == 2
    assert "is 0 (it would change nothing)" in one_line(capsys)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--lora-alpha", "0", "lora_alpha must be > 0, got 0.0"),
        ("--adam-beta1", "1.5", "adam_beta1 must be in [0, 1), got 1.5"),
        ("--adam-beta2", "-0.1", "adam_beta2 must be in [0, 1), got -0.1"),
        ("--adam-eps", "-1", "adam_eps must be a finite number > 0, got -1.0"),
    ],
)
def test_repa_lora_alpha_and_adam_settings_are_checked(tmp_path, capsys, option, value, message):
    argv = ["repa", "train", "--data-dir", str(tmp_path / "none"), "--model", MISSING_MODEL]
    assert run_cli([*argv, "--output-dir", str(tmp_path / "o"), option, value]) == 2
    assert message in one_line(capsys)


def test_the_engine_checks_adam_settings_of_every_task(tmp_path):
    from diffalign.engine.train import OptimizerSpec

    class BadBetas(RegressionTask):
        def optimizers(self):
            return {"main": OptimizerSpec([{"params": self.net.parameters()}], betas=(0.9, 1.0))}

    with pytest.raises(DiffalignError, match=r"optimizer 'main': adam_beta2 must be in \[0, 1\)"):
        train(BadBetas(), TrainConfig(output_dir=str(tmp_path), max_steps=1, tracker="none"))


def _cfg(out: Path, **kw) -> TrainConfig:
    return TrainConfig(output_dir=str(out), tracker="none", progress=False, log_every=1, **kw)


def test_a_run_whose_every_step_is_nonfinite_fails(tmp_path):
    # 6 steps, all NaN: fewer than max_nonfinite_steps (10) in a row, but nothing was trained
    with pytest.raises(DiffalignError, match=r"NaN/inf at every step of this run \(steps 1-6\)"):
        train(RegressionTask(nan_steps=set(range(100))), _cfg(tmp_path / "a", max_steps=6))
    assert not (tmp_path / "a" / "checkpoint-final").exists()
    # a resume whose steps are all NaN trained nothing either (finite steps before it or not)
    # (a constant schedule: a longer horizon under cosine is another job, refused by identity)
    train(RegressionTask(), _cfg(tmp_path / "b", max_steps=3, lr_scheduler="constant"))
    task = RegressionTask(nan_steps=set(range(100)))
    with pytest.raises(DiffalignError, match=r"every step of this run \(steps 4-6\)"):
        train(task, _cfg(tmp_path / "b", max_steps=6, resume="latest", lr_scheduler="constant"))
    # the rule: some finite step in the run is enough (the ones after it are skipped, counted)
    res = train(RegressionTask(nan_steps={3, 4, 5}), _cfg(tmp_path / "c", max_steps=6))
    assert res.summary["skipped_nonfinite"] == 3 and res.final_dir.is_dir()


def test_repa_train_with_only_nonfinite_steps_exits_2(tiny_model_dir, tmp_path, capsys):
    from diffalign.engine.lmdb_store import TensorLMDB, TensorLMDBWriter
    from test_repa_train import build_data_dir

    sd15 = tiny_model_dir("sd15")
    data = build_data_dir(tmp_path / "data")
    store = TensorLMDB(data / "vae_latents.lmdb")
    shape, keys = store.shape, [k for k in store.keys() if "train" in k]
    store.close()
    with TensorLMDBWriter(data / "vae_latents.lmdb", shape) as w:
        for key in keys:
            w.put(key, torch.full(shape, float("nan")))
    argv = ["repa", "train", "--data-dir", str(data), "--model", sd15]
    argv += ["--output-dir", str(tmp_path / "run"), "--no-progress"]
    for key, value in {
        "grid": 4, "head-hidden-dim": 16, "batch-size": 4, "num-workers": 0, "max-steps": 6,
        "mixed-precision": "no", "validate-every": 0, "checkpoint-every": 0, "tracker": "none",
        "max-val-samples": 4, "ema-decay": 0.9,
    }.items():  # fmt: skip
        argv += [f"--{key}", str(value)]
    assert run_cli(argv) == 2  # was: "trained 6 steps", exit 0
    assert "NaN/inf at every step of this run (steps 1-6)" in one_line(capsys)
    assert not (tmp_path / "run" / "checkpoint-final").exists()


# ---------------------------------------------------------------------------- item 14


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_fill_train_captions_stay_inside_the_data_folder(tmp_path, capsys, where):
    from fill_helpers import tiny_train_args, write_triptychs

    data = write_triptychs(tmp_path / "data", n=2)
    outside = write_triptychs(tmp_path / "elsewhere", n=1) / "t0.png"
    image = "../elsewhere/t0.png" if where == "parent" else str(outside)
    with open(data / "captions.jsonl", "a") as f:
        f.write(json.dumps({"image": image, "prompt": "not ours"}) + "\n")
    out = tmp_path / "run"
    assert run_cli(tiny_train_args(MISSING_MODEL, data, out)) == 2
    line = one_line(capsys)
    assert "captions.jsonl:3: 'image'" in line
    assert ("points outside" if where == "parent" else "must be relative") in line


# ---------------------------------------------------------------------------- item 15


@pytest.mark.parametrize("device", ["cuda:99", "foo"])
@pytest.mark.parametrize("verb", ["assign", "build-dataset", "optimize"])
def test_noise_verbs_check_the_device(sd21, tmp_path, capsys, verb, device):
    data = write_pairs(tmp_path / "data", n=1)
    out = tmp_path / "out"
    argv = {
        "assign": ["noise", "assign", "--prompt", "a cat", "--target-image",
                   str(data / "images" / "0000.png"), "--steps", "1"],
        "build-dataset": ["noise", "build-dataset", "--data-root", str(data), "--steps", "1"],
        "optimize": ["noise", "optimize", "--prompt", "a cat", "--steps", "1"],
    }[verb]  # fmt: skip
    assert run_cli([*argv, "--output-dir", str(out), "--device", device, *sd21_args(sd21)]) == 2
    line = one_line(capsys)
    assert "--device" in line and device in line
    assert not out.exists()


@pytest.mark.parametrize(
    "key, value",
    [
        ("num_attention_heads", "many"),
        ("num_attention_heads", 5),  # does not divide the width 32
        ("hidden_act", 3),
        ("layer_norm_eps", "tiny"),
        ("pad_token_id", 1.5),
        ("hidden_size", "32"),
    ],
)
def test_imagereward_med_config_with_wrong_types_is_one_line(tiny_model_dir, tmp_path, key, value):
    import shutil

    from diffalign.engine.rewards import load_reward

    folder = tmp_path / "ir"
    shutil.copytree(tiny_model_dir("imagereward"), folder)
    med = json.loads((folder / "med_config.json").read_text())
    med[key] = value
    (folder / "med_config.json").write_text(json.dumps(med))
    with pytest.raises(DiffalignError, match=f"{key}") as e:
        load_reward("imagereward", imagereward_model_path=str(folder / "ImageReward.pt"))
    assert "\n" not in str(e.value)


def test_imagereward_med_config_with_wrong_types_through_the_cli(
    sd21, tiny_model_dir, tmp_path, capsys
):
    import shutil

    folder = tmp_path / "ir"
    shutil.copytree(tiny_model_dir("imagereward"), folder)
    med = json.loads((folder / "med_config.json").read_text())
    med["num_attention_heads"] = "many"
    (folder / "med_config.json").write_text(json.dumps(med))
    argv = ["noise", "optimize", "--prompt", "a cat", "--steps", "1", "--reward", "imagereward"]
    argv += ["--imagereward-model-path", str(folder / "ImageReward.pt")]
    assert run_cli([*argv, "--output-dir", str(tmp_path / "o"), *sd21_args(sd21)]) == 2
    assert "num_attention_heads must be an integer >= 1, got 'many'" in one_line(capsys)


class _Marker:
    """A pickle that would create a file if it were ever unpickled with weights_only=False."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("reward", ["clip", "pickscore"])
def test_reward_folder_with_a_pickled_bin_is_refused(
    sd21, tiny_model_dir, tmp_path, capsys, reward
):
    import shutil

    folder = tmp_path / "weights"
    shutil.copytree(tiny_model_dir(reward), folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    torch.save({"w": _Marker(str(marker))}, folder / "pytorch_model.bin")
    option = {"clip": "--clip-model", "pickscore": "--pickscore-model"}[reward]
    argv = ["noise", "optimize", "--prompt", "a cat", "--steps", "1", "--reward", reward]
    argv += [option, str(folder), "--output-dir", str(tmp_path / "o"), *sd21_args(sd21)]
    if reward == "pickscore":
        argv += ["--pickscore-processor", str(folder / "processor")]
    assert run_cli(argv) == 2
    line = one_line(capsys)
    assert "pytorch_model.bin" in line and "never loaded" in line
    assert not marker.exists()


def test_repa_preprocess_resolution_is_bounded(tmp_path, capsys):
    argv = ["repa", "preprocess", "images", "--source", str(tmp_path / "empty")]
    argv += ["--data-dir", str(tmp_path / "d"), "--resolution", "100000"]
    (tmp_path / "empty").mkdir()
    assert run_cli(argv) == 2
    assert "--resolution 100000 is above the maximum 4096" in one_line(capsys)


def test_fill_infer_input_name_with_a_nul_byte(tmp_path, capsys):
    from fill_helpers import write_image

    inputs = tmp_path / "in"
    inputs.mkdir()
    write_image(inputs / "a.png", (16, 16))
    line = {"visible": "a.png", "prompt": "a cat", "name": "a\x00b"}
    (inputs / "inputs.jsonl").write_text(json.dumps(line) + "\n")
    argv = ["fill", "infer", "--model", MISSING_MODEL, "--input-dir", str(inputs)]
    assert run_cli([*argv, "--output", str(tmp_path / "o")]) == 2
    assert "inputs.jsonl:1: 'name' holds a NUL byte" in one_line(capsys)


class _Records(logging.Handler):
    """Every record a library logger emits while attached."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def library_records():
    handler = _Records()
    names = ("diffusers", "transformers", "peft")
    for name in names:
        logging.getLogger(name).addHandler(handler)
    yield handler.records
    for name in names:
        logging.getLogger(name).removeHandler(handler)


def test_a_vae_of_another_kind_is_our_line_alone(sd21, tiny_model_dir, tmp_path):
    """A subprocess: the libraries' handlers write to the real stderr there."""
    target = write_pairs(tmp_path / "data", n=1) / "images" / "0000.png"
    argv = ["noise", "assign", "--prompt", "a cat", "--target-image", str(target), "--steps", "1"]
    argv += ["--output-dir", str(tmp_path / "o"), "--vae", tiny_model_dir("dinov2")]
    env = {**os.environ, "PYTHONPATH": SRC, "DIFFALIGN_NO_PROGRESS": "1"}
    env.pop("DIFFALIGN_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "diffalign.cli", *argv, *sd21_args(sd21)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("diffalign: error: ") and "dinov2" in lines[0]


def _lora_of_another_model(model: str, out: Path) -> Path:
    """A diffusers LoRA whose down projections expect 8 more inputs than `model`'s layers."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig

    from diffalign.engine.lora import save_unet_lora

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"]))
    file = save_unet_lora(StableDiffusionPipeline, out, unet)
    tensors, meta = load_tensors(file)
    tensors = {
        k: torch.zeros(v.shape[0], v.shape[1] + 8) if ".lora.down." in k else v
        for k, v in tensors.items()
    }
    save_tensors(file, tensors, meta)
    return file


def test_an_init_lora_of_another_model_is_our_line_alone(sd21, tmp_path, capsys, library_records):
    data = write_pairs(tmp_path / "data", n=1)
    ds = tmp_path / "ds"
    argv = ["noise", "build-dataset", "--data-root", str(data), "--output-dir", str(ds)]
    assert main([*argv, "--steps", "1", "--no-plots", *sd21_args(sd21)]) == 0
    _lora_of_another_model(sd21, tmp_path / "lora")
    capsys.readouterr()
    library_records.clear()
    argv = ["noise", "sft", "--manifest-path", str(ds), "--output-dir", str(tmp_path / "run")]
    argv += ["--init-lora", str(tmp_path / "lora"), "--max-steps", "1", "--tracker", "none"]
    assert run_cli([*argv, *sd21_args(sd21)]) == 2
    line = one_line(capsys)
    assert "--init-lora" in line and "cannot load it" in line
    # what diffusers logged ("Loading default was unsuccessful ...", the size mismatches)
    assert not [r.getMessage() for r in library_records if r.levelno >= logging.ERROR]


def test_a_hyper_sd15_lora_of_another_model_is_our_line_alone(
    tiny_model_dir, tmp_path, capsys, library_records
):
    sd15 = tiny_model_dir("sd15")
    lora = _lora_of_another_model(sd15, tmp_path / "lora")
    target = write_pairs(tmp_path / "data", n=1) / "images" / "0000.png"
    argv = ["noise", "assign", "--prompt", "a cat", "--target-image", str(target), "--steps", "1"]
    argv += ["--output-dir", str(tmp_path / "o"), *model_args(sd15), "--generator", "hyper-sd15"]
    capsys.readouterr()
    library_records.clear()
    assert run_cli([*argv, "--weights", str(lora)]) == 2
    assert "not a hyper-sd15 LoRA for this model" in one_line(capsys)
    assert not [r.getMessage() for r in library_records if r.levelno >= logging.ERROR]


def test_held_library_lines_come_back_when_the_load_succeeds(library_records):
    from diffalign.engine.errors import library_output_held

    log = logging.getLogger("diffusers.some.module")
    with library_output_held():
        log.error("kept for later")
        assert library_records == []
    assert [r.getMessage() for r in library_records] == ["kept for later"]
    library_records.clear()
    with pytest.raises(ValueError), library_output_held():
        log.error("dropped")
        raise ValueError("the load failed")
    assert library_records == []


def test_no_assignable_sample_exits_2_as_the_readme_says(sd21, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "pairs.jsonl").write_text(json.dumps({"prompt": "x", "image": "nope.png"}) + "\n")
    argv = ["noise", "build-dataset", "--data-root", str(data), "--output-dir", str(tmp_path / "o")]
    assert main([*argv, "--steps", "1", *sd21_args(sd21)]) == 2
    assert "no sample could be assigned" in capsys.readouterr().err


# ---------------------------------------------------------------------------- item 16a


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, out_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        pooled_projection_dim=16, axes_dims_rope=[2, 2, 4],
    )  # fmt: skip


_SAVE_LORA = """
import hashlib, sys, tempfile
from pathlib import Path
import torch
from diffusers import FluxTransformer2DModel
from diffalign.fill.model import add_lora
from diffalign.fill.weights import save_lora

torch.manual_seed(0)
t = FluxTransformer2DModel(patch_size=1, in_channels=8, out_channels=4, num_layers=1,
    num_single_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
    pooled_projection_dim=16, axes_dims_rope=[2, 2, 4])
cfg = add_lora(t, rank=2, targets="all-linear")
for _ in range(2):
    with tempfile.TemporaryDirectory() as d:
        print(hashlib.sha256(save_lora(Path(d), t, cfg).read_bytes()).hexdigest())
"""


def test_fill_lora_saved_again_is_the_same_bytes(tmp_path):
    """The metadata order changed from one save to the next even in one process (safetensors
    keeps it in a hash map seeded per map): 8 saves, one sha256."""
    import tempfile

    from diffalign.fill.model import add_lora
    from diffalign.fill.weights import save_lora

    torch.manual_seed(0)
    t = _tiny_flux()
    cfg = add_lora(t, rank=2, targets="all-linear")
    hashes = set()
    for _ in range(8):
        with tempfile.TemporaryDirectory(dir=tmp_path) as d:
            hashes.add(hashlib.sha256(save_lora(Path(d), t, cfg).read_bytes()).hexdigest())
    assert len(hashes) == 1, hashes


@pytest.mark.slow  # two fresh interpreters importing diffusers: ~20 s each on a loaded machine
def test_fill_lora_bytes_do_not_depend_on_the_process(tmp_path):
    hashes = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONPATH": SRC, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", _SAVE_LORA],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        hashes.update(proc.stdout.split())
    assert len(hashes) == 1, hashes  # was 2 (metadata keys in a hash map's order)


def test_fill_lora_keeps_diffusers_keys_and_metadata(tmp_path):
    from safetensors import safe_open

    from diffalign.fill.model import add_lora
    from diffalign.fill.weights import LORA_METADATA_KEY, save_lora

    torch.manual_seed(0)
    t = _tiny_flux()
    cfg = add_lora(t, rank=2, alpha=6, targets="all-linear")
    file = save_lora(tmp_path, t, cfg)
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["format"] == "pt" and all(k.startswith("transformer.") for k in keys)
    lora_meta = json.loads(meta[LORA_METADATA_KEY])
    assert lora_meta["transformer.r"] == 2 and lora_meta["transformer.lora_alpha"] == 6
    raw = file.read_bytes()
    header = raw[8 : 8 + int.from_bytes(raw[:8], "little")].decode()
    assert header.index('"format"') < header.index(f'"{LORA_METADATA_KEY}"')  # sorted
    assert (
        hashlib.sha256(raw).hexdigest()
        == hashlib.sha256(save_lora(tmp_path / "again", t, cfg).read_bytes()).hexdigest()
    )
