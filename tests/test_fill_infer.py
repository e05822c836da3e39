"""FLUX Fill inference (spec F: Infer): the exported LoRA loads into a plain FluxFillPipeline and
matches our sampler with the module at scale 0, `diffalign fill infer` end to end (one input and a
batched folder), and one-line errors for bad input with nothing already written lost."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffalign.engine.errors import DiffalignError
from fill_helpers import tiny_train_args, write_image, write_triptychs


@pytest.fixture(scope="module")
def flux(tiny_model_dir):
    return tiny_model_dir("flux-fill")


@pytest.fixture(scope="module")
def trained(flux, tmp_path_factory):
    """checkpoint-final of a 1-step run on the tiny model."""
    from diffalign.cli import main

    root = tmp_path_factory.mktemp("fill-run")
    data = write_triptychs(root / "data", n=2)
    args = tiny_train_args(flux, data, root / "run", max_steps=1, num_validation=0)
    assert main(args) == 0
    return root / "run" / "checkpoint-final"


def _one_line_error(capsys, argv) -> str:
    from diffalign.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("diffalign: error: ")
    return err[0]


def test_lora_loads_into_plain_pipeline_and_matches_our_sampler(flux, tmp_path):
    from diffalign.fill.infer import draw_noise, fresh_scheduler, sample_latents
    from diffalign.fill.model import SemanticFillTransformer, add_lora, lora_parameters
    from diffalign.fill.train import load_fill_pipeline
    from diffalign.fill.weights import (
        build_semantic,
        load_lora_into_pipeline,
        save_combined,
        save_lora,
    )

    torch.manual_seed(0)
    src = load_fill_pipeline(flux)
    cfg = add_lora(src.transformer, rank=4, alpha=8, targets="all-linear")
    for p in lora_parameters(src.transformer):
        p.data.normal_(0, 0.1)
    semantic = build_semantic(64, 8, 1)  # scale 0
    save_lora(tmp_path / "lora", src.transformer, cfg)
    save_combined(tmp_path / "both.safetensors", src.transformer, semantic, cfg)

    plain = load_fill_pipeline(flux)
    plain.load_lora_weights(str(tmp_path / "lora"))  # plain diffusers, nothing of ours
    ours = load_fill_pipeline(flux)
    load_lora_into_pipeline(ours, tmp_path / "both.safetensors")
    base = load_fill_pipeline(flux)

    g = torch.Generator().manual_seed(1)
    vis = torch.rand(1, 3, 16, 16, generator=g)
    diptych = torch.cat([vis, torch.zeros_like(vis)], -1)
    mask = torch.zeros(1, 1, 16, 32)
    mask[..., 16:] = 1
    noise = draw_noise(torch.Generator().manual_seed(3), 16, 16, 32, 8)
    pe, pooled = torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g)
    call = dict(
        prompt_embeds=pe,
        pooled_prompt_embeds=pooled,
        image=diptych,
        mask_image=mask,
        latents=noise,
        height=16,
        width=32,
        num_inference_steps=3,
        guidance_scale=30.0,
        output_type="latent",
    )
    want = plain(**call, generator=torch.Generator().manual_seed(5)).images
    untouched = base(**call, generator=torch.Generator().manual_seed(5)).images

    # our side: the fill condition as the pipeline prepares it, then our sampler + module
    init = ours.image_processor.preprocess(diptych, height=16, width=32).float()
    m = ours.mask_processor.preprocess(mask, height=16, width=32)
    mask_l, masked_l = ours.prepare_mask_latents(
        m, init * (1 - m), 1, 16, 1, 16, 32, pe.dtype, "cpu", torch.Generator().manual_seed(5)
    )
    model = SemanticFillTransformer(ours.transformer, semantic, guidance=30.0)
    got = sample_latents(
        model,
        fresh_scheduler(ours),
        noise=noise,
        cond=torch.cat([masked_l, mask_l], -1),
        img_ids=ours._prepare_latent_image_ids(1, 1, 2, "cpu", pe.dtype),
        prompt_embeds=pe,
        pooled_prompt_embeds=pooled,
        text_ids=torch.zeros(8, 3),
        steps=3,
        semantic_tokens=torch.randn(1, 2, 64, generator=g),
        guidance=30.0,
    )
    assert torch.equal(got, want)
    assert not torch.allclose(untouched, want)  # the LoRA does something


def test_infer_seed_gives_the_plain_pipelines_image(flux, trained, tmp_path):
    """`fill infer --seed s` (module off) = FluxFillPipeline with the same LoRA and
    `generator=torch.Generator().manual_seed(s)`, building its own condition from image + mask:
    the VAE samples and the noise are drawn in the pipeline's order."""
    from diffusers import FluxFillPipeline
    from PIL import Image

    from diffalign.cli import main
    from diffalign.fill.infer import load_image

    vis = write_image(tmp_path / "v.png", (16, 16), seed=3)
    out = tmp_path / "ours"
    argv = ["fill", "infer", "--model", flux, "--lora", str(trained), "--steps", "2"]
    argv += ["--max-sequence-length", "8", "--guidance", "30", "--visible", str(vis)]
    assert main([*argv, "--prompt", "a red cup", "--seed", "11", "--output", str(out)]) == 0
    ours = torch.from_numpy(np.array(Image.open(out / "v.png"))).int()

    pipe = FluxFillPipeline.from_pretrained(flux)
    pipe.load_lora_weights(str(trained))
    visible = load_image(vis, "v")[None]
    mask = torch.zeros(1, 1, 16, 32)
    mask[..., 16:] = 1.0
    image = pipe(
        prompt="a red cup",
        image=torch.cat([visible, torch.zeros_like(visible)], -1),
        mask_image=mask,
        height=16,
        width=32,
        num_inference_steps=2,
        guidance_scale=30.0,
        max_sequence_length=8,
        generator=torch.Generator().manual_seed(11),
        output_type="np",
    ).images[0]
    want = torch.from_numpy((image[:, 16:] * 255 + 0.5).astype(np.uint8)).int()  # as to_pil
    assert (ours - want).abs().max().item() == 0


