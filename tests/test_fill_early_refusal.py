"""`fill train` refuses a used output folder, or a --resume into a run made with other settings,
before the pipeline loads or the text cache is filled (the text encoders never run)."""

from __future__ import annotations

import pytest

from fill_helpers import tiny_train_args, write_triptychs


@pytest.fixture(scope="module")
def flux(tiny_model_dir):
    return tiny_model_dir("flux-fill")


def test_mismatched_resume_and_used_folder_refused_before_loading(
    flux, tmp_path, capsys, monkeypatch
):
    import diffalign.fill.train as fill_train
    from diffalign.cli import main

    data = write_triptychs(tmp_path / "data", n=2)
    out = tmp_path / "run"
    common = dict(max_steps=1, num_validation=0, cache_text="true")
    assert main(tiny_train_args(flux, data, out, **common)) == 0
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    loads = []
    real_load = fill_train.load_fill_pipeline

    def load(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(fill_train, "load_fill_pipeline", load)
    for extra, words in (
        ({"resume": "latest", "lora_alpha": 32}, ("cannot resume", "lora_alpha")),
        ({"resume": "latest", "semantic_heads": 4}, ("cannot resume", "semantic_heads")),
        ({"resume": "latest", "seed": 7}, ("cannot resume", "seed")),
        ({}, ("already holds a training run", "--resume latest")),
        ({"lora_alpha": 32}, ("already holds a training run", "--overwrite")),
    ):
        capsys.readouterr()
        assert main(tiny_train_args(flux, data, out, **{**common, **extra})) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), (extra, err)
        assert loads == [], extra  # refused before any model (text encoders included) loaded
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # nothing lost

    # the same settings still resume (more steps at a constant lr), --overwrite starts over
    resume = {**common, "max_steps": 2, "resume": "latest"}
    assert main(tiny_train_args(flux, data, out, **resume)) == 0
    over = {**common, "lora_alpha": 32, "overwrite": "true"}
    assert main(tiny_train_args(flux, data, out, **over)) == 0
    assert len(loads) == 2
