"""CLI-level checks of the toy branch found by playing the issue's checker (spec N, toy branch;
spec "Interfaces": bad input is one line, non-zero exit, nothing already written is lost)."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct

import numpy as np
import pytest
import torch

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import load_tensors, save_tensors
from diffalign.noise.toy.assignment import assign
from diffalign.noise.toy.data import load_dataset
from diffalign.noise.toy.models import ToyModelConfig, build_model, save_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An (untrained) digits generator and a 6-item assignment made with it."""
    root = tmp_path_factory.mktemp("toycli")
    torch.manual_seed(0)
    save_model(build_model(ToyModelConfig.for_dataset("generator", "digits")), root / "gen")
    data = load_dataset("digits", "train").subset(range(6))
    assign(root / "gen", root / "asg", data=data, assign_steps=2, write_plots=False)
    return root


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    # library checks: "diffalign: error: ..."; option types: "diffalign noise toy X: error: ..."
    assert err.startswith("diffalign") and ": error: " in err, err
    return err


def run_cli(argv) -> int:
    """`main(argv)`, with argparse's exit (bad option values) turned into its exit code."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def _idx(arr: np.ndarray) -> bytes:
    head = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _write_mnist(root, n=4):
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(rng.integers(0, 256, (n, 28, 28))))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(rng.integers(0, 10, n)))


def test_corrupt_gzip_payload_is_one_line_error(tmp_path, capsys):
    # a valid gzip header followed by a damaged deflate stream raises zlib.error, not OSError
    raw = gzip.compress(_idx(np.arange(28 * 28 * 3).reshape(3, 28, 28) % 256))
    bad = bytearray(raw)
    for i in range(20, 60):
        bad[i] ^= 0xFF
    _write_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(bytes(bad))
    with pytest.raises(DiffalignError, match="cannot read"):
        load_dataset("mnist", "train", str(tmp_path))
    out = tmp_path / "run"
    rc = main(
        ["noise", "toy", "train-gan", "--dataset", "mnist", "--data-dir", str(tmp_path),
         "--output-dir", str(out), "--max-steps", "1"]
    )  # fmt: skip
    assert rc == 2 and "cannot read" in _one_line_error(capsys)
    assert not out.exists()


def test_em_passes_parametrization_to_the_e_step(setup, tmp_path):
    out = tmp_path / "em"
    rc = main(
        ["noise", "toy", "em", "--generator_ckpt", str(setup / "gen"), "--output_dir", str(out),
         "--num_cycles", "1", "--max_items", "3", "--assign_steps", "1", "--max-steps", "1",
         "--parametrization", "cayley"]
    )  # fmt: skip
    assert rc == 0
    cfg = json.loads((out / "cycle-000" / "assign" / "assign_config.json").read_text())
    assert cfg["parametrization"] == "cayley"
    # the M-step logs to TensorBoard by default (SPEC E), as the other toy trainers
    assert list((out / "cycle-000" / "sft" / "logs").rglob("*tfevents*"))


def test_em_tracker_none_writes_no_event_files(setup, tmp_path):
    """`noise toy em --tracker` as the other toy trainers, passed to each M-step (the option
    did not exist: the M-steps' TensorBoard logs could not be turned off; the default's are
    checked above)."""
    out = tmp_path / "em"
    rc = main(
        ["noise", "toy", "em", "--generator-ckpt", str(setup / "gen"), "--output-dir", str(out),
         "--num-cycles", "1", "--max-items", "3", "--assign-steps", "1", "--max-steps", "1",
         "--tracker", "none"]
    )  # fmt: skip
    assert rc == 0 and (out / "cycle-000" / "sft" / "checkpoint-final").is_dir()
    assert not list(out.rglob("*tfevents*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["assign", "--max-items", "0"], "--max-items/--max_items: '0' must be >= 1"),
        (["assign", "--max-items", "2", "--lr", "nan"], "'nan' is not a finite number"),
        (["sft", "--manifest-path", "ASG", "--batch-size", "0"], "'0' must be >= 1"),
        (
            ["sft", "--manifest-path", "ASG", "--preserve-weight", "-1"],
            "--preserve-weight/--preserve_weight: '-1' must be >= 0",
        ),
        (["sft", "--manifest-path", "ASG", "--lr", "0"], "--lr: '0' must be > 0"),
        (["direct-sft", "--max-items", "0"], "'0' must be >= 1"),
        (
            ["direct-sft", "--max-items", "2", "--l1-weight", "-0.5"],
            "--l1-weight/--l1_weight: '-0.5' must be >= 0",
        ),
        (["em", "--max-items", "2", "--preserve-weight", "-1"], "'-1' must be >= 0"),
    ],
)
def test_bad_settings_are_one_line_errors(setup, tmp_path, capsys, args, message):
    verb, *rest = args
    rest = [str(setup / "asg") if a == "ASG" else a for a in rest]
    out = tmp_path / "out"
    argv = ["noise", "toy", verb, "--generator-ckpt", str(setup / "gen"), "--output-dir", str(out)]
    rc = run_cli(argv + rest)
    assert rc == 2 and message in _one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--batch-size", "0"], "'0' must be >= 1"), (["--lr", "nan"], "'nan' is not a finite")],
)
def test_train_gan_bad_settings(tmp_path, capsys, args, message):
    out = tmp_path / "gan"
    rc = run_cli(["noise", "toy", "train-gan", "--output-dir", str(out), "--max-steps", "1", *args])
    assert rc == 2 and message in _one_line_error(capsys)
    assert not out.exists()


def _copy_assignment(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst / "samples" / "000002" / "noise.safetensors"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", ["wrong_target_size", "nan_noise"])
@pytest.mark.parametrize("verb", ["sft", "direct-sft"])
def test_damaged_noise_file_is_refused_by_sft(setup, tmp_path, capsys, damage, verb):
    noise_file = _copy_assignment(setup / "asg", tmp_path / "asg")
    tensors, meta = load_tensors(noise_file)
    if damage == "wrong_target_size":
        tensors["target"] = torch.zeros(1, 28, 28)
        message = "different shapes"
    else:
        tensors["noise"][0, 0, 0] = float("nan")
        message = "NaN"
    save_tensors(noise_file, tensors, metadata=meta)
    before = _sha(tmp_path / "asg" / "manifest.jsonl"), _sha(noise_file)
    out = tmp_path / "run"
    rc = main(
        ["noise", "toy", verb, "--generator-ckpt", str(setup / "gen"), "--manifest-path",
         str(tmp_path / "asg"), "--output-dir", str(out), "--max-steps", "1"]
    )  # fmt: skip
    assert rc == 2 and message in _one_line_error(capsys)
    assert not out.exists()
    assert (_sha(tmp_path / "asg" / "manifest.jsonl"), _sha(noise_file)) == before


def test_direct_sft_refuses_manifest_from_another_dataset(setup, tmp_path, capsys):
    _copy_assignment(setup / "asg", tmp_path / "asg")
    cfg_path = tmp_path / "asg" / "assign_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dataset"] = "mnist"
    cfg_path.write_text(json.dumps(cfg))
    rc = main(
        ["noise", "toy", "direct-sft", "--generator-ckpt", str(setup / "gen"), "--manifest-path",
         str(tmp_path / "asg"), "--output-dir", str(tmp_path / "run"), "--max-steps", "1"]
    )  # fmt: skip
    assert rc == 2 and "assigned on 'mnist'" in _one_line_error(capsys)


def test_sft_accepts_the_shared_data_options(setup, tmp_path):
    out = tmp_path / "sft"
    rc = main(
        ["noise", "toy", "sft", "--generator_ckpt", str(setup / "gen"), "--manifest_path",
         str(setup / "asg"), "--dataset", "digits", "--data_dir", str(tmp_path),
         "--output_dir", str(out), "--max-steps", "1", "--preserve_weight", "0.5"]
    )  # fmt: skip
    assert rc == 0 and (out / "checkpoint-final" / "generator.safetensors").is_file()


def test_train_gan_resume_on_another_dataset_names_the_dataset(tmp_path, capsys):
    out = tmp_path / "gan"
    assert main(["noise", "toy", "train-gan", "--output-dir", str(out), "--max-steps", "1"]) == 0
    history = (out / "train_summary.json").read_bytes()
    data = tmp_path / "mnist"
    data.mkdir()
    _write_mnist(data)
    rc = main(
        ["noise", "toy", "train-gan", "--dataset", "mnist", "--data-dir", str(data),
         "--output-dir", str(out), "--max-steps", "2", "--resume", "latest"]
    )  # fmt: skip
    assert rc == 2 and "run on 'digits', not on 'mnist'" in _one_line_error(capsys)
    assert (out / "train_summary.json").read_bytes() == history


def test_data_dir_that_is_a_file_says_so(tmp_path):
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(b"")
    with pytest.raises(DiffalignError, match="is a file, not a folder"):
        load_dataset("mnist", "train", str(f))


def test_generator_without_metadata_and_broken_json_config(tmp_path, capsys):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    g = build_model(ToyModelConfig.for_dataset("generator", "digits"))
    save_file(
        {k: v.contiguous() for k, v in g.state_dict().items()}, tmp_path / "generator.safetensors"
    )
    (tmp_path / "generator.json").write_text("{not json")
    rc = main(
        ["noise", "toy", "assign", "--generator-ckpt", str(tmp_path), "--output-dir",
         str(tmp_path / "asg"), "--max-items", "1"]
    )  # fmt: skip
    assert rc == 2 and "generator.json: not valid JSON" in _one_line_error(capsys)
