"""`diffalign download` offline: plan, layout, skip-if-present, failures (spec E, seed 001)."""

from __future__ import annotations

import time
from pathlib import Path

import huggingface_hub
import pytest

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
    assert download.DEFAULT_ASSETS == ("sd3", "sd3.5")


def test_plan_names_and_errors(tmp_path):
    plan = download.plan_downloads(None, tmp_path)
    assert [p.asset.name for p in plan] == ["sd3", "sd3.5"]
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
