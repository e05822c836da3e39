"""`diffalign make-tiny`: tiny models in the real on-disk format, loaded by the real loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffalign.cli import main
from diffalign.engine import tiny
from diffalign.engine.errors import DiffalignError


def _load(path):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(path)


def test_kinds_registry():
    assert {"sd3", "sd35"} <= set(tiny.TINY_KINDS)
    with pytest.raises(DiffalignError, match="choose one of: .*sd3"):
        tiny.tiny_kind("no-such-kind")


def test_every_family_module_imports_first():
    """A family module imported before `engine.tiny` (as a bench does with `tiny_flux`) loads, and
    the registry then holds every kind (the import-time discovery made this an import circle)."""
    import pkgutil
    import subprocess
    import sys

    import diffalign.engine as engine_pkg

    names = [
        m.name for m in pkgutil.iter_modules(engine_pkg.__path__) if m.name.startswith("tiny_")
    ]
    assert {"tiny_flux", "tiny_flux1", "tiny_qwenimage"} <= set(names)
    for first in names:  # each module first, in its own interpreter
        order = [first] + [n for n in names if n != first]
        code = "; ".join(f"import diffalign.engine.{n}" for n in order)
        code += "; from diffalign.engine.tiny import kind_names; print(len(kind_names()))"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, f"{first}: {done.stderr[-400:]}"
        assert int(done.stdout) == len(tiny.kind_names())


def test_sd3_folder_layout_and_generation(tiny_model_dir):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
    )
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    path = tiny_model_dir("sd3")
    index = json.loads((Path(path) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    for name in ("transformer", "vae", "text_encoder", "text_encoder_3", "tokenizer_3"):
        assert index[name][1] is not None

    pipe = _load(path)
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_3, T5EncoderModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)

    cfg = pipe.transformer.config
    assert cfg.num_layers == 4
    assert cfg.num_attention_heads * cfg.attention_head_dim == cfg.caption_projection_dim == 32
    assert cfg.joint_attention_dim == pipe.text_encoder_3.config.d_model
    clip_proj = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert cfg.pooled_projection_dim == clip_proj
    assert cfg.qk_norm is None and not cfg.dual_attention_layers

    # the pipeline's own text encoding: 77 CLIP tokens + 256 T5 tokens, as in the real SD3
    emb, _, pooled, _ = pipe.encode_prompt(
        "a cat", "a cat", "a cat", do_classifier_free_guidance=False
    )
    assert emb.shape == (1, 77 + 256, cfg.joint_attention_dim)
    assert pooled.shape == (1, clip_proj)
    other, _, _, _ = pipe.encode_prompt(
        "a dog", "a dog", "a dog", do_classifier_free_guidance=False
    )
    assert not torch.equal(emb, other)  # prompts are really tokenized, not all <unk>

    out = pipe(
        "a cat",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_sd35_structure(tiny_model_dir):
    pipe = _load(tiny_model_dir("sd35"))
    cfg = pipe.transformer.config
    assert cfg.qk_norm == "rms_norm"
    assert tuple(cfg.dual_attention_layers) == (0,)
    blocks = pipe.transformer.transformer_blocks
    assert blocks[0].attn2 is not None and blocks[1].attn2 is None
    assert blocks[0].attn.norm_q is not None
    image = pipe("a cat", num_inference_steps=1, height=32, width=32).images[0]
    assert image.size == (32, 32)


def test_tokenizers_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    clip, t5 = tiny.tiny_clip_tokenizer(), tiny.tiny_t5_tokenizer()
    ids = clip("a cat").input_ids
    assert ids[0] == clip.bos_token_id == 512 and ids[-1] == clip.eos_token_id == 513
    assert t5("a cat").input_ids[-1] == t5.eos_token_id == 1
    assert t5.pad_token_id == 0
    clip.save_pretrained(tmp_path / "clip")
    t5.save_pretrained(tmp_path / "t5")
    assert AutoTokenizer.from_pretrained(tmp_path / "clip")("a cat").input_ids == ids
    again = AutoTokenizer.from_pretrained(tmp_path / "t5")
    assert again("a cat!").input_ids == t5("a cat!").input_ids


def test_seed_determinism_and_overrides(tmp_path):
    from safetensors.torch import load_file

    a = tiny.make_tiny("sd3", tmp_path / "a", seed=3, num_layers=2)
    b = tiny.make_tiny("sd3", tmp_path / "b", seed=3, num_layers=2)
    c = tiny.make_tiny("sd3", tmp_path / "c", seed=4, num_layers=2)
    f = "transformer/diffusion_pytorch_model.safetensors"
    wa, wb, wc = (load_file(str(p / f)) for p in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    cfg = json.loads((a / "transformer/config.json").read_text())
    assert cfg["num_layers"] == 2


def test_cli_overrides_and_bigger_text_width(tmp_path):
    out = tmp_path / "m"
    rc = main(
        [
            "make-tiny",
            "sd35",
            "--out",
            str(out),
            "--num-layers",
            "3",
            "--num_attention_heads",
            "2",
            "--attention-head-dim",
            "16",
            "--joint-attention-dim",
            "48",
            "--dual-attention-layers",
            "0,2",
        ]
    )
    assert rc == 0
    pipe = _load(out)
    cfg = pipe.transformer.config
    assert (cfg.num_layers, cfg.caption_projection_dim, cfg.joint_attention_dim) == (3, 32, 48)
    assert tuple(cfg.dual_attention_layers) == (0, 2)
    assert pipe.text_encoder_3.config.d_model == 48
    assert pipe("x", num_inference_steps=1, height=16, width=16).images[0].size == (16, 16)


def test_refuses_non_empty_out_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["make-tiny", "sd3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0] and "--overwrite" in err[0]
    assert (out / "keep.txt").read_text() == "precious"
    assert main(["make-tiny", "sd3", "--out", str(out), "--overwrite", "--num-layers", "2"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folders left


def test_bad_kind_and_bad_overrides_are_one_line_errors(tmp_path, capsys):
    assert main(["make-tiny", "sdxxl", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sd3" in err[0] and "sd35" in err[0]
    assert main(["make-tiny", "sd3", "--out", str(tmp_path / "y"), "--num-layers", "0"]) == 2
    assert "num_layers" in capsys.readouterr().err
    assert (
        main(["make-tiny", "sd3", "--out", str(tmp_path / "z"), "--dual-attention-layers", "0"])
        == 2
    )
    assert "dual_attention_layers" in capsys.readouterr().err
    rc = main(["make-tiny", "sd35", "--out", str(tmp_path / "w"), "--dual-attention-layers", "9"])
    assert rc == 2 and "outside" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written on any failure


def test_failing_builder_leaves_nothing_behind(tmp_path):
    @tiny.register_kind("_broken_for_test", "raises half-way")
    def _broken(out, seed):
        (out / "half.txt").write_text("x")
        raise RuntimeError("boom")

    try:
        with pytest.raises(RuntimeError):
            tiny.make_tiny("_broken_for_test", tmp_path / "m")
        assert not any(tmp_path.iterdir())
    finally:
        tiny._KINDS.pop("_broken_for_test")
        tiny.TINY_KINDS.remove("_broken_for_test")