def test_infer_end_to_end_single_and_folder(flux, trained, tmp_path):
    from diffalign.cli import main
    from diffalign.engine.io import read_json

    vis = write_image(tmp_path / "v.png", (16, 16), seed=1)
    sem = write_image(tmp_path / "s.png", (16, 16), seed=2)
    out = tmp_path / "one"
    common = ["--model", flux, "--lora", str(trained), "--steps", "2", "--max-sequence-length", "8"]
    argv = ["fill", "infer", *common, "--semantic-module", str(trained)]
    argv += ["--visible", str(vis), "--semantic", str(sem), "--prompt", "a photo"]
    assert main([*argv, "--output", str(out), "--save-diptych", "--seed", "7"]) == 0
    from PIL import Image

    assert Image.open(out / "v.png").size == (16, 16)
    assert Image.open(out / "v_diptych.png").size == (32, 16)
    s = read_json(out / "summary.json")
    assert s["written"] == 1 and s["semantic_module_shape"]["dim"] == 64
    # same seed, same image (the VAE sample and the noise are seeded)
    again = tmp_path / "again"
    assert main([*argv, "--output", str(again), "--seed", "7"]) == 0
    assert Image.open(again / "v.png").tobytes() == Image.open(out / "v.png").tobytes()

    folder = tmp_path / "inputs"
    folder.mkdir()
    for i in range(3):
        write_image(folder / f"im{i}_visible.png", (16, 16), seed=10 + i)
        write_image(folder / f"im{i}_semantic.png", (16, 16), seed=20 + i)
        (folder / f"im{i}.txt").write_text(f"prompt {i}\n")
    many = tmp_path / "many"
    fargs = [
        "fill",
        "infer",
        *common,
        "--semantic-module",
        str(trained / "fill_semantic.safetensors"),
    ]
    fargs += ["--input-dir", str(folder), "--output", str(many), "--batch-size", "2"]
    assert main(fargs) == 0
    assert sorted(p.name for p in many.glob("im*.png")) == ["im0.png", "im1.png", "im2.png"]
    # batching does not change an image: im1 alone (seed 1 + 1) equals im1 of the batch
    alone = tmp_path / "alone"
    single = ["fill", "infer", *common, "--semantic-module", str(trained), "--seed", "1"]
    single += ["--visible", str(folder / "im1_visible.png"), "--prompt", "prompt 1"]
    single += ["--semantic", str(folder / "im1_semantic.png"), "--output", str(alone)]
    assert main(single) == 0
    assert Image.open(alone / "im1.png").tobytes() == Image.open(many / "im1.png").tobytes()
    assert read_json(many / "summary.json")["written"] == 3
    assert main(fargs) == 0  # a rerun keeps what is there
    assert read_json(many / "summary.json")["kept_existing"] == 3
    assert [e["name"] for e in read_json(many / "summary.json")["images"]] == [
        "im0",
        "im1",
        "im2",
    ]
    # a rerun asking for diptychs makes the missing ones (and the same target panels)
    before = (many / "im2.png").read_bytes()
    assert main([*fargs, "--save-diptych"]) == 0
    assert sorted(p.name for p in many.glob("im*_diptych.png")) == [
        "im0_diptych.png",
        "im1_diptych.png",
        "im2_diptych.png",
    ]
    assert (many / "im2.png").read_bytes() == before


