"""`textstream cache` / `train-weights` on FLUX.1 and Qwen-Image (issue 16 on the families of
issue 15): the cached tensors are the pipelines' own, the family's velocity is the transformer
called as the pipeline calls it, and cache -> train-weights -> sample runs from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.engine.lmdb_store import TensorLMDB
from diffalign.textstream.flow import FluxFlow, QwenImageFlow, pack_latents, unpack_latents
from diffalign.textstream.train_weights import scheduler_shift
from diffalign.textstream.weights import load_learned_weights, shift_times

CAPTIONS = ["a red square", "a blue circle", "a green cat", "a yellow dog"]
RES = 32
TARGETS = {"flux-dev": "1,2", "flux-schnell": "1,3", "qwen-image": "2,3"}  # FLUX: 2 + 2 blocks
# text length: the tiny Qwen tokenizer gives 128-140 tokens per caption, so 160 pads every one
MSL = {"flux-dev": 8, "flux-schnell": 8, "qwen-image": 160}


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(CAPTIONS):
        arr = rng.integers(0, 255, (36 + 2 * i, 44, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(caption)
    return root


def _cache_args(model: str, data: Path, out: Path, msl: int) -> list[str]:
    return [
        "textstream", "cache", "--model", model, "--dataset", str(data), "--output-dir",
        str(out), "--resolution", str(RES), "--batch-size", "2", "--max-sequence-length", str(msl),
    ]  # fmt: skip


def _train_args(model: str, cache: Path, out: Path, targets: str) -> list[str]:
    return [
        "textstream", "train-weights", "--model", model, "--cache", str(cache), "--output-dir",
        str(out), "--residual-target-layers", targets, "--batch-size", "2", "--max-steps", "3",
        "--lr", "0.05", "--num-val", "1", "--eval-every", "3", "--eval-steps", "2",
        "--eval-samples", "1", "--log-every", "1", "--tracker", "none",
    ]  # fmt: skip


@pytest.fixture(scope="module", params=["flux-dev", "flux-schnell", "qwen-image"])
def fam(request, tiny_model_dir, tmp_path_factory):
    """(kind, model folder, cache folder) of one family's tiny model."""
    kind = request.param
    model = tiny_model_dir(kind)
    root = tmp_path_factory.mktemp(f"cache-{kind}")
    data = _image_folder(root / "data")
    assert main(_cache_args(model, data, root / "cache", MSL[kind])) == 0
    return kind, model, root / "cache"


def _record(cache: Path, store: str, key: str) -> torch.Tensor:
    db = TensorLMDB(cache / store)
    try:
        return db.get(key).clone().float()
    finally:
        db.close()


def _pipeline(kind: str, model: str):
    from diffusers import FluxPipeline, QwenImagePipeline

    cls = FluxPipeline if kind.startswith("flux") else QwenImagePipeline
    pipe = cls.from_pretrained(model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(path: str) -> torch.Tensor:
    """The pair's image resized (shorter side) and centre-cropped by hand, in [-1, 1]."""
    with Image.open(path) as im:
        w, h = im.size
        scale = RES / min(w, h)
        size = (max(RES, round(w * scale)), max(RES, round(h * scale)))
        im = im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - RES) // 2, (size[1] - RES) // 2
        im = im.crop((left, top, left + RES, top + RES))
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]


