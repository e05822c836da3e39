"""Benchmarks of U-REPA (spec R, seed 003). Sections:

data   LMDB read throughput of `TensorLMDB` against the seed's plain loop, in the same run, on
       stores of the real record sizes (VAE latents [4, 64, 64] and DINOv2 tokens [256, 1024],
       fp16; seed §6.2: 7,300 and 8,200 samples/s). Variants, each producing one training batch
       tensor per `--batch-size` keys in a shuffled epoch order:
         plain      per key `env.begin()` + `txn.get` + `torch.frombuffer`, then `torch.stack`
                    (the seed's `__getitem__` + the default collate), each batch dropped
         get        per key `TensorLMDB.get` (zero-copy) + `torch.stack` (a map-style dataset)
         get_many   `TensorLMDB.get_many(keys)`: one read transaction, each record copied
                    once from the memory map into a recycled batch buffer (engine.buffers)
         get_many_fresh  the same into a fresh `torch.empty` batch (no pool)
         get_many_out  get_many into one reused batch buffer (`out=`)
         plain_held, get_many_held  the previous batch kept alive while the next is read, as
                    `for batch in loader` does (the pool must then use another buffer)
         loader     get_many inside a torch DataLoader (a dataset with `__getitems__`, the
                    batch passed through; workers 0), what a training loop sees
       And the whole training dataset: `RepaDataset.__getitems__` (latents + tokens with
       `get_many`, class embeddings with CFG dropout 0.1) against the seed's per-sample
       dataset (two `txn.get` + `frombuffer`, `clip_embeddings[class]`) + the default collate,
       same shuffled batches, on a data folder in `repa preprocess`'s layout: batch dropped,
       previous batch held, and both through a DataLoader with `--workers N` (default 2;
       persistent workers, batches built in shared memory) iterated by `for batch in loader`.
       Each ratio is to the seed's loop under the same consumer pattern (column `baseline`).
       One torch thread (as in DataLoader workers; `--threads`).
       Repetitions are interleaved, medians reported; goal >= 2.5x the seed. Also bytes
       stored per sample (seed: 544 KB = 32 KB latent + 512 KB tokens; online teacher: the
       latent only), from the stores' data.mdb sizes.

train  Seconds per optimizer step, in the same run, of the same LoRA step (peft LoRA r8 on the
       mid block's attention, diffusion loss, AdamW, clipping) without alignment (`lora`), with
       the mid-block AlignHead + token + manifold losses on cached teacher tokens
       (`lora+align`), and with the teacher run online on the batch's 512 px images
       (`lora+align+online`). U-Net: SD 1.5's layout (4 levels, cross-attention 768), `small`
       = 5x narrower, one layer per block, 32x32 latents (CPU) or `real` = SD 1.5's config at
       64x64 latents (GPU; seed: 1.9 s/step at batch 128 on an H200). Teacher: DINOv2 at 518 px,
       ViT-S/14-shaped with 4 layers (small) or ViT-L/14 (real). Random weights (speed only).
       Interleaved repetitions, medians; on CPU the clock is the thread's CPU time with one torch
       thread. Goal: alignment overhead < 5%. AdamW runs the kernel `repa train` picks (fused
       when every parameter is on CUDA).
       `--compile` (issue 18's row R): after the eager timings (and the JSON with them, so a time
       limit hit while compiling keeps them) the `lora+align` and `lora` nets are compiled in
       place as `repa train` with `compile: true` does (`engine.compile.speed_up_modules` on its
       trainable modules, the U-Net and the heads: the U-Net's transformer blocks regionally;
       `--channels-last` adds `channels_last: true`) and timed again: first compiled step (wall
       clock), cold start = setup + first step - steady step, steady seconds per step, FLOPs (the
       eager count: the same arithmetic) and MFU, under `train.compiled`.

    python bench/repa.py --section data [--num-samples 512] [--batch-size 128] [--workers 2]
    python bench/repa.py --section train [--train-size small|real] [--train-batch-size 4]
    python bench/repa.py --section train --compile [--channels-last]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/rows.py

from diffalign.engine.lmdb_store import TensorLMDB, TensorLMDBWriter  # noqa: E402
from timing import break_even_text, cold_start, compile_payoff, interleaved_times  # noqa: E402

STORES = {"vae": (4, 64, 64), "dino": (256, 1024)}


STORE_FILES = {"vae": ("vae_latents.lmdb", ""), "dino": ("dino_tokens.lmdb", "_mid")}
CLASSES = 10  # of the dataset benchmark's manifest (the embedding table: 11 x 77 x 768)


def _sample_id(idx: int) -> str:
    return f"n{idx % CLASSES:08d}_{idx}"


def _build_store(path: Path, shape, n: int, suffix: str = "") -> list[str]:
    keys = [_sample_id(idx) + suffix for idx in range(n)]
    g = torch.Generator().manual_seed(0)
    with TensorLMDBWriter(path, shape, commit_every=64) as w:
        for k in keys:
            w.put(k, torch.randn(shape, generator=g))
    return keys


def _plain_loop(env, shape, batches, hold: bool = False):
    """The seed's dataset: one txn + get + decode per key, then the default collate (stack).

    `env` is the seed's handle (readonly, lock=False, readahead=False), kept open across
    epochs as in a worker; py-lmdb allows one handle per store and process, so it is the one
    `TensorLMDB` opened with the same flags. `hold`: keep the previous batch alive while the
    next is read, as `for batch in loader` does."""
    batch = None
    for keys in batches:
        items = []
        for k in keys:
            with env.begin(write=False) as txn:
                value = txn.get(k.encode())
            items.append(torch.frombuffer(value, dtype=torch.float16).view(shape))
        batch = torch.stack(items)
        if not hold:
            batch = None
    return batch


def _get_loop(db: TensorLMDB, batches):
    for keys in batches:
        torch.stack([db.get(k) for k in keys])


def _get_many_loop(db: TensorLMDB, batches, out=None, hold: bool = False, fresh: bool = False):
    """`get_many` per batch: into the recycled pool (default), a fresh tensor per batch
    (`fresh`, what `get_many` did before the pool) or one reused buffer (`out`)."""
    batch = None
    for keys in batches:
        if fresh:
            out = torch.empty((len(keys), *db.shape), dtype=db.dtype)
        batch = db.get_many(keys, out=out if out is not None and len(keys) == len(out) else None)
        if not hold:
            batch = None
    return batch


class _BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose batches come from one `get_many` (DataLoader `__getitems__`)."""

    def __init__(self, db: TensorLMDB, keys: list[str]):
        self.db, self.keys = db, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.db.get(self.keys[i])

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return self.db.get_many([self.keys[i] for i in indices])


