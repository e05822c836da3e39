"""Latent-matched SFT / direct SFT of a one-step U-Net (spec N; seed 001 step 3): full and LoRA
exports load back into diffusers, exact resume on the shared loop, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.cli import main
from diffalign.engine.io import load_tensors
from diffalign.noise.dataset import AssignSettings, build_dataset
from diffalign.noise.generators import load_generator
from diffalign.noise.sft import MatchedSftTask, sft
from folder_helpers import file_mtimes
from noise_data_helpers import SIZE, model_args, write_pairs

TRAIN = ["--tracker", "none", "--batch-size", "2", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def sdxl(tiny_model_dir):
    return tiny_model_dir("sdxl")


@pytest.fixture(scope="module")
def dataset(sdxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("sftdata")
    data = write_pairs(root / "data", n=3)
    gen = load_generator(sdxl, height=SIZE, width=SIZE, device="cpu")
    build_dataset(gen, data, root / "ds", AssignSettings(steps=2), batch_size=3, plots=False)
    return root / "ds"


def _unet_weights(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(f"{folder}/unet").state_dict()


def test_full_sft_exports_loadable_pipelines(sdxl, dataset, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "full"
    argv = ["noise", "sft", "--manifest-path", str(dataset / "manifest.jsonl"), "--output-dir"]
    argv += [str(out), "--epochs", "2", "--ema-decay", "0.5", *TRAIN, *model_args(sdxl)]
    assert main(argv) == 0
    for name in (
        "checkpoint-final",
        "checkpoint-best",
        "checkpoint-epoch-001",
        "checkpoint-epoch-002",
    ):
        assert (out / name / "model_index.json").is_file(), name
    assert (out / "train_history.png").is_file()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4
    pipe = StableDiffusionXLPipeline.from_pretrained(out / "checkpoint-final")
    base = _unet_weights(sdxl)
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, base[k])]
    assert changed  # the U-Net trained; the exported pipeline runs as a generator again
    gen = load_generator(str(out / "checkpoint-final"), "sdxl-turbo", height=SIZE, width=SIZE)
    with torch.no_grad():
        img = gen.generate(gen.sample_noise(1), gen.encode_prompts(["a cat"]))
    assert img.shape == (1, 3, SIZE, SIZE)


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_lora_export_loads_with_load_lora_weights(tiny_model_dir, dataset, tmp_path, kind):
    from diffusers import DiffusionPipeline

    model = tiny_model_dir(kind)
    out = tmp_path / "lora"
    argv = ["noise", "sft", "--manifest-path", str(dataset), "--output-dir", str(out)]
    argv += ["--max-steps", "2", "--lora-rank", "4", *TRAIN, *model_args(model)]
    if kind == "sd15":  # direct SFT: the same targets, no sdxl-shaped noises needed
        argv += ["--direct", "--generator", "sd-turbo"]
    assert main(argv) == 0
    lora_file = out / "checkpoint-final" / "pytorch_lora_weights.safetensors"
    tensors, _ = load_tensors(lora_file)
    assert tensors and all(k.startswith("unet.") and "lora" in k for k in tensors)
    pipe = DiffusionPipeline.from_pretrained(model)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(out / "checkpoint-final")
    pipe.fuse_lora()
    after = pipe.unet.state_dict()
    fused = {k.replace(".base_layer.", "."): v for k, v in after.items()}
    changed = [k for k, v in before.items() if k in fused and not torch.equal(fused[k], v)]
    assert changed, "the LoRA did not change any U-Net weight"


def test_resume_is_exact(sdxl, dataset, tmp_path, monkeypatch):
    def run(out, **kw):
        gen = load_generator(sdxl, height=SIZE, width=SIZE, device="cpu")
        return sft(
            gen, dataset, out, max_steps=4, batch_size=2, lr=1e-3, lora_rank=2,
            checkpoint_every=2, tracker="none", progress=False, **kw,
        )  # fmt: skip

    run(tmp_path / "straight")
    real = MatchedSftTask.training_step

    def crash(self, batch, step, ctx):
        if step == 3:
            raise RuntimeError("simulated crash")
        return real(self, batch, step, ctx)

    monkeypatch.setattr(MatchedSftTask, "training_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "resumed")
    monkeypatch.setattr(MatchedSftTask, "training_step", real)
    run(tmp_path / "resumed", resume="latest")
    a, _ = load_tensors(tmp_path / "straight/checkpoint-final/pytorch_lora_weights.safetensors")
    b, _ = load_tensors(tmp_path / "resumed/checkpoint-final/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_deterministic_reaches_the_loop(sdxl, dataset, tmp_path):
    gen = load_generator(sdxl, height=SIZE, width=SIZE, device="cpu")
    out = tmp_path / "det"
    r = sft(
        gen, dataset, out, max_steps=1, batch_size=2, lr=1e-3, lora_rank=2,
        tracker="none", progress=False, deterministic=True,
    )  # fmt: skip
    assert r["steps"] == 1  # the U-Net's ops run under torch's deterministic mode
    assert json.loads((out / "run_config.json").read_text())["train"]["deterministic"] is True
    assert not torch.are_deterministic_algorithms_enabled()


def test_compile_option_compiles_the_trained_unet(sdxl, dataset, tmp_path, monkeypatch):
    """`noise sft --compile` reaches the loop, which compiles the U-Net in place (regional); the
    compiled == eager numbers are tests/test_train_compile.py's (inductor is slow on the CPU)."""
    import diffalign.engine.compile as compile_mod  # the loop compiles through speed_up_modules

    seen = []

    def record(module, **kw):
        seen.append(type(module).__name__)
        return "regional"

    monkeypatch.setattr(compile_mod, "compile_module", record)
    base = ["noise", "sft", "--manifest-path", str(dataset), *TRAIN, *model_args(sdxl)]
    out = tmp_path / "c"
    assert main([*base, "--output-dir", str(out), "--max-steps", "1", "--compile"]) == 0
    assert seen == ["UNet2DConditionModel"]
    assert json.loads((out / "run_config.json").read_text())["train"]["compile"] is True


