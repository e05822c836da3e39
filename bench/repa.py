"""Benchmarks of U-REPA (spec R, seed 003). Sections:

data   LMDB read throughput of `TensorLMDB` against the seed's plain loop, in the same run, on
       stores of the real record sizes (VAE latents [4, 64, 64] and DINOv2 tokens [256, 1024],
       fp16; seed §6.2: 7,300 and 8,200 samples/s). Variants, each producing one training batch
       tensor per `--batch-size` keys in a shuffled epoch order:
         plain      per key `env.begin()` + `txn.get` + `torch.frombuffer`, then `torch.stack`
                    (the seed's `__getitem__` + the default collate)
         get        per key `TensorLMDB.get` (zero-copy) + `torch.stack` (a map-style dataset)
         get_many   `TensorLMDB.get_many(keys)`: one read transaction, one cursor `getmulti`,
                    each record copied once from the memory map into the batch tensor
         get_many_out  get_many into a reused batch buffer (`out=`), as a loader that recycles
                    its (pinned) batch buffers after the host-to-device copy would
         loader     get_many inside a torch DataLoader (a dataset with `__getitems__`, the
                    batch passed through; workers 0), what a training loop sees
       And the whole training dataset: `RepaDataset.__getitems__` (latents + tokens with
       `get_many`, class embeddings with CFG dropout 0.1) against the seed's per-sample
       dataset (two `txn.get` + `frombuffer`, `clip_embeddings[class]`) + the default collate,
       same shuffled batches, on a data folder in `repa preprocess`'s layout.
       One torch thread (as in DataLoader workers; `--threads`).
       Repetitions are interleaved, medians reported; goal: get_many >= 2.5x plain. Also bytes
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
       thread. Goal: alignment overhead < 5%.

    python bench/repa.py --section data [--num-samples 512] [--batch-size 128] [--json out.json]
    python bench/repa.py --section train [--train-size small|real] [--train-batch-size 4]
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

from diffalign.engine.lmdb_store import TensorLMDB, TensorLMDBWriter  # noqa: E402

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


def _plain_loop(env, shape, batches):
    """The seed's dataset: one txn + get + decode per key, then the default collate (stack).

    `env` is the seed's handle (readonly, lock=False, readahead=False), kept open across
    epochs as in a worker; py-lmdb allows one handle per store and process, so it is the one
    `TensorLMDB` opened with the same flags."""
    for keys in batches:
        items = []
        for k in keys:
            with env.begin(write=False) as txn:
                value = txn.get(k.encode())
            items.append(torch.frombuffer(value, dtype=torch.float16).view(shape))
        torch.stack(items)


def _get_loop(db: TensorLMDB, batches):
    for keys in batches:
        torch.stack([db.get(k) for k in keys])


def _get_many_loop(db: TensorLMDB, batches, out=None):
    for keys in batches:
        db.get_many(keys, out=out if out is not None and len(keys) == len(out) else None)


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
    for _ in loader:
        pass


def section_data(args) -> dict:
    results: dict = {"num_samples": args.num_samples, "batch_size": args.batch_size, "stores": {}}
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
                "get_many_out": lambda d=db, b=batches, o=buffer: _get_many_loop(d, b, o),
                "loader": lambda d=db, b=batches, k=keys: _loader_loop(d, b, k),
            }
            warm = {}
            for v, fn in variants.items():  # warm the page cache and the mapping
                t0 = time.perf_counter()
                fn()
                warm[v] = time.perf_counter() - t0
            # each timing covers >= ~0.3 s of the fastest variant (epochs over the same keys)
            epochs = max(1, round(0.3 / max(min(warm.values()), 1e-4)))
            times: dict[str, list[float]] = {v: [] for v in variants}
            for _ in range(args.repeats):
                names = list(variants)
                rng.shuffle(names)
                for v in names:
                    t0 = time.perf_counter()
                    for _ in range(epochs):
                        variants[v]()
                    times[v].append((time.perf_counter() - t0) / epochs)
            db.close()
            rates = {v: args.num_samples / statistics.median(t) for v, t in times.items()}
            results["stores"][name] = {
                "record_shape": list(shape),
                "record_bytes": int(torch.tensor(shape).prod()) * 2,
                "epochs_per_timing": epochs,
                "samples_per_s": {v: round(r, 1) for v, r in rates.items()},
                "ratio_to_plain": {v: round(r / rates["plain"], 2) for v, r in rates.items()},
            }
        results["dataset"] = _dataset_bench(Path(tmp), args)
        results["bytes_per_sample"] = {
            "vae_record": STORES["vae"][0] * 64 * 64 * 2,
            "dino_record": 256 * 1024 * 2,
            "cached_teacher_on_disk": round(stored["vae"] + stored["dino"]),
            "online_teacher_on_disk": round(stored["vae"]),
        }
    return results


def _seed_dataset_loop(root: Path, batches, labels, table, null, dropout, rng):
    """The seed's training data: per sample one txn + get + decode for the latent and for the
    tokens, `clip_embeddings[class]` (or the null row with probability `dropout`), then the
    default collate (three `torch.stack`s)."""
    envs = _seed_dataset_loop.envs
    for idx in batches:
        lat, tok, emb = [], [], []
        for i in idx:
            sid = _sample_id(i)
            with envs["vae"].begin(write=False) as txn:
                lat.append(torch.frombuffer(txn.get(sid.encode()), dtype=torch.float16))
            with envs["dino"].begin(write=False) as txn:
                tok.append(torch.frombuffer(txn.get(f"{sid}_mid".encode()), dtype=torch.float16))
            emb.append(table[null if rng.random() < dropout else labels[i]])
        torch.stack(lat).view(len(idx), *STORES["vae"])
        torch.stack(tok).view(len(idx), *STORES["dino"])
        torch.stack(emb)


def _dataset_bench(root: Path, args) -> dict:
    """`RepaDataset` (our training dataset: both stores with `get_many`, class embeddings with
    CFG dropout 0.1) against the seed's per-sample dataset + default collate, same batches."""
    import csv

    from diffalign.engine.io import save_tensors
    from diffalign.repa.data import RepaDataset

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

    def ours():
        for b in batches:
            ds.__getitems__(b)

    def seed():
        _seed_dataset_loop(root, batches, labels, table, CLASSES, 0.1, rng)

    variants = {"seed_dataset": seed, "RepaDataset": ours}
    warm = []
    for fn in variants.values():  # warm the page cache and the mapping
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    epochs = max(1, round(0.3 / max(min(warm), 1e-4)))  # >= ~0.3 s per timing
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        names = list(variants)
        rng.shuffle(names)
        for v in names:
            t0 = time.perf_counter()
            for _ in range(epochs):
                variants[v]()
            times[v].append((time.perf_counter() - t0) / epochs)
    rates = {v: n / statistics.median(t) for v, t in times.items()}
    return {
        "samples_per_s": {v: round(r, 1) for v, r in rates.items()},
        "ratio_to_seed": {v: round(r / rates["seed_dataset"], 2) for v, r in rates.items()},
    }


