"""`diffalign download` offline: plan, layout, skip-if-present, failures (spec E, seed 001)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.utils import filter_repo_objects

from diffalign.cli import main
from diffalign.engine import download
from diffalign.engine.errors import DiffalignError


class FakeHub:
    """Stands in for `snapshot_download`: records calls, writes one file per allow pattern."""

    def __init__(
        self, fail: dict[str, Exception] | None = None, no_weights: set[str] = frozenset()
    ):
        self.calls: list[dict] = []
        self.fail = fail or {}
        self.no_weights = set(no_weights)
        self.repos: dict[str, Path] = {}  # repo id -> a folder served with its real files

    def __call__(self, repo_id, *, allow_patterns=None, ignore_patterns=None, local_dir, **kw):
        self.calls.append(
            {
                "repo_id": repo_id,
                "allow": list(allow_patterns or []),
                "ignore": list(ignore_patterns or []),
                "local_dir": Path(local_dir),
                "token": kw.get("token"),
            }
        )
        if repo_id in self.fail:
            raise self.fail[repo_id]
        if repo_id in self.repos:  # the files the Hub would send, filtered as the Hub filters
            root = self.repos[repo_id]
            files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
            for rel in filter_repo_objects(
                files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns
            ):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / rel, Path(local_dir) / rel)
            return str(local_dir)
        for pattern in allow_patterns or []:
            if repo_id in self.no_weights and pattern.endswith(".safetensors"):
                continue
            path = Path(local_dir) / pattern.replace("*", "x")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{repo_id}:{pattern}")
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)
        return str(local_dir)


@pytest.fixture
def hub(monkeypatch):
    # the libraries that bind `snapshot_download` when first imported do so now, with the real
    # one: a first import under the fake (a pipeline loaded inside a test) would keep the fake
    # for the rest of the worker's tests
    import diffusers.loaders.single_file  # noqa: F401
    import diffusers.pipelines.pipeline_utils  # noqa: F401
    import diffusers.utils.hub_utils  # noqa: F401
    import transformers.utils.hub  # noqa: F401

    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return fake


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_registry_covers_the_spec():
    expected = {
        "sdxl-turbo": "stabilityai/sdxl-turbo",
        "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
        "sd3.5": "stabilityai/stable-diffusion-3.5-large",
        "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
        "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "flux-fill": "black-forest-labs/FLUX.1-Fill-dev",
        "dinov2-large": "facebook/dinov2-large",
        "CLIP-ViT-L-14": "openai/clip-vit-large-patch14",
        "PickScore_v1": "yuvalkirstain/PickScore_v1",
        "ImageReward": "THUDM/ImageReward",
        "HPSv2": "xswu/HPSv2",
        "Aesthetic": download.AESTHETIC_REPO,
        "sd-turbo": "stabilityai/sd-turbo",
        "sdxl-base": "stabilityai/stable-diffusion-xl-base-1.0",
        "hyper-sd": "ByteDance/Hyper-SD",
        "flux-dev": "black-forest-labs/FLUX.1-dev",
        "flux-schnell": "black-forest-labs/FLUX.1-schnell",
        "qwen-image": "Qwen/Qwen-Image",
        "sd3.5-large-turbo": "stabilityai/stable-diffusion-3.5-large-turbo",
        "sana-sprint": "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers",
        "pixart-dmd": "PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512",
    }
    assert {n: a.sources[0].repo_id for n, a in download.ASSETS.items()} == expected
    # without --only: every asset spec E lists (it was SD3 and SD3.5 only)
    assert set(download.DEFAULT_ASSETS) == {
        "sd3", "sd3.5", "sdxl-turbo", "sd15", "flux-fill", "dinov2-large", "CLIP-ViT-L-14",
        "PickScore_v1", "ImageReward", "HPSv2", "Aesthetic",
    }  # fmt: skip


def test_plan_names_and_errors(tmp_path):
    plan = download.plan_downloads(None, tmp_path)
    assert [p.asset.name for p in plan] == list(download.DEFAULT_ASSETS)
    assert all(p.status == "fetch" and p.target.parent == tmp_path for p in plan)
    plan = download.plan_downloads(["aesthetic", "Aesthetic", "hpsv2"], tmp_path, "v2.0")
    assert [p.asset.name for p in plan] == ["Aesthetic", "HPSv2"]  # case-insensitive, deduped
    assert plan[1].sources[0].allow_patterns == ("HPS_v2_compressed.pt",)
    with pytest.raises(DiffalignError, match="unknown asset 'sd4'; choose from: sd3, .*Aesthetic"):
        download.plan_downloads(["sd4"], tmp_path)
    with pytest.raises(DiffalignError, match="--hps-version"):
        download.plan_downloads(["HPSv2"], tmp_path, "v3")


def test_models_dir_env_is_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFALIGN_MODELS_DIR", str(tmp_path / "store"))
    assert download.plan_downloads(["sd3"])[0].target == tmp_path / "store" / "sd3"


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, hub, capsys):
    rc = main(["download", "--dry-run", "--dir", str(tmp_path / "m"), "--only", "sd3,HPSv2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "stabilityai/stable-diffusion-3-medium-diffusers" in out
    assert "HPS_v2.1_compressed.pt" in out and str(tmp_path / "m" / "HPSv2") in out
    assert not hub.calls and not (tmp_path / "m").exists()


def test_fetch_layout_and_skip_if_present(tmp_path, hub, capsys):
    models = tmp_path / "models"
    rc = main(
        [
            "download",
            "--dir",
            str(models),
            "--only",
            "sd3",
            "--only",
            "ImageReward,Aesthetic",
            "--hps_version",
            "v2.0",
            "--only",
            "HPSv2",
            "--token",
            "hf_x",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    by_repo = {c["repo_id"]: c for c in hub.calls}
    sd3 = by_repo["stabilityai/stable-diffusion-3-medium-diffusers"]
    assert "model_index.json" in sd3["allow"] and "*/*.safetensors" in sd3["allow"]
    assert "*.fp16.*" in sd3["ignore"] and "safety_checker/*" in sd3["ignore"]
    assert by_repo["THUDM/ImageReward"]["allow"] == ["ImageReward.pt", "med_config.json"]
    assert by_repo["xswu/HPSv2"]["allow"] == ["HPS_v2_compressed.pt"]
    assert by_repo[download.AESTHETIC_REPO]["allow"] == [download.AESTHETIC_FILE]
    assert by_repo[download.CLIP_H_REPO]["local_dir"].name == "processor"
    assert all(c["token"] == "hf_x" for c in hub.calls)
    # downloads land in temp folders beside the target, never in the target itself
    assert all(
        c["local_dir"].parent.parent == models or c["local_dir"].parent == models for c in hub.calls
    )
    assert all(
        c["local_dir"].name.endswith(".download")
        or c["local_dir"].parent.name.endswith(".download")
        for c in hub.calls
    )

    assert (models / "sd3" / "model_index.json").is_file()
    assert (models / "ImageReward" / "ImageReward.pt").is_file()
    assert (models / "ImageReward" / "med_config.json").is_file()
    assert (models / "ImageReward" / "bert-base-uncased" / "vocab.txt").is_file()
    assert (models / "HPSv2" / "HPS_v2_compressed.pt").is_file()
    assert (models / "HPSv2" / "processor" / "tokenizer.json").is_file()
    assert (models / "Aesthetic" / "sac+logos+ava1-l14-linearMSE.pth").is_file()
    assert not (models / "sd3" / ".cache").exists()
    assert _leftovers(models) == []
    for name in ("sd3", "ImageReward", "HPSv2", "Aesthetic"):
        assert (models / name / download.MARKER).is_file()

    # second run: everything present, nothing fetched
    hub.calls.clear()
    capsys.readouterr()
    assert main(["download", "--dir", str(models), "--only", "sd3,Aesthetic"]) == 0
    assert not hub.calls
    assert capsys.readouterr().out.count("already complete") == 2

    # another HPS version completes the existing asset: only the new file is fetched
    assert main(["download", "--dir", str(models), "--only", "HPSv2"]) == 0
    assert [(c["repo_id"], c["allow"]) for c in hub.calls] == [
        ("xswu/HPSv2", ["HPS_v2.1_compressed.pt"])
    ]
    assert (models / "HPSv2" / "HPS_v2.1_compressed.pt").is_file()
    assert (models / "HPSv2" / "HPS_v2_compressed.pt").is_file()
    assert _leftovers(models) == []


def test_failure_is_one_line_and_others_continue(tmp_path, hub, capsys):
    hub.fail["stabilityai/stable-diffusion-3.5-large"] = ConnectionError(
        "Name or service not known"
    )
    models = tmp_path / "models"
    rc = main(["download", "--dir", str(models), "--only", "sd3.5,Aesthetic,sd3"])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert err[0].startswith("sd3.5: download of stabilityai/stable-diffusion-3.5-large failed")
    assert "ConnectionError" in err[0]
    assert err[1] == "diffalign: error: 1 of 3 assets failed: sd3.5"
    assert not (models / "sd3.5").exists()  # nothing half-written
    assert (models / "Aesthetic" / download.MARKER).is_file()
    assert (models / "sd3" / download.MARKER).is_file()
    assert _leftovers(models) == []


def test_gated_repo_hint(tmp_path, hub, capsys):
    from huggingface_hub.errors import GatedRepoError

    class Response:  # the two attributes the error reads
        headers: dict = {}
        request = None

    hub.fail["black-forest-labs/FLUX.1-Fill-dev"] = GatedRepoError(
        "401 Client Error: access to model is restricted", response=Response()
    )
    assert main(["download", "--dir", str(tmp_path), "--only", "flux-fill"]) == 1
    line = capsys.readouterr().err.splitlines()[0]
    assert "accept the licence at https://huggingface.co/black-forest-labs/FLUX.1-Fill-dev" in line


def test_fallback_to_bin_and_missing_weights(tmp_path, hub, capsys):
    hub.no_weights.add("yuvalkirstain/PickScore_v1")
    assert main(["download", "--dir", str(tmp_path), "--only", "PickScore_v1"]) == 0
    assert (tmp_path / "PickScore_v1" / "pytorch_model.bin").is_file()
    assert (tmp_path / "PickScore_v1" / "processor" / "preprocessor_config.json").is_file()
    hub.no_weights.add("stabilityai/sdxl-turbo")  # a diffusers repo has no fallback
    assert main(["download", "--dir", str(tmp_path), "--only", "sdxl-turbo"]) == 1
    assert "has no files matching *.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "sdxl-turbo").exists()


def test_foreign_folder_left_untouched(tmp_path, hub, capsys):
    mine = tmp_path / "CLIP-ViT-L-14"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    assert main(["download", "--dir", str(tmp_path), "--only", "CLIP-ViT-L-14"]) == 0
    assert "left as is" in capsys.readouterr().out
    assert not hub.calls and [p.name for p in mine.iterdir()] == ["config.json"]


def test_unknown_name_cli(tmp_path, capsys):
    assert main(["download", "--dir", str(tmp_path), "--only", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown asset 'nope'" in err[0] and "sdxl-turbo" in err[0]


def test_real_hub_offline_fails_fast_and_clean(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    rc = main(["download", "--dir", str(tmp_path), "--only", "Aesthetic,sd3"])
    assert rc == 1 and time.monotonic() - start < 20
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3
    assert err[0] == (
        f"Aesthetic: cannot download {download.AESTHETIC_REPO}: HF_HUB_OFFLINE is set "
        "(unset it to download)"
    )
    assert list(tmp_path.iterdir()) == []


def _serve_pixart(hub: FakeHub, tiny: Path, root: Path) -> tuple[Path, Path]:
    """The two Hub repos of pixart-dmd, split from a tiny `make-tiny pixart-dmd` folder: the DMD
    release (transformer + scheduler, its card; its config named as diffusers of 2024 named
    it) and PixArt-alpha 512px (a whole pipeline: its own transformer, a DPM-Solver scheduler)."""
    dmd, base = root / "dmd", root / "base"
    for sub in ("transformer", "scheduler"):
        shutil.copytree(tiny / sub, dmd / sub)
    shutil.copyfile(tiny / "README.md", dmd / "README.md")
    config = json.loads((dmd / "transformer" / "config.json").read_text())
    (dmd / "transformer" / "config.json").write_text(
        json.dumps({**config, "_class_name": "Transformer2DModel"})
    )
    shutil.copytree(tiny, base, ignore=shutil.ignore_patterns("README.md"))
    (base / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"base weights")
    (base / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"base weights")
    (base / "text_encoder" / "pytorch_model.bin").write_bytes(b"a pickle")
    scheduler = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    scheduler["_class_name"] = "DPMSolverMultistepScheduler"
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    index = json.loads((base / "model_index.json").read_text())
    index.update(
        _diffusers_version="0.22.0.dev0",
        scheduler=["diffusers", "DPMSolverMultistepScheduler"],
        transformer=["diffusers", "Transformer2DModel"],
    )
    (base / "model_index.json").write_text(json.dumps(index))
    hub.repos = {download.PIXART_DMD_REPO: dmd, download.PIXART_BASE_REPO: base}
    return dmd, base


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_pixart_dmd_assembles_a_loadable_pipeline(tmp_path, hub, capsys, tiny_model_dir):
    import torch
    from diffusers import DDPMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    from diffalign.noise.generators import load_generator
    from diffalign.noise.recipes import generator_recipe

    tiny = Path(tiny_model_dir("pixart-dmd"))
    dmd, base = _serve_pixart(hub, tiny, tmp_path / "hub")
    models = tmp_path / "models"
    folder = models / "pixart-dmd"

    # dry run: both repos, only their parts, and the index it would write; nothing fetched
    assert main(["download", "--dry-run", "--dir", str(models), "--only", "pixart-dmd"]) == 0
    out = capsys.readouterr().out
    assert f"would fetch {download.PIXART_DMD_REPO} [transformer/*.json" in out
    assert f"would fetch {download.PIXART_BASE_REPO} [model_index.json, text_encoder/" in out
    assert "would write model_index.json naming PixArtAlphaPipeline" in out
    assert not hub.calls and not models.exists()

    # the base repo fails: one line, nothing half-written
    hub.fail[download.PIXART_BASE_REPO] = ConnectionError("Name or service not known")
    assert main(["download", "--dir", str(models), "--only", "pixart-dmd"]) == 1
    assert f"download of {download.PIXART_BASE_REPO} failed" in capsys.readouterr().err
    assert not models.exists()  # nothing half-written, no new empty --dir (a refused run)
    hub.fail.clear()
    hub.calls.clear()

    assert main(["download", "--dir", str(models), "--only", "pixart-dmd"]) == 0
    assert [c["repo_id"] for c in hub.calls] == [
        download.PIXART_DMD_REPO,
        download.PIXART_BASE_REPO,
    ]
    got = _files(folder)
    # the DMD transformer and scheduler, the base's T5, tokenizer and VAE; no base transformer
    # or scheduler, no pickles, no card
    for sub, repo in (("transformer", dmd), ("scheduler", dmd), ("vae", base)):
        assert {k: v for k, v in got.items() if k.startswith(sub + "/")} == {
            f"{sub}/{k}": v for k, v in _files(repo / sub).items()
        }
    assert {k for k in got if k.startswith(("text_encoder/", "tokenizer/"))} == {
        f"{sub}/{k}"
        for sub in ("text_encoder", "tokenizer")
        for k in _files(base / sub)
        if not k.endswith(".bin")
    }
    assert set(got) - {k for k in got if "/" in k} == {"model_index.json", download.MARKER}
    assert json.loads(got["model_index.json"]) == {
        "_class_name": "PixArtAlphaPipeline",
        "_diffusers_version": "0.22.0.dev0",
        "scheduler": ["diffusers", "DDPMScheduler"],  # the DMD one, not the base's DPM-Solver
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    assert _leftovers(models) == []

    pipe = PixArtAlphaPipeline.from_pretrained(folder)
    assert isinstance(pipe.transformer, PixArtTransformer2DModel)
    assert isinstance(pipe.scheduler, DDPMScheduler)

    # the noise verbs' loader: recognised as pixart-dmd by the download record alone (the DMD
    # card was not fetched), and it renders what the whole tiny pipeline renders
    recipe = generator_recipe(str(folder))
    assert recipe.spec.name == "pixart-dmd" and "download" in recipe.found_by
    gens = [load_generator(str(m), None, height=32, width=32, device="cpu") for m in (folder, tiny)]
    assert [g.name for g in gens] == ["pixart-dmd", "pixart-dmd"]
    z = gens[0].sample_noise(1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = [g.generate(z, g.encode_prompts(["a cat"])) for g in gens]
    assert torch.equal(images[0], images[1])

    # second call: complete, skipped
    hub.calls.clear()
    capsys.readouterr()
    assert main(["download", "--dir", str(models), "--only", "pixart-dmd"]) == 0
    assert not hub.calls and "already complete" in capsys.readouterr().out

    # a folder holding only the DMD part (the base's record and files gone) gets the base part
    # alone, and its index written again from the parts already there
    marker = json.loads((folder / download.MARKER).read_text())
    marker["sources"] = [k for k in marker["sources"] if k.startswith(download.PIXART_DMD_REPO)]
    (folder / download.MARKER).write_text(json.dumps(marker))
    for sub in ("text_encoder", "tokenizer", "vae"):
        shutil.rmtree(folder / sub)
    (folder / "model_index.json").unlink()
    assert main(["download", "--dir", str(models), "--only", "pixart-dmd"]) == 0
    assert [c["repo_id"] for c in hub.calls] == [download.PIXART_BASE_REPO]
    assert _files(folder) == got
    assert _leftovers(models) == []


def test_pixart_dmd_index_without_the_base_index_and_refusals(
    tmp_path, hub, capsys, tiny_model_dir
):
    from diffusers import PixArtAlphaPipeline

    tiny = Path(tiny_model_dir("pixart-dmd"))
    _, base = _serve_pixart(hub, tiny, tmp_path / "hub")
    models = tmp_path / "models"
    index = json.loads((base / "model_index.json").read_text())

    # a base repo whose index names another pipeline: one line, nothing moved in
    (base / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "StableDiffusionPipeline"})
    )
    assert main(["download", "--dir", str(models), "--only", "pixart-dmd"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == (
        f"pixart-dmd: {download.PIXART_BASE_REPO}'s model_index.json names "
        "'StableDiffusionPipeline', not PixArtAlphaPipeline: not the pipeline this asset assembles"
    )
    assert not models.exists()  # nothing moved in, no new empty --dir

    # no VAE weights sent: refused
    (base / "model_index.json").write_text(json.dumps(index))
    (base / "vae" / "diffusion_pytorch_model.safetensors").rename(base / "vae.safetensors")
    assert main(["download", "--dir", str(models), "--only", "pixart-dmd"]) == 1
    assert f"{download.PIXART_BASE_REPO} sent no vae/*.safetensors" in capsys.readouterr().err
    assert not (models / "pixart-dmd").exists()
    (base / "vae.safetensors").rename(base / "vae" / "diffusion_pytorch_model.safetensors")

    # no index in the base repo: every entry from the parts' own configs
    (base / "model_index.json").unlink()
    assert main(["download", "--dir", str(models), "--only", "pixart-dmd"]) == 0
    folder = models / "pixart-dmd"
    assert json.loads((folder / "model_index.json").read_text()) == {
        "_class_name": "PixArtAlphaPipeline",
        "_diffusers_version": json.loads((tiny / "model_index.json").read_text())[
            "_diffusers_version"
        ],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    assert type(PixArtAlphaPipeline.from_pretrained(folder).transformer).__name__ == (
        "PixArtTransformer2DModel"
    )


def test_pixart_dmd_transformer_as_a_pickle_is_converted(tmp_path, hub, tiny_model_dir):
    """The DMD release's transformer is one `diffusion_pytorch_model.bin` (no safetensors on
    the Hub): fetched as the fallback, read with weights_only=True and kept as safetensors."""
    import torch
    from safetensors.torch import load_file

    from diffalign.noise.recipes import generator_recipe

    tiny = Path(tiny_model_dir("pixart-dmd"))
    dmd, _ = _serve_pixart(hub, tiny, tmp_path / "hub")
    weights = dmd / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    weights.unlink()
    torch.save(state, dmd / "transformer" / "diffusion_pytorch_model.bin")
    models = tmp_path / "models"
    assert main(["download", "--dir", str(models), "--only", "pixart-dmd"]) == 0
    dmd_calls = [c for c in hub.calls if c["repo_id"] == download.PIXART_DMD_REPO]
    assert dmd_calls[-1]["allow"] == [
        "transformer/diffusion_pytorch_model.bin",
        "transformer/pytorch_model.bin",
    ]
    folder = models / "pixart-dmd"
    assert not list(folder.rglob("*.bin"))
    got = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    assert generator_recipe(str(folder)).spec.name == "pixart-dmd"


def test_only_takes_several_names_after_one_flag(tmp_path, capsys):
    """SPEC E: `diffalign download [--only NAME ...]`: names after one --only, as well as
    repeated or comma-separated (argparse said 'unrecognized arguments' before)."""
    argv = ["download", "--dry-run", "--dir", str(tmp_path / "m"), "--only", "sd3", "HPSv2"]
    assert main([*argv, "--only", "sd15,Aesthetic"]) == 0
    out = capsys.readouterr().out
    for name in ("sd3", "HPSv2", "sd15", "Aesthetic"):
        assert str(tmp_path / "m" / name) in out
    assert "sd3.5" not in out and not (tmp_path / "m").exists()
    assert main(["download", "--dry-run", "--dir", str(tmp_path / "m"), "--only", ""]) == 2


def test_download_without_only_plans_the_spec_assets(tmp_path, capsys):
    assert main(["download", "--dry-run", "--dir", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    for name in download.DEFAULT_ASSETS:
        assert str(tmp_path / "m" / name) in out
    assert str(tmp_path / "m" / "qwen-image") not in out  # the others stay --only


def test_damaged_marker_counts_as_incomplete(tmp_path):
    """A download record that is not UTF-8 (or not JSON) is an incomplete download, not an
    internal error (UnicodeDecodeError: it is read for every Hub id matching an asset)."""
    folder = tmp_path / "sd3"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    for raw in (b"\xff\xfe\x00garbage", b"{not json"):
        (folder / download.MARKER).write_bytes(raw)
        assert download.folder_status(download.ASSETS["sd3"], folder) == "complete-missing"
        (planned,) = download.plan_downloads(["sd3"], tmp_path)
        assert planned.status == "complete-missing" and planned.missing == planned.sources
