"""Issue 6 item 1 applied to commands that came after it (noise theory / toy optimize, FLUX Fill
make-triptychs, U-REPA preprocess images): a second run into a folder whose lock another run
holds is one `diffalign: error:` line naming the folder and the running process, and nothing is
written there."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffalign.cli import main


class HeldHere:
    """The folder's lock held through another open file (flock locks belong to the open file,
    so this conflicts with `output_lock` in this process exactly as another process does)."""

    def __init__(self, folder: Path):
        from diffalign.engine.io import LOCK_NAME

        folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(self.fd, json.dumps({"pid": 4242, "host": "here", "command": "x"}).encode(), 0)

    def release(self) -> None:
        os.close(self.fd)


def _triples(folder: Path) -> Path:
    folder.mkdir()
    for j, role in enumerate(("visible", "target", "semantic")):
        Image.new("RGB", (32, 32), (40 * j, 10, 200)).save(folder / f"ex0_{role}.png")
    (folder / "ex0.txt").write_text("a prompt")
    return folder


def _class_tree(root: Path) -> Path:
    for k, wnid in enumerate(("n01440764", "n01443537")):
        (root / wnid).mkdir(parents=True)
        Image.new("RGB", (80, 72), (100 * k, 50, 20)).save(root / wnid / f"{wnid}_1.JPEG")
    return root


def _commands(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    from diffalign.noise.toy.models import ToyModelConfig, build_model, save_model

    out = tmp_path / "out"
    torch.manual_seed(0)
    gen = tmp_path / "gen"
    save_model(build_model(ToyModelConfig.for_dataset("generator", "digits")), gen)
    return {
        "noise theory": (
            out,
            ["noise", "theory", "--output-dir", str(out), "--num-samples", "64",
             "--batch-size", "64", "--opt-steps", "1", "--per-sample-count", "2"],
        ),
        "noise toy optimize": (
            out,
            ["noise", "toy", "optimize", "--generator-ckpt", str(gen), "--output-dir", str(out),
             "--classifier-steps", "5", "--steps", "1"],
        ),
        "fill make-triptychs": (
            out,
            ["fill", "make-triptychs", "--input", str(_triples(tmp_path / "in")), "--out",
             str(out), "--panel-size", "16"],
        ),
        "repa preprocess images": (
            out,
            ["repa", "preprocess", "images", "--source", str(_class_tree(tmp_path / "tree")),
             "--data-dir", str(out), "--resolution", "64"],
        ),
    }  # fmt: skip


@pytest.mark.parametrize(
    "command",
    ["noise theory", "noise toy optimize", "fill make-triptychs", "repa preprocess images"],
)
def test_new_commands_refuse_a_locked_output_folder(tmp_path, capsys, command):
    from diffalign.engine.io import LOCK_NAME

    folder, argv = _commands(tmp_path)[command]
    holder = HeldHere(folder)
    try:
        code = main(argv)
    finally:
        holder.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err[-1].startswith("diffalign: error:") and str(folder) in err[-1], err
    assert "4242" in err[-1], err  # names the running process
    assert [p.name for p in folder.iterdir()] == [LOCK_NAME]  # nothing written beside it
