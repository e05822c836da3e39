"""`textstream cache` VAE-encodes each distinct image once (COCO: about five captions per image)
and reuses its latent for all its captions: every latent record equals a direct VAE encode of
its pair's image alone (diffusers' AutoencoderKL in the test), the VAE sees each image once, a
killed run finished by a re-run equals a straight run, and the memory's size changes nothing
but speed. `LatentMemory`'s keep/drop rule is checked against an exhaustive search."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.textstream.cache import LatentMemory, build_cache

N_IMAGES, CAPTIONS_PER_IMAGE = 4, 3
STORES = ("latents.lmdb", "prompt_embeds.lmdb", "pooled_prompt_embeds.lmdb")


def _coco(root: Path, broken: bool = False) -> Path:
    """COCO layout, annotations in COCO's scattered order (caption c of image i at c*N + i), so
    the captions of one image fall in different batches; `broken`: one more image, unreadable,
    with two captions."""
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    rng = np.random.default_rng(3)
    images, anns = [], []
    for i in range(N_IMAGES):
        arr = rng.integers(0, 255, (36 + 4 * i, 44, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "val2017" / f"{i:012d}.png")
        images.append({"id": 10 + i, "file_name": f"{i:012d}.png"})
    for c in range(CAPTIONS_PER_IMAGE):
        for i in range(N_IMAGES):
            anns.append({"image_id": 10 + i, "id": 100 * c + i, "caption": f"thing {i} ({c})"})
    if broken:
        (root / "val2017" / "broken.png").write_bytes(b"not a png")
        images.append({"id": 99, "file_name": "broken.png"})
        anns[1:1] = [{"image_id": 99, "id": 900 + c, "caption": "a broken one"} for c in (0, 1)]
    ann = root / "annotations" / "captions_val2017.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns}))
    return ann


def _args(model: str, ann: Path, out: Path, *extra: str) -> list[str]:
    return [
        "textstream", "cache", "--model", model, "--dataset", str(ann), "--output-dir", str(out),
        "--resolution", "32", "--batch-size", "5", "--max-sequence-length", "8", *extra,
    ]  # fmt: skip


def _raw_records(cache: Path) -> dict[str, dict[str, bytes]]:
    import lmdb

    out = {}
    for name in STORES:
        env = lmdb.open(str(cache / name), readonly=True, lock=False, subdir=True)
        with env.begin() as txn:
            out[name] = {bytes(k).decode(): bytes(v) for k, v in txn.cursor()}
        env.close()
    return out


class _CountingVAE:
    """Counts the images that go through `AutoencoderKL.encode` (monkeypatched on the class)."""

    def __init__(self, monkeypatch):
        from diffusers import AutoencoderKL

        self.batch_sizes: list[int] = []
        original = AutoencoderKL.encode

        def encode(vae, x, *args, **kwargs):
            self.batch_sizes.append(int(x.shape[0]))
            return original(vae, x, *args, **kwargs)

        monkeypatch.setattr(AutoencoderKL, "encode", encode)


@pytest.fixture(scope="module")
def sd3(tiny_model_dir):
    return tiny_model_dir("sd3")


@pytest.fixture(scope="module")
def straight(sd3, tmp_path_factory):
    """(dataset json, cache folder) of one straight run with a broken image among the pairs."""
    root = tmp_path_factory.mktemp("reuse")
    ann = _coco(root / "coco", broken=True)
    assert main(_args(sd3, ann, root / "cache")) == 0
    return ann, root / "cache"


def _vae_reference(vae, image: str) -> torch.Tensor:
    """The pair's image resized + centre-cropped by hand, the VAE's posterior mean of it alone,
    shifted and scaled as SD3 does, in fp16."""
    with Image.open(image) as im:
        w, h = im.size
        scale = 32 / min(w, h)
        size = (max(32, round(w * scale)), max(32, round(h * scale)))
        im = im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - 32) // 2, (size[1] - 32) // 2
        im = im.crop((left, top, left + 32, top + 32))
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    x = x / 255.0 * 2.0 - 1.0
    with torch.no_grad():
        mean = vae.encode(x[None]).latent_dist.mean
    return ((mean - vae.config.shift_factor) * vae.config.scaling_factor)[0].half()


def test_every_latent_is_its_image_encoded_alone(sd3, straight):
    from diffusers import AutoencoderKL

    from diffalign.engine.lmdb_store import TensorLMDB

    _, cache = straight
    pairs = [json.loads(line) for line in (cache / "pairs.jsonl").read_text().splitlines()]
    summary = json.loads((cache / "summary.json").read_text())
    assert len(pairs) == N_IMAGES * CAPTIONS_PER_IMAGE + 2
    assert summary["failed"] == 2 and {f["id"] for f in summary["failures"]} == {"900", "901"}
    assert summary["written"] == N_IMAGES * CAPTIONS_PER_IMAGE
    assert summary["images_encoded"] == N_IMAGES
    vae = AutoencoderKL.from_pretrained(Path(sd3) / "vae").eval()
    db = TensorLMDB(cache / "latents.lmdb")
    try:
        assert sorted(db.keys()) == sorted(p["id"] for p in pairs if not p["id"].startswith("9"))
        refs = {}
        for p in pairs:
            if p["id"] in ("900", "901"):
                continue
            ref = refs.setdefault(p["image"], _vae_reference(vae, p["image"]))
            assert torch.equal(db.get(p["id"]), ref), p  # bit for bit
    finally:
        db.close()


def test_the_vae_sees_each_image_once(sd3, straight, tmp_path, monkeypatch):
    ann, cache = straight
    vae = _CountingVAE(monkeypatch)
    assert main(_args(sd3, ann, tmp_path / "cache")) == 0
    # 14 pairs in batches of 5: 3 batches; the 4 readable images, each in batches 0, 1 and 2
    assert vae.batch_sizes == [1] * N_IMAGES
    assert _raw_records(tmp_path / "cache") == _raw_records(cache)


@pytest.mark.parametrize("memory_mb", [0, 0.008])  # nothing kept across batches; one record
def test_the_memory_size_changes_no_byte(sd3, straight, tmp_path, monkeypatch, memory_mb):
    ann, cache = straight
    vae = _CountingVAE(monkeypatch)
    out = tmp_path / "cache"
    assert main(_args(sd3, ann, out, "--latent-memory-mb", str(memory_mb))) == 0
    # batches hold images {0,1,2}, {3,0,1,2}, {0,1,2,3}: without memory 3 + 4 + 4 encodes,
    # with one record kept across batches 3 + 3 + 3
    assert len(vae.batch_sizes) == (11 if memory_mb == 0 else 9)
    assert _raw_records(out) == _raw_records(cache)


def test_killed_then_rerun_equals_the_straight_run(sd3, straight, tmp_path, monkeypatch):
    from diffalign.textstream import cache as cache_mod

    ann, cache = straight
    out = tmp_path / "cache"
    original = cache_mod._encode_batch
    calls = []

    def dies_in_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "_encode_batch", dies_in_third_batch)
    assert main(_args(sd3, ann, out)) == 130
    monkeypatch.setattr(cache_mod, "_encode_batch", original)
    assert len(_raw_records(out)["latents.lmdb"]) == 3 + 5 + 1  # batches 0, 1 and __meta__
    vae = _CountingVAE(monkeypatch)
    assert main(_args(sd3, ann, out)) == 0
    # batch 0 (its broken pairs are missing) and batch 2 are encoded again, batch 1 is kept
    summary = json.loads((out / "summary.json").read_text())
    assert summary["already_present"] == 5 and summary["images_encoded"] == N_IMAGES
    assert len(vae.batch_sizes) == N_IMAGES
    assert _raw_records(out) == _raw_records(cache)
    assert (out / "job.json").read_bytes() == (cache / "job.json").read_bytes()


def test_a_rerun_in_another_dtype_or_of_a_batch_encoded_cache_is_refused(
    sd3, straight, tmp_path, capsys
):
    """The encoders' dtype and the per-image encoding are part of the job: neither a rerun in
    another dtype nor a resume of a cache an older diffalign encoded in batches mixes latents."""
    ann, cache = straight
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    before = _raw_records(out)
    assert main([*_args(sd3, ann, out), "--dtype", "float16"]) == 2
    assert "dtype" in capsys.readouterr().err
    job = json.loads((out / "job.json").read_text())
    assert job["dtype"] == "float32" and job["latent_encoding"] == "per-image"
    del job["latent_encoding"]  # as an older diffalign wrote it
    (out / "job.json").write_text(json.dumps(job))
    assert main(_args(sd3, ann, out)) == 2
    assert "latent_encoding" in capsys.readouterr().err
    assert _raw_records(out) == before  # nothing lost


def test_build_cache_refuses_a_negative_memory(sd3, straight, tmp_path):
    from diffalign.engine.errors import DiffalignError

    ann, _ = straight
    for bad in (-1.0, float("nan")):
        with pytest.raises(DiffalignError, match="latent-memory-mb"):
            build_cache(sd3, str(ann), tmp_path / "c", resolution=32, latent_memory_mb=bad)
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------
# LatentMemory against an exhaustive search


def _encodes_with_memory(schedule: list[set[str]], capacity: int) -> int:
    """VAE encodes of `schedule` (the images of each batch) with `LatentMemory`."""
    from diffalign.textstream.cache import _image_uses

    class _P:
        def __init__(self, image):
            self.image = image

    memory = LatentMemory(_image_uses([[_P(i) for i in sorted(b)] for b in schedule]), capacity)
    encodes = 0
    for step, batch in enumerate(schedule):
        memory.now = step
        encodes += sum(memory.get(i) is None for i in batch)
        memory.keep({i: i.encode() for i in batch})
        assert len(memory) <= capacity
    return encodes


def _fewest_encodes(schedule: list[set[str]], capacity: int) -> int:
    """The fewest encodes over every choice of what to keep after each batch (brute force)."""
    best = {frozenset(): 0}  # records held after a step -> fewest encodes so far
    for batch in schedule:
        nxt: dict[frozenset, int] = {}
        for held, cost in best.items():
            cost += len(batch - held)
            pool = sorted(held | batch)
            for n in range(min(capacity, len(pool)) + 1):
                for keep in itertools.combinations(pool, n):
                    key = frozenset(keep)
                    nxt[key] = min(nxt.get(key, cost), cost)
        best = nxt
    return min(best.values())


def test_latent_memory_encodes_as_few_as_the_best_choice():
    rng = np.random.default_rng(0)
    images = ["a", "b", "c", "d", "e"]
    for _ in range(60):
        steps = int(rng.integers(2, 7))
        schedule = [set(rng.choice(images, size=int(rng.integers(1, 4)))) for _ in range(steps)]
        for capacity in (0, 1, 2, 3):
            got = _encodes_with_memory(schedule, capacity)
            assert got == _fewest_encodes(schedule, capacity), (schedule, capacity)
    # an image no later step needs is not kept, whatever room there is
    memory = LatentMemory({"a": [0], "b": [0, 2]}, capacity=5)
    memory.keep({"a": b"a", "b": b"b"})
    assert memory.get("a") is None and memory.get("b") == b"b"
    memory.now = 2
    memory.keep({"b": b"b"})
    assert len(memory) == 0


@pytest.mark.slow
def test_two_processes_match_one(sd3, straight, tmp_path):
    """`accelerate launch` with 2 CPU processes, each with its own memory: rank 0 encodes
    batches 0 and 2, rank 1 batch 1, and the store is the 1-process one byte for byte."""
    from launch_helper import launch_two_cpu_processes

    ann, cache = straight
    out = tmp_path / "cache2"
    proc = launch_two_cpu_processes(["-m", "diffalign.cli", *_args(sd3, ann, out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["images_encoded"] == N_IMAGES + 4
    assert _raw_records(out) == _raw_records(cache)
