"""FLUX Fill training (spec F: Model, Train): flow-matching math against references, LoRA targets,
init identity, config files, train -> stop -> resume equals the uninterrupted run, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffalign.engine.errors import DiffalignError
from diffalign.fill import flow
from fill_helpers import tiny_train_args, write_triptychs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flux(tiny_model_dir):
    return tiny_model_dir("flux-fill")


@pytest.fixture(scope="module")
def triptychs(tmp_path_factory):
    return write_triptychs(tmp_path_factory.mktemp("trip"), n=3)


# ---------------------------------------------------------------------------------------------
# flow-matching math (pure functions) against slow references


def test_interpolation_target_and_loss_match_loops():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    t = torch.tensor([0.0, 0.3, 1.0])
    xt = flow.interpolate(x0, x1, t)
    for b in range(3):
        for i in range(5):
            for c in range(4):
                want = (1 - t[b]) * x0[b, i, c] + t[b] * x1[b, i, c]
                assert abs(float(xt[b, i, c] - want)) < 1e-6
    assert torch.equal(flow.velocity_target(x0, x1), x1 - x0)
    pred = torch.randn(3, 5, 4, generator=g)
    target = x1 - x0
    total = sum(
        float((pred[b, i, c] - target[b, i, c]) ** 2)
        for b in range(3)
        for i in range(5)
        for c in range(4)
    )
    assert math.isclose(float(flow.flow_matching_loss(pred, target)), total / 60, rel_tol=1e-5)
    w = torch.tensor([[1, 0, 1, 0, 0]] * 3, dtype=torch.float32)
    sel = sum(
        float((pred[b, i, c] - target[b, i, c]) ** 2)
        for b in range(3)
        for i in (0, 2)
        for c in range(4)
    )
    assert math.isclose(float(flow.flow_matching_loss(pred, target, w)), sel / 24, rel_tol=1e-5)


def test_target_token_weight_reads_the_mask_channels():
    cond = torch.zeros(1, 4, 64 + 256)
    cond[0, 2:, 64:] = 1.0  # the right half of the tokens is masked
    cond[0, :, :64] = 5.0  # masked-image latents do not count
    assert flow.target_token_weight(cond, 64).tolist() == [[0.0, 0.0, 1.0, 1.0]]


def test_time_shift_equals_the_flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    mu = flow.shift_mu(4096)
    ours = flow.time_shift(t, mu)
    for a, b in zip(ours[1:].tolist(), t[1:].tolist()):
        assert math.isclose(a, float(sched.time_shift(mu, 1.0, torch.tensor(b))), rel_tol=1e-5)
    assert float(ours[0]) == 0.0 and math.isclose(float(ours[-1]), 1.0)
    assert math.isclose(mu, 1.15, rel_tol=1e-6)  # FLUX max shift at 4096 tokens


def test_timestep_sampling_schemes():
    g = torch.Generator().manual_seed(3)
    u = flow.sample_timesteps("uniform", 1000, generator=g)
    assert torch.equal(u, torch.rand(1000, generator=torch.Generator().manual_seed(3)))
    ln = flow.sample_timesteps("logit-normal", 4000, generator=g)
    assert 0 < float(ln.min()) and float(ln.max()) < 1 and abs(float(ln.median()) - 0.5) < 0.05
    mode = flow.sample_timesteps("mode", 1000, mode_scale=1.29, generator=g)
    assert float(mode.min()) >= 0 and float(mode.max()) <= 1
    shifted = flow.sample_timesteps("uniform", 1000, mu=1.0, generator=g)
    assert float(shifted.mean()) > 0.6  # shift towards noise
    with pytest.raises(ValueError):
        flow.sample_timesteps("cosine", 2)


# ---------------------------------------------------------------------------------------------
# model: LoRA targets and the init identity


def _tiny_transformer():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16 + 64,
        out_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )


def test_lora_targets_default_all_linear_and_unknown():
    from diffalign.fill.model import DEFAULT_LORA_TARGETS, add_lora

    tr = _tiny_transformer()
    linear = [n for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)]
    add_lora(tr, rank=2, targets="default")
    with_lora = {n.rsplit(".lora_A", 1)[0] for n, _ in tr.named_parameters() if ".lora_A." in n}
    want = {n for n in linear if any(n.endswith("." + t) for t in DEFAULT_LORA_TARGETS)}
    assert with_lora == want and "transformer_blocks.0.attn.to_q" in want
    assert "single_transformer_blocks.0.attn.to_q" in want and "x_embedder" not in want
    assert all(p.requires_grad == (".lora_" in n) for n, p in tr.named_parameters())

    tr = _tiny_transformer()
    add_lora(tr, rank=2, targets="all-linear")
    with_lora = {n.rsplit(".lora_A", 1)[0] for n, _ in tr.named_parameters() if ".lora_A." in n}
    assert with_lora == set(linear) and "x_embedder" in with_lora and "proj_out" in with_lora

    with pytest.raises(DiffalignError, match="to_nothing"):
        add_lora(_tiny_transformer(), rank=2, targets="attn.to_q,to_nothing")


def test_init_output_is_bit_identical_to_the_plain_transformer():
    from diffalign.fill.model import SemanticFillTransformer, add_lora
    from diffalign.fill.weights import build_semantic

    tr = _tiny_transformer()
    g = torch.Generator().manual_seed(1)
    b, L = 2, 6
    xt, cond = torch.randn(b, L, 16, generator=g), torch.randn(b, L, 64, generator=g)
    sem = torch.randn(b, L, 16, generator=g)
    pe, pooled = torch.randn(b, 5, 32, generator=g), torch.randn(b, 32, generator=g)
    txt, img = torch.zeros(5, 3), torch.rand(L, 3)
    t = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        ref = tr(
            hidden_states=torch.cat([xt, cond], 2),
            timestep=t,
            guidance=torch.full([b], 30.0),
            pooled_projections=pooled,
            encoder_hidden_states=pe,
            txt_ids=txt,
            img_ids=img,
            return_dict=False,
        )[0]
        add_lora(tr, rank=4, targets="all-linear")
        model = SemanticFillTransformer(tr, build_semantic(16, 8, 2), guidance=30.0)
        out = model(xt, cond, t, pe, pooled, txt, img, semantic_tokens=sem)
    assert torch.equal(out, ref)
    # once the scale moves, the semantic tokens change the output
    with torch.no_grad():
        model.semantic.layers[0].scale.fill_(0.5)
        moved = model(xt, cond, t, pe, pooled, txt, img, semantic_tokens=sem)
    assert not torch.equal(moved, ref)
    # the `panel` layout's tokens: half as many (K/V only; the output keeps the latent shape)
    assert model(xt, cond, t, pe, pooled, txt, img, semantic_tokens=sem[:, :3]).shape == ref.shape
    with pytest.raises(DiffalignError, match="semantic"):  # neither L nor L/2 tokens
        model(xt, cond, t, pe, pooled, txt, img, semantic_tokens=sem[:, :2])


# ---------------------------------------------------------------------------------------------
# config


def test_every_shipped_fill_config_loads():
    from diffalign.fill.config import load_config

    files = sorted((ROOT / "configs").glob("fill_*.yaml"))
    assert files
    for f in files:
        cfg = load_config(f)
        assert cfg.model and cfg.data and cfg.lora_rank >= 1
    cfg = load_config(ROOT / "configs/fill_semantic.yaml", {"lora-rank": "8", "semantic": "false"})
    assert cfg.lora_rank == 8 and cfg.semantic is False


def test_config_errors_name_the_key(tmp_path):
    from diffalign.fill.config import load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x\nlora_rnak: 4\n")
    with pytest.raises(DiffalignError, match="lora_rnak"):
        load_config(bad)
    with pytest.raises(DiffalignError, match="lora_rank.*not a valid int"):
        load_config(None, {"data": "x", "lora_rank": "four"})
    with pytest.raises(DiffalignError, match="loss_region"):
        load_config(None, {"data": "x", "loss_region": "middle"})
    with pytest.raises(DiffalignError, match="panel"):
        load_config(None, {"data": "x", "panel": "40"})
    with pytest.raises(DiffalignError, match="lr_lora"):
        load_config(None, {"data": "x", "lr_lora": "nan"})
    with pytest.raises(DiffalignError, match="seed"):
        load_config(None, {"data": "x", "seed": "-1"})
    assert load_config(None, {"data": "x", "max_steps": "null", "epochs": "2"}).epochs == 2
    with pytest.raises(DiffalignError, match="panel 4096 is above max_panel_size 1024"):
        load_config(None, {"data": "x", "panel": "4096"})
    assert load_config(None, {"data": "x", "panel": "2048", "max_panel_size": "2048"}).panel == 2048
    with pytest.raises(DiffalignError, match="max_panel_size must be a positive multiple"):
        load_config(None, {"data": "x", "max_panel_size": "0"})


def test_train_refuses_native_panels_above_the_bound_before_loading(tmp_path, capsys):
    """Native panels above max_panel_size (`panel: null`): one error line from the dataset,
    before the model (here a folder that does not exist) is loaded."""
    from PIL import Image

    from diffalign.cli import main
    from diffalign.fill.config import FillTrainConfig
    from diffalign.fill.data import MAX_PANEL_SIZE

    assert FillTrainConfig().max_panel_size == MAX_PANEL_SIZE
    data = tmp_path / "big"
    data.mkdir()
    Image.new("RGB", (3 * 1040, 1040)).save(data / "a.png")
    (data / "a.txt").write_text("a cat\n")
    args = ["fill", "train", "--data", str(data), "--panel", "null"]
    args += ["--model", str(tmp_path / "no_model"), "--output-dir", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1040px panels, above max_panel_size 1024" in err[0], err
    assert "no_model" not in err[0]  # the model was not loaded


def test_cli_unknown_option_and_bad_config_are_one_line(tmp_path, capsys):
    from diffalign.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x\nsemantic_heads: many\n")
    assert main(["fill", "train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "semantic_heads" in err[0]
    with pytest.raises(SystemExit) as e:
        main(["fill", "train", "--lora-rnak", "3"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------
# training on make-tiny flux-fill


def _train(args) -> None:
    from diffalign.cli import main

    assert main(args) == 0


def test_train_stop_resume_equals_uninterrupted(flux, triptychs, tmp_path, monkeypatch):
    from diffalign.cli import main
    from diffalign.engine.io import load_tensors, read_json
    from diffalign.fill.train import FillTrainTask

    straight, split = tmp_path / "straight", tmp_path / "split"
    _train(tiny_train_args(flux, triptychs, straight, max_steps=4, checkpoint_every=2))

    # a run killed in its 4th step, after checkpoint-2 was written
    original = FillTrainTask.training_step

    def killed(self, batch, step, ctx):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, batch, step, ctx)

    monkeypatch.setattr(FillTrainTask, "training_step", killed)
    assert main(tiny_train_args(flux, triptychs, split, max_steps=4, checkpoint_every=2)) == 130
    assert not (split / "checkpoint-final").exists()
    monkeypatch.setattr(FillTrainTask, "training_step", original)
    _train(
        tiny_train_args(flux, triptychs, split, max_steps=4, checkpoint_every=2, resume="latest")
    )
    assert read_json(split / "run_config.json")["resumed_from"].endswith("checkpoint-2")

    def train_losses(run):
        hist = read_json(run / "summary.json")
        steps = read_json(run / "checkpoints/checkpoint-4/state.json")["history"]
        return hist, [(e["step"], e["loss"]) for e in steps if "loss" in e and "val" not in e]

    (s_sum, s_loss), (_, p_loss) = train_losses(straight), train_losses(split)
    assert [s for s, _ in s_loss] == [1, 2, 3, 4]
    assert s_loss == p_loss
    for name in ("pytorch_lora_weights.safetensors", "semantic_module.safetensors"):
        a, _ = load_tensors(straight / "checkpoint-final" / name)
        b, _ = load_tensors(split / "checkpoint-final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the cross-attention scale is logged per layer and moves away from 0
    fill = s_sum["fill"]
    assert len(fill["semantic_scales_final"]) == 1 and fill["semantic_scales_final"][0] != 0.0
    assert fill["semantic_scale_history"][0]["xattn_scale/0"] != 0.0  # after step 1's update
    assert fill["semantic_parameters"] > 0 and fill["lora_parameters"] > 0
    assert (straight / "train_history.png").is_file() and (straight / "xattn_scales.png").is_file()
    assert (straight / "validation/step-0000004/grid.png").is_file()


def test_logged_xattn_scale_is_the_scale_after_that_step(flux, triptychs, tmp_path, capsys):
    """The history's `xattn_scale/0` at step k is the module's scale after optimizer step k (the
    one checkpoint-k stores), not before it nor a mean over the log window; the end-of-run line
    shows a small scale with significant digits, not `[0.0]`."""
    from diffalign.engine.io import load_tensors, read_json

    out = tmp_path / "run"
    args = tiny_train_args(flux, triptychs, out, max_steps=3, log_every=2, num_validation=0)
    capsys.readouterr()
    _train([*args, "--keep-checkpoints", "3", "--lr-semantic", "1e-5"])
    history = read_json(out / "summary.json")["fill"]["semantic_scale_history"]
    saved = {
        k: float(
            load_tensors(out / f"checkpoints/checkpoint-{k}/semantic.safetensors")[0][
                "layers.0.scale"
            ]
        )
        for k in (1, 2, 3)
    }
    assert 0.0 < saved[1] < saved[2] < saved[3] < 1e-4
    assert [(e["step"], e["xattn_scale/0"]) for e in history] == [(2, saved[2]), (3, saved[3])]
    done = [line for line in capsys.readouterr().out.splitlines() if "[fill] done" in line]
    assert f"cross-attention scales [{saved[3]:.4g}]" in done[0], done


def test_resume_with_another_module_shape_is_one_line(flux, triptychs, tmp_path, capsys):
    from diffalign.cli import main

    out = tmp_path / "run"
    _train(tiny_train_args(flux, triptychs, out, max_steps=1, num_validation=0))
    args = tiny_train_args(flux, triptychs, out, max_steps=2, semantic_layers=2, resume="latest")
    capsys.readouterr()
    assert main(args + ["--num-validation", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot resume" in err[0] and "semantic" in err[0]
    assert (out / "checkpoint-final/semantic_module.safetensors").is_file()  # nothing lost


def test_resume_with_other_heads_or_objective_is_one_line(flux, triptychs, tmp_path, capsys):
    """Heads, layout and loss region change no tensor shape: the recorded config catches them."""
    from diffalign.cli import main

    out = tmp_path / "run"
    _train(tiny_train_args(flux, triptychs, out, max_steps=1, num_validation=0))
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    for key, value in (
        ("semantic_heads", 4),
        ("semantic_layout", "both-halves"),
        ("loss_region", "target"),
        ("lora_alpha", 32),
    ):
        args = tiny_train_args(
            flux, triptychs, out, max_steps=2, num_validation=0, resume="latest", **{key: value}
        )
        capsys.readouterr()
        assert main(args) == 2, key
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot resume" in err[0] and key in err[0], err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing lost
    # what may change: more steps at a constant lr, where logs go, how often it checkpoints
    _train(
        tiny_train_args(
            flux,
            triptychs,
            out,
            max_steps=2,
            num_validation=0,
            resume="latest",
            checkpoint_every=5,
            log_every=2,
        )
    )
    assert (out / "checkpoint-final/semantic_module.safetensors").is_file()


def test_a_second_run_into_a_locked_folder_is_refused_before_writing(
    flux, triptychs, tmp_path, capsys
):
    """Another process holds the run folder: `fill train` is one error line and writes nothing
    there (not even the text cache, filled before the training loop starts)."""
    import os
    import subprocess
    import sys

    from diffalign.cli import main

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from diffalign.engine.io import output_lock\n"
            "with output_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(60)\n",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        args = tiny_train_args(flux, triptychs, out, max_steps=1, cache_text="true")
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use" in err[0] and str(out) in err[0], err
        assert sorted(p.name for p in out.iterdir()) == [".diffalign.lock"]
    finally:
        holder.kill()
        holder.wait()


def test_loop_options_fail_before_anything_is_written(tmp_path, capsys):
    from diffalign.cli import main

    data = write_triptychs(tmp_path / "data", n=1)
    for key, value, words in (
        ("max-steps", "0", "max_steps"),
        ("keep-checkpoints", "-1", "keep_checkpoints"),
        ("checkpoint-every", "-2", "checkpoint_every"),
        ("base-dtype", "float64", "base_dtype"),
    ):
        out = tmp_path / f"run-{key}"
        args = tiny_train_args("/no/such/model", data, out, cache_text="true")
        capsys.readouterr()
        assert main([*args, f"--{key}", value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
        assert not out.exists()


def test_train_target_region_logit_normal_lora_only(flux, tmp_path):
    import json

    from diffalign.engine.io import read_json
    from fill_helpers import write_image

    data = write_triptychs(tmp_path / "data", n=2)
    write_image(data / "bad.png", (40, 16))  # wrong aspect: skipped and counted
    with open(data / "captions.jsonl", "a") as f:
        f.write(json.dumps({"image": "bad.png", "prompt": "bad"}) + "\n")
    out = tmp_path / "run"
    _train(
        tiny_train_args(
            flux,
            data,
            out,
            max_steps=1,
            semantic="false",
            loss_region="target",
            timestep_sampling="logit-normal",
            resolution_shift="true",
            lora_targets="all-linear",
            gradient_checkpointing="true",
            cache_text="true",
            num_validation=0,
        )
    )
    s = read_json(out / "summary.json")
    assert s["fill"]["semantic_parameters"] == 0 and s["fill"]["semantic_scales_final"] == []
    assert s["fill"]["data"]["used"] == 2 and s["fill"]["data"]["skipped"] == 1
    assert math.isfinite(s["final_train"]["loss"])
    assert not (out / "checkpoint-final/semantic_module.safetensors").exists()
    assert list((out / "text_cache").glob("*.safetensors"))


@pytest.mark.slow
def test_train_under_accelerate_launch_two_processes(flux, triptychs, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): one run, data sharded, one export."""
    from diffalign.engine.io import read_json
    from launch_helper import launch_two_cpu_processes

    out = tmp_path / "ddp"
    args = tiny_train_args(flux, triptychs, out, max_steps=2, cache_text="true")
    r = launch_two_cpu_processes(["-m", "diffalign", *args], timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = read_json(out / "summary.json")
    assert s["num_processes"] == 2 and s["steps"] == 2
    assert (out / "checkpoint-final/pytorch_lora_weights.safetensors").is_file()
    assert len(list((out / "text_cache").glob("*.safetensors"))) == 3  # each rank its share
    assert "3 prompts, 2 encoded now" in r.stdout  # rank 0 encoded 2 of the 3
