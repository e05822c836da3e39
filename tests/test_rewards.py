"""Rewards: spec parsing, the shared interface, clip / aesthetic / hybrid / pickscore on tiny
checkpoints in the official layouts (written by `diffalign make-tiny`), missing and wrong files."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffalign.engine.cliutils import ArgumentParser
from diffalign.engine.errors import DiffalignError
from diffalign.engine.rewards import (
    RENO_DEFAULT_SPEC,
    CombinedReward,
    Reward,
    add_reward_arguments,
    clip_preprocess,
    expand_spec,
    load_reward,
    parse_reward_spec,
    resize_center_crop,
    reward_from_args,
    reward_spec_from_args,
    reward_type_spec,
)

AESTHETIC = "sac+logos+ava1-l14-linearMSE.pth"
PROMPTS = ["a red apple", "a blue car"]


def _images(seed=0, shape=(2, 3, 40, 48)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g).requires_grad_(True)


@pytest.fixture(scope="module")
def clip_dir(tiny_model_dir):
    return tiny_model_dir("clip")


@pytest.fixture(scope="module")
def aesthetic_ckpt(tiny_model_dir):
    return str(Path(tiny_model_dir("aesthetic")) / AESTHETIC)


@pytest.fixture(scope="module")
def pickscore_dir(tiny_model_dir):
    return tiny_model_dir("pickscore")


# --------------------------------------------------------------------------------------------
# spec parsing


def test_parse_reno_defaults_and_bare_names():
    assert parse_reward_spec(RENO_DEFAULT_SPEC) == [
        ("hpsv2", 5.0),
        ("imagereward", 1.0),
        ("clip", 0.01),
        ("pickscore", 0.05),
    ]
    assert parse_reward_spec("clip") == [("clip", 1.0)]
    assert parse_reward_spec(" HPSv2:2 , ImageReward ") == [("hpsv2", 2.0), ("imagereward", 1.0)]
    assert parse_reward_spec("clip:-1e-2") == [("clip", -0.01)]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("clipp", "unknown reward 'clipp'; valid names: clip, aesthetic, hybrid"),
        ("clip:abc", "weight of 'clip' must be a finite number"),
        ("clip:nan", "finite number"),
        ("clip:inf", "finite number"),
        ("clip:", "finite number"),
        ("clip:1:2", "finite number"),
        ("clip,,hpsv2", "empty item"),
        ("", "empty"),
        ("clip:1,clip:2", "listed twice"),
    ],
)
def test_parse_bad_specs(spec, match):
    with pytest.raises(DiffalignError, match=match) as e:
        parse_reward_spec(spec)
    assert "\n" not in str(e.value)


def test_reward_type_and_hybrid_expansion():
    assert reward_type_spec("hybrid") == "hybrid"
    with pytest.raises(DiffalignError, match="clip, aesthetic, hybrid"):
        reward_type_spec("pickscore")
    # the seed's hybrid: aesthetic + 0.25 cos = aesthetic + 0.0025 * (100 cos)
    assert expand_spec([("hybrid", 2.0)]) == [("aesthetic", 2.0), ("clip", 0.005)]
    assert expand_spec([("clip", 1.0), ("hybrid", 1.0)]) == [("clip", 1.0025), ("aesthetic", 1.0)]


@pytest.mark.parametrize(
    "spec, message",
    [
        # hybrid's clip part cancelled: old code built clip with weight 0 (loaded, computed,
        # multiplied by 0)
        ("hybrid,clip:-0.0025", "the effective weight of 'clip' is 0 (0.0025 from hybrid:1 + "),
        ("hybrid:-2,clip:0.005", "the effective weight of 'clip' is 0 ("),
        ("hybrid:1.1,clip:-0.00275", "the effective weight of 'clip' is 4.33681e-19, i.e. 0 ("),
        ("hybrid,aesthetic:-1", "the effective weight of 'aesthetic' is 0 ("),
        # every weight 0: the reward was identically 0 (and its gradient too)
        ("hybrid,aesthetic:-1,clip:-0.0025", "the effective weight of 'aesthetic' is 0 ("),
        ("hybrid:1e-322", "the effective weight of 'clip' is 0 ("),  # 0.0025 w underflows
        ("hybrid:1e308,aesthetic:1e308", "the effective weight of 'aesthetic' is inf ("),
    ],
)
def test_degenerate_effective_weights_are_refused(spec, message):
    with pytest.raises(DiffalignError, match=re.escape(f"--reward '{spec}': {message}")) as e:
        parse_reward_spec(spec)
    assert "\n" not in str(e.value)
    terms = [(n, float(w) if w else 1.0) for n, _, w in (t.partition(":") for t in spec.split(","))]
    with pytest.raises(DiffalignError, match="the effective weight of"):
        load_reward(terms)  # a parsed list is checked too, before any model loads


@pytest.mark.parametrize(
    "spec, part, shown",
    [
        ("aesthetic:1e308", "aesthetic", "1e+308 (1e+308 from aesthetic:1e+308)"),
        ("clip:-2e6", "clip", "-2e+06 (-2e+06 from clip:-2e+06)"),
        ("hybrid:1e9", "aesthetic", "1e+09 (1e+09 from hybrid:1e+09)"),  # a hybrid part
        ("clip:1e-3,hybrid:5e8", "clip", "1.25e+06 (0.001 from clip:0.001 + 1.25e+06 from "),
    ],
)
def test_huge_weights_are_refused_at_spec_time(spec, part, shown):
    """A finite but huge weight would overflow the weighted total or its loss offset to inf/NaN
    at run time (a float32 reward times 1e38 already does): one line at spec time instead."""
    message = f"--reward '{spec}': the weight of '{part}' is {shown}"
    with pytest.raises(DiffalignError, match=re.escape(message)) as e:
        parse_reward_spec(spec)
    assert "\n" not in str(e.value) and "above the bound 1e+06" in str(e.value)
    terms = [(n, float(w) if w else 1.0) for n, _, w in (t.partition(":") for t in spec.split(","))]
    with pytest.raises(DiffalignError, match="above the bound 1e\\+06"):
        load_reward(terms)  # a parsed list too, before any model loads
    # the bound itself passes
    assert expand_spec(parse_reward_spec("aesthetic:1e6,clip:-1e6")) == [
        ("aesthetic", 1e6),
        ("clip", -1e6),
    ]


@pytest.mark.parametrize("terms", [[("clip", 0.0)], [("clip", float("nan"))]])
def test_parsed_lists_with_zero_or_nan_weights_are_refused(terms):
    with pytest.raises(DiffalignError, match="the effective weight of 'clip' is (0|nan) "):
        load_reward(terms)


def test_valid_specs_expand_as_before():
    assert expand_spec(parse_reward_spec("hybrid,clip:1")) == [("aesthetic", 1.0), ("clip", 1.0025)]
    assert expand_spec(parse_reward_spec("hybrid,clip:-0.001")) == [
        ("aesthetic", 1.0),
        ("clip", 0.0025 - 0.001),
    ]
    assert expand_spec(parse_reward_spec("hybrid:-1")) == [("aesthetic", -1.0), ("clip", -0.0025)]


def test_cli_refuses_a_cancelled_hybrid_part(tmp_path, capsys):
    """One line, exit 2, before any model loads (the model does not exist), nothing written."""
    from diffalign.cli import main

    out = tmp_path / "o"
    code = main(
        ["noise", "optimize", "--prompt", "a cat", "--model", str(tmp_path / "no-model")]
        + ["--reward", "hybrid,clip:-0.0025", "--output-dir", str(out)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(
        "diffalign: error: --reward 'hybrid,clip:-0.0025': the effective weight of 'clip' is 0 "
    )
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# preprocessing


def test_resize_center_crop_matches_reference():
    x = torch.rand(1, 3, 30, 60)
    out = resize_center_crop(x, 20)
    assert out.shape == (1, 3, 20, 20)
    # reference: shorter side 20 -> 20 x 40 (bicubic, antialiased), then the central 20 columns
    ref = F.interpolate(x, size=(20, 40), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(out, ref[..., :, 10:30])
    same = torch.rand(2, 3, 20, 20)
    assert torch.equal(resize_center_crop(same, 20), same)
    # ReNO's normalisation with the OpenAI CLIP mean/std
    norm = clip_preprocess(same, 20)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(norm, (same - mean) / std)


# --------------------------------------------------------------------------------------------
# clip / aesthetic / hybrid / pickscore


def _reference_clip_cos(clip_dir, images, prompts):
    """Slow reference: the CLIPModel's own forward (logits_per_image / logit_scale)."""
    from transformers import AutoTokenizer, CLIPModel

    from diffalign.engine.selftest_refs import reference_clip_cos

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    pix = clip_preprocess(images, model.config.vision_config.image_size)
    cos, embeds = reference_clip_cos(model, tok, pix, prompts)
    return cos, embeds


