"""`diffalign selftest` (issue 14 item 11) on a models folder of tiny kinds: assets found by
their contents under any name, every check passes, the table and selftest.json, exit codes, an
empty folder, and a drifted implementation caught as FAIL; the few-step generators (issue 17)
and the FLUX.1 / Qwen-Image text-stream families (issue 15) included."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

SIZE = "32"


def _models(tmp_path: Path, tiny_model_dir, kinds: list[str]) -> Path:
    """A models folder linking tiny kinds under unrelated names (recognition is by contents)."""
    root = tmp_path / "models"
    root.mkdir()
    for i, kind in enumerate(kinds):
        os.symlink(tiny_model_dir(kind), root / f"asset{i}")
    return root


def _run(capsys, argv) -> tuple[int, str, dict | None]:
    from diffalign.cli import main

    capsys.readouterr()
    code = main(["selftest", *argv])
    out = capsys.readouterr().out
    report = None
    for i, a in enumerate(argv):
        if a == "--output-dir" and (Path(argv[i + 1]) / "selftest.json").is_file():
            report = json.loads((Path(argv[i + 1]) / "selftest.json").read_text())
    return code, out, report


def _rows(report: dict) -> dict[tuple[str, str], str]:
    return {(r["asset"], r["check"]): r["verdict"] for r in report["results"]}


def test_rewards_pass_on_their_official_layouts(tmp_path, tiny_model_dir, capsys):
    kinds = ["clip", "aesthetic", "hpsv2", "imagereward", "pickscore", "dinov2"]
    models = _models(tmp_path, tiny_model_dir, kinds)
    code, out, report = _run(
        capsys, ["--models", str(models), "--output-dir", str(tmp_path / "r"), "--size", SIZE]
    )
    assert code == 0, out
    rows = _rows(report)
    assert rows[("asset0", "reward clip/pickscore vs CLIPModel forward")] == "pass"
    assert (
        rows[("asset1/sac+logos+ava1-l14-linearMSE.pth", "reward aesthetic vs LAION nn.Sequential")]
        == "pass"
    )
    assert rows[("asset2/HPS_v2.1_compressed.pt", "reward hpsv2 vs open_clip reference")] == "pass"
    assert rows[("asset3/ImageReward.pt", "reward imagereward vs BLIP reference")] == "pass"
    assert rows[("asset4", "reward clip/pickscore vs CLIPModel forward")] == "pass"
    assert rows[("asset5", "-")] == "skip"  # DINOv2: recognised, nothing to compare
    assert report["passed"] and report["counts"] == {"pass": 5, "FAIL": 0, "error": 0, "skip": 1}
    # the parts of a recognised asset are not assets of their own
    assert {a["path"] for a in report["assets"]} == {
        "asset0",
        "asset1/sac+logos+ava1-l14-linearMSE.pth",
        "asset2/HPS_v2.1_compressed.pt",
        "asset3/ImageReward.pt",
        "asset4",
        "asset5",
    }
    header = next(line for line in out.splitlines() if line.startswith("asset "))
    assert "check" in header and "max difference" in header and "verdict" in header


def test_generators_fill_and_textstream_pass(tmp_path, tiny_model_dir, capsys):
    kinds = ["sdxl", "sd15", "hyper-sd", "flux-fill", "sd3"]
    models = _models(tmp_path, tiny_model_dir, kinds)
    code, out, report = _run(
        capsys, ["--models", str(models), "--output-dir", str(tmp_path / "r"), "--size", SIZE]
    )
    assert code == 0, out
    rows = _rows(report)
    assert rows[("asset0", "generator sdxl-turbo vs StableDiffusionXLPipeline")] == "pass"
    assert rows[("asset1", "generator sd-turbo vs StableDiffusionPipeline")] == "pass"
    for asset in ("asset0", "asset1"):
        assert (
            rows[(asset, "U-Net LoRA round trip (save_unet_lora -> load_lora_weights)")] == "pass"
        )
    hyper = {k: v for k, v in rows.items() if k[0].startswith("asset2/")}
    assert sorted(hyper.values()) == ["pass", "pass"] and len(hyper) == 2
    for check in (
        "FillEncoder vs FluxFillPipeline preparation",
        "LoRA round trip (save_lora -> load_lora_weights)",
        "attach_semantic hook vs SemanticFillTransformer",
    ):
        assert rows[("asset3", check)] == "pass"
    assert rows[("asset4", "text-stream residual off = plain pipeline")] == "pass"
    off = next(r for r in report["results"] if r["check"].startswith("text-stream"))
    assert off["max_difference"] == 0.0 and off["tolerance"] == 0.0  # bit for bit
    # an SD3 folder is not SD3.5-Large-Turbo: no few-step generator check on it
    assert not any(a == "asset4" and c.startswith("generator") for a, c in rows)


def test_hyper_sd15_runs_on_sd15_first_and_rows_name_the_release(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Folders are tried by name, but the Hyper-SD15 LoRA is checked on an SD 1.5 folder (the
    release it is published for, by its model card) before an SD-Turbo one; the rows say which
    release each check ran on, and when it is not the release the kind is meant for. A row
    looks each folder's release up once (for the order and for its detail)."""
    import collections

    import diffalign.noise.selftest as noise_selftest
    from diffalign.engine.selftest import run_checks
    from diffalign.selftest import load_checks, run_selftest  # noqa: F401 - registers checks

    looked_up = collections.Counter()
    folder_release = noise_selftest.folder_release
    monkeypatch.setattr(
        noise_selftest,
        "folder_release",
        lambda a: looked_up.update([a.label]) or folder_release(a),
    )

    root = tmp_path / "models"
    root.mkdir()
    for name, kind in (("a_turbo", "sd21"), ("b_sd15", "sd15"), ("c_hyper", "hyper-sd")):
        os.symlink(tiny_model_dir(kind), root / name)
    checks = [
        c
        for c in load_checks()
        if c.name.split(" ")[:2] in (["generator", "sd-turbo"], ["generator", "hyper-sd15"])
    ]
    assert len(checks) == 2
    code = run_checks(root, tmp_path, size=32, checks=checks, log=lambda line: None)
    assert code == 0
    report = json.loads((tmp_path / "selftest.json").read_text())
    rows = [r for r in report["results"] if r["check"] != "-"]  # "-": the SDXL U-Net file
    detail = {(r["asset"], r["check"].split(" ")[1]): r["detail"] for r in rows}
    hyper = detail[("c_hyper/Hyper-SD15-1step-lora.safetensors", "hyper-sd15")]
    assert hyper == "on b_sd15, Stable Diffusion v1-5"
    assert detail[("a_turbo", "sd-turbo")] == "on SD-Turbo"
    assert detail[("b_sd15", "sd-turbo")] == (
        "on Stable Diffusion v1-5 (the sd-turbo recipe, which is meant for SD-Turbo)"
    )
    # the sd-turbo rows once each; the Hyper-SD15 row once per folder it orders
    assert looked_up == {"a_turbo": 2, "b_sd15": 2}


