"""`diffalign noise toy optimize`: the method's proof on the digits generator (quick sizes)."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from diffalign.noise.toy.models import ToyModelConfig, build_model, save_model
from diffalign.noise.toy.onestep import (
    ToyClassifierReward,
    ToyOneStepGenerator,
    parse_class_prompt,
)


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    torch.manual_seed(0)
    g = build_model(ToyModelConfig.for_dataset("generator", "digits"))
    out = tmp_path_factory.mktemp("gen")
    save_model(g, out)
    return out


@pytest.fixture(scope="module")
def proof_run(gen_dir, tmp_path_factory):
    import contextlib
    import io

    out = tmp_path_factory.mktemp("toyopt") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(
            [
                "noise",
                "toy",
                "optimize",
                "--reward",
                "classifier",
                "--generator-ckpt",
                str(gen_dir),
                "--output-dir",
                str(out),
                "--classifier-steps",
                "80",
                "--classes",
                "1",
                "digit 4",
                "7",
                "--steps",
                "12",
                "--images-per-prompt",
                "8",
                "--heldout-noise",
                "512",
                "--save-every",
                "6",
            ]
        )
    capsys_text = buf.getvalue()
    return code, out, capsys_text


def test_proof_holds_on_a_quick_run(proof_run):
    code, out, printed = proof_run
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    proof = summary["proof"]
    assert proof["all_checks_passed"], proof["checks"]
    assert proof["mean_reward_last"] > proof["mean_reward_step0"]
    assert proof["max_orthogonality_error"] < 1e-5
    assert proof["min_fresh_qz_ks_pvalue"] > proof["ks_threshold_per_class"]
    assert [c["prompt"] for c in proof["per_class"]] == ["1", "digit 4", "7"]
    for c in proof["per_class"]:
        assert c["reward_best"] > c["reward_step0"]
    # in-sample and held-out side by side: the held-out gain is zero up to Monte Carlo error
    table = proof["table"]
    assert [r["class"] for r in table] == ["1", "digit 4", "7", "mean"]
    for r, c in zip(table, proof["per_class"]):
        assert r["in_sample_best"] == c["reward_best"]
        assert r["heldout_q"] - r["heldout_identity"] == pytest.approx(r["heldout_gain"], abs=1e-6)
        assert abs(r["heldout_gain"]) <= 4 * r["heldout_gain_se"]
    assert proof["checks"]["heldout_gain_within_noise"] is True
    assert isinstance(proof["reward_saturated"], bool)
    assert "held-out: Q = I -> Q" in printed and "mean" in printed
    # the `noise optimize` layout, one folder per class
    for i in range(3):
        d = out / f"prompt_{i}"
        for name in ("best.png", "step_000.png", "step_006.png", "step_012.png"):
            assert (d / name).is_file(), name
        assert not (d / "step_001.png").exists()  # --save-every 6 reaches run_optimize
        hist = json.loads((d / "reward_history.json").read_text())
        assert len(hist["reward"]) == 13


def test_the_proof_can_fail(gen_dir, tmp_path):
    """With lr = 0 nothing moves: the reward does not rise and the check says so."""
    from diffalign.noise.optimize import OptimizeSettings
    from diffalign.noise.toy.optimize import toy_optimize

    classifier_dir = tmp_path / "run" / "classifier"
    s = toy_optimize(
        gen_dir,
        tmp_path / "run",
        classifier_steps=20,
        classes=["2"],
        settings=OptimizeSettings(steps=2, lr=1e-12, images_per_prompt=2),
        heldout_noise=64,
        show_progress=False,
    )
    assert classifier_dir.is_dir()
    assert s["proof"]["checks"]["reward_rises"] is False
    assert s["proof"]["all_checks_passed"] is False


def test_reward_and_prompts(gen_dir):
    from diffalign.noise.toy.models import load_model

    g, _ = load_model(gen_dir, "generator")
    gen = ToyOneStepGenerator(g)
    assert parse_class_prompt("digit 3") == 3 and parse_class_prompt(" 9 ") == 9
    assert parse_class_prompt("cat", dataset="cifar10") == 3
    for bad in ("10", "dog", ""):
        with pytest.raises(DiffalignError, match="not a class"):
            parse_class_prompt(bad)
    z = gen.sample_noise(4, generator=torch.Generator().manual_seed(0))
    images = gen.generate(z, gen.encode_prompts(["0", "1", "2", "3"]))
    assert images.shape == (4, 3, 8, 8) and 0 <= float(images.min()) <= float(images.max()) <= 1
    torch.manual_seed(0)
    clf = build_model(ToyModelConfig.for_dataset("classifier", "digits"))
    reward = ToyClassifierReward(clf)
    r = reward(images, ["0", "1", "2", "3"])
    logp = torch.log_softmax(clf(images[:, :1] * 2 - 1), 1)
    assert torch.allclose(r, logp[torch.arange(4), torch.arange(4)], atol=1e-6)
    assert torch.allclose(reward.loss(images, ["0", "1", "2", "3"]), -r)
    with pytest.raises(DiffalignError, match="not finite"):
        reward(torch.full_like(images, float("nan")), ["0"] * 4)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--reward", "clip"], "unknown toy reward"),
        (["--classes", "11"], "not a class"),
        (["--steps", "0"], "--steps"),
        (["--generator-ckpt", "/nonexistent/run"], "not found"),
    ],
)
def test_bad_input(gen_dir, tmp_path, capsys, extra, message):
    args = ["noise", "toy", "optimize", "--output-dir", str(tmp_path / "o")]
    if "--generator-ckpt" not in extra:
        args += ["--generator-ckpt", str(gen_dir)]
    try:
        code = main(args + ["--classifier-steps", "5"] + extra)
    except SystemExit as e:  # argparse's own one-line errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("diffalign") and message in err, err


def test_paired_gain():
    """The held-out gain is a paired mean with its standard error."""
    from diffalign.noise.toy.optimize import paired_gain

    after, before = torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([0.0, 1.0, 1.0, 2.0])
    gain, se = paired_gain(after, before)
    d = after - before
    assert gain == pytest.approx(2.0) and se == pytest.approx(float(d.std() / 2.0))


def test_a_saturated_reward_is_flagged(gen_dir, tmp_path):
    """A classifier that is sure of the class whatever the image (p ~ 1): nothing to gain, and
    the proof says the reward is saturated."""
    from diffalign.noise.optimize import OptimizeSettings
    from diffalign.noise.toy.optimize import toy_optimize

    torch.manual_seed(0)
    clf = build_model(ToyModelConfig.for_dataset("classifier", "digits"))
    with torch.no_grad():
        clf.head.weight.zero_()
        clf.head.bias.zero_()
        clf.head.bias[2] = 20.0
    save_model(clf, tmp_path / "clf")
    s = toy_optimize(
        gen_dir,
        tmp_path / "run",
        classifier_ckpt=str(tmp_path / "clf"),
        classes=["2"],
        settings=OptimizeSettings(steps=2, lr=0.05, images_per_prompt=2),
        heldout_noise=64,
        save_every=0,
        show_progress=False,
    )
    assert s["proof"]["reward_saturated"] is True
    assert s["proof"]["heldout_mean_p_class_identity"] > 0.999