def test_clip_reward_values_grad_and_loss(clip_dir):
    reward = load_reward("clip", clip_model=clip_dir)
    assert isinstance(reward, Reward) and reward.name == "clip"
    assert not reward.training and not any(p.requires_grad for p in reward.parameters())
    x = _images()
    value = reward(x, PROMPTS)
    assert value.shape == (2,) and value.dtype == torch.float32 and torch.isfinite(value).all()
    cos, _ = _reference_clip_cos(clip_dir, x.detach(), PROMPTS)
    torch.testing.assert_close(value.detach(), 100 * cos, atol=1e-4, rtol=1e-4)
    loss = reward.loss(x, PROMPTS)
    torch.testing.assert_close(loss, 100 - value)  # ReNO: 100 - 100 cos
    loss.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # text encodings are cached per prompt; a single prompt broadcasts over the batch
    assert set(reward.text_cache._cache) == set(PROMPTS)
    one = reward(x.detach(), "a red apple")
    assert one.shape == (2,)
    with pytest.raises(DiffalignError, match="2 images but 3 prompts"):
        reward(x, ["a", "b", "c"])
    with pytest.raises(DiffalignError, match=r"\[B, 3, H, W\]"):
        reward(torch.rand(3, 8, 8), ["a"])


def test_nan_reward_is_one_line_error(clip_dir):
    reward = load_reward("clip", clip_model=clip_dir)
    x = torch.rand(1, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(DiffalignError, match="reward 'clip' is not finite"):
        reward(x, ["a"])


def test_aesthetic_matches_plain_sequential(clip_dir, aesthetic_ckpt):
    reward = load_reward("aesthetic", clip_model=clip_dir, aesthetic_ckpt=aesthetic_ckpt)
    x = _images(1)
    value = reward(x, PROMPTS)
    # reference: the LAION predictor exactly as published (nn.Sequential, torch.load)
    from diffalign.engine.selftest_refs import reference_aesthetic_head

    head = reference_aesthetic_head(torch.load(aesthetic_ckpt, weights_only=True))
    _, emb = _reference_clip_cos(clip_dir, x.detach(), PROMPTS)
    with torch.no_grad():
        ref = head(emb).squeeze(-1)
    torch.testing.assert_close(value.detach(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reward.loss(x, PROMPTS), 10 - value)
    value.sum().backward()
    assert x.grad.abs().sum() > 0


def test_hybrid_is_seed_weighting_and_shares_clip(clip_dir, aesthetic_ckpt):
    hybrid = load_reward("hybrid", clip_model=clip_dir, aesthetic_ckpt=aesthetic_ckpt)
    assert isinstance(hybrid, CombinedReward) and hybrid.name == "hybrid"
    clip_r, aes_r = (
        hybrid.rewards[hybrid.names.index("clip")],
        hybrid.rewards[hybrid.names.index("aesthetic")],
    )
    assert clip_r.model is aes_r.model  # one CLIP model for both terms
    runs = []
    hook = clip_r.model.vision_model.register_forward_hook(lambda *a: runs.append(1))
    x = _images(2)
    total = hybrid(x, PROMPTS)
    hook.remove()
    assert len(runs) == 1  # ... and one image-tower pass per call
    assert clip_r.bundle.memo is None
    terms = hybrid.last_terms
    # seed: total = aesthetic + 0.25 * clip_cosine
    torch.testing.assert_close(total.detach(), terms["aesthetic"] + 0.25 * terms["clip"] / 100)
    torch.testing.assert_close(hybrid.loss(x, PROMPTS), 10.25 - total)


def test_pickscore_uses_processor_folder_and_logit_scale(pickscore_dir):
    reward = load_reward("pickscore", pickscore_model=pickscore_dir)
    assert reward.name == "pickscore"
    assert reward.scale == pytest.approx(100.0, rel=1e-3)  # PickScore's trained logit scale
    x = _images(3)
    value = reward(x, PROMPTS)
    assert value.shape == (2,) and torch.isfinite(value).all()
    torch.testing.assert_close(reward.loss(x, PROMPTS), 30 - value)
    value.sum().backward()
    assert x.grad.abs().sum() > 0


def test_combined_weights_and_terms(clip_dir, pickscore_dir):
    combo = load_reward(
        "clip:0.01,pickscore:0.05", clip_model=clip_dir, pickscore_model=pickscore_dir
    )
    x = _images(4)
    total = combo(x, PROMPTS)
    t = combo.last_terms
    assert set(t) == {"clip", "pickscore"} and t["clip"].shape == (2,)
    torch.testing.assert_close(total.detach(), 0.01 * t["clip"] + 0.05 * t["pickscore"])
    assert combo.loss_offset == pytest.approx(0.01 * 100 + 0.05 * 30)
    # a single weighted term is a CombinedReward too (the weight applies)
    half = load_reward("clip:0.5", clip_model=clip_dir)
    torch.testing.assert_close(
        half(x, PROMPTS), 0.5 * t["clip"].to(total.dtype), atol=1e-4, rtol=1e-4
    )


def _count_checkpoint_calls(reward):
    """Wrap every layer's checkpoint function with a call counter."""
    calls = []
    layers = [m for m in reward.modules() if getattr(m, "gradient_checkpointing", False)]
    for m in layers:
        inner = m._gradient_checkpointing_func

        def counted(*a, _inner=inner, **k):
            calls.append(1)
            return _inner(*a, **k)

        m._gradient_checkpointing_func = counted
    return layers, calls


@pytest.mark.parametrize("kind", ["clip", "imagereward"])
def test_gradient_checkpointing_gives_same_gradients(kind, clip_dir, tiny_model_dir):
    kw = (
        {"clip_model": clip_dir}
        if kind == "clip"
        else {"imagereward_model_path": str(Path(tiny_model_dir("imagereward")) / "ImageReward.pt")}
    )
    x1, x2 = _images(5), _images(5)
    plain = load_reward(kind, **kw)
    ckpt = load_reward(kind, gradient_checkpointing=True, **kw)
    layers, calls = _count_checkpoint_calls(ckpt)
    assert layers and not any(getattr(m, "gradient_checkpointing", False) for m in plain.modules())
    plain.loss(x1, PROMPTS).sum().backward()
    ckpt.loss(x2, PROMPTS).sum().backward()
    assert len(calls) >= 2  # the image tower's layers really ran under checkpoint
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# defaults in models/<download name>/, missing and wrong files


def test_defaults_resolve_through_models_dir(tmp_path, monkeypatch, clip_dir, aesthetic_ckpt):
    monkeypatch.setenv("DIFFALIGN_MODELS_DIR", str(tmp_path))
    with pytest.raises(DiffalignError) as e:
        load_reward("clip")
    msg = str(e.value)
    assert "CLIP-ViT-L-14" in msg and "config.json" in msg
    assert "diffalign download --only CLIP-ViT-L-14" in msg
    shutil.copytree(clip_dir, tmp_path / "CLIP-ViT-L-14")
    with pytest.raises(DiffalignError, match=r"Aesthetic.*--only Aesthetic"):
        load_reward("aesthetic")
    (tmp_path / "Aesthetic").mkdir()
    shutil.copy(aesthetic_ckpt, tmp_path / "Aesthetic" / AESTHETIC)
    reward = load_reward("hybrid")
    assert reward(_images(), PROMPTS).shape == (2,)
    # a download name works as --clip-model too
    assert load_reward("clip", clip_model="CLIP-ViT-L-14")(_images(), PROMPTS).shape == (2,)


def test_missing_and_wrong_files(tmp_path, clip_dir, pickscore_dir):
    with pytest.raises(
        DiffalignError, match=r"aesthetic checkpoint not found: .*nope.pth.*--only Aesthetic"
    ):
        load_reward("aesthetic", clip_model=clip_dir, aesthetic_ckpt=str(tmp_path / "nope.pth"))
    with pytest.raises(DiffalignError, match=r"CLIP model not found: .*--only CLIP-ViT-L-14"):
        load_reward("clip", clip_model=str(tmp_path / "no-clip"))
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1, 16), "fc.bias": torch.zeros(1)}, bad)
    with pytest.raises(DiffalignError, match=r"not the MLP layout layers\.\{0,2,4,6,7\}"):
        load_reward("aesthetic", clip_model=clip_dir, aesthetic_ckpt=str(bad))
    wide = tmp_path / "wide.pth"
    from diffalign.engine.tiny_rewards import aesthetic_state_dict

    torch.save(aesthetic_state_dict(0, in_features=768), wide)
    with pytest.raises(DiffalignError, match="expects 768-wide CLIP image embeddings"):
        load_reward("aesthetic", clip_model=clip_dir, aesthetic_ckpt=str(wide))
    not_clip = tmp_path / "not-clip"
    not_clip.mkdir()
    (not_clip / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(DiffalignError, match="'bert' model, not a transformers CLIPModel"):
        load_reward("clip", clip_model=str(not_clip))
    bare = tmp_path / "pick-bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(Path(pickscore_dir) / f, bare / f)
    with pytest.raises(DiffalignError, match="no processor/ folder.*--only PickScore"):
        load_reward("pickscore", pickscore_model=str(bare))
    # an explicit processor folder works
    r = load_reward(
        "pickscore",
        pickscore_model=str(bare),
        pickscore_processor=str(Path(pickscore_dir) / "processor"),
    )
    assert r(_images(), PROMPTS).shape == (2,)


# a reward folder without its tokenizer vocabulary: (make-tiny kind, tokenizer folder inside it,
# the reward's path option and the file it names, files deleted, files the error must name)
_NO_VOCAB = {
    "clip": ("", "--clip-model", "", ["tokenizer.json"], "vocab.json, merges.txt"),
    "pickscore": (
        "processor",
        "--pickscore-model-id",
        "",
        ["tokenizer.json"],
        "vocab.json, merges.txt",
    ),
    "hpsv2": (
        "processor",
        "--hps-checkpoint-path",
        "HPS_v2.1_compressed.pt",
        ["tokenizer.json"],
        "vocab.json, merges.txt",
    ),
    "imagereward": (
        "bert-base-uncased",
        "--imagereward-model-path",
        "ImageReward.pt",
        ["tokenizer.json", "vocab.txt"],
        "vocab.txt",
    ),
}


@pytest.mark.parametrize("kind", sorted(_NO_VOCAB))
def test_reward_folder_without_tokenizer_vocabulary_is_refused(
    kind, tiny_model_dir, tmp_path, capsys
):
    """transformers builds an empty CLIP tokenizer from such a folder (every prompt the same
    tokens: the score ignores the prompt) and a BERT one mapping every word to [UNK]."""
    from diffalign.cli import main

    sub, option, file, drop, named = _NO_VOCAB[kind]
    folder = tmp_path / kind
    shutil.copytree(tiny_model_dir(kind), folder)
    for name in drop:
        (folder / sub / name).unlink()
    out = tmp_path / "out"
    argv = ["noise", "optimize", "--model", tiny_model_dir("sdxl"), "--prompt", "a red apple"]
    argv += ["--reward", kind, option, str(folder / file), "--output-dir", str(out)]
    argv += ["--height", "32", "--width", "32", "--steps", "1"]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("diffalign: error:") and str(folder / sub) in err[0], err[0]
    assert f"missing: tokenizer.json, {named}" in err[0], err[0]
    assert not out.exists()
    if kind == "clip":  # half a BPE vocabulary names the half that is missing
        from diffalign.engine.rewards.files import check_tokenizer_files

        (folder / "vocab.json").write_text("{}")
        with pytest.raises(DiffalignError, match=r"missing: tokenizer.json, merges.txt$"):
            check_tokenizer_files(folder, "bpe", "CLIP tokenizer folder")
    # vocabulary files alone (no tokenizer.json) are a tokenizer: these load and score
    if kind == "imagereward":
        shutil.copy(Path(tiny_model_dir(kind)) / sub / "vocab.txt", folder / sub / "vocab.txt")
        reward = load_reward(kind, imagereward_model_path=str(folder / file))
        ids, _ = reward.tokens(["a red apple"])
        assert (ids != reward.tokenizer.unk_token_id).sum() > 3


# --------------------------------------------------------------------------------------------
# command-line options


def test_reward_arguments_accept_seed_spellings(clip_dir, aesthetic_ckpt):
    parser = ArgumentParser(prog="t")
    add_reward_arguments(parser)
    args = parser.parse_args(
        [
            "--reward_type",
            "hybrid",
            "--clip_local_dir",
            clip_dir,
            "--aesthetic_ckpt",
            aesthetic_ckpt,
        ]
    )
    reward = reward_from_args(args, "cpu", torch.float32)
    assert reward.name == "hybrid"
    args = parser.parse_args(["--reward", "clip:0.01", "--clip-model", clip_dir])
    assert reward_from_args(args).name == "clip:0.01"
    args = parser.parse_args(["--clip-model", clip_dir])  # default: the seed's clip
    assert reward_from_args(args).name == "clip"
    for opt in (
        "--pickscore_model_id",
        "--imagereward_model_path",
        "--imagereward_med_config_path",
        "--hps_version",
        "--hps_checkpoint_path",
    ):
        assert opt in parser.format_help()
    args = parser.parse_args(["--reward", "clip", "--reward-type", "hybrid"])
    with pytest.raises(DiffalignError, match="disagree"):
        reward_from_args(args)
    args = parser.parse_args(["--reward", "hpsv2:x"])
    with pytest.raises(DiffalignError, match="finite number"):
        reward_from_args(args)


def _reward_args(argv):
    parser = ArgumentParser(prog="t")
    add_reward_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--reward", "clip", "--aesthetic-ckpt", "a.pth"],
            "--reward clip does not use --aesthetic-ckpt (for the aesthetic and hybrid rewards); "
            "drop it or add its reward to --reward",
        ),
        (  # typed, so named even at its default value
            ["--reward_type", "aesthetic", "--hps_version", "v2.1"],
            "--reward-type aesthetic does not use --hps_version (for the hpsv2 reward)",
        ),
        (
            ["--reward", "pickscore", "--clip_local_dir", "d"],
            "--clip_local_dir (for the clip, aesthetic and hybrid rewards)",
        ),
        (
            ["--imagereward-tokenizer", "t"],
            "the default reward clip does not use --imagereward-tokenizer (for the imagereward",
        ),
        (
            ["--reward", "clip", "--hps-checkpoint-path", "h", "--pickscore-model-id", "p"],
            "--hps-checkpoint-path (for the hpsv2 reward), --pickscore-model-id (for the "
            "pickscore reward); drop them or add their reward to --reward",
        ),
    ],
)
def test_options_of_a_reward_not_selected_are_an_error(argv, message):
    with pytest.raises(DiffalignError, match=re.escape(message)):
        reward_spec_from_args(_reward_args(argv))


