"""Issue 6 on the engine: incomplete model folders, deterministic safetensors, OS errors as one
line, stale temporaries, bad devices / seeds / numbers, and `download`'s empty --only."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffalign.cli import main
from diffalign.engine import io as io_mod
from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import append_jsonl, load_tensors, save_tensors, write_json
from diffalign.engine.train import OptimizerSpec, TrainConfig, TrainTask, train

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--steps", "2", "--height", "32", "--width", "32"]


def run_cli(argv) -> int:
    """`main(argv)` with argparse's exit (bad option values) turned into its exit code."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def sd3(tiny_model_dir):
    return tiny_model_dir("sd3")


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n")
    return path


# ---------------------------------------------------------------------------- item 2


def _copy(sd3, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(sd3, dst)
    return dst


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda m: shutil.rmtree(m / "tokenizer_3"), "tokenizer_3"),
        (lambda m: (m / "tokenizer_3" / "tokenizer.json").unlink(), "tokenizer_3"),
        (lambda m: shutil.rmtree(m / "text_encoder_2"), "text_encoder_2"),
        (lambda m: (m / "vae" / "diffusion_pytorch_model.safetensors").unlink(), "vae"),
        (lambda m: (m / "scheduler" / "scheduler_config.json").unlink(), "scheduler"),
    ],
)
def test_incomplete_model_folder_is_one_line_naming_the_component(
    sd3, tmp_path, prompts, capsys, damage, match
):
    model = _copy(sd3, tmp_path)
    damage(model)
    out = tmp_path / "out"
    argv = ["textstream", "generate", "--prompts", str(prompts), "--model", str(model)]
    assert run_cli([*argv, "--output-dir", str(out), *TINY]) == 2
    line = one_error(capsys)
    assert line.startswith("diffalign: error: incomplete model folder") and match in line
    assert not out.exists()


def test_pickled_weights_in_a_model_folder_are_refused_cleanly(sd3, tmp_path, prompts, capsys):
    model = _copy(sd3, tmp_path)
    weights, _ = load_tensors(model / "text_encoder" / "model.safetensors")
    (model / "text_encoder" / "model.safetensors").unlink()
    torch.save(weights, model / "text_encoder" / "pytorch_model.bin")
    argv = ["textstream", "generate", "--prompts", str(prompts), "--model", str(model)]
    assert run_cli([*argv, "--output-dir", str(tmp_path / "out"), *TINY]) == 2
    line = one_error(capsys)
    assert "text_encoder" in line and "pickled" in line and "pytorch_model.bin" in line


# ---------------------------------------------------------------------------- item 6 (files)


_WRITE = """
import sys, torch
sys.path.insert(0, {src!r})
from diffalign.engine.io import save_tensors
meta = {{f"key{{k}}": str(k * 7) for k in range(12)}}
save_tensors(sys.argv[1], {{"b": torch.arange(6.0), "a": torch.ones(2, 3)}}, metadata=meta)
"""


def test_identical_tensors_give_identical_files_across_processes(tmp_path):
    paths = [tmp_path / f"{k}.safetensors" for k in range(2)]
    for path in paths:  # separate processes: safetensors' own metadata map order is per process
        subprocess.run([sys.executable, "-c", _WRITE.format(src=SRC), str(path)], check=True)
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    assert len(digests) == 1
    tensors, meta = load_tensors(paths[0])
    assert torch.equal(tensors["b"], torch.arange(6.0)) and meta["key3"] == "21"


# ---------------------------------------------------------------------------- item 7


def test_no_space_left_names_the_path_and_the_size(tmp_path, monkeypatch):
    class Full:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_mod, "open", Full, raising=False)
    target = tmp_path / "noise.safetensors"
    with pytest.raises(DiffalignError, match=r"no space left .*noise\.safetensors.*4\.0 MB"):
        save_tensors(target, {"x": torch.zeros(1024, 1024)})
    assert not target.exists() and list(tmp_path.iterdir()) == []  # no temporary left


