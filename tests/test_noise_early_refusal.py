"""`noise toy train-gan | sft | direct-sft` and the EM loops (`noise toy em`, `noise em`) refuse a
used output folder, or a resume into a run made with other settings, before any model (or the
toy data) loads (`engine.checkpoints.check_before_setup`; `noise em`'s E-step datasets and
`noise build-dataset` through `noise.dataset.check_dataset_before_loading`; `noise assign`, which
has no resume, through `noise.assign.check_assign_image_before_loading`): one line, exit 2, the
folder as it was; the same settings still resume, and --overwrite removes nothing before the
setup succeeded."""

from __future__ import annotations

import shutil

import pytest
import torch

from diffalign.cli import main
from folder_helpers import file_mtimes
from noise_data_helpers import model_args, write_pairs


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A digits generator and an assignment of 16 items with it."""
    from diffalign.noise.toy.assignment import assign
    from diffalign.noise.toy.data import load_dataset
    from diffalign.noise.toy.models import ToyModelConfig, build_model, save_model

    root = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    save_model(build_model(ToyModelConfig.for_dataset("generator", "digits")), root / "base")
    data = load_dataset("digits", "train").subset(range(16))
    assign(root / "base", root / "asg", data=data, assign_steps=1, write_plots=False)
    return root


@pytest.fixture
def loads(monkeypatch):
    """The names of the model and data loaders called, in order (each still loads)."""
    import diffalign.noise.generators as generators
    import diffalign.noise.toy.data as toy_data
    import diffalign.noise.toy.finetune as finetune
    import diffalign.noise.toy.gan as gan
    import diffalign.noise.toy.models as toy_models

    calls = []

    def recording(module, name):
        real = getattr(module, name)

        def load(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, load)

    for module, name in (
        (toy_models, "load_model"),  # the toy assignment's (E-step) loader
        (finetune, "load_model"),
        (toy_data, "load_dataset"),  # direct-sft's targets
        (gan, "load_dataset"),
        (generators, "load_generator"),  # `noise em`'s
    ):
        recording(module, name)
    return calls


def _refused(argv, capsys, *words) -> None:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), (argv, err)


TRAIN = ["--max-steps", "1", "--checkpoint-every", "1", "--batch-size", "8"]


@pytest.mark.parametrize("verb", ["sft", "direct-sft", "train-gan"])
def test_toy_trainers_refuse_before_loading(toy, tmp_path, verb, loads, capsys):
    out = tmp_path / "run"
    gen = ["--generator-ckpt", str(toy / "base")]
    argv = {
        "sft": [*gen, "--manifest-path", str(toy / "asg")],
        "direct-sft": [*gen, "--max-items", "8"],  # the targets come from the dataset split
        "train-gan": ["--max-items", "16"],
    }[verb]
    base = ["noise", "toy", verb, *argv, "--output-dir", str(out), *TRAIN, "--tracker", "none"]
    assert main(base) == 0
    before, loads[:] = file_mtimes(out), []
    for extra, words in (
        ([], ("already holds a training run", "--resume latest", "--overwrite")),
        (["--lr", "1e-2"], ("already holds a training run", "another output folder")),
        (["--resume", "latest", "--lr", "1e-2"], ("cannot resume", "task.lr")),
        (["--resume", "latest", "--seed", "7"], ("cannot resume", "loop.seed")),
    ):
        _refused([*base, *extra], capsys, *words)
        assert loads == [], extra  # refused before a model or the data loaded (old code: after)
    assert file_mtimes(out) == before
    # a refused run into a new folder leaves no folder behind
    fresh = [a if a != str(out) else str(tmp_path / "new" / "run") for a in base]
    _refused([*fresh, "--resume", str(tmp_path / "nope")], capsys, "resume checkpoint not found")
    assert not (tmp_path / "new").exists() and loads == []

    # --overwrite with a generator (train-gan: data) that cannot load: the run is still there
    if verb == "train-gan":
        _refused([*base, "--dataset", "mnist", "--overwrite"], capsys, "--data-dir")
    else:
        bad = [a if a != str(toy / "base") else str(tmp_path / "missing") for a in base]
        _refused([*bad, "--overwrite"], capsys, "missing")
    assert file_mtimes(out) == before

    # the same settings resume (one step more at the constant lr)
    more = [*base, "--resume", "latest"]
    more[more.index("--max-steps") + 1] = "2"
    capsys.readouterr()
    assert main(more) == 0
    assert loads and "(2 steps)" in capsys.readouterr().out


def test_toy_em_refuses_a_resume_with_other_settings_before_the_e_step(
    toy, tmp_path, loads, capsys
):
    """A re-run resumes the unfinished M-step; with another --lr (or --assign-steps: its E-step)
    it is refused before the first E-step loads a generator (old code: after it loaded)."""
    out = tmp_path / "em"
    base = [
        "noise", "toy", "em", "--generator-ckpt", str(toy / "base"), "--output-dir", str(out),
        "--num-cycles", "1", "--max-items", "8", "--assign-steps", "1", *TRAIN,
    ]  # fmt: skip
    assert main(base) == 0
    shutil.rmtree(out / "cycle-000" / "sft" / "checkpoint-final")  # killed before its export
    before, loads[:] = file_mtimes(out), []
    _refused([*base, "--lr", "1e-2"], capsys, "cannot resume", "task.lr", "--resume restart")
    _refused([*base, "--assign-steps", "2"], capsys, "holds an assignment", "(assign_steps)")
    assert loads == []
    assert file_mtimes(out) == before
    more = list(base)
    more[more.index("--max-steps") + 1] = "2"
    capsys.readouterr()
    assert main(more) == 0, capsys.readouterr().err
    run = (out / "cycle-000" / "sft" / "run_config.json").read_text()
    assert "checkpoint-1" in run and loads  # resumed from its checkpoint


ARGS = ["--num-cycles", "1", "--assign-steps", "1", "--train-max-steps", "1"]
ARGS += ["--train-batch-size", "2", "--tracker", "none", "--no-plots", "--num-intermediates", "0"]


def test_noise_em_refuses_a_resume_with_other_settings_before_loading(
    tiny_model_dir, tmp_path, loads, capsys
):
    """`noise em` resumes an unfinished M-step; with another --train-lr (or --assign-steps: its
    E-step's dataset) it is refused before the generator loads, naming its own options;
    --overwrite with a model that cannot load leaves the cycles; the same settings resume."""
    sdxl = tiny_model_dir("sdxl")
    data = write_pairs(tmp_path / "data", n=2)
    work = tmp_path / "em"
    base = ["noise", "em", "--data-root", str(data), "--output-dir", str(work), *ARGS]
    base += ["--checkpoint-every", "1", *model_args(sdxl)]
    assert main(base) == 0
    shutil.rmtree(work / "cycle-000" / "sft" / "checkpoint-final")  # killed before its export
    before, loads[:] = file_mtimes(work), []
    words = ("cannot resume", "task.lr", "--resume restart", "--overwrite", "--output-dir")
    _refused([*base, "--train-lr", "1e-2"], capsys, *words)
    # the E-steps' datasets too (old code: refused once the generator had loaded)
    _refused([*base, "--assign-steps", "2"], capsys, "holds a dataset", "(steps)", "--overwrite")
    assert loads == []  # old code: the E-step loaded the generator first
    assert file_mtimes(work) == before

    missing = [a if a != sdxl else str(tmp_path / "missing") for a in base]
    capsys.readouterr()
    assert main([*missing, "--overwrite"]) == 2
    assert file_mtimes(work) == before  # the cycles go only once the initial model loaded

    more = list(base)
    more[more.index("--train-max-steps") + 1] = "2"
    capsys.readouterr()
    assert main(more) == 0, capsys.readouterr().err
    run = (work / "cycle-000" / "sft" / "run_config.json").read_text()
    assert "checkpoint-1" in run and loads


def test_build_dataset_refuses_other_settings_before_loading(
    tiny_model_dir, tmp_path, loads, capsys
):
    """`noise build-dataset` into a folder that holds a dataset made with other settings: one
    line before the generator loads (old code: after); the same settings resume."""
    data = write_pairs(tmp_path / "data", n=2)
    out = tmp_path / "ds"
    base = ["noise", "build-dataset", "--data-root", str(data), "--output-dir", str(out)]
    base += ["--steps", "1", "--no-plots", "--num-intermediates", "0"]
    base += model_args(tiny_model_dir("sdxl"))
    assert main(base) == 0
    before, loads[:] = file_mtimes(out), []
    _refused([*base, "--steps", "2"], capsys, "holds a dataset", "(steps)", "--overwrite")
    _refused([*base, "--max-items", "1"], capsys, "holds a dataset", "(num_items)")
    assert loads == []
    assert file_mtimes(out) == before
    assert main(base) == 0 and loads == ["load_generator"]


def test_assign_refuses_a_held_folder_before_loading(tiny_model_dir, tmp_path, loads, capsys):
    """`noise assign` into a folder that holds an assignment (it has no resume: refused
    whatever the settings) or is a file: one line before the generator loads (old code: after;
    --overwrite replacing it: test_newuser_20)."""
    target = write_pairs(tmp_path / "data", n=1) / "images" / "0000.png"
    out = tmp_path / "asg"
    base = ["noise", "assign", "--prompt", "a cat", "--target-image", str(target), "--steps", "1"]
    base += ["--num-intermediates", "0", *model_args(tiny_model_dir("sdxl"))]
    assert main([*base, "--output-dir", str(out)]) == 0
    before, loads[:] = file_mtimes(out), []
    for extra in ([], ["--steps", "2"]):
        _refused([*base, "--output-dir", str(out), *extra], capsys, "holds an assignment")
    (tmp_path / "file").write_text("x")
    _refused([*base, "--output-dir", str(tmp_path / "file")], capsys, "is not a folder")
    assert loads == []  # old code: the generator loaded first
    assert file_mtimes(out) == before
    from diffalign.noise.assign import check_assign_image_before_loading

    check_assign_image_before_loading("a cat", out, overwrite=True)  # goes on to load