@pytest.mark.parametrize(
    ("argv", "spec"),
    [
        ([], "clip"),  # every default, --hps-version v2.1 included, never counts
        (["--reward-type", "hybrid", "--clip-model", "d", "--aesthetic-ckpt", "a"], "hybrid"),
        (["--reward", "aesthetic", "--clip-model", "d"], "aesthetic"),  # aesthetic embeds with CLIP
        (
            ["--reward", RENO_DEFAULT_SPEC, "--hps-version", "v2.0", "--clip-model", "d"]
            + ["--pickscore-processor", "p", "--imagereward-med-config-path", "m"],
            RENO_DEFAULT_SPEC,
        ),
        (["--reward", "hpsv2:0.5,clip", "--hps-processor", "p"], "hpsv2:0.5,clip"),
        (["--reward", "pickscore", "--reward-gradient-checkpointing"], "pickscore"),  # every reward
    ],
)
def test_options_of_the_selected_rewards_pass(argv, spec):
    assert reward_spec_from_args(_reward_args(argv)) == spec


def test_download_knows_every_reward_asset(tmp_path):
    from diffalign.engine.download import ASSETS, plan_downloads

    names = ["CLIP-ViT-L-14", "Aesthetic", "PickScore", "ImageReward", "HPSv2"]
    plan = plan_downloads(names, tmp_path)
    assert [p.asset.name for p in plan] == [
        "CLIP-ViT-L-14",
        "Aesthetic",
        "PickScore_v1",
        "ImageReward",
        "HPSv2",
    ]
    assert plan[2].target == tmp_path / "PickScore_v1"  # the seed's models/PickScore_v1/
    assert "PickScore" not in ASSETS  # an alias, not a second asset


