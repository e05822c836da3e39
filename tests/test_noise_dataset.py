"""The matched-noise dataset builder (spec N; seed 001 step 2): layout, failures, resume after a
kill, damaged samples, sharding across 2 processes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import load_tensors
from diffalign.noise.dataset import AssignSettings, build_dataset, load_dataset_manifest
from diffalign.noise.generators import DiffusionOneStepGenerator, load_generator
from noise_data_helpers import SIZE, model_args, write_pairs

ARGS = ["--steps", "2", "--num-intermediates", "2", "--batch-size", "2"]


@pytest.fixture(scope="module")
def sdxl(tiny_model_dir):
    return tiny_model_dir("sdxl")


@pytest.fixture(scope="module")
def gen(sdxl):
    return load_generator(sdxl, height=SIZE, width=SIZE, device="cpu")


def _manifest(folder) -> list[dict]:
    return [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]


def test_layout_failures_and_the_run_goes_on(sdxl, tmp_path, monkeypatch):
    from PIL import Image

    data = write_pairs(
        tmp_path / "data",
        n=3,
        extra=[
            {"image": "images/0000.png"},  # no prompt field
            {"prompt": "gone", "image": "images/nope.png"},
            {"prompt": "too big", "image": "big.png"},
            {"prompt": "garbage", "image": "bad.png"},
            {"prompt": "nan please", "image": "images/0001.png"},
        ],
    )
    Image.new("RGB", (64, 64)).save(data / "big.png")
    (data / "bad.png").write_bytes(b"nope")
    nan_embeds = {}
    real_encode = DiffusionOneStepGenerator.encode_prompts

    def encode(self, prompts):
        e = real_encode(self, prompts)
        nan_embeds["rows"] = [i for i, p in enumerate(prompts) if p == "nan please"]
        for i in nan_embeds["rows"]:
            e["prompt_embeds"][i] = float("nan")
        return e

    monkeypatch.setattr(DiffusionOneStepGenerator, "encode_prompts", encode)
    out = tmp_path / "ds"
    argv = ["noise", "build-dataset", "--data-root", str(data), "--output-root", str(out)]
    assert main(argv + ARGS + model_args(sdxl)) == 0
    recs = _manifest(out)
    assert [r["id"] for r in recs] == [0, 1, 2]
    r = recs[0]
    assert r["sample_dir"] == "samples/000000_a_photo_number_0"
    sdir = out / r["sample_dir"]
    for name in ("best_input_noise.safetensors", "meta.json", "target.png"):
        assert (sdir / name).is_file()
    for name in ("loss_curve.json", "loss_curve.png", "step_0000.png", "step_0002.png", "best.png"):
        assert (sdir / "run_outputs" / name).is_file(), name
    assert not os.path.isabs(r["noise_file"]) and r["loss_after"] <= r["loss_before"]
    fails = {f["id"]: f["error"] for f in map(json.loads, (out / "failures.jsonl").open())}
    assert sorted(fails) == [3, 4, 5, 6, 7]
    assert "no prompt field" in fails[3] and "not found" in fails[4]
    assert "64x64" in fails[5] and "cannot be read" in fails[6] and "NaN" in fails[7]
    s = json.loads((out / "summary.json").read_text())
    assert s["finished"] == 3 and s["failed"] == 5 and "gaussianity_final" in s
    assert (out / "orthogonal_gaussian_final.png").is_file()


def test_resume_skips_finished_and_redoes_damaged(gen, tmp_path):
    data = write_pairs(tmp_path / "data", n=3)
    out = tmp_path / "ds"
    settings = AssignSettings(steps=2)
    build_dataset(gen, data, out, settings, batch_size=2, plots=False)
    first = (out / "manifest.jsonl").read_text()
    victim = out / _manifest(out)[1]["noise_file"]
    victim.write_bytes(b"corrupt")
    s = build_dataset(gen, data, out, settings, batch_size=2, plots=False)
    assert s["skipped_finished"] == 2 and s["redone_damaged"] == 1
    assert (out / "manifest.jsonl").read_text() == first  # the same bytes again
    with pytest.raises(DiffalignError, match="other settings"):
        build_dataset(gen, data, out, AssignSettings(steps=3), batch_size=2)


def test_manifest_path_outside_the_dataset_is_refused(gen, tmp_path):
    data = write_pairs(tmp_path / "data", n=1)
    out = tmp_path / "ds"
    build_dataset(gen, data, out, AssignSettings(steps=1), plots=False)
    rec = _manifest(out)[0]
    rec["noise_file"] = "../../etc/passwd"
    (out / "manifest.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(DiffalignError, match="outside"):
        load_dataset_manifest(out)


@pytest.mark.slow  # a subprocess start (~10 s on the loaded CI machine) + 2 builds
def test_killed_run_resumes_to_the_same_manifest(sdxl, tmp_path):
    data = write_pairs(tmp_path / "data", n=8)
    args = ["--steps", "3", "--batch-size", "1", "--no-plots", "--num-intermediates", "0"]
    args += [*model_args(sdxl), "--device", "cpu"]
    ref = tmp_path / "ref"
    assert (
        main(["noise", "build-dataset", "--data-root", str(data), "--output-dir", str(ref), *args])
        == 0
    )
    out = tmp_path / "killed"
    argv = ["noise", "build-dataset", "--data-root", str(data), "--output-dir", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffalign.cli", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    manifest = out / "manifest.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file() and len(manifest.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the build finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(manifest.read_text().splitlines())
    assert 2 <= n_before < 8
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["skipped_finished"] >= 2 and s["finished"] == 8
    assert manifest.read_text() == (ref / "manifest.jsonl").read_text()


@pytest.mark.slow  # 2 processes under accelerate launch
def test_two_processes_shard_the_pairs(sdxl, gen, tmp_path):
    from launch_helper import launch_two_cpu_processes

    data = write_pairs(tmp_path / "data", n=4)
    out = tmp_path / "sharded"
    argv = ["-m", "diffalign.cli", "noise", "build-dataset", "--data-root", str(data)]
    argv += ["--output-dir", str(out), "--steps", "2", "--batch-size", "2", "--no-plots"]
    r = launch_two_cpu_processes(argv + model_args(sdxl))
    assert r.returncode == 0, r.stderr[-2000:]
    recs = _manifest(out)
    assert [x["id"] for x in recs] == [0, 1, 2, 3]
    assert not list(out.glob("*.rank-*.jsonl"))
    # every rank's counts are summed into summary.json (issue 14 item 18), not null
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["written_this_run"] == 4 and s["skipped_finished"] == 0
    assert s["redone_damaged"] == 0 and s["samples_per_second"] > 0
    ref = tmp_path / "single"
    build_dataset(gen, data, ref, AssignSettings(steps=2), batch_size=2, plots=False)
    assert recs == _manifest(ref)  # the 1-process batches: the same records and noises
    for r in recs:
        a, _ = load_tensors(out / r["noise_file"])
        b, _ = load_tensors(ref / r["noise_file"])
        assert all(torch.equal(a[k], b[k]) for k in b), r["id"]


@pytest.mark.parametrize("verb", ["build-dataset", "assign", "em"])
def test_a_second_run_into_a_held_folder_is_refused(sdxl, tmp_path, capsys, verb):
    import fcntl

    from diffalign.engine.io import LOCK_NAME

    data = write_pairs(tmp_path / "data", n=1)
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT)  # another open file: another owner
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, json.dumps({"pid": 4242, "host": "here", "command": "x"}).encode(), 0)
    try:
        argv = {
            "build-dataset": ["noise", "build-dataset", "--data-root", str(data),
                              "--output-dir", str(out), "--steps", "1"],
            "assign": ["noise", "assign", "--prompt", "a cat", "--target-image",
                       str(data / "images" / "0000.png"), "--output-dir", str(out),
                       "--steps", "1"],
            "em": ["noise", "em", "--data-root", str(data), "--work-dir", str(out),
                   "--assign-steps", "1", "--train-max-steps", "1", "--tracker", "none"],
        }[verb]  # fmt: skip
        assert main([*argv, *model_args(sdxl)]) == 2
    finally:
        os.close(fd)
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("diffalign")]
    assert len(err) == 1 and str(out) in err[0] and "4242" in err[0], err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing was written


def test_pairs_may_name_images_anywhere(gen, tmp_path):
    src = write_pairs(tmp_path / "elsewhere", n=1)
    data = tmp_path / "data"
    data.mkdir()
    line = {"caption": "far away", "file": str((src / "images" / "0000.png").resolve())}
    (data / "pairs.jsonl").write_text(json.dumps(line) + "\n")
    out = tmp_path / "ds"
    s = build_dataset(
        gen, data, out, AssignSettings(steps=1), prompt_field="caption", image_field="file",
        plots=False,
    )  # fmt: skip
    assert s["finished"] == 1
    rec = _manifest(out)[0]
    assert rec["image"] == line["file"] and rec["prompt"] == "far away"
    assert not os.path.isabs(rec["target_image"])  # our own paths stay relative
    # the pairs file is recorded by the sha256 of its bytes (reference: hashlib on the bytes)
    cfg = json.loads((out / "dataset_config.json").read_text())
    assert cfg["pairs_sha256"] == hashlib.sha256((data / "pairs.jsonl").read_bytes()).hexdigest()


def test_pairs_jsonl_with_a_byte_order_mark_is_read(tmp_path):
    """A pairs.jsonl saved by a Windows editor (a leading U+FEFF): its first item failed as
    'pairs.jsonl:1 is not JSON'."""
    from diffalign.noise.dataset import read_pairs

    data = write_pairs(tmp_path / "data", n=2)
    text = (data / "pairs.jsonl").read_text()
    (data / "pairs.jsonl").write_bytes(("\ufeff" + text).encode())
    items = read_pairs(data)
    assert [(it.error, it.prompt) for it in items] == [
        (None, "a photo number 0"),
        (None, "a photo number 1"),
    ]


def test_a_build_where_every_sample_fails_exits_non_zero(sdxl, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "pairs.jsonl").write_text(json.dumps({"prompt": "x", "image": "nope.png"}) + "\n")
    out = tmp_path / "ds"
    argv = ["noise", "build-dataset", "--data-root", str(data), "--output-dir", str(out)]
    assert main([*argv, "--steps", "1", *model_args(sdxl)]) == 2
    assert "failures.jsonl" in capsys.readouterr().err
    assert json.loads((out / "failures.jsonl").read_text())["error"].endswith("not found")