FEWSTEP = {  # make-tiny kind -> the generator check its folder gets (recognised by its card)
    "flux-schnell": "generator flux-schnell vs FluxPipeline",
    "sd35-turbo": "generator sd3.5-large-turbo vs StableDiffusion3Pipeline",
    "sana-sprint": "generator sana-sprint vs SanaSprintPipeline",
    "pixart-dmd": "generator pixart-dmd vs PixArtAlphaPipeline",
    "qwen-image": None,
}
OFF = "text-stream residual off = plain pipeline"


def test_fewstep_generators_and_flux_qwen_textstream_pass(tmp_path, tiny_model_dir, capsys):
    """Each few-step generator equals its own pipeline for the same noise and settings (FLUX:
    packed latents); the residual off is bit-identical on FLUX.1-schnell, SD3.5 and Qwen-Image
    (whose one-step latents were all NaN: the check samples two steps, on finite latents)."""
    kinds = list(FEWSTEP)
    models = _models(tmp_path, tiny_model_dir, kinds)
    code, out, report = _run(
        capsys, ["--models", str(models), "--output-dir", str(tmp_path / "r"), "--size", SIZE]
    )
    assert code == 0, out
    rows = _rows(report)
    expected = {}
    for i, kind in enumerate(kinds):
        if FEWSTEP[kind]:
            expected[(f"asset{i}", FEWSTEP[kind])] = "pass"
        if kind in ("flux-schnell", "sd35-turbo", "qwen-image"):
            expected[(f"asset{i}", OFF)] = "pass"
    assert rows == expected, out
    for r in report["results"]:
        assert r["max_difference"] <= r["tolerance"], r
        if r["check"] == OFF:
            assert r["max_difference"] == 0.0 and r["tolerance"] == 0.0