def test_reno_default_combination_end_to_end(tiny_model_dir, clip_dir, pickscore_dir):
    """ReNO's `hpsv2:5,imagereward:1,clip:0.01,pickscore:0.05` on the four official layouts."""
    hps = Path(tiny_model_dir("hpsv2"))
    ir = Path(tiny_model_dir("imagereward"))
    reward = load_reward(
        RENO_DEFAULT_SPEC,
        clip_model=clip_dir,
        pickscore_model=pickscore_dir,
        imagereward_model_path=str(ir / "ImageReward.pt"),
        hps_checkpoint_path=str(hps / "HPS_v2.1_compressed.pt"),
    )
    assert isinstance(reward, CombinedReward)
    assert reward.names == ["hpsv2", "imagereward", "clip", "pickscore"]
    x = _images(6, (2, 3, 64, 64))
    loss = reward.loss(x, PROMPTS)
    t = reward.last_terms
    expected = (
        5 * (1 - t["hpsv2"])
        + 1 * (2 - t["imagereward"])
        + 0.01 * (100 - t["clip"])
        + 0.05 * (30 - t["pickscore"])
    )
    torch.testing.assert_close(loss.detach(), expected, atol=1e-4, rtol=1e-5)
    loss.sum().backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_single_reward_last_terms_and_hub_id_offline(clip_dir, monkeypatch):
    reward = load_reward("clip", clip_model=clip_dir)
    value = reward(_images(7), PROMPTS)
    assert set(reward.last_terms) == {"clip"}
    torch.testing.assert_close(reward.last_terms["clip"], value.detach())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-cache")
    with pytest.raises(DiffalignError, match="not in the Hugging Face cache.*--only CLIP-ViT-L-14"):
        load_reward("clip", clip_model="someorg/some-clip-model")


def test_download_cli_dry_run_reward_assets(tmp_path, capsys):
    from diffalign.cli import main

    only = "CLIP-ViT-L-14,Aesthetic,PickScore,ImageReward,HPSv2"
    assert main(["download", "--dir", str(tmp_path), "--only", only, "--dry-run"]) == 0
    out = capsys.readouterr().out
    for target in (
        "CLIP-ViT-L-14",
        "Aesthetic",
        "PickScore_v1/processor",
        "ImageReward/bert-base-uncased",
        "HPSv2/processor",
    ):
        assert str(tmp_path / target) in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