def _loader_loop(db: TensorLMDB, batches, keys: list[str]):
    index = {k: i for i, k in enumerate(keys)}
    sampler = [[index[k] for k in b] for b in batches]
    loader = torch.utils.data.DataLoader(
        _BatchDataset(db, keys), batch_sampler=sampler, collate_fn=lambda batch: batch
    )
    for _ in loader:  # `_` holds the previous batch while the next is read
        pass


def _time_variants(variants: dict, repeats: int, rng: random.Random, n: int) -> tuple:
    """samples/s of each variant: one warm-up run each, then `repeats` interleaved timings (in
    shuffled order), each covering >= ~0.3 s of the fastest variant; medians."""
    warm = []
    for fn in variants.values():  # warm the page cache, the mapping, workers and the pool
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    epochs = max(1, round(0.3 / max(min(warm), 1e-4)))
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):
        names = list(variants)
        rng.shuffle(names)
        for v in names:
            t0 = time.perf_counter()
            for _ in range(epochs):
                variants[v]()
            times[v].append((time.perf_counter() - t0) / epochs)
    return {v: n / statistics.median(t) for v, t in times.items()}, epochs


def _rates(rates: dict, base: dict, epochs: int) -> dict:
    """Rates and each variant's ratio to its baseline (`base[variant]`) from the same run."""
    return {
        "epochs_per_timing": epochs,
        "samples_per_s": {v: round(r, 1) for v, r in rates.items()},
        "baseline": dict(base),
        "ratio": {v: round(r / rates[base[v]], 2) for v, r in rates.items()},
    }


