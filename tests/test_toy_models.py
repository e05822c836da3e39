"""Toy models: shapes per dataset, safetensors round trip, run-folder resolution, CLI train-gan."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import save_tensors
from diffalign.noise.toy.models import (
    ToyModelConfig,
    build_model,
    load_model,
    resolve_weights,
    save_model,
)


@pytest.mark.parametrize("dataset", ["digits", "mnist", "cifar10"])
def test_shapes_per_dataset(dataset):
    torch.manual_seed(0)
    g = build_model(ToyModelConfig.for_dataset("generator", dataset))
    d = build_model(ToyModelConfig.for_dataset("discriminator", dataset))
    c = build_model(ToyModelConfig.for_dataset("classifier", dataset))
    y = torch.tensor([0, 9])
    x = g(g.sample_noise(2), y)
    assert tuple(x.shape[1:]) == g.config.image_shape
    assert x.abs().max() <= 1
    assert d(x, y).shape == (2,)
    assert c(x).shape == (2, 10) and c.features(x).shape == (2, 64)
    with pytest.raises(DiffalignError, match="generator expects latents"):
        g(torch.zeros(2, 4, 2, 2), y)


def test_save_load_roundtrip_and_resolution(tmp_path):
    torch.manual_seed(0)
    g = build_model(ToyModelConfig.for_dataset("generator", "digits"))
    save_model(g, tmp_path / "run" / "checkpoint-final")
    g2, cfg = load_model(tmp_path / "run")  # run folder -> checkpoint-final/generator.safetensors
    assert cfg.dataset == "digits" and cfg.latent_shape == (4, 4, 4)
    for a, b in zip(g.state_dict().values(), g2.state_dict().values()):
        assert torch.equal(a, b)
    # a weights file without config metadata finds generator.json beside it
    save_tensors(tmp_path / "bare" / "generator.safetensors", g.state_dict())
    (tmp_path / "bare" / "generator.json").write_text(
        (tmp_path / "run" / "checkpoint-final" / "generator.json").read_text()
    )
    load_model(tmp_path / "bare" / "generator.safetensors", "generator", "digits")
    with pytest.raises(DiffalignError, match="not found"):
        resolve_weights(tmp_path / "nothing")
    with pytest.raises(DiffalignError, match="no generator.safetensors"):
        resolve_weights(tmp_path)
    with pytest.raises(DiffalignError, match="holds a generator, expected a classifier"):
        load_model(tmp_path / "run" / "checkpoint-final" / "generator.safetensors", "classifier")
    # weights that do not fit the recorded config
    cfg_d = json.loads((tmp_path / "bare" / "generator.json").read_text())
    cfg_d["hidden"] = 128
    save_tensors(
        tmp_path / "bad" / "generator.safetensors",
        g.state_dict(),
        metadata={"config": json.dumps(cfg_d)},
    )
    with pytest.raises(DiffalignError, match="do not fit"):
        load_model(tmp_path / "bad")


def test_cli_train_gan_tiny(tmp_path, capsys):
    out = tmp_path / "gan"
    rc = main(
        [
            "noise", "toy", "train-gan", "--output-dir", str(out), "--max-steps", "4",
            "--batch-size", "16", "--max-items", "64",
        ]
    )  # fmt: skip
    assert rc == 0
    assert (out / "checkpoint-final" / "generator.safetensors").is_file()
    assert (out / "train_summary.json").is_file()
    assert list((out / "validation").glob("step-*/samples.png"))
    # SPEC E: TensorBoard is the default tracker (it was none for the toy verbs)
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    load_model(out, "generator", "digits")
    # an existing run is refused without --overwrite / --resume
    rc = main(["noise", "toy", "train-gan", "--output-dir", str(out), "--max-steps", "4"])
    assert rc == 2 and "already holds a training run" in capsys.readouterr().err


def test_cli_help_lists_verbs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["noise", "toy", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for verb in ("train-gan", "assign", "sft", "direct-sft", "em", "evaluate"):
        assert verb in text


def test_cli_refusal_of_a_used_run_folder_names_the_cli_options(tmp_path, capsys):
    """The refusal spoke Python to CLI users ("resume='latest'", "overwrite=True")."""
    out = tmp_path / "gan"
    argv = ["noise", "toy", "train-gan", "--output-dir", str(out), "--max-steps", "1"]
    argv += ["--batch-size", "4", "--max-items", "8"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--resume latest" in err and "--overwrite" in err, err
    assert "resume='latest'" not in err and "overwrite=True" not in err, err


@pytest.mark.parametrize("verb", ["train-gan", "sft", "direct-sft"])
def test_toy_trainers_log_to_tensorboard_by_default(verb):
    """SPEC E: the training loop's trackers default to TensorBoard, the toy verbs' too."""
    from diffalign.cli import build_parser

    argv = ["noise", "toy", verb, "--output-dir", "o", "--generator-ckpt", "g"]
    argv += ["--manifest-path", "m"]
    known, _ = build_parser().parse_known_args(argv)
    assert known.tracker == "tensorboard"