def test_cached_latents_and_text_are_the_pipelines(fam):
    kind, model, cache = fam
    job = json.loads((cache / "job.json").read_text())
    assert job["family"] == ("flux" if kind.startswith("flux") else "qwen-image")
    assert job["shapes"]["latents.lmdb"] == [16, RES // 8, RES // 8]
    pair = json.loads((cache / "pairs.jsonl").read_text().splitlines()[1])
    pipe = _pipeline(kind, model)
    x = _pixels(pair["image"])
    with torch.no_grad():
        if kind.startswith("flux"):
            mean = pipe.vae.encode(x).latent_dist.mean
            ref = (mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
            pe, pooled, text_ids = pipe.encode_prompt(pair["caption"], None, max_sequence_length=8)
            epe, epooled, _ = pipe.encode_prompt("", None, max_sequence_length=8)
            assert torch.equal(text_ids, torch.zeros(8, 3))
            second, esecond = pooled[0], epooled[0]
        else:  # the video VAE on one frame; the pipeline's (z - mean) * (1 / std)
            mean = pipe.vae.encode(x[:, :, None]).latent_dist.mean
            cfg = pipe.vae.config
            lm = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
            inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)
            ref = ((mean - lm) * inv_std)[:, :, 0]
            L = MSL[kind]  # noqa: N806
            pe, mask = pipe.encode_prompt(pair["caption"], max_sequence_length=L)
            epe, emask = pipe.encode_prompt("", max_sequence_length=L)
            n, en = pe.shape[1], epe.shape[1]
            assert n < L and en < L  # the cache pads both
            mask = torch.ones(1, n) if mask is None else mask
            emask = torch.ones(1, en) if emask is None else emask
            pe = torch.cat([pe, pe.new_zeros(1, L - n, pe.shape[2])], dim=1)
            epe = torch.cat([epe, epe.new_zeros(1, L - en, epe.shape[2])], dim=1)
            second = torch.cat([mask[0].float(), torch.zeros(L - n)])
            esecond = torch.cat([emask[0].float(), torch.zeros(L - en)])
    got = _record(cache, "latents.lmdb", pair["id"])
    torch.testing.assert_close(got, ref[0].half().float(), rtol=0, atol=2e-3)
    for key, p, s in ((pair["id"], pe, second), ("__empty__", epe, esecond)):
        for store, want in (("prompt_embeds.lmdb", p[0]), ("pooled_prompt_embeds.lmdb", s)):
            torch.testing.assert_close(_record(cache, store, key), want.half().float())
    # packing: the pipeline's own pack / unpack
    packed = pipe._pack_latents(ref, 1, 16, RES // 8, RES // 8)
    assert torch.equal(pack_latents(ref), packed)
    unpacked = pipe._unpack_latents(packed, RES, RES, pipe.vae_scale_factor)
    assert torch.equal(unpack_latents(packed, RES // 8, RES // 8), unpacked.reshape(ref.shape))


def test_velocity_is_the_pipelines_transformer_call(fam):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    kind, model, cache = fam
    pipe = _pipeline(kind, model)
    tr = pipe.transformer
    h = RES // 8
    xs = torch.randn(1, 16, h, h, generator=torch.Generator().manual_seed(0))
    pe = _record(cache, "prompt_embeds.lmdb", "img0")[None]
    second = _record(cache, "pooled_prompt_embeds.lmdb", "img0")[None]
    t = torch.tensor([700.0])  # sigma 0.7 in the scheduler's units
    packed = pipe._pack_latents(xs, 1, 16, h, h)
    # one denoising step's call, as in pipeline_flux.py / pipeline_qwenimage.py
    with torch.no_grad():
        if kind.startswith("flux"):
            flow = FluxFlow
            # FLUX.1-dev: the card's distilled guidance; schnell has no guidance embedder
            guidance = torch.full([1], 3.5) if kind == "flux-dev" else None
            assert FluxFlow.settings(tr) == {"guidance": None if guidance is None else 3.5}
            ref = tr(
                hidden_states=packed,
                timestep=t / 1000,
                guidance=guidance,
                pooled_projections=second,
                encoder_hidden_states=pe,
                txt_ids=torch.zeros(pe.shape[1], 3),
                img_ids=pipe._prepare_latent_image_ids(1, h // 2, h // 2, "cpu", torch.float32),
                return_dict=False,
            )[0]

        else:
            flow = QwenImageFlow
            ref = tr(
                hidden_states=packed,
                timestep=t / 1000,
                guidance=None,
                encoder_hidden_states_mask=second.long(),
                encoder_hidden_states=pe,
                img_shapes=[[(1, h // 2, h // 2)]],
                return_dict=False,
            )[0]
            # the cache's padding is masked out: the unpadded prompt gives the same velocity
            n = int(second.sum())
            assert n < pe.shape[1]
            unpadded = tr(
                hidden_states=packed,
                timestep=t / 1000,
                encoder_hidden_states_mask=None,
                encoder_hidden_states=pe[:, :n],
                img_shapes=[[(1, h // 2, h // 2)]],
                return_dict=False,
            )[0]
            torch.testing.assert_close(unpadded, ref, rtol=1e-4, atol=1e-5)
        got = flow.velocity(tr, xs, t, pe, second)
    assert got.shape == xs.shape
    torch.testing.assert_close(pack_latents(got), ref, rtol=0, atol=0)
    # dynamic time shift keyed on the packed sequence length, as the pipelines compute it
    assert flow.image_seq_len(tr, [16, h, h]) == packed.shape[1]
    cfg = pipe.scheduler.config
    u = torch.tensor([0.2, 0.5, 0.9])
    shift = scheduler_shift(cfg, flow.image_seq_len(tr, [16, h, h]))
    if not cfg.use_dynamic_shifting:  # FLUX.1-schnell: the static shift (1)
        assert shift == cfg.shift == 1.0
        return
    mu = calculate_shift(
        packed.shape[1],
        cfg.base_image_seq_len,
        cfg.max_image_seq_len,
        cfg.base_shift,
        cfg.max_shift,
    )
    torch.testing.assert_close(shift_times(u, shift), pipe.scheduler.time_shift(mu, 1.0, u))


def test_cache_train_weights_sample_from_the_cli(fam, tmp_path, monkeypatch, capsys):
    kind, model, cache = fam
    flow = FluxFlow if kind.startswith("flux") else QwenImageFlow
    loaded = []
    real_load = flow.load.__func__

    def spy(cls, *args, **kwargs):
        loaded.append(real_load(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(flow, "load", classmethod(spy))
    run = tmp_path / "run"
    assert main(_train_args(model, cache, run, TARGETS[kind])) == 0
    monkeypatch.undo()
    before = _pipeline(kind, model).transformer.state_dict()
    after = loaded[0].transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen: bit-identical
    lw = load_learned_weights(run / "residual_weights.safetensors")
    targets = [int(t) for t in TARGETS[kind].split(",")]
    assert lw.target_layers == targets and all(np.isfinite(lw.weights))
    assert lw.weights != [1.0, 1.0]
    summary = json.loads((run / "summary.json").read_text())["residual_weights"]
    assert summary["family"] == flow.name and summary["val_loss_final"] is not None
    if kind.startswith("flux"):
        assert summary["guidance"] == (3.5 if kind == "flux-dev" else None)
    assert (run / "validation" / "step-0000003" / "grid.png").is_file()

    out = tmp_path / "samples"
    argv = [
        "textstream", "sample", "--model", model, "--prompt", "a cat", "--output-dir", str(out),
        "--steps", "2", "--height", str(RES), "--width", str(RES),
        "--residual-weights-file", str(run / "residual_weights.safetensors"),
    ]  # fmt: skip
    assert main(argv) == 0
    settings = json.loads(next(out.glob("*/settings.json")).read_text())
    assert settings["residual"]["weights"] == lw.weights
    assert settings["residual"]["target_layers"] == targets


def test_a_cache_of_another_family_is_refused(fam, tiny_model_dir, tmp_path, capsys):
    kind, _, cache = fam
    other = tiny_model_dir("qwen-image" if kind.startswith("flux") else "flux-dev")
    capsys.readouterr()
    assert main(_train_args(other, cache, tmp_path / "run", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    made_for = "flux" if kind.startswith("flux") else "qwen-image"
    assert len(err) == 1 and f"was made for a {made_for} model" in err[0], err
    assert not (tmp_path / "run" / "residual_weights.safetensors").exists()