def test_infer_bad_inputs_are_one_line_and_keep_outputs(flux, trained, tmp_path, capsys):
    from diffalign.engine.io import load_tensors, save_tensors
    from diffalign.fill import SemanticCrossAttention
    from diffalign.fill.attention import save_semantic_module

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.png").write_bytes(b"already here")
    vis = write_image(tmp_path / "v.png", (16, 16))
    base = ["fill", "infer", "--model", flux, "--output", str(out), "--steps", "1"]
    base += ["--max-sequence-length", "8"]
    one = [*base, "--visible", str(vis), "--prompt", "p"]

    sem_big = write_image(tmp_path / "s32.png", (32, 32))
    err = _one_line_error(
        capsys, [*one, "--semantic", str(sem_big), "--semantic-module", str(trained)]
    )
    assert "same size" in err
    odd = write_image(tmp_path / "odd.png", (24, 16))
    err = _one_line_error(capsys, [*base, "--visible", str(odd), "--prompt", "p"])
    assert "divisible by 16" in err
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    err = _one_line_error(capsys, [*base, "--visible", str(corrupt), "--prompt", "p"])
    assert "cannot read image" in err
    err = _one_line_error(capsys, [*base, "--visible", str(vis), "--prompt", " "])
    assert "caption" in err
    folder = tmp_path / "nocap"
    folder.mkdir()
    write_image(folder / "a_visible.png", (16, 16))
    err = _one_line_error(capsys, [*base, "--input-dir", str(folder)])
    assert "caption" in err

    # a module of another shape, a LoRA for another base model
    other = tmp_path / "other_module.safetensors"
    save_semantic_module(other, SemanticCrossAttention(32, heads=4))
    err = _one_line_error(capsys, [*one, "--semantic", str(vis), "--semantic-module", str(other)])
    assert "dim=32" in err
    tensors, meta = load_tensors(trained / "fill_semantic.safetensors")
    first = next(k for k in tensors if k.startswith("semantic.") and tensors[k].ndim == 2)
    tensors[first] = torch.zeros(3, 3)
    save_tensors(tmp_path / "broken.safetensors", tensors, metadata=meta)
    err = _one_line_error(
        capsys,
        [*one, "--semantic", str(vis), "--semantic-module", str(tmp_path / "broken.safetensors")],
    )
    assert "do not match" in err
    lora, lmeta = load_tensors(trained / "pytorch_lora_weights.safetensors")
    key = next(k for k in lora if k.endswith("lora_A.weight"))
    lora[key] = torch.zeros(lora[key].shape[0], 3072)
    save_tensors(tmp_path / "flux_dev_lora.safetensors", lora, metadata=lmeta)
    err = _one_line_error(capsys, [*one, "--lora", str(tmp_path / "flux_dev_lora.safetensors")])
    assert "another base model" in err and "3072" in err
    sd_lora = {"unet.down_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8)}
    save_tensors(tmp_path / "sd.safetensors", sd_lora)
    err = _one_line_error(capsys, [*one, "--lora", str(tmp_path / "sd.safetensors")])
    assert "another" in err
    # an --output-dir whose <name>.png is the input itself (written over after it was read)
    err = _one_line_error(
        capsys, [*base[:5], str(tmp_path), *base[6:], "--visible", str(vis), "--prompt", "p",
                 "--overwrite"]
    )  # fmt: skip
    assert "over an input image" in err and vis.is_file()
    assert (out / "keep.png").read_bytes() == b"already here"
    assert not (out / "v.png").exists()
    assert sorted(p.name for p in out.iterdir()) == ["keep.png"]


def test_labelled_grid_has_a_header_and_row_labels(tmp_path):
    from PIL import Image

    from diffalign.engine.reports import save_labelled_grid

    cells = [[Image.new("RGB", (16, 16), (255, 0, 0))] * 4 for _ in range(2)]
    grid = save_labelled_grid(
        tmp_path / "g.png", cells, ["a", "b"], ["visible", "prediction", "target", "semantic"]
    )
    assert Image.open(tmp_path / "g.png").size == grid.size
    w, h = grid.size
    assert w > 4 * 64 and h > 2 * 64  # cells at least 64 px, plus the label column and header
    assert grid.getpixel((w - 1, h - 1)) == (255, 0, 0)
    assert grid.getpixel((1, 1)) == (255, 255, 255)


def test_semantic_layout_follows_the_training_run(tmp_path):
    from diffalign.engine.io import write_json
    from diffalign.fill.infer import resolve_semantic_layout

    run = tmp_path / "checkpoint-final"
    run.mkdir()
    write_json(run / "fill_config.json", {"semantic_layout": "both-halves"})
    module = run / "semantic_module.safetensors"
    logged = []
    assert resolve_semantic_layout(None, str(run), logged.append) == "both-halves"
    assert resolve_semantic_layout(None, str(module), logged.append) == "both-halves"
    assert resolve_semantic_layout(None, None, logged.append) == "target-half"
    assert resolve_semantic_layout(None, str(tmp_path / "x.safetensors")) == "target-half"
    assert len(logged) == 2 and "both-halves" in logged[0]
    with pytest.raises(DiffalignError, match="trained with both-halves"):
        resolve_semantic_layout("target-half", str(run), logged.append)
    (run / "fill_config.json").write_text("[1, 2]")
    assert resolve_semantic_layout(None, str(run)) == "target-half"
    with pytest.raises(DiffalignError, match="semantic-layout"):
        resolve_semantic_layout("left", None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_infer_on_an_absent_gpu_is_one_line(flux, tmp_path, capsys):
    vis = write_image(tmp_path / "v.png", (16, 16))
    out = tmp_path / "out"
    base = ["fill", "infer", "--model", flux, "--visible", str(vis), "--prompt", "p"]
    err = _one_line_error(capsys, [*base, "--output", str(out), "--device", "cuda"])
    assert "no CUDA device" in err
    err = _one_line_error(capsys, [*base, "--output", str(out), "--device", "tpu9"])
    assert "unknown device" in err
    assert not out.exists()


def test_a_flux_dev_transformer_is_one_line(flux, tmp_path, capsys):
    """A FLUX.1-dev-style transformer (64 input channels, no fill condition) in a Fill folder."""
    import json
    import shutil

    from diffusers import FluxTransformer2DModel

    model = tmp_path / "flux-dev-like"
    shutil.copytree(flux, model)
    cfg = json.loads((model / "transformer/config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    FluxTransformer2DModel(**{**cfg, "in_channels": 64}).save_pretrained(model / "transformer")
    vis = write_image(tmp_path / "v.png", (16, 16))
    out = tmp_path / "out"
    err = _one_line_error(
        capsys,
        ["fill", "infer", "--model", str(model), "--visible", str(vis), "--prompt", "p"]
        + ["--output", str(out), "--steps", "1"],
    )
    assert "64 input" in err and "384" in err and "FLUX.1-Fill" in err
    assert not out.exists()
    data = write_triptychs(tmp_path / "data", n=1)
    err = _one_line_error(capsys, tiny_train_args(str(model), data, tmp_path / "run"))
    assert "384" in err


def test_the_checkpoint_records_its_layout_and_infer_follows_it(tmp_path):
    """Item 14.8: the layout lives in the module's own metadata (both files), read back at
    infer; an explicit contradicting --semantic-layout is one error, not a warning."""
    from diffalign.engine.io import write_json
    from diffalign.fill.infer import resolve_semantic_layout
    from diffalign.fill.model import add_lora
    from diffalign.fill.weights import build_semantic, load_semantic, save_combined, save_semantic

    module = build_semantic(64, 8, 1)
    save_semantic(tmp_path / "semantic_module.safetensors", module, "panel")
    write_json(tmp_path / "fill_config.json", {"semantic_layout": "both-halves"})  # stale
    assert resolve_semantic_layout(None, str(tmp_path)) == "panel"  # the checkpoint wins
    assert resolve_semantic_layout("panel", str(tmp_path)) == "panel"
    with pytest.raises(
        DiffalignError, match=r"--semantic-layout both-halves, .* trained with panel"
    ):
        resolve_semantic_layout("both-halves", str(tmp_path / "semantic_module.safetensors"))
    assert load_semantic(tmp_path, 64).layout == "panel"

    transformer = _tiny_transformer()
    cfg = add_lora(transformer, rank=2)
    save_combined(tmp_path / "both.safetensors", transformer, module, cfg, "panel")
    assert resolve_semantic_layout(None, str(tmp_path / "both.safetensors")) == "panel"
    assert load_semantic(tmp_path / "both.safetensors", 64).layout == "panel"
    # a module saved without a layout falls back to fill_config.json, then target-half
    save_semantic(tmp_path / "old" / "semantic_module.safetensors", module)
    assert load_semantic(tmp_path / "old", 64).layout is None
    assert resolve_semantic_layout("panel", str(tmp_path / "old")) == "panel"
    assert resolve_semantic_layout(None, str(tmp_path / "old")) == "target-half"


def _tiny_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=8,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    )


def test_panel_layout_trains_records_and_infers(flux, tmp_path):
    """`semantic_layout: panel` end to end: K/V = the semantic panel's tokens (half the
    diptych's), recorded in the exported module, used by `fill infer` without being told."""
    import json

    from diffalign.cli import main
    from diffalign.fill.weights import load_semantic
    from fill_helpers import write_image

    data = write_triptychs(tmp_path / "data", n=2)
    args = tiny_train_args(
        flux, data, tmp_path / "run", max_steps=1, num_validation=1, semantic_layout="panel"
    )
    assert main(args) == 0
    final = tmp_path / "run" / "checkpoint-final"
    assert load_semantic(final, 64).layout == "panel"
    write_image(tmp_path / "v.png", (16, 16))
    write_image(tmp_path / "s.png", (16, 16), seed=1)
    common = [
        "fill",
        "infer",
        "--model",
        flux,
        "--lora",
        str(final),
        "--semantic-module",
        str(final),
        "--visible",
        str(tmp_path / "v.png"),
        "--semantic",
        str(tmp_path / "s.png"),
        "--prompt",
        "a cat",
        "--steps",
        "1",
    ]
    assert main([*common, "--output", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["semantic_layout"] == "panel"
    assert (
        main([*common, "--output", str(tmp_path / "o2"), "--semantic-layout", "target-half"]) == 2
    )
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("layout", ["panel", "target-half"])
def test_attach_semantic_on_a_plain_pipeline_equals_our_sampler(flux, tmp_path, layout):
    """Item 14.9: a plain diffusers FluxFillPipeline with the LoRA loaded by
    `load_lora_weights` and the module hooked in by `attach_semantic` gives the same image as
    our sampler (the `fill infer` model) for the same noise, fill condition and semantic tokens.
    The comparison fixes the noise and the VAE samples explicitly rather than going through
    `fill infer`'s seeds (their draw order is being aligned with the pipeline's separately)."""
    from diffusers import FluxFillPipeline

    from diffalign.fill import attach_semantic
    from diffalign.fill.encode import FillEncoder
    from diffalign.fill.infer import (
        build_model,
        decode_latents,
        fresh_scheduler,
        sample_latents,
    )
    from diffalign.fill.model import add_lora, lora_parameters
    from diffalign.fill.train import load_fill_pipeline
    from diffalign.fill.weights import SEMANTIC_FILE, build_semantic, save_lora, save_semantic

    torch.manual_seed(0)
    src = load_fill_pipeline(flux)
    cfg = add_lora(src.transformer, rank=4, alpha=8)
    for p in lora_parameters(src.transformer):
        p.data.normal_(0, 0.1)
    semantic = build_semantic(64, 8, 1)
    with torch.no_grad():
        semantic.layers[0].scale.fill_(0.7)  # a trained module: the branch changes the output
    ck = tmp_path / "checkpoint-final"
    save_lora(ck, src.transformer, cfg)
    save_semantic(ck / SEMANTIC_FILE, semantic, layout)

    g = torch.Generator().manual_seed(1)
    vis, sem_img = torch.rand(1, 3, 16, 16, generator=g), torch.rand(3, 16, 16, generator=g)
    diptych = torch.cat([vis, torch.zeros_like(vis)], -1)
    mask = torch.zeros(1, 1, 16, 32)
    mask[..., 16:] = 1
    noise = FluxFillPipeline._pack_latents(torch.randn(1, 16, 2, 4, generator=g), 1, 16, 2, 4)
    pe, pooled = torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g)
    call = dict(
        prompt_embeds=pe,
        pooled_prompt_embeds=pooled,
        image=diptych,
        mask_image=mask,
        latents=noise,
        height=16,
        width=32,
        num_inference_steps=3,
        guidance_scale=30.0,
        output_type="pt",
    )
    plain = FluxFillPipeline.from_pretrained(flux)
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(ck))
    attached = attach_semantic(plain, ck, sem_img, generator=torch.Generator().manual_seed(7))
    assert attached.layout == layout  # read from the checkpoint
    want = plain(**call, generator=torch.Generator().manual_seed(5)).images

    ours = load_fill_pipeline(flux)
    model = build_model(ours, str(ck), str(ck), guidance=30.0)
    tokens = FillEncoder(ours).encode_semantic(
        sem_img[None], layout, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(tokens, attached.semantic_tokens)
    init = ours.image_processor.preprocess(diptych, height=16, width=32).float()
    m = ours.mask_processor.preprocess(mask, height=16, width=32)
    mask_l, masked_l = ours.prepare_mask_latents(
        m, init * (1 - m), 1, 16, 1, 16, 32, pe.dtype, "cpu", torch.Generator().manual_seed(5)
    )
    latents = sample_latents(
        model,
        fresh_scheduler(ours),
        noise=noise,
        cond=torch.cat([masked_l, mask_l], -1),
        img_ids=ours._prepare_latent_image_ids(1, 1, 2, "cpu", pe.dtype),
        prompt_embeds=pe,
        pooled_prompt_embeds=pooled,
        text_ids=torch.zeros(8, 3),
        steps=3,
        semantic_tokens=tokens,
        guidance=30.0,
    )
    assert torch.equal(decode_latents(ours, latents, 16, 32), want)

    attached.remove()  # the plain pipeline again: the module did change the image
    without = plain(**call, generator=torch.Generator().manual_seed(5)).images
    assert not torch.allclose(without, want)
    with pytest.raises(DiffalignError, match="trained with"):
        attach_semantic(plain, ck, layout="both-halves")
    empty = attach_semantic(plain, ck)
    with pytest.raises(DiffalignError, match="no semantic image yet"):
        plain(**call, generator=torch.Generator().manual_seed(5))
    empty.set_semantic(torch.rand(3, 32, 32))  # another size than the visible panel
    with pytest.raises(DiffalignError, match="semantic panel must be the visible panel's size"):
        plain(**call, generator=torch.Generator().manual_seed(5))
    empty.remove()


def test_overwrite_units_of_a_damaged_record_are_every_image(tmp_path):
    """What `--overwrite` removes where infer_settings.json is unreadable: every image it may
    describe (each non-dot png) and the summary; recorded inputs and this run's otherwise."""
    import json

    from diffalign.fill.infer import SETTINGS_FILE, _earlier_units

    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.png", "a_diptych.png", "b.png", ".a.png.tmp", "notes.txt", "summary.json"):
        (out / name).write_bytes(b"x")
    (out / SETTINGS_FILE).write_text("{not json")
    got = _earlier_units(out, ["c"], set())
    assert sorted(p.name for p in got) == ["a.png", "a_diptych.png", "b.png", "summary.json"]
    # never one of this run's inputs (an --output-dir that is the input folder)
    got = _earlier_units(out, ["c"], {(out / "b.png").resolve()})
    assert sorted(p.name for p in got) == ["a.png", "a_diptych.png", "summary.json"]
    (out / SETTINGS_FILE).write_text(json.dumps({"inputs": {"a": "d"}}))
    got = _earlier_units(out, ["b"], set())
    assert sorted(p.name for p in got) == ["a.png", "a_diptych.png", "b.png", "summary.json"]
    (out / "b.png").unlink()
    assert sorted(p.name for p in _earlier_units(out, [], set())) == [
        "a.png", "a_diptych.png", "summary.json"
    ]  # fmt: skip
