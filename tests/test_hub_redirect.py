"""`--model <Hub id>` of an asset `diffalign download` fetched, with the Hub unreachable: the Hub
id runs from its complete `models/` folder (one notice line), an incomplete or foreign folder
is named in the "not found" line, and a job started with the preset name resumes with the Hub
id (spec E: Model loading). Before, the loader answered "fetch it with `diffalign download
--only sdxl-turbo`" and download answered "already complete": a loop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest

from diffalign.cli import main
from diffalign.engine import download, loading
from diffalign.engine.errors import DiffalignError, ModelNotFoundError

SDXL_REPO = "stabilityai/sdxl-turbo"
CLIP_REPO = "openai/clip-vit-large-patch14"


def _serve(monkeypatch, repos: dict[str, str]) -> None:
    """`snapshot_download` replaced by a copy of local folders, filtered as the Hub filters."""
    import diffusers.loaders.single_file  # noqa: F401 - bind the real one first (test_download)
    import diffusers.pipelines.pipeline_utils  # noqa: F401
    import diffusers.utils.hub_utils  # noqa: F401
    import transformers.utils.hub  # noqa: F401
    from huggingface_hub.utils import filter_repo_objects

    def fake(repo_id, *, allow_patterns=None, ignore_patterns=None, local_dir, **kw):
        root = Path(repos[repo_id])
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns,
                                       ignore_patterns=ignore_patterns):  # fmt: skip
            (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, Path(local_dir) / rel)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)


def _offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_model_dir):
    """A project folder (the cwd) where `diffalign download --only sdxl-turbo CLIP-ViT-L-14`
    ran against a fake Hub; afterwards the Hub is unreachable (HF_HUB_OFFLINE=1)."""
    _serve(monkeypatch, {SDXL_REPO: tiny_model_dir("sdxl"), CLIP_REPO: tiny_model_dir("clip")})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv(download.MODELS_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loading, "_NOTED", set())
    assert main(["download", "--only", "sdxl-turbo", "--only", "CLIP-ViT-L-14"]) == 0
    _offline(monkeypatch)
    return tmp_path


def _error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_hub_id_runs_from_its_complete_download(project, capsys):
    folder = (project / "models" / "sdxl-turbo").absolute()
    capsys.readouterr()
    got = loading.check_model_available(SDXL_REPO)
    assert (got.kind, got.source, got.download_name) == ("folder", str(folder), "sdxl-turbo")
    assert loading.resolve_model(SDXL_REPO).source == str(folder)
    notices = capsys.readouterr().err.strip().splitlines()
    assert notices == [f"diffalign: {SDXL_REPO}: using its `diffalign download` copy {folder}"]

    from diffusers import StableDiffusionXLPipeline

    pipe = loading.load_pipeline(SDXL_REPO, StableDiffusionXLPipeline, "sdxl")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert capsys.readouterr().err == ""  # once per process

    # the same model to a job's identity, by the preset name or by the Hub id
    from diffalign.engine.identity import model_identity

    assert model_identity(SDXL_REPO) == model_identity("sdxl-turbo")
    assert model_identity(SDXL_REPO)["path"] == str(folder.resolve())


def test_precedence_local_path_then_download_then_hub(project, monkeypatch, capsys):
    # an existing local path of that spelling wins over the downloaded folder
    shutil.copytree(project / "models" / "sdxl-turbo", project / "stabilityai" / "sdxl-turbo")
    assert loading.resolve_model(SDXL_REPO).source == SDXL_REPO
    shutil.rmtree(project / "stabilityai")
    # a repo without an asset, or a repo that only lends files to one, stays a Hub id
    assert loading.resolve_model("org/other").kind == "hub"
    assert loading.resolve_model(download.PIXART_BASE_REPO).kind == "hub"
    # the legacy folder counts too, when its download record is complete
    shutil.move(project / "models", project / loading.LEGACY_MODELS_DIR)
    got = loading.resolve_model(SDXL_REPO)
    assert got.source == str((project / loading.LEGACY_MODELS_DIR / "sdxl-turbo").absolute())
    # no notice on the other ranks of a distributed run
    monkeypatch.setattr(loading, "_NOTED", set())
    monkeypatch.setenv("RANK", "1")
    capsys.readouterr()
    assert loading.resolve_model(SDXL_REPO).kind == "folder"
    assert capsys.readouterr().err == ""


def test_an_incomplete_or_foreign_folder_is_named_not_used(project, capsys):
    folder = (project / "models" / "sdxl-turbo").absolute()
    marker = folder / download.MARKER
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "sources": []}))  # an interrupted / older download
    with pytest.raises(ModelNotFoundError) as e:
        loading.check_model_available(SDXL_REPO)
    assert str(e.value) == (
        f"model '{SDXL_REPO}' not found (not in the local Hugging Face cache and "
        f"HF_HUB_OFFLINE=1; {folder} is an incomplete `diffalign download` of it); fetch it with "
        "`diffalign download --only sdxl-turbo` or pass a local folder with --model"
    )
    # ... which that command completes (it does not answer "already complete")
    assert download.plan_downloads(["sdxl-turbo"])[0].status == "complete-missing"

    marker.write_text("[]")  # a record that lists nothing is incomplete, not a crash
    assert loading.downloaded_copy(SDXL_REPO).status == "complete-missing"

    marker.unlink()  # a folder copied by hand: download leaves it as is, so say how to use it
    with pytest.raises(ModelNotFoundError) as e:
        loading.check_model_available(SDXL_REPO)
    assert str(e.value) == (
        f"model '{SDXL_REPO}' not found (not in the local Hugging Face cache and "
        f"HF_HUB_OFFLINE=1; {folder} is not used for it: it was not written by `diffalign "
        f"download` (no download record)); pass that folder itself with --model {folder}, or "
        "move it away and run `diffalign download --only sdxl-turbo`"
    )
    assert loading.resolve_model(str(folder)).kind == "folder"
    capsys.readouterr()
    assert main(["noise", "assign", "--model", SDXL_REPO, "--prompt", "a", "--target-image",
                 "none.png", "--output-dir", "o"]) == 2  # fmt: skip
    assert f"{folder} is not used for it" in _error(capsys)


def test_a_job_started_by_preset_name_resumes_by_hub_id(project, capsys):
    from noise_data_helpers import model_args, write_pairs

    data = write_pairs(project / "data", n=2)
    argv = ["noise", "build-dataset", "--data-root", str(data), "--output-dir", "ds"]
    argv += ["--steps", "1", "--batch-size", "2", "--no-plots"]
    assert main([*argv, *model_args("sdxl-turbo")]) == 0
    manifest = (project / "ds" / "manifest.jsonl").read_bytes()
    capsys.readouterr()
    assert main([*argv, *model_args(SDXL_REPO)]) == 0  # same folder: the same model
    assert "using its `diffalign download` copy" in capsys.readouterr().err
    assert (project / "ds" / "manifest.jsonl").read_bytes() == manifest  # nothing redone
    # the model is compared: another folder is refused
    other = shutil.copytree(project / "models" / "sdxl-turbo", project / "other")
    assert main([*argv, *model_args(str(other))]) == 2
    assert "other settings (model.model.path)" in _error(capsys)
    # and the loop is gone: download still has nothing to do
    assert main(["download", "--only", "sdxl-turbo"]) == 0
    assert "already complete" in capsys.readouterr().out


def test_reward_models_take_the_hub_id_of_their_download(project, capsys):
    from diffalign.engine.rewards.clip import load_clip_bundle
    from diffalign.engine.rewards.files import resolve_folder

    folder = (project / "models" / "CLIP-ViT-L-14").absolute()
    args = ("", "CLIP model", "CLIP-ViT-L-14", "--clip-model")
    source = resolve_folder(CLIP_REPO, *args)
    assert source == str(folder)
    assert load_clip_bundle(source).model.config.model_type == "clip"
    (folder / download.MARKER).unlink()
    with pytest.raises(DiffalignError, match=f"{folder} is not used for it.*--clip-model {folder}"):
        resolve_folder(CLIP_REPO, *args)


def test_repa_sd15_loaders_take_the_hub_id_of_their_download(tmp_path, monkeypatch, tiny_model_dir):
    from diffalign.repa.model import load_sd15_unet
    from diffalign.repa.preprocess import load_text_encoder

    repo = loading.PRESETS["sd15"].repo_id
    _serve(monkeypatch, {repo: tiny_model_dir("sd15")})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv(download.MODELS_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["download", "--only", "sd15"]) == 0
    _offline(monkeypatch)
    unet = load_sd15_unet(repo)[0]
    assert unet.config.in_channels == 4
    assert type(load_text_encoder(repo, "cpu")[1]).__name__ == "CLIPTextModel"
    folder = (tmp_path / "models" / "sd15").absolute()
    (folder / download.MARKER).write_text("{}")
    for load in (load_sd15_unet, lambda m: load_text_encoder(m, "cpu")):
        with pytest.raises(ModelNotFoundError, match=f"{folder} is an incomplete .*--only sd15"):
            load(repo)