def test_real_enospc_on_append(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(DiffalignError, match="no space left on the device while writing /dev/full"):
        append_jsonl("/dev/full", {"id": 1})


def test_enospc_in_a_command_is_one_line(tmp_path, monkeypatch, capsys):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "asg"
    gen = _toy_generator(tmp_path)
    monkeypatch.setattr(io_mod, "safetensors_bytes", lambda t, m=None: b"x" * 2048)
    monkeypatch.setattr(io_mod, "open", full, raising=False)
    argv = ["noise", "toy", "assign", "--generator-ckpt", str(gen), "--output-dir", str(out)]
    assert run_cli([*argv, "--max-items", "2", "--assign-steps", "1"]) == 2
    line = one_error(capsys)
    assert "no space left" in line and "noise.safetensors" in line and "2.0 KB" in line


def _toy_generator(tmp_path) -> Path:
    from diffalign.noise.toy.models import ToyModelConfig, build_model, save_model

    torch.manual_seed(0)
    save_model(build_model(ToyModelConfig.for_dataset("generator", "digits")), tmp_path / "gen")
    return tmp_path / "gen"


def _unwritable() -> str | None:
    probe = Path("/sys/diffalign-probe")
    try:
        probe.mkdir()
    except OSError:
        return str(probe / "out")
    probe.rmdir()
    return None


@pytest.mark.parametrize("where", ["file", "unwritable"])
def test_output_dir_that_is_a_file_or_unwritable(tmp_path, prompts, sd3, capsys, where):
    if where == "file":
        out = tmp_path / "taken"
        out.write_text("not a folder")
    else:
        out = _unwritable()
        if out is None:
            pytest.skip("no unwritable location on this machine")
    gen = _toy_generator(tmp_path)
    commands = [
        ["noise", "toy", "train-gan", "--max-items", "8", "--max-steps", "1"],
        ["noise", "toy", "assign", "--generator-ckpt", str(gen), "--max-items", "2"],
        ["textstream", "generate", "--prompts", str(prompts), "--model", sd3, *TINY],
        ["textstream", "sample", "--prompt", "a cat", "--model", sd3, *TINY],
        ["noise", "theory", "--num-samples", "64", "--opt-steps", "1"],
    ]
    for argv in commands:
        assert run_cli([*argv, "--output-dir", str(out)]) == 2, argv
        line = one_error(capsys)
        assert line.startswith("diffalign: error:") and str(Path(out).parent) in line, line
    assert run_cli(["make-tiny", "sd3", "--out", str(out)]) == 2
    assert str(Path(out).parent) in one_error(capsys)
    if where == "file":
        assert Path(out).read_text() == "not a folder"


def test_os_errors_with_a_path_are_one_line(capsys, monkeypatch):
    import diffalign.noise.toy.cli as toy_cli

    def boom(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/some/where")

    monkeypatch.setattr(toy_cli, "_run_demo", boom)
    assert run_cli(["demo", "--quick"]) == 2
    assert "cannot write /some/where: Permission denied" in one_error(capsys)


@pytest.mark.parametrize("device", ["bogus", "cuda:99", "npu"])
def test_bad_device_is_one_line_before_loading(sd3, tmp_path, prompts, capsys, device):
    out = tmp_path / "o"
    argv = ["textstream", "generate", "--prompts", str(prompts), "--model", sd3, *TINY]
    assert run_cli([*argv, "--output-dir", str(out), "--device", device]) == 2
    assert device in one_error(capsys) and not out.exists()
    argv = ["textstream", "calibrate", "--dataset", str(prompts), "--model", sd3]
    assert run_cli([*argv, "--output", str(out / "r.safetensors"), "--device", device]) == 2
    assert device in one_error(capsys) and not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["textstream", "generate", "--prompts", "p.txt", "--output-dir", "o", "--seed", "-1"],
        ["textstream", "sample", "--prompt", "x", "--seed", str(2**63)],
        ["noise", "toy", "assign", "--generator-ckpt", "g", "--output-dir", "o", "--seed", "-1"],
        ["noise", "toy", "assign", "--generator-ckpt", "g", "--output-dir", "o", "--patch-size", "0"],
        ["noise", "toy", "evaluate", "--generator-ckpt", "g", "--output-dir", "o", "--num-samples", "0"],
        ["noise", "toy", "train-gan", "--output-dir", "o", "--seed", str(2**64)],
        ["noise", "toy", "sft", "--generator-ckpt", "g", "--manifest-path", "m", "--output-dir", "o",
         "--lr", "inf"],
        ["textstream", "generate", "--prompts", "p.txt", "--output-dir", "o", "--cfg", "nan"],
        ["textstream", "generate", "--prompts", "p.txt", "--output-dir", "o", "--cfg", "inf"],
        ["textstream", "calibrate", "--dataset", "p.txt", "--cfg", "nan"],
        ["noise", "theory", "--output-dir", "o", "--lr", "nan"],
        ["make-tiny", "sd3", "--out", "o", "--seed", "-3"],
    ],
)  # fmt: skip
def test_bad_numbers_fail_while_parsing(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    assert run_cli(argv) == 2
    line = one_error(capsys)
    assert "argument" in line and not (tmp_path / "o").exists()


def test_library_checks_refuse_non_finite_and_out_of_range_values(tmp_path):
    from diffalign.noise.toy.evaluate import EvalSettings
    from diffalign.textstream.generate import (
        GenerationConfig,
        ResidualConfig,
        validate_config,
        validate_residual_config,
    )

    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(DiffalignError, match="--cfg"):
            validate_config(GenerationConfig(cfg=bad))
    with pytest.raises(DiffalignError, match="--seed"):
        validate_config(GenerationConfig(seed=-1))
    with pytest.raises(DiffalignError, match="finite"):
        validate_residual_config(ResidualConfig(target_layers=[2], weights=[math.nan]))
    with pytest.raises(DiffalignError, match="--num-samples"):
        EvalSettings(num_samples=0).validate()
    with pytest.raises(DiffalignError, match="--patch-size"):
        EvalSettings(patch_size=0).validate()


def test_evaluate_num_samples_zero_from_python(tmp_path):
    from diffalign.noise.toy.evaluate import EvalSettings, evaluate_runs

    gen = _toy_generator(tmp_path)
    with pytest.raises(DiffalignError, match="--num-samples must be >= 2"):
        evaluate_runs([str(gen)], tmp_path / "ev", settings=EvalSettings(num_samples=0))
    assert not (tmp_path / "ev").exists()


def test_strict_json_in_what_we_write(tmp_path):
    write_json(tmp_path / "a.json", {"x": math.nan, "y": [math.inf, 1.0]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": None, "y": [None, 1.0]}


# ---------------------------------------------------------------------------- item 8


@pytest.mark.parametrize("only", ["", ",", " , "])
def test_download_only_empty_is_an_error(tmp_path, capsys, only):
    assert run_cli(["download", "--only", only, "--dry-run", "--dir", str(tmp_path / "m")]) == 2
    assert "--only" in one_error(capsys)
    assert not (tmp_path / "m").exists()


def test_download_dry_run_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert run_cli(["download", "--only", "sd3", "--dry-run", "--dir", str(f)]) == 2
    assert "not a folder" in one_error(capsys)


# ---------------------------------------------------------------------------- item 5 (engine)


class _Tiny(TrainTask):
    def __init__(self, fail_at: int | None = None):
        torch.manual_seed(0)
        self.net = torch.nn.Linear(2, 1)
        self.fail_at = fail_at

    def trainable(self):
        return {"net": self.net}

    def optimizers(self):
        return {"main": OptimizerSpec([{"params": self.net.parameters()}], lr=1e-2)}

    def train_dataloader(self):
        x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
        return torch.utils.data.DataLoader(list(zip(x, x.sum(1, keepdim=True))), batch_size=4)

    def training_step(self, batch, step, ctx):
        if step == self.fail_at:
            raise KeyboardInterrupt  # a kill
        x, y = batch
        return {"loss": torch.nn.functional.mse_loss(self.net(x), y)}

    def export(self, out_dir):
        save_tensors(Path(out_dir) / "net.safetensors", self.net.state_dict())


def _cfg(out, **kw):
    return TrainConfig(output_dir=str(out), tracker="none", progress=False, log_every=0, **kw)


def test_stale_temporaries_of_a_killed_checkpoint_are_removed_on_start(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_Tiny(fail_at=3), _cfg(out, max_steps=6, checkpoint_every=2))
    # what a kill -9 inside atomic_dir leaves: temporaries, and a half-swapped export
    (out / "checkpoints" / ".checkpoint-4.ab12cd34.tmp").mkdir()
    (out / "checkpoints" / ".checkpoint-4.ab12cd34.tmp" / "state.json").write_text("{")
    (out / ".checkpoint-final.zz99yy88.tmp").mkdir()
    (out / ".train_summary.json.k2j3h4g5.tmp").write_text("{")
    (out / ".checkpoint-best.old").mkdir()  # the old export, its replacement never renamed
    (out / "notes.tmp").write_text("the user's file")  # not ours: kept
    res = train(_Tiny(), _cfg(out, max_steps=6, checkpoint_every=2, resume="latest"))
    assert res.step == 6
    names = {p.name for p in out.iterdir()} | {p.name for p in (out / "checkpoints").iterdir()}
    assert not [n for n in names if n.endswith(".tmp") and n.startswith(".")]
    assert "checkpoint-best" in names and ".checkpoint-best.old" not in names  # put back
    assert (out / "notes.tmp").read_text() == "the user's file"


def test_clean_stale_temporaries_only_touches_our_names(tmp_path):
    from diffalign.engine.io import clean_stale_temporaries

    (tmp_path / ".a.json.abcd1234.tmp").write_text("x")
    (tmp_path / ".hidden.tmp").write_text("x")  # no random part: not an atomic_path name
    (tmp_path / "b.tmp").write_text("x")
    removed = clean_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".a.json.abcd1234.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden.tmp", "b.tmp"]


def test_the_largest_seed_works_everywhere(tmp_path):
    """seed_int allows up to 2**63 - 1: numpy's 32-bit seeding and derived per-item seeds
    must not overflow (they were internal errors)."""
    top = str(2**63 - 1)
    gan = tmp_path / "gan"
    assert main(["noise", "toy", "train-gan", "--output-dir", str(gan), "--max-items", "8",
                 "--batch-size", "4", "--max-steps", "1", "--seed", top]) == 0  # fmt: skip
    assert main(["noise", "toy", "assign", "--generator-ckpt", str(gan), "--output-dir",
                 str(tmp_path / "asg"), "--max-items", "2", "--assign-steps", "1",
                 "--seed", top]) == 0  # fmt: skip
    with pytest.raises(DiffalignError, match="seed"):
        TrainConfig(output_dir=str(tmp_path / "x"), max_steps=1, seed=-1).validate()


def test_a_failed_checkpoint_write_is_one_line():
    from diffalign.engine.io import save_pt

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(DiffalignError, match="cannot write /dev/full.*disk full"):
        save_pt({"a": torch.zeros(1000)}, "/dev/full")


def test_enospc_inside_a_librarys_writer_is_one_line(tmp_path, monkeypatch, capsys):
    """save_pretrained writes through safetensors, whose error wraps ENOSPC in a SafetensorError
    (seen with `make-tiny` on a full tmpfs): one `diffalign: error:` line, exit 2."""
    import safetensors.torch
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    # transformers binds `save_file` at import: importing it for the first time under the patch
    # would keep the fake for the rest of this test process (seen as every later make-tiny
    # failing "disk full" in one xdist worker), so import it first and patch its name too
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    assert run_cli(["make-tiny", "sd15", "--out", str(tmp_path / "m")]) == 2
    line = one_error(capsys)
    assert line.startswith("diffalign: error: no space left on the device"), line