def test_a_drifted_fewstep_generator_and_off_residual_fail(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    """A FLUX.1-schnell sampling loop whose step drifted by 1e-2, and an "off" residual that
    registers no hook but leaves Qwen-Image's last block changed: both FAIL, exit 1; the
    untouched checks still pass."""
    from diffalign.noise import flow_generators
    from diffalign.textstream import attach

    sample = flow_generators.FluxSchnellGenerator._sample
    monkeypatch.setattr(
        flow_generators.FluxSchnellGenerator,
        "_sample",
        lambda self, *a: sample(self, *a) + 1e-2,
    )

    def enter(self):
        with torch.no_grad():
            next(self.adapter.blocks[-1].parameters()).add_(1e-3)
        return self

    monkeypatch.setattr(attach.AttachedResidual, "__enter__", enter)
    models = _models(tmp_path, tiny_model_dir, ["flux-schnell", "sana-sprint", "qwen-image"])
    code, out, report = _run(
        capsys, ["--models", str(models), "--output-dir", str(tmp_path), "--size", SIZE]
    )
    assert code == 1, out
    rows = _rows(report)
    assert rows[("asset0", FEWSTEP["flux-schnell"])] == "FAIL"
    assert rows[("asset0", OFF)] == "FAIL"
    assert rows[("asset1", FEWSTEP["sana-sprint"])] == "pass"
    assert rows[("asset2", OFF)] == "FAIL"
    assert not report["passed"] and report["counts"]["FAIL"] == 3


def test_empty_and_missing_folders(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    code, out, _ = _run(capsys, ["--models", str(tmp_path / "empty")])
    assert code == 0
    assert f"nothing found under {tmp_path / 'empty'}" in out
    report = json.loads((tmp_path / "selftest.json").read_text())  # default: current folder
    assert report["assets"] == [] and report["results"] == [] and report["passed"]
    from diffalign.cli import main

    assert main(["selftest", "--models", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"diffalign: error: --models {tmp_path / 'none'}: no such folder"]


def test_a_drifted_implementation_fails_with_exit_1(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """If our reward preprocessing drifted from the reference (here: the CLIP reward scoring
    non-square images with another geometry), the check says FAIL and the exit status is 1; a
    check that raises is reported as error and the others still run."""
    from diffalign.engine import selftest
    from diffalign.engine.rewards import base, clip

    models = _models(tmp_path, tiny_model_dir, ["clip"])
    monkeypatch.setattr(
        clip,
        "clip_preprocess",
        lambda x, s, m, d, g="reno": base.clip_preprocess(x, s, m, d, "official"),
    )
    boom = selftest.SelftestCheck(
        "always raises", selftest.transformers_of("CLIPModel"), 0.0, lambda a, c: 1 / 0
    )
    monkeypatch.setitem(selftest._CHECKS, "always raises", boom)
    code, out, report = _run(capsys, ["--models", str(models), "--output-dir", str(tmp_path)])
    assert code == 1
    rows = _rows(report)
    assert rows[("asset0", "reward clip/pickscore vs CLIPModel forward")] == "FAIL"
    assert rows[("asset0", "always raises")] == "error"
    assert "ZeroDivisionError" in out and not report["passed"]


def test_every_check_module_registers_and_bad_size(tmp_path):
    from diffalign.engine.errors import DiffalignError
    from diffalign.noise.generators import GENERATORS
    from diffalign.selftest import load_checks, run_selftest

    names = {c.name for c in load_checks()}
    assert all(any(n.startswith(f"generator {k} ") for n in names) for k in GENERATORS)
    with pytest.raises(DiffalignError, match="--size must be a positive multiple of 16"):
        run_selftest(tmp_path, tmp_path, size=40)