def test_direct_and_matched_differ_and_bad_input(sdxl, dataset, tmp_path, capsys):
    base = ["noise", "sft", "--manifest-path", str(dataset), *TRAIN, *model_args(sdxl)]
    assert main([*base, "--output-dir", str(tmp_path / "d"), "--max-steps", "1", "--direct"]) == 0
    assert json.loads((tmp_path / "d/run_config.json").read_text())["task"]["method"] == "direct"
    bad = tmp_path / "bad"
    bad.mkdir()
    rec = json.loads((dataset / "manifest.jsonl").read_text().splitlines()[0])
    rec["target_image"] = "/etc/hostname"
    (bad / "manifest.jsonl").write_text(json.dumps(rec) + "\n")
    for extra, needle in (
        (["--manifest-path", str(bad)], "absolute"),
        (["--dtype", "fp16"], "float32"),
    ):
        capsys.readouterr()
        assert main([*base, "--output-dir", str(tmp_path / "x"), *extra]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("diffalign")]
        assert len(err) == 1 and needle in err[0], err


def test_hyper_sd15_sft_keeps_the_fused_one_step_lora(tiny_model_dir, dataset, tmp_path):
    """Full SFT of hyper-sd15 drops the fused LoRA's layers but keeps its fused weights: the
    exported pipeline, loaded without re-applying the LoRA, is the Hyper-SD generator again
    (1 step at lr 1e-9 changes next to nothing)."""
    weights = f"{tiny_model_dir('hyper-sd')}/Hyper-SD15-1step-lora.safetensors"
    kw = dict(height=SIZE, width=SIZE, device="cpu")
    gen = load_generator(tiny_model_dir("sd15"), "hyper-sd15", weights=weights, **kw)
    z = gen.sample_noise(1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = gen.generate(z, gen.encode_prompts(["a cat"]))
    r = sft(
        gen, dataset, tmp_path / "h", direct=True, max_steps=1, lr=1e-9, tracker="none",
        progress=False,
    )  # fmt: skip
    from diffalign.noise.recipes import generator_recipe

    recipe = generator_recipe(r["model"])  # what every verb loads it as
    assert recipe.spec.name == "hyper-sd15" and recipe.weights_in_model
    again = load_generator(r["model"], **kw)
    with torch.no_grad():
        after = again.generate(z, again.encode_prompts(["a cat"]))
    assert torch.allclose(before, after, atol=1e-4)
    assert not getattr(again.unet, "peft_config", None)  # fused, no adapter layers left
    # `noise assign --model CHECKPOINT` runs it as hyper-sd15 without applying the LoRA again
    target = (
        dataset
        / json.loads((dataset / "manifest.jsonl").read_text().splitlines()[0])["target_image"]
    )
    argv = ["noise", "assign", "--prompt", "a cat", "--target-image", str(target), "--steps"]
    argv += ["1", "--output-dir", str(tmp_path / "a"), *model_args(r["model"])]
    assert main(argv) == 0
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["generator"] == "hyper-sd15"


@pytest.mark.slow  # 2 processes under accelerate launch
def test_two_process_lora_sft(sdxl, dataset, tmp_path):
    from launch_helper import launch_two_cpu_processes

    out = tmp_path / "two"
    argv = ["-m", "diffalign.cli", "noise", "sft", "--manifest-path", str(dataset)]
    argv += ["--output-dir", str(out), "--max-steps", "2", "--batch-size", "1"]
    argv += ["--lora-rank", "2", "--tracker", "none", *model_args(sdxl)]
    r = launch_two_cpu_processes(argv)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 2
    assert (out / "checkpoint-final" / "pytorch_lora_weights.safetensors").is_file()


def test_matched_sft_fits_its_matched_noises(sdxl, dataset, tmp_path):
    """The M-step does what it claims: the reconstruction loss of (matched noise -> target)
    falls after a few steps of matched SFT."""
    from diffalign.noise.assign import assign_loss, load_target_image
    from diffalign.noise.dataset import load_dataset_manifest

    records, _ = load_dataset_manifest(dataset)

    def recon(gen) -> float:
        z = torch.stack([load_tensors(r["noise_path"])[0]["noise"] for r in records])
        x = torch.stack([load_target_image(r["target_path"], (SIZE, SIZE)) for r in records])
        with torch.no_grad():
            lat = gen.denoise(z, gen.encode_prompts([r["prompt"] for r in records]))
            return float(assign_loss(lat, gen.encode_images(x)).mean())

    kw = dict(height=SIZE, width=SIZE, device="cpu")
    before = recon(load_generator(sdxl, **kw))
    r = sft(
        load_generator(sdxl, **kw), dataset, tmp_path / "m", max_steps=6, batch_size=3,
        lr=1e-3, pixel_l1_weight=0.0, preserve_latent_weight=0.0, preserve_pixel_weight=0.0,
        tracker="none", progress=False,
    )  # fmt: skip
    after = recon(load_generator(r["model"], "sdxl-turbo", **kw))
    assert after < 0.9 * before, (before, after)


def test_used_folder_and_mismatched_resume_refused_before_loading(
    sdxl, dataset, tmp_path, capsys, monkeypatch
):
    """`noise sft` refuses a used output folder, or a --resume into a run made with other
    settings, before the generator loads: one line, exit 2, nothing lost."""
    import diffalign.noise.generators as generators

    out = tmp_path / "run"
    base = [
        "noise", "sft", "--manifest-path", str(dataset), *TRAIN, *model_args(sdxl),
        "--output-dir", str(out), "--lora-rank", "2", "--max-steps", "1",
        "--checkpoint-every", "1",
    ]  # fmt: skip
    assert main(base) == 0

    before = file_mtimes(out)
    loads = []
    real_load = generators.load_generator

    def load(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(generators, "load_generator", load)
    for extra, words in (
        (["--resume", "latest", "--lr", "1e-2"], ("cannot resume", "task.lr")),
        (["--resume", "latest", "--lora-rank", "4"], ("cannot resume", "lora_rank")),
        (["--resume", "latest", "--direct"], ("cannot resume", "method")),
        (["--resume", "latest", "--seed", "7"], ("cannot resume", "seed")),
        ([], ("already holds a training run", "--resume latest")),
        (["--lr", "1e-2"], ("already holds a training run", "--overwrite")),
    ):
        capsys.readouterr()
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), (extra, err)
        assert loads == [], extra  # refused before the generator loaded
    assert file_mtimes(out) == before

    # the same settings still resume (one step more at the constant lr)
    more = list(base)
    more[more.index("--max-steps") + 1] = "2"
    capsys.readouterr()
    assert main([*more, "--resume", "latest"]) == 0
    assert len(loads) == 1 and "(2 steps;" in capsys.readouterr().out


def test_cli_reads_the_dataset_files_once_per_run(sdxl, dataset, tmp_path, monkeypatch):
    """`noise sft` reads dataset_config.json once and opens manifest.jsonl twice (its records,
    its sha256 for the run identity), fresh or resumed; it read them 4 and 3 (resumed: 4) times."""
    import builtins
    import io
    from collections import Counter
    from pathlib import Path

    names = ("dataset_config.json", "manifest.jsonl")
    opened = Counter()
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, str | Path) and Path(file).name in names:
            opened[Path(file).name] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)  # pathlib's read_text opens through io.open
    out = tmp_path / "run"
    base = [
        "noise", "sft", "--manifest-path", str(dataset), *TRAIN, *model_args(sdxl),
        "--output-dir", str(out), "--lora-rank", "2", "--checkpoint-every", "1",
    ]  # fmt: skip
    assert main([*base, "--max-steps", "1"]) == 0
    assert opened == {"dataset_config.json": 1, "manifest.jsonl": 2}
    opened.clear()
    assert main([*base, "--max-steps", "2", "--resume", "latest"]) == 0
    assert opened == {"dataset_config.json": 1, "manifest.jsonl": 2}
