"""`diffalign demo --quick` end to end: the project's main job (spec N, issue 3)."""

from __future__ import annotations

import json

from diffalign.cli import main


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    stdout = capsys.readouterr().out.rstrip().splitlines()
    # the comparison table comes last
    assert stdout[-6].startswith("method") and "accuracy" in stdout[-6] and "FD" in stdout[-6]
    assert [line.split("|")[0].strip() for line in stdout[-4:]] == [
        "base GAN",
        "direct SFT",
        "matched SFT",
        "EM (+1 cycle)",
    ]
    s = json.loads((out / "summary.json").read_text())
    assert set(s["methods"]) == {"base", "direct", "matched", "em"}
    for m in s["methods"].values():
        for key in ("recon_mse_before", "recon_mse_after", "accuracy", "fd"):
            assert isinstance(m[key], float)
        assert m["recon_mse_after"] <= m["recon_mse_before"]
    assert {"classifier_test_accuracy", "fd_real_train_vs_test"} <= set(s["reference"])
    stages = {"train_gan", "noise_theory", "classifier", "assign", "direct_sft", "matched_sft"}
    assert stages | {"em_cycle", "evaluate", "report", "total"} <= set(s["timings"])
    assert s["quick"] is True and s["assign"]["finished"] == s["sizes"]["train_items"]
    report = (out / "report.md").read_text()
    assert "matched SFT" in report and "--quick" in report
    for png in (
        "samples_comparison.png",
        "samples_base.png",
        "samples_direct.png",
        "samples_matched.png",
        "samples_em.png",
        "loss_gan.png",
        "loss_sft.png",
        "noise_orthogonal_gaussian_final.png",
    ):
        assert (out / png).stat().st_size > 1000, png

    # re-running into the same folder is refused (nothing is touched) unless --overwrite
    before = (out / "summary.json").read_bytes()
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before


def test_demo_refuses_to_delete_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["demo", "--quick", "--overwrite", "--output-dir", str(tmp_path)]) == 2
    assert "not a diffalign demo output" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me"