# each store variant against the seed's loop under the same consumer pattern
STORE_BASE = {
    "plain": "plain",
    "get": "plain",
    "get_many": "plain",
    "get_many_fresh": "plain",
    "get_many_out": "plain",
    "plain_held": "plain_held",
    "get_many_held": "plain_held",
    "loader": "plain_held",
}


def section_data(args, save=None) -> dict:
    results: dict = {
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "stores": {},
    }
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        stored = {}
        for name, shape in STORES.items():
            # the data folder's layout (`repa preprocess`): the dataset section reads it too
            path = Path(tmp) / STORE_FILES[name][0]
            keys = _build_store(path, shape, args.num_samples, STORE_FILES[name][1])
            stored[name] = (path / "data.mdb").stat().st_size / args.num_samples
            db = TensorLMDB(path)
            rng = random.Random(0)
            order = keys[:]
            rng.shuffle(order)
            batches = [
                order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)
            ]
            env = db._open()
            buffer = torch.empty((args.batch_size, *shape), dtype=torch.float16)
            variants = {
                "plain": lambda e=env, s=shape, b=batches: _plain_loop(e, s, b),
                "get": lambda d=db, b=batches: _get_loop(d, b),
                "get_many": lambda d=db, b=batches: _get_many_loop(d, b),
                "get_many_fresh": lambda d=db, b=batches: _get_many_loop(d, b, fresh=True),
                "get_many_out": lambda d=db, b=batches, o=buffer: _get_many_loop(d, b, o),
                "plain_held": lambda e=env, s=shape, b=batches: _plain_loop(e, s, b, True),
                "get_many_held": lambda d=db, b=batches: _get_many_loop(d, b, hold=True),
                "loader": lambda d=db, b=batches, k=keys: _loader_loop(d, b, k),
            }
            rates, epochs = _time_variants(variants, args.repeats, rng, args.num_samples)
            db.close()
            results["stores"][name] = {
                "record_shape": list(shape),
                "record_bytes": int(torch.tensor(shape).prod()) * 2,
                **_rates(rates, STORE_BASE, epochs),
            }
        results["dataset"] = _dataset_bench(Path(tmp), args)
        results["bytes_per_sample"] = {
            "vae_record": STORES["vae"][0] * 64 * 64 * 2,
            "dino_record": 256 * 1024 * 2,
            "cached_teacher_on_disk": round(stored["vae"] + stored["dino"]),
            "online_teacher_on_disk": round(stored["vae"]),
        }
    return results


def _seed_dataset_loop(root: Path, batches, labels, table, null, dropout, rng, hold=False):
    """The seed's training data: per sample one txn + get + decode for the latent and for the
    tokens, `clip_embeddings[class]` (or the null row with probability `dropout`), then the
    default collate (three `torch.stack`s). `hold`: the previous batch stays alive while the
    next is read (`for batch in loader`)."""
    envs = _seed_dataset_loop.envs
    batch = None
    for idx in batches:
        lat, tok, emb = [], [], []
        for i in idx:
            sid = _sample_id(i)
            with envs["vae"].begin(write=False) as txn:
                lat.append(torch.frombuffer(txn.get(sid.encode()), dtype=torch.float16))
            with envs["dino"].begin(write=False) as txn:
                tok.append(torch.frombuffer(txn.get(f"{sid}_mid".encode()), dtype=torch.float16))
            emb.append(table[null if rng.random() < dropout else labels[i]])
        batch = (
            torch.stack(lat).view(len(idx), *STORES["vae"]),
            torch.stack(tok).view(len(idx), *STORES["dino"]),
            torch.stack(emb),
        )
        if not hold:
            batch = None
    return batch


