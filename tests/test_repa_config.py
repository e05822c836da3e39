"""U-REPA configuration: every shipped config loads, typed overrides, unknown keys name themselves."""

from pathlib import Path

import pytest

from diffalign.engine.errors import DiffalignError
from diffalign.repa.config import RepaTrainConfig, config_differences, load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("repa_*.yaml"))


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"repa_track_a.yaml", "repa_track_b.yaml"} <= names
    assert len([n for n in names if n.startswith("repa_ablation_")]) >= 12


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RepaTrainConfig)
    assert cfg.data_dir and cfg.output_dir


def test_track_a_is_the_seed_and_track_b_is_online():
    a = load_config(CONFIGS[0].parent / "repa_track_a.yaml")
    assert (a.lora_rank, a.lora_alpha, a.align_coeff, a.align_warmup_steps) == (8, 8.0, 0.5, 3000)
    assert (a.manifold_weight, a.cfg_dropout, a.lr, a.batch_size) == (3.0, 0.1, 1e-4, 128)
    assert (a.ema_decay, a.warmup_ratio, a.max_grad_norm, a.mixed_precision) == (
        0.9995,
        0.1,
        1.0,
        "bf16",
    )
    assert a.prediction_type == "v_prediction" and a.teacher == "cached"
    assert (a.lora_weight_decay, a.head_weight_decay) == (0.0, 0.01)
    b = load_config(CONFIGS[0].parent / "repa_track_b.yaml")
    assert b.teacher == "online" and b.lora_rank == 8  # inherited from Track A
    ab = load_config(CONFIGS[0].parent / "repa_ablation_multi_layer.yaml")
    assert ab.align_layers == ["enc_last", "mid", "dec_first"]


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        CONFIGS[0].parent / "repa_track_a.yaml",
        {
            "lora-rank": "16",
            "lr": "3e-5",
            "lora_conv": "true",
            "manifold_cap": "0.1",
            "align_layers": "mid,dec_first",
            "ema_decay": "none",
        },
    )
    assert cfg.lora_rank == 16 and cfg.lr == 3e-5 and cfg.lora_conv is True
    assert cfg.manifold_cap == 0.1 and cfg.align_layers == ["mid", "dec_first"]
    assert cfg.ema_decay is None
    with pytest.raises(DiffalignError, match=r"--lora-rank: lora_rank: '8.5' is not a valid int"):
        load_config(None, {"data_dir": "x", "lora_rank": "8.5"})
    with pytest.raises(
        DiffalignError, match=r"--lora-conv: lora_conv: 'maybe' is not a valid bool"
    ):
        load_config(None, {"data_dir": "x", "lora_conv": "maybe"})


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data_dir: x\nlora_rnak: 16\n")
    with pytest.raises(
        DiffalignError, match=r"unknown key 'lora_rnak' \(did you mean 'lora_rank'\?\)"
    ):
        load_config(bad)
    with pytest.raises(DiffalignError, match="unknown key 'bogus'"):
        load_config(None, {"data_dir": "x", "bogus": "1"})


def test_bad_files_and_values(tmp_path):
    with pytest.raises(DiffalignError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(DiffalignError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(DiffalignError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "cycle.yaml").write_text("base: cycle.yaml\n")
    with pytest.raises(DiffalignError, match="cycle"):
        load_config(tmp_path / "cycle.yaml")
    with pytest.raises(DiffalignError, match="teacher must be one of"):
        load_config(None, {"data_dir": "x", "teacher": "live"})
    with pytest.raises(DiffalignError, match="data_dir is not set"):
        load_config(None, {})
    with pytest.raises(DiffalignError, match="cfg_dropout"):
        load_config(None, {"data_dir": "x", "cfg_dropout": "1.5"})


def test_config_differences_ignore_run_keys():
    a = {"lora_rank": 8, "output_dir": "a", "num_workers": 8}
    b = {"lora_rank": 16, "output_dir": "b", "num_workers": 0}
    assert config_differences(a, b) == ["lora_rank"]