def _print_data(r: dict) -> None:
    print(f"LMDB reads, {r['num_samples']} samples, batches of {r['batch_size']}, medians")
    print(f"{'store':<6} {'variant':<13} {'samples/s':>12} {'x plain':>8}")
    for name, s in r["stores"].items():
        for v, rate in s["samples_per_s"].items():
            print(f"{name:<6} {v:<13} {rate:>12.1f} {s['ratio_to_plain'][v]:>8.2f}")
    d = r["dataset"]
    for v, rate in d["samples_per_s"].items():
        print(f"{'data':<6} {v:<13} {rate:>12.1f} {d['ratio_to_seed'][v]:>8.2f}  (x seed_dataset)")
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


def section_train(args) -> dict:
    """Seconds per optimizer step of the same LoRA step without and with alignment."""
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
        opt = torch.optim.AdamW(params, lr=1e-4)
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

    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    variants = list(nets)
    for v in variants:  # warm-up
        step(v)
    times: dict[str, list[float]] = {v: [] for v in variants}
    rng = random.Random(0)
    for _ in range(args.repeats):
        order = variants[:]
        rng.shuffle(order)
        for v in order:
            t0 = clock()
            step(v)
            times[v].append(clock() - t0)
    med = {v: statistics.median(t) for v, t in times.items()}
    base = med["lora"]
    return {
        "device": str(device),
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
    if r["online_teacher_overhead_pct"] is not None:
        print(
            f"online teacher ({r['online_teacher']}): {r['online_teacher_overhead_pct']:+.2f}% "
            "over the cached-teacher step"
        )


SECTIONS = {"data": (section_data, _print_data), "train": (section_train, _print_train)}


def main() -> int:
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--section", choices=[*SECTIONS, "all"], default="all", help="what to measure")
    p.add_argument("--num-samples", type=int, default=512, help="records per store (data)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (data; seed: 128)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repetitions")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--tmp", default=None, help="folder for the temporary stores (data)")
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
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out: dict = {"load_avg_1_5_15": load, "torch": torch.__version__, "threads": args.threads}
    for name, (run, show) in SECTIONS.items():
        if args.section in (name, "all"):
            out[name] = run(args)
            show(out[name])
    print(f"load average at start: {load}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