class _SeedDataset(torch.utils.data.Dataset):
    """The seed's per-sample dataset (§6.2) for a DataLoader: lazily opened stores, per sample a
    txn + get + `torch.frombuffer` per store and the class row `clip_embeddings[class]` (the
    empty prompt's with probability `dropout`); batched by the default collate."""

    def __init__(self, root: Path, labels, table, null: int, dropout: float):
        self.root, self.labels, self.table = root, labels, table
        self.null, self.dropout = null, dropout
        self.envs = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        if self.envs is None:  # in the worker (one handle per store and process)
            self.envs = {k: TensorLMDB(self.root / STORE_FILES[k][0])._open() for k in STORES}
        sid = _sample_id(i)
        with self.envs["vae"].begin(write=False) as txn:
            lat = torch.frombuffer(txn.get(sid.encode()), dtype=torch.float16)
        with self.envs["dino"].begin(write=False) as txn:
            tok = torch.frombuffer(txn.get(f"{sid}_mid".encode()), dtype=torch.float16)
        c = self.null if random.random() < self.dropout else self.labels[i]
        return {
            "latent": lat.view(*STORES["vae"]),
            "tokens": tok.view(*STORES["dino"]),
            "class_embedding": self.table[c],
            "label": self.labels[i],
        }


# each dataset variant against the seed's dataset under the same consumer pattern
DATASET_BASE = {
    "seed_dataset": "seed_dataset",
    "RepaDataset": "seed_dataset",
    "seed_dataset_held": "seed_dataset_held",
    "RepaDataset_held": "seed_dataset_held",
    "seed_loader": "seed_loader",
    "RepaDataset_loader": "seed_loader",
}


