"""Model loading (spec E): folders, presets, Hub ids, single files, and one-line failures."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch

from diffalign.engine import loading
from diffalign.engine.errors import DiffalignError, ModelNotFoundError
from diffalign.engine.loading import (
    PRESETS,
    load_pipeline,
    load_sd3_pipeline,
    parse_dtype,
    resolve_model,
)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty project folder as CWD, no models dir override, Hub offline."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DIFFALIGN_MODELS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.mark.parametrize(
    "text,expected",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("FP16", torch.float16),
        ("float16", torch.float16),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        (torch.float16, torch.float16),
        (None, torch.float32),
    ],
)
def test_parse_dtype(text, expected):
    assert parse_dtype(text) is expected


def test_parse_dtype_rejects_junk():
    with pytest.raises(DiffalignError, match="unknown dtype 'int8'"):
        parse_dtype("int8")


def test_presets_name_their_download():
    assert PRESETS["sd3"].repo_id == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert PRESETS["sd3.5"].repo_id == PRESETS["sd3.5-large"].repo_id
    assert PRESETS["sd3.5"].repo_id == "stabilityai/stable-diffusion-3.5-large"
    assert PRESETS["sd3.5-medium"].repo_id == "stabilityai/stable-diffusion-3.5-medium"
    from diffalign.engine.download import ASSETS

    for preset in PRESETS.values():  # every preset is fetchable with `diffalign download`
        assert preset.download_name in ASSETS
        assert ASSETS[preset.download_name].sources[0].repo_id == preset.repo_id


def test_resolve_order(workdir, monkeypatch):
    # preset with nothing local -> the Hub repo
    r = resolve_model("sd3")
    assert (r.kind, r.source, r.preset, r.download_name) == (
        "hub",
        PRESETS["sd3"].repo_id,
        "sd3",
        "sd3",
    )
    # legacy third_party_weights/<name> is found ...
    legacy = workdir / "third_party_weights" / "sd3.5"
    legacy.mkdir(parents=True)
    (legacy / "model_index.json").write_text("{}")
    r = resolve_model("sd3.5-large")
    assert (r.kind, r.source, r.download_name) == ("folder", str(legacy), "sd3.5")
    # ... but models/<name> wins
    local = workdir / "models" / "sd3.5"
    local.mkdir(parents=True)
    (local / "model_index.json").write_text("{}")
    assert resolve_model("sd3.5").source == str(local)
    # DIFFALIGN_MODELS_DIR overrides ./models
    other = workdir / "elsewhere" / "sd3.5"
    other.mkdir(parents=True)
    (other / "model_index.json").write_text("{}")
    monkeypatch.setenv("DIFFALIGN_MODELS_DIR", str(workdir / "elsewhere"))
    assert resolve_model("sd3.5").source == str(other)
    # an empty models/<name>/ (e.g. an interrupted manual copy) is not used
    monkeypatch.delenv("DIFFALIGN_MODELS_DIR")
    (workdir / "models" / "sd3.5-medium").mkdir()
    assert resolve_model("sd3.5-medium").kind == "hub"


def test_resolve_paths_and_hub_ids(workdir):
    folder = workdir / "my-model"
    folder.mkdir()
    assert resolve_model(str(folder)) == loading.ResolvedModel(str(folder), "folder")
    single = workdir / "m.safetensors"
    single.write_bytes(b"x")
    assert resolve_model(str(single)).kind == "single_file"
    r = resolve_model("stabilityai/stable-diffusion-3.5-medium")
    assert (r.kind, r.download_name) == ("hub", "sd3.5-medium")
    r = resolve_model("someone/finetune")
    assert (r.kind, r.download_name) == ("hub", None)


def test_resolve_errors(workdir):
    (workdir / "m.ckpt").write_bytes(b"x")
    with pytest.raises(DiffalignError, match="pickled checkpoints"):
        resolve_model(str(workdir / "m.ckpt"))
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        resolve_model("./models/missing")
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        resolve_model("models/sd3")  # a missing download, not a Hub id
    with pytest.raises(ModelNotFoundError, match="no such file"):
        resolve_model(str(workdir / "missing.safetensors"))
    with pytest.raises(ModelNotFoundError, match="preset .*sd3.5-medium"):
        resolve_model("stable-diffusion")
    with pytest.raises(DiffalignError, match="sdxl model; this command needs a sd3 model"):
        resolve_model("sdxl-turbo", family="sd3")


def test_load_tiny_folder_through_from_pretrained(tiny_model_dir):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = load_sd3_pipeline(tiny_model_dir("sd3"), dtype="bf16")
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder_3.dtype == torch.bfloat16
    pipe = load_sd3_pipeline(tiny_model_dir("sd35"))
    assert pipe.transformer.config.qk_norm == "rms_norm"


def test_preset_loads_from_models_dir(workdir, tiny_model_dir):
    target = workdir / "models" / "sd3.5-medium"
    target.parent.mkdir()
    shutil.copytree(tiny_model_dir("sd35"), target)
    pipe = load_sd3_pipeline("sd3.5-medium")
    assert tuple(pipe.transformer.config.dual_attention_layers) == (0,)


def test_vae_override_from_folder(tiny_model_dir, tmp_path):
    from diffalign.engine.tiny import make_tiny

    other = make_tiny("sd3", tmp_path / "other", seed=7, num_layers=1)
    pipe = load_sd3_pipeline(tiny_model_dir("sd3"), vae=str(other / "vae"))
    from safetensors.torch import load_file

    want = load_file(str(other / "vae" / "diffusion_pytorch_model.safetensors"))
    got = pipe.vae.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    pipe = load_sd3_pipeline(tiny_model_dir("sd3"), vae=str(other))  # a pipeline folder works too
    assert all(torch.equal(want[k], pipe.vae.state_dict()[k]) for k in want)
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_sd3_pipeline(tiny_model_dir("sd3"), vae=str(tmp_path))


def test_missing_vae_path_names_the_vae(workdir):
    """A --vae that does not exist is reported as a VAE, not as a missing --model."""
    from diffalign.engine.loading import load_vae

    for vae in ("./nope/vae.safetensors", "models/sd3_vae.safetensors"):
        with pytest.raises(DiffalignError, match=r"^VAE '.*' not found") as info:
            load_vae(vae)
        assert "--model" not in str(info.value)


def test_hub_id_offline_is_fast_clean_error(workdir):
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as e:
        load_sd3_pipeline("sd3")
    msg = str(e.value)
    assert time.monotonic() - start < 10
    assert "'sd3'" in msg and "HF_HUB_OFFLINE" in msg
    assert "diffalign download --only sd3`" in msg and "\n" not in msg
    with pytest.raises(ModelNotFoundError, match="someone/model.*HF_HUB_OFFLINE"):
        load_sd3_pipeline("someone/model")


def test_not_a_diffusers_folder(workdir):
    (workdir / "junk").mkdir()
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        load_sd3_pipeline(str(workdir / "junk"))


def test_folder_of_another_family(workdir):
    folder = workdir / "sdxl"
    folder.mkdir()
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(DiffalignError, match="holds StableDiffusionXLPipeline, not a sd3 model"):
        load_sd3_pipeline(str(folder))


def test_generic_loader_checks_component_class(tiny_model_dir):
    from diffusers import FluxTransformer2DModel, StableDiffusion3Pipeline

    with pytest.raises(DiffalignError, match="not FluxTransformer2DModel"):
        load_pipeline(
            tiny_model_dir("sd3"),
            StableDiffusion3Pipeline,
            "sd3",
            expect={"transformer": FluxTransformer2DModel},
        )


# --- single-file checkpoints -------------------------------------------------------------------


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    shift, scale = w.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def _sd3_to_original(sd: dict, num_layers: int, dual: tuple[int, ...]) -> dict:
    """Diffusers SD3 transformer weights -> the original (SAI) single-file layout.

    Written independently of diffusers' converter (which goes the other way), so loading the
    result through `from_single_file` checks the whole single-file path.
    """
    p = "model.diffusion_model."
    renames = {
        "pos_embed.pos_embed": "pos_embed",
        "pos_embed.proj": "x_embedder.proj",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
        "context_embedder": "context_embedder",
        "proj_out": "final_layer.linear",
    }
    out = {p + "pos_embed": sd["pos_embed.pos_embed"]}
    for new, old in renames.items():
        for t in ("weight", "bias"):
            if f"{new}.{t}" in sd:
                out[f"{p}{old}.{t}"] = sd[f"{new}.{t}"]
    for t in ("weight", "bias"):
        out[f"{p}final_layer.adaLN_modulation.1.{t}"] = _swap_halves(sd[f"norm_out.linear.{t}"])
    for i in range(num_layers):
        d, o, last = f"transformer_blocks.{i}.", f"{p}joint_blocks.{i}.", i == num_layers - 1
        for t in ("weight", "bias"):
            out[o + f"x_block.attn.qkv.{t}"] = torch.cat(
                [sd[d + f"attn.to_{c}.{t}"] for c in "qkv"]
            )
            out[o + f"context_block.attn.qkv.{t}"] = torch.cat(
                [sd[d + f"attn.add_{c}_proj.{t}"] for c in "qkv"]
            )
            out[o + f"x_block.attn.proj.{t}"] = sd[d + f"attn.to_out.0.{t}"]
            out[o + f"x_block.adaLN_modulation.1.{t}"] = sd[d + f"norm1.linear.{t}"]
            ctx = sd[d + f"norm1_context.linear.{t}"]
            out[o + f"context_block.adaLN_modulation.1.{t}"] = _swap_halves(ctx) if last else ctx
            out[o + f"x_block.mlp.fc1.{t}"] = sd[d + f"ff.net.0.proj.{t}"]
            out[o + f"x_block.mlp.fc2.{t}"] = sd[d + f"ff.net.2.{t}"]
            if not last:
                out[o + f"context_block.attn.proj.{t}"] = sd[d + f"attn.to_add_out.{t}"]
                out[o + f"context_block.mlp.fc1.{t}"] = sd[d + f"ff_context.net.0.proj.{t}"]
                out[o + f"context_block.mlp.fc2.{t}"] = sd[d + f"ff_context.net.2.{t}"]
            if i in dual:
                out[o + f"x_block.attn2.qkv.{t}"] = torch.cat(
                    [sd[d + f"attn2.to_{c}.{t}"] for c in "qkv"]
                )
                out[o + f"x_block.attn2.proj.{t}"] = sd[d + f"attn2.to_out.0.{t}"]
        if d + "attn.norm_q.weight" in sd:
            for ours, theirs in (
                ("attn.norm_q", "x_block.attn.ln_q"),
                ("attn.norm_k", "x_block.attn.ln_k"),
                ("attn.norm_added_q", "context_block.attn.ln_q"),
                ("attn.norm_added_k", "context_block.attn.ln_k"),
            ) + (
                (("attn2.norm_q", "x_block.attn2.ln_q"), ("attn2.norm_k", "x_block.attn2.ln_k"))
                if i in dual
                else ()
            ):
                out[f"{o}{theirs}.weight"] = sd[f"{d}{ours}.weight"]
    return out


@pytest.fixture
def sd35_single_file(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tiny_model_dir("sd35")
    sd = load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))
    path = tmp_path / "sd35_tiny.safetensors"
    save_file(_sd3_to_original(sd, 4, (0,)), str(path))
    return folder, path, sd


def test_single_file_roundtrip(sd35_single_file, tiny_model_dir):
    folder, path, sd = sd35_single_file
    # transformer-only file: text encoders and VAE come from the config folder
    pipe = load_sd3_pipeline(str(path), single_file_config=folder)
    got = pipe.transformer.state_dict()
    assert got.keys() == sd.keys() and all(torch.equal(sd[k], got[k]) for k in sd)
    assert pipe.transformer.config.qk_norm == "rms_norm"
    image = pipe("a cat", num_inference_steps=1, height=32, width=32).images[0]
    assert image.size == (32, 32)
    # the seed's `--model x.safetensors --vae ...` form
    pipe = load_sd3_pipeline(str(path), single_file_config=folder, vae=tiny_model_dir("sd3"))
    assert pipe.vae is not None


def test_single_file_through_the_cli(sd35_single_file, tmp_path):
    from diffalign import cli

    folder, path, _ = sd35_single_file
    out = tmp_path / "out"
    argv = ["textstream", "sample", "--prompt", "a cat", "--model", str(path)]
    argv += ["--single-file-config", folder, "--output-dir", str(out)]
    argv += ["--steps", "1", "--height", "32", "--width", "32", "--device", "cpu"]
    assert cli.main(argv) == 0
    (folder_out,) = [p for p in out.iterdir() if p.is_dir()]
    assert (folder_out / "000.png").is_file()


def test_single_file_without_config_is_clear(sd35_single_file, workdir):
    _, path, _ = sd35_single_file
    with pytest.raises(DiffalignError, match="cannot tell which sd3 model"):
        load_sd3_pipeline(str(path))
    with pytest.raises(ModelNotFoundError, match="not cached and HF_HUB_OFFLINE=1"):
        load_sd3_pipeline(str(path), single_file_config="sd3.5")


# --- the CLI path: one line, non-zero exit, no traceback ---------------------------------------


def test_cli_missing_model_is_one_line(workdir, monkeypatch, capsys):
    from diffalign import cli
    from diffalign.engine import cli as engine_cli

    original = engine_cli.register

    def register(sub):
        original(sub)
        p = sub.add_parser("load-for-test")
        p.add_argument("--model")
        p.set_defaults(func=lambda args: load_sd3_pipeline(args.model) and 0)

    monkeypatch.setattr(engine_cli, "register", register)
    for model in ("sd3.5", "./models/nope", "someone/model"):
        rc = cli.main(["load-for-test", "--model", model])
        err = capsys.readouterr().err
        assert rc != 0
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("diffalign: error: model") and "Traceback" not in err
        assert "diffalign download" in lines[0]


def test_a_local_folder_named_like_a_preset_is_named_once(workdir, capsys, monkeypatch):
    """`./sd15` in the current folder is what `sd15` loads (a local path wins, unchanged); rank 0
    says once which folder that is. The preset's own models/ folder, a path that is no preset
    name, or another rank say nothing."""
    monkeypatch.setattr(loading, "_NOTED", set())
    stray = workdir / "sd15"
    stray.mkdir()
    (stray / "model_index.json").write_text("{}")
    for _ in range(2):
        r = resolve_model("sd15", "sd15")
        assert (r.kind, r.source, r.preset) == ("folder", "sd15", None)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert f"'sd15' loads the local folder {stray}," in err[0]
    assert PRESETS["sd15"].repo_id in err[0] and "rename the folder" in err[0]

    resolve_model(str(stray))  # a path, not a preset name
    monkeypatch.setattr(loading, "_NOTED", set())
    monkeypatch.setenv("RANK", "1")
    resolve_model("sd15")
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("DIFFALIGN_MODELS_DIR", str(workdir))  # ./sd15 is the preset's folder
    resolve_model("sd15")
    assert capsys.readouterr().err == ""

    # models/sd15 downloaded: the note names it as the preset's folder
    monkeypatch.delenv("DIFFALIGN_MODELS_DIR")
    shutil.copytree(stray, workdir / "models" / "sd15")
    assert resolve_model("sd15").source == "sd15"
    err = capsys.readouterr().err
    assert f"not the sd15 preset ({workdir / 'models' / 'sd15'})" in err


def test_hyper_sd15_on_a_local_sd15_folder_names_it(workdir, tiny_model_dir, capsys, monkeypatch):
    """`--model hyper-sd15` loads its base `sd15` from `./sd15` when the current folder has one
    (unchanged); the note names that folder."""
    from diffalign.noise.generators import load_generator

    monkeypatch.setattr(loading, "_NOTED", set())
    os.symlink(tiny_model_dir("sd15"), workdir / "sd15")
    lora = f"{tiny_model_dir('hyper-sd')}/Hyper-SD15-1step-lora.safetensors"
    gen = load_generator("hyper-sd15", weights=lora, height=32, width=32, device="cpu")
    assert gen.name == "hyper-sd15"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"'sd15' loads the local folder {workdir / 'sd15'}," in err[0]
