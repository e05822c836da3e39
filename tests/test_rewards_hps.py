"""HPSv2: the official open_clip-layout checkpoint mapped onto transformers' CLIPModel, proven
against a slow reference forward written directly on the open_clip state dict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign.engine.errors import DiffalignError
from diffalign.engine.rewards import clip_preprocess, load_reward
from diffalign.engine.rewards.hpsv2 import HPS_UNUSED_KEYS, map_open_clip_to_transformers
from diffalign.engine.selftest_refs import reference_hps

PROMPTS = ["a photo of a cat", "an oil painting of a harbour at dusk"]


@pytest.fixture(scope="module")
def hps_dir(tiny_model_dir):
    return Path(tiny_model_dir("hpsv2"))


def test_key_map_is_complete(hps_dir):
    sd = torch.load(hps_dir / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    mapped, unused = map_open_clip_to_transformers(sd)
    assert set(unused) <= HPS_UNUSED_KEYS
    # every transformers CLIPModel parameter is filled, with the right shape
    from diffalign.engine.rewards.hpsv2 import empty_clip_model, hps_clip_config

    model = empty_clip_model(hps_clip_config(sd, eos_token_id=513, bos_token_id=512))
    params = dict(model.named_parameters())
    assert set(params) == set(mapped)
    assert all(params[k].shape == mapped[k].shape for k in params)
    # the real ViT-H-14 count: 24 text + 32 vision blocks x 12 tensors + 14 others = 686 keys
    n_blocks = sum(1 for k in sd if k.endswith("attn.in_proj_weight"))
    assert len(sd) == 12 * n_blocks + 14


def test_hps_matches_reference_forward(hps_dir):
    reward = load_reward("hpsv2", hps_checkpoint_path=str(hps_dir / "HPS_v2.1_compressed.pt"))
    assert reward.name == "hpsv2" and reward.loss_offset == 1.0
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    value = reward(x, PROMPTS)
    sd = torch.load(hps_dir / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    tok = reward.bundle.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
    pix = clip_preprocess(x.detach(), 32)
    ref = reference_hps(sd, pix, tok["input_ids"], text_heads=4, vision_heads=5)
    torch.testing.assert_close(value.detach(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reward.loss(x, PROMPTS), 1 - value)
    value.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())


# prompts that open_clip's cleaning changes: curly quotes, HTML entities (one and two levels),
# ligatures, full-width letters, runs of whitespace, capitals
UNCLEAN_PROMPTS = [
    "A Dog\u2019s toy",
    "cats &amp; dogs",
    "rock &amp;amp; roll",
    "the \ufb01sh and the \ufb02ower",
    "\uff26\uff35\uff2c\uff2c width letters",
    "two  spaces\tand a\nnewline ",
    "she said \u201chello\u201d",
]


def _byte_chars() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character table."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b], extra = chr(256 + extra), extra + 1
    return out


def reference_open_clip_tokenize(texts, tokenizer_json: Path, context_length: int = 77):
    """open_clip's `tokenize` (what HPSv2 scores with), written from its documented steps:
    clean (ftfy.fix_text, html.unescape twice, whitespace runs -> one space, strip, lowercase),
    split with CLIP's pattern, byte-level BPE, <sot> ids <eot>, zero padding."""
    import html
    import json

    import ftfy
    import regex

    model = json.loads(tokenizer_json.read_text())["model"]
    vocab = model["vocab"]
    ranks = {
        tuple(m.split() if isinstance(m, str) else m): i for i, m in enumerate(model["merges"])
    }
    pattern = regex.compile(
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
        r"|[^\s\p{L}\p{N}]+",
        regex.IGNORECASE,
    )
    table = _byte_chars()
    sot, eot = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = [sot]
        for word in pattern.findall(text):
            parts = [table[b] for b in word.encode("utf-8")]
            parts[-1] += "</w>"
            while len(parts) > 1:
                rank, i = min(
                    (ranks.get(pair, 1e9), i) for i, pair in enumerate(zip(parts, parts[1:]))
                )
                if rank == 1e9:
                    break
                parts[i : i + 2] = [parts[i] + parts[i + 1]]
            ids += [vocab[p] for p in parts]
        ids = (ids + [eot])[:context_length]
        ids[-1] = eot
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def test_hps_tokenises_like_open_clip(hps_dir):
    """HPSv2 scores with open_clip's tokenizer, which cleans the text before BPE; the HF
    tokenizer alone keeps curly quotes, entities, ligatures and full-width letters."""
    reward = load_reward("hpsv2", hps_checkpoint_path=str(hps_dir / "HPS_v2.1_compressed.pt"))
    ref = reference_open_clip_tokenize(UNCLEAN_PROMPTS, hps_dir / "processor" / "tokenizer.json")
    tok = reward.bundle.tokens(UNCLEAN_PROMPTS)
    for row, prompt in enumerate(UNCLEAN_PROMPTS):
        got = tok["input_ids"][row][tok["attention_mask"][row].bool()].tolist()
        want = ref[row][: ref[row].nonzero().max() + 1].tolist()
        assert got == want, prompt
    # and the score is the official one on those ids (open_clip's forward, zero padding)
    x = torch.rand(len(UNCLEAN_PROMPTS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sd = torch.load(hps_dir / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    want = reference_hps(sd, clip_preprocess(x, 32), ref, text_heads=4, vision_heads=5)
    torch.testing.assert_close(reward(x, UNCLEAN_PROMPTS), want, atol=1e-5, rtol=1e-4)


def test_hps_defaults_versions_and_errors(hps_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("DIFFALIGN_MODELS_DIR", str(tmp_path))
    with pytest.raises(
        DiffalignError, match=r"HPS checkpoint not found: .*HPS_v2\.1_compressed\.pt.*--only HPSv2"
    ):
        load_reward("hpsv2")
    with pytest.raises(
        DiffalignError, match=r"HPS_v2_compressed\.pt.*--only HPSv2 --hps-version v2\.0`"
    ):
        load_reward("hpsv2", hps_version="v2.0")
    shutil.copytree(hps_dir, tmp_path / "HPSv2")
    assert load_reward("hpsv2")(torch.rand(1, 3, 32, 32), ["a"]).shape == (1,)
    # v2.0 reads HPS_v2_compressed.pt from the same folder
    shutil.copy(
        tmp_path / "HPSv2" / "HPS_v2.1_compressed.pt", tmp_path / "HPSv2" / "HPS_v2_compressed.pt"
    )
    assert load_reward("hpsv2", hps_version="v2.0").version == "v2.0"
    with pytest.raises(DiffalignError, match="--hps-version must be one of v2.0, v2.1"):
        load_reward("hpsv2", hps_version="v3")

    # wrong layouts: an ImageReward-like dict, a pickled non-tensor object, an extra key
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"blip.visual_encoder.cls_token": torch.zeros(1, 1, 8)}}, bad)
    proc = str(hps_dir / "processor")
    with pytest.raises(
        DiffalignError,
        match=r"HPS checkpoint .*bad\.pt: not an open_clip CLIP checkpoint .*missing token_emb",
    ):
        load_reward("hpsv2", hps_checkpoint_path=str(bad), hps_processor=proc)
    sd = torch.load(hps_dir / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    sd["visual.extra.weight"] = torch.zeros(2)
    torch.save({"state_dict": sd}, bad)
    with pytest.raises(
        DiffalignError, match="unexpected keys for the open_clip layout: visual.extra.weight"
    ):
        load_reward("hpsv2", hps_checkpoint_path=str(bad), hps_processor=proc)
    with pytest.raises(DiffalignError, match="processor folder not found.*--hps-processor"):
        load_reward("hpsv2", hps_checkpoint_path=str(bad), hps_processor=str(tmp_path / "none"))


def official_resize_max_pad(image: np.ndarray, size: int) -> np.ndarray:
    """open_clip's `ResizeMaxSize(size, fill=0)` written on PIL and numpy (the official HPSv2
    `img_score.py` preprocessing before normalisation): PIL bicubic resize of the longer side to
    `size`, then black padding `pad // 2` before, the rest after. `image`: [3, H, W] floats;
    each channel is resized as a float ("F") image, so no uint8 rounding enters."""
    from PIL import Image

    _, h, w = image.shape
    scale = size / float(max(h, w))
    nh, nw = round(h * scale), round(w * scale)
    chans = [
        np.asarray(Image.fromarray(c, mode="F").resize((nw, nh), Image.BICUBIC)) for c in image
    ]
    out = np.zeros((3, size, size), np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[:, top : top + nh, left : left + nw] = np.stack(chans)
    return out


@pytest.mark.parametrize("shape", [(3, 60, 100), (3, 90, 40)])
def test_official_geometry_is_open_clip_resize_max_pad(shape):
    from diffalign.engine.rewards.base import resize_max_pad

    image = np.random.default_rng(0).random(shape).astype(np.float32)
    x = torch.from_numpy(image)[None].requires_grad_(True)
    out = resize_max_pad(x, 32)
    np.testing.assert_allclose(
        out[0].detach().numpy(), official_resize_max_pad(image, 32), atol=1e-5
    )
    out.sum().backward()  # differentiable
    assert x.grad is not None and x.grad.abs().sum() > 0
    # a square image of the model's size passes unchanged
    same = torch.rand(1, 3, 32, 32)
    assert torch.equal(resize_max_pad(same, 32), same)


def test_hps_geometry_option_reaches_the_reward(hps_dir):
    from diffalign.engine.rewards import add_reward_arguments, reward_from_args
    from diffalign.engine.rewards.base import CLIP_MEAN, CLIP_STD

    ckpt = str(hps_dir / "HPS_v2.1_compressed.pt")
    x = torch.rand(2, 3, 40, 64, generator=torch.Generator().manual_seed(1))
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    official = torch.from_numpy(np.stack([official_resize_max_pad(i, 32) for i in x.numpy()]))
    parser = __import__("argparse").ArgumentParser()
    add_reward_arguments(parser)
    values = {}
    for geometry in ("official", "reno"):
        argv = ["--reward", "hpsv2", "--hps-checkpoint-path", ckpt, "--hps-geometry", geometry]
        reward = reward_from_args(parser.parse_args(argv))
        values[geometry] = reward(x, PROMPTS)
        assert reward.bundle.geometry == geometry
    tok = reward.bundle.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
    ref = reference_hps(sd, (official - mean) / std, tok["input_ids"], text_heads=4, vision_heads=5)
    torch.testing.assert_close(values["official"], ref, atol=1e-5, rtol=1e-4)
    assert (values["official"] - values["reno"]).abs().max() > 1e-4  # the geometry matters
    # the default stays ReNO's; square images score the same either way
    default = reward_from_args(
        parser.parse_args(["--reward", "hpsv2", "--hps-checkpoint-path", ckpt])
    )
    assert default.bundle.geometry == "reno"
    sq = torch.rand(1, 3, 48, 48)
    official_reward = load_reward("hpsv2", hps_checkpoint_path=ckpt, hps_geometry="official")
    torch.testing.assert_close(official_reward(sq, PROMPTS[:1]), default(sq, PROMPTS[:1]))
    with pytest.raises(DiffalignError, match="--hps-geometry must be one of reno, official"):
        load_reward("hpsv2", hps_checkpoint_path=ckpt, hps_geometry="square")
    with pytest.raises(DiffalignError, match="--hps-geometry"):  # only for hpsv2
        reward_from_args(parser.parse_args(["--reward", "clip", "--hps-geometry", "official"]))