def _dataset_bench(root: Path, args) -> dict:
    """`RepaDataset` (our training dataset: both stores with `get_many`, class embeddings with
    CFG dropout 0.1) against the seed's per-sample dataset + default collate, same batches:
    batch dropped at once, previous batch held, and both through a DataLoader with workers."""
    import csv

    from torch.utils.data import DataLoader

    from diffalign.engine.io import save_tensors
    from diffalign.repa.data import RepaDataset, collate

    n = args.num_samples
    labels = [i % CLASSES for i in range(n)]
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "wnid", "label", "split"])
        w.writerows([_sample_id(i), f"n{labels[i]:08d}", labels[i], "train"] for i in range(n))
    g = torch.Generator().manual_seed(0)
    table = torch.randn(CLASSES + 1, 77, 768, generator=g).half()
    prompts = [f"a photo of a class{c}" for c in range(CLASSES)] + [""]
    save_tensors(
        root / "clip_embeddings.safetensors",
        {"embeddings": table},
        {"prompts": json.dumps(prompts)},
    )
    ds = RepaDataset(root, "train", "cached", cfg_dropout=0.1, seed=0)
    rng = random.Random(0)
    order = list(range(n))
    rng.shuffle(order)
    batches = [order[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
    _seed_dataset_loop.envs = {
        "vae": ds.latents._open(),
        "dino": ds.tokens._open(),
    }

    def ours(hold=False):
        batch = None
        for b in batches:
            batch = ds.__getitems__(b)
            if not hold:
                batch = None
        return batch

    def seed(hold=False):
        return _seed_dataset_loop(root, batches, labels, table, CLASSES, 0.1, rng, hold)

    w = args.workers
    common = dict(batch_sampler=batches, num_workers=w, persistent_workers=w > 0)
    seed_loader = DataLoader(_SeedDataset(root, labels, table, CLASSES, 0.1), **common)
    ours_loader = DataLoader(ds, collate_fn=collate, **common)

    def through(loader):
        for _ in loader:  # `_` holds the previous batch while the workers deliver the next
            pass

    variants = {
        "seed_dataset": seed,
        "RepaDataset": ours,
        "seed_dataset_held": lambda: seed(True),
        "RepaDataset_held": lambda: ours(True),
        "seed_loader": lambda d=seed_loader: through(d),
        "RepaDataset_loader": lambda d=ours_loader: through(d),
    }
    rates, epochs = _time_variants(variants, args.repeats, rng, n)
    variants.clear()
    del seed_loader, ours_loader  # stops the persistent workers
    return _rates(rates, DATASET_BASE, epochs)


DATA_LABELS = {
    "plain": "plain (seed): per key txn.get+frombuffer, stack",
    "get": "TensorLMDB.get per key + stack",
    "get_many": "get_many (pooled batch), batch dropped",
    "get_many_fresh": "get_many into a fresh tensor per batch",
    "get_many_out": "get_many into one reused out= buffer",
    "plain_held": "plain, previous batch held",
    "get_many_held": "get_many (pooled), previous batch held",
    "loader": "get_many in a DataLoader (workers 0)",
    "seed_dataset": "seed's dataset + collate, batch dropped",
    "RepaDataset": "RepaDataset.__getitems__, batch dropped",
    "seed_dataset_held": "seed's dataset + collate, previous held",
    "RepaDataset_held": "RepaDataset, previous batch held",
    "seed_loader": "seed's dataset, DataLoader workers {w}",
    "RepaDataset_loader": "RepaDataset, DataLoader workers {w}",
}


def _print_data(r: dict) -> None:
    print(f"LMDB reads, {r['num_samples']} samples, batches of {r['batch_size']}, medians")
    print(f"{'store':<6} {'variant':<48} {'samples/s':>11} {'ratio':>6}  baseline")
    groups = [(name, s) for name, s in r["stores"].items()] + [("data", r["dataset"])]
    for name, s in groups:
        for v, rate in s["samples_per_s"].items():
            label = DATA_LABELS[v].format(w=r["workers"])
            print(f"{name:<6} {label:<48} {rate:>11.1f} {s['ratio'][v]:>6.2f}  {s['baseline'][v]}")
    b = r["bytes_per_sample"]
    print(
        f"bytes per sample: cached teacher {b['cached_teacher_on_disk'] / 1024:.1f} KiB on disk "
        f"(records {(b['vae_record'] + b['dino_record']) / 1024:.0f} KiB; seed 544 KB), "
        f"online teacher {b['online_teacher_on_disk'] / 1024:.1f} KiB"
    )


# ---------------------------------------------------------------------------------------------
# train: the cost of alignment in a training step


def _bench_unet(size: str, device, dtype):
    """An SD 1.5-shaped U-Net (4 levels, cross-attention 768): `real` = SD 1.5's own config,
    `small` = the same layout 5x narrower with one layer per block (CPU-sized)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if size == "real":
        cfg = dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_head_dim=8,
            sample_size=64,
        )
    else:
        cfg = dict(
            block_out_channels=(64, 128, 256, 256),
            layers_per_block=1,
            attention_head_dim=8,
            sample_size=32,
            norm_num_groups=32,
        )
    with torch.device(device):  # built where it runs: a GPU initialises 860 M parameters at once
        unet = UNet2DConditionModel(cross_attention_dim=768, **cfg)
    return unet, cfg["sample_size"]


def _bench_dino(size: str, device, dtype):
    """DINOv2 at 518 px: `real` = ViT-L/14 (1024 wide, 24 layers), `small` = ViT-S/14 shape
    with 4 layers (CPU-sized)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    if size == "real":
        cfg = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16)
    else:
        cfg = Dinov2Config(hidden_size=384, num_hidden_layers=4, num_attention_heads=6)
    cfg.image_size, cfg.patch_size = 518, 14
    with torch.device(device):
        model = Dinov2Model(cfg)
    return model.to(dtype=dtype).eval(), cfg.hidden_size


def section_train(args, save=None) -> dict:
    """Seconds per optimizer step of the same LoRA step without and with alignment (then
    compiled with `--compile`; `save(result)` is called with the eager figures first)."""
    from diffalign.engine.compile import uses_fused_adamw
    from diffalign.repa.heads import add_lora, lora_config, lora_parameters
    from diffalign.repa.losses import (
        add_noise,
        align_coeff,
        diffusion_loss,
        diffusion_target,
        manifold_loss,
        token_loss,
        total_loss,
    )
    from diffalign.repa.model import SD15_SCHEDULE, RepaModel, RepaSpec
    from diffalign.repa.teacher import dino_tokens

    device = torch.device(args.device)
    size = args.train_size
    teacher_dim = 1024 if size == "real" else 384  # the DINOv2 below: ViT-L/14 or ViT-S/14
    b = args.train_batch_size
    amp = device.type == "cuda"
    wdtype = torch.bfloat16 if amp else torch.float32
    from diffusers import DDPMScheduler

    ac = DDPMScheduler.from_config(SD15_SCHEDULE).alphas_cumprod

    def build(align: bool):
        unet, side = _bench_unet(size, device, torch.float32)
        if align:
            model = RepaModel(unet, RepaSpec(teacher_dim=teacher_dim))
            heads = model.heads.to(device)
            params = [
                {"params": lora_parameters(unet), "weight_decay": 0.0},
                {"params": list(heads.parameters()), "weight_decay": 0.01},
            ]
        else:
            add_lora(unet, lora_config())
            model = None
            params = [{"params": lora_parameters(unet), "weight_decay": 0.0}]
        for p in unet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(wdtype)
        # the kernel `repa train` runs (the loop's choice: fused when every parameter is on CUDA)
        fused = uses_fused_adamw([p for gr in params for p in gr["params"]])
        opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if fused else {}))
        return unet, model, opt, side

    g = torch.Generator().manual_seed(0)
    nets = {"lora": build(False), "lora+align": build(True)}
    side = nets["lora"][3]
    x0 = torch.randn(b, 4, side, side, generator=g).to(device)
    cond = torch.randn(b, 77, 768, generator=g).to(device, wdtype)
    tokens = torch.nn.functional.normalize(
        torch.randn(b, 256, teacher_dim, generator=g), dim=-1
    ).to(device)
    images = torch.rand(b, 3, 512, 512, generator=g).to(device)
    dino = None
    if args.online:
        dino, _ = _bench_dino(size, device, wdtype)
        nets["lora+align+online"] = None  # the lora+align nets, tokens from DINOv2 in the step

    def step(variant: str) -> None:
        key = "lora+align" if variant.startswith("lora+align") else "lora"
        unet, model, opt, _ = nets[key]
        t = torch.randint(0, 1000, (b,), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            zt = add_noise(x0, noise, ac, t).to(wdtype)
            target = diffusion_target(x0, noise, ac, t)
            if model is None:
                loss = diffusion_loss(unet(zt, t, encoder_hidden_states=cond).sample, target)
            else:
                pred, _, out = model.forward(zt, t, cond)
                teach = tokens
                if variant.endswith("online"):
                    teach = dino_tokens(dino, images, grid=16)
                tok = out["mid"]
                loss = total_loss(
                    diffusion_loss(pred, target),
                    token_loss(tok, teach),
                    manifold_loss(tok, teach),
                    align_coeff(5000),
                )
        loss.backward()
        params = [p for gr in opt.param_groups for p in gr["params"]]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    variants = list(nets)
    # one warm-up round, then `repeats` shuffled rounds (bench/timing.py)
    times = interleaved_times(
        {v: (lambda v=v: step(v)) for v in variants}, reps=args.repeats, warmup=1, device=device
    )
    med = {v: statistics.median(t) for v, t in times.items()}
    base = med["lora"]
    from rows import count_flops, mfu

    flops = {v: count_flops(lambda v=v: step(v)) for v in variants}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    mfus = {v: mfu(flops[v], med[v], device_name) for v in variants}
    result = {
        "device": str(device),
        "device_name": device_name,
        "times": times,
        "flops_per_step": flops,
        "flops_counted": "FlopCounterMode: matmul/conv/SDPA, 2 per MAC, forward + backward",
        "mfu_pct": {v: None if m is None else round(m, 2) for v, m in mfus.items()},
        "size": size,
        "batch_size": b,
        "clock": "wall (cuda synchronised)" if device.type == "cuda" else "thread CPU time",
        "teacher_dim": teacher_dim,
        "online_teacher": "DINOv2 ViT-L/14 at 518 px"
        if size == "real"
        else "DINOv2 ViT-S/14-shaped, 4 layers, 518 px",
        "seconds_per_step": {v: round(s, 4) for v, s in med.items()},
        "ratio_to_lora": {v: round(s / base, 4) for v, s in med.items()},
        "alignment_overhead_pct": round(100 * (med["lora+align"] / base - 1), 2),
        "online_teacher_overhead_pct": (
            round(100 * (med["lora+align+online"] / med["lora+align"] - 1), 2)
            if "lora+align+online" in med
            else None
        ),
        "fused_adamw": bool(nets["lora"][2].defaults.get("fused")),
    }
    if getattr(args, "compile", False):
        if save is not None:
            save(result)  # the eager figures survive a time limit hit while compiling
        result["compiled"] = _train_compiled(args, nets, step, result)
    return result


# the compiled run's variants, the row's own first: its first step pays the compile
COMPILED_VARIANTS = ("lora+align", "lora")


def _train_compiled(args, nets: dict, step, eager: dict) -> dict:
    """The eager run's nets compiled in place as `repa train` compiles its trainable modules
    (U-Net and heads) with `compile: true` (and `channels_last`), then timed as the eager run.

    The first compiled step of each variant is timed on the wall clock (inductor compiles in
    worker processes too); cold start = setup + first step - steady step of `lora+align`;
    break-even = cold start / seconds saved per step against eager. FLOPs per step are the eager
    count (compiling changes the kernels, not the model's arithmetic)."""
    from diffalign.engine.compile import speed_up_modules
    from rows import mfu

    device = torch.device(eager["device"])
    t0 = time.perf_counter()
    how = {}
    for v in COMPILED_VARIANTS:
        unet, model, _, _ = nets[v]
        modules = {"unet": unet} if model is None else {"unet": unet, "heads": model.heads}
        how[v] = speed_up_modules(
            modules, device, compile=True, channels_last=getattr(args, "channels_last", False)
        )
    setup = time.perf_counter() - t0
    first = {}
    for v in COMPILED_VARIANTS:
        t0 = time.perf_counter()
        step(v)
        first[v] = time.perf_counter() - t0
    times = interleaved_times(  # the first steps above were the warm-up
        {v: (lambda v=v: step(v)) for v in COMPILED_VARIANTS},
        reps=args.repeats,
        warmup=0,
        device=device,
        seed=1,
    )
    med = {v: statistics.median(t) for v, t in times.items()}
    row = "lora+align"
    payoff = compile_payoff(
        cold_start(first[row], med[row], setup), eager["seconds_per_step"][row], med[row]
    )
    flops = {v: eager["flops_per_step"][v] for v in COMPILED_VARIANTS}
    mfus = {v: mfu(flops[v], med[v], eager["device_name"]) for v in COMPILED_VARIANTS}
    return {
        "compiled_as": how,
        "channels_last": bool(getattr(args, "channels_last", False)),
        "setup_s": round(setup, 3),
        "first_step_s": {v: round(s, 3) for v, s in first.items()},
        "cold_start_s": payoff["cold_start_s"],
        "times": times,
        "seconds_per_step": {v: round(s, 4) for v, s in med.items()},
        "flops_per_step": flops,
        "flops_counted": "the eager step's count (same arithmetic; bench/rows.py convention)",
        "mfu_pct": {v: None if m is None else round(m, 2) for v, m in mfus.items()},
        "speedup": {v: round(eager["seconds_per_step"][v] / s, 3) for v, s in med.items()},
        "break_even_steps": payoff["break_even_steps"],
        "alignment_overhead_pct": round(100 * (med["lora+align"] / med["lora"] - 1), 2),
    }


def _print_train(r: dict) -> None:
    print(
        f"training step, {r['size']} SD 1.5-shaped U-Net, batch {r['batch_size']}, "
        f"{r['device']}, {r['clock']}, medians"
    )
    print(f"{'variant':<20} {'s/step':>9} {'x lora':>8}")
    for v, s in r["seconds_per_step"].items():
        print(f"{v:<20} {s:>9.4f} {r['ratio_to_lora'][v]:>8.3f}")
    print(f"alignment overhead: {r['alignment_overhead_pct']:+.2f}% (goal < 5%)")
    for v, f in r["flops_per_step"].items():
        m = r["mfu_pct"][v]
        print(f"{v}: {f / 1e12:.3f} TFLOP per step" + (f", MFU {m:.1f}%" if m is not None else ""))
    if r["online_teacher_overhead_pct"] is not None:
        print(
            f"online teacher ({r['online_teacher']}): {r['online_teacher_overhead_pct']:+.2f}% "
            "over the cached-teacher step"
        )
    c = r.get("compiled")
    if c:
        print(
            f"compiled ({'channels_last, ' if c['channels_last'] else ''}{c['compiled_as']}): "
            + ", ".join(
                f"{v} {s:.4f} s/step ({c['speedup'][v]:.2f}x eager"
                + (f", MFU {c['mfu_pct'][v]:.1f}%" if c["mfu_pct"][v] is not None else "")
                + ")"
                for v, s in c["seconds_per_step"].items()
            )
            + f"; cold start {c['cold_start_s']:.1f} s (first steps {c['first_step_s']}), "
            + break_even_text(c["break_even_steps"])
            + f"; alignment overhead {c['alignment_overhead_pct']:+.2f}%"
        )


SECTIONS = {"data": (section_data, _print_data), "train": (section_train, _print_train)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--section", choices=[*SECTIONS, "all"], default="all", help="what to measure")
    p.add_argument("--num-samples", type=int, default=512, help="records per store (data)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (data; seed: 128)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repetitions")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--tmp", default=None, help="folder for the temporary stores (data)")
    p.add_argument("--workers", type=int, default=2, help="data: DataLoader workers (default 2)")
    p.add_argument(
        "--train-size",
        choices=("small", "real"),
        default="small",
        help="train: SD 1.5-shaped U-Net 5x narrower (CPU) or SD 1.5's own size (GPU)",
    )
    p.add_argument("--train-batch-size", type=int, default=4, help="train: batch (seed: 128)")
    p.add_argument(
        "--no-online",
        dest="online",
        action="store_false",
        help="train: skip the online-teacher variant",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="train: torch device (bf16 autocast on cuda)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="train: then the same steps compiled as `repa train` with `compile: true`",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="train: the compiled run also with `channels_last: true` (needs --compile)",
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    p = build_parser()
    args = p.parse_args(argv)
    if args.channels_last and not args.compile:
        p.error("--channels-last applies to the compiled run: add --compile")
    torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out: dict = {"load_avg_1_5_15": load, "torch": torch.__version__, "threads": args.threads}

    def write(results: dict) -> None:
        if args.json:
            from diffalign.engine.io import write_json  # atomic: a kill keeps the last JSON

            write_json(args.json, results)

    for name, (run, show) in SECTIONS.items():
        if args.section in (name, "all"):
            out[name] = run(args, lambda partial, name=name: write({**out, name: partial}))
            show(out[name])
    out["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"load average (1/5/15 min) at start: {load}, at the end: {out['load_avg_end']}")
    write(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
