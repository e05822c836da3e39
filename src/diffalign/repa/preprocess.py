"""`diffalign repa preprocess images|vae|dino|clip`: the data folder of seed 003 §3.

Layout of one `--data-dir`:

    images.zip                     {id}.jpg, RGB, square (512 px by default), JPEG q95   (§3.1)
    manifest.csv                   id,wnid,label,split
    classes.csv                    label,wnid,name (every class of the source, label order)
    vae_latents.lmdb/              fp16 [4, R/8, R/8], key = id                          (§3.2)
    dino_tokens.lmdb/              fp16 [256, D] L2-normalised, key = {id}_mid           (§3.3)
    clip_embeddings.safetensors    `embeddings` [classes + 1, 77, 768] (last = "")      (§3.4)
    summary_<step>.json            what each step did (counts, failures, model, seconds)

Every step shards its work over the processes of `accelerate launch` (the items run in the
fixed batches of a 1-process run; rank r takes batches r, r + N, ...: the same records); the
LMDB stores and the zip have one writer: the other ranks send their results to rank 0 batch by
batch (`torch.distributed.gather_object`), which writes them. Every step resumes: records
already present are skipped, a record of the wrong length is redone, staged images survive a
kill. Each step holds an `output_lock` on what it writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError, ModelNotFoundError

IMAGES_ZIP = "images.zip"
MANIFEST = "manifest.csv"
CLASSES = "classes.csv"
VAE_LMDB = "vae_latents.lmdb"
DINO_LMDB = "dino_tokens.lmdb"
CLIP_FILE = "clip_embeddings.safetensors"
STAGING = ".images_staging"
DINO_KEY_SUFFIX = "_mid"
PROMPT_TEMPLATE = "a photo of a {name}"
MAX_RESOLUTION = 4096  # px per side: 48 MiB per decoded RGB image (SDXL trains at 1024)


def summary_path(data_dir: str | os.PathLike, step: str) -> Path:
    return Path(data_dir) / f"summary_{step}.json"


def dino_key(sample_id: str) -> str:
    """The teacher-token key of a sample (seed §3.3: `{sample_id}_mid`)."""
    return f"{sample_id}{DINO_KEY_SUFFIX}"


# ---------------------------------------------------------------------------------------------
# Sharding helpers


def _gather_to_main(state, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on rank 0 (an empty list elsewhere)."""
    if state.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * state.num_processes if state.is_main_process else None
    dist.gather_object(obj, out, dst=0)
    return out if state.is_main_process else []


def _run_sharded(
    state,
    items: Sequence[Any],
    batch_size: int,
    compute: Callable[[Any], tuple[list[tuple[str, bytes]], list[dict]]],
    write: Callable[[str, bytes], None] | None,
    desc: str,
    prepare: Callable[[list[Any]], Any] | None = None,
    needed: Callable[[list[Any]], bool] | None = None,
    total: int | None = None,
) -> list[dict]:
    """The items run in fixed batches (`batch_size` at a time, in order) and rank r computes
    batches r, r + N, ...: each item runs in the batch it has in a 1-process run, so the records
    do not depend on the number of processes; rank 0 writes every rank's records.

    `compute(batch) -> (records, failures)`; it must not raise for one bad item (a rank that
    stops would leave the others waiting). With `prepare`, `compute` receives
    `prepare(batch)`, made in a background thread one batch ahead (image decoding overlaps
    the model). With `needed`, a batch for which it is False is not computed (every item is
    already done): the batches stay the fixed ones of the whole item list, so a resumed run
    batches an item with the same neighbours as an uninterrupted run. Returns all failures (on
    rank 0).
    """
    from concurrent.futures import ThreadPoolExecutor

    from diffalign.engine.distributed import rank_batches
    from diffalign.engine.progress import progress

    world = state.num_processes
    chunks = rank_batches(items, batch_size, state.process_index, world)
    # one round per N batches: every rank has a chunk (maybe empty) in every round
    chunks += [[]] * (math.ceil(math.ceil(len(items) / batch_size) / world) - len(chunks))
    # every rank takes part in every gather, with an empty batch where it has nothing to do
    chunks = [c if c and (needed is None or needed(c)) else [] for c in chunks]
    work = [c for c in chunks if c]
    failures: list[dict] = []
    bar = progress(total=len(items) if total is None else total, desc=desc, unit="img")
    ahead = ThreadPoolExecutor(max_workers=1) if prepare is not None else None
    try:
        pending = ahead.submit(prepare, work[0]) if ahead and work else None
        k = 0
        for chunk in chunks:
            if not chunk:
                records, failed = [], []
            elif ahead is not None:
                prepared = pending.result()
                k += 1
                pending = ahead.submit(prepare, work[k]) if k < len(work) else None
                records, failed = compute(prepared)
            else:
                records, failed = compute(chunk)
            for part_records, part_failed in _gather_to_main(state, (records, failed)):
                failures.extend(part_failed)
                if write is not None:
                    for key, value in part_records:
                        write(key, value)
                bar.update(len(part_records) + len(part_failed))
    finally:
        if ahead is not None:
            ahead.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return failures


def _resolve_device(device: str | None) -> str | None:
    if device in (None, "", "auto"):
        return None
    return str(device)


def _report_failures(failures: list[dict], what: str, summary_file: Path) -> None:
    if failures:
        print(
            f"diffalign: warning: {len(failures)} {what} could not be read and were skipped "
            f"(listed in {summary_file})",
            file=sys.stderr,
        )


# ---------------------------------------------------------------------------------------------
# images


def preprocess_images(
    source: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    split: str = "train",
    num_samples: int | None = None,
    resolution: int = 512,
    quality: int = 95,
    seed: int = 0,
    val_labels: str | os.PathLike | None = None,
    class_names: str | os.PathLike | None = None,
) -> dict:
    """Seed §3.1: source images -> `images.zip` + `manifest.csv` + `classes.csv`.

    Another split (or more samples) can be added to the same data folder by running again.
    """
    from diffalign.engine.distributed import process_state
    from diffalign.engine.io import atomic_path, output_lock
    from diffalign.engine.reports import write_summary
    from diffalign.repa.images import (
        ImageZip,
        check_sample_id,
        encode_jpeg,
        read_classes,
        read_manifest,
        scan_source,
        select_balanced,
        write_classes,
        write_manifest,
        zip_entry_name,
    )

    if resolution < 8 or resolution % 8:
        raise DiffalignError(f"--resolution must be a multiple of 8 (the VAE's), got {resolution}")
    if resolution > MAX_RESOLUTION:  # 3 x side^2 bytes per decoded image, several held at once
        raise DiffalignError(
            f"--resolution {resolution} is above the maximum {MAX_RESOLUTION} px "
            "(the seed uses 512)"
        )
    if not 1 <= quality <= 100:
        raise DiffalignError(f"--quality must be 1..100, got {quality}")
    check_sample_id(split, "--split")
    start = time.time()
    state = process_state()  # shared by the later steps of one process
    root = Path(data_dir)
    with output_lock(root, "data folder"):
        src = scan_source(source, split, val_labels=val_labels, class_names=class_names)
        selected = select_balanced(src.samples, num_samples, seed)
        zip_path, manifest_path = root / IMAGES_ZIP, root / MANIFEST
        old_rows = read_manifest(manifest_path) if manifest_path.is_file() else []
        if (root / CLASSES).is_file():
            old_classes = read_classes(root / CLASSES)
            if [(c["wnid"], c["name"]) for c in old_classes] != [
                (c["wnid"], c["name"]) for c in src.classes
            ]:
                raise DiffalignError(
                    f"{root} holds another class list ({len(old_classes)} classes in "
                    f"{CLASSES}); use a new --data-dir for this source"
                )
        old_by_id = {r["id"]: r for r in old_rows}
        for s in selected:
            old = old_by_id.get(s.sample_id)
            if old is not None and (old["split"], old["wnid"]) != (split, s.wnid):
                raise DiffalignError(
                    f"sample id {s.sample_id} is already in {manifest_path} as "
                    f"{old['split']}/{old['wnid']}"
                )
        have = ImageZip(zip_path).names() if zip_path.is_file() else set()
        if have:
            size = ImageZip(zip_path).read(sorted(have)[0]).size
            if size != (resolution, resolution):
                raise DiffalignError(
                    f"{zip_path} holds {size[0]} px images, not {resolution}: use the same "
                    "--resolution or a new --data-dir"
                )
        staging = root / STAGING
        todo = [
            s
            for s in selected
            if s.sample_id not in have and not (staging / zip_entry_name(s.sample_id)).is_file()
        ]
        resumed = len(selected) - len(have & {s.sample_id for s in selected}) - len(todo)
        state.wait_for_everyone()  # everyone has its to-do list before anything is staged
        staging.mkdir(parents=True, exist_ok=True)

        def compute(batch):
            failed = []
            for s in batch:
                try:
                    data = encode_jpeg(s.path, resolution, quality)
                except Exception as e:  # unreadable file: counted, never fatal
                    failed.append({"id": s.sample_id, "path": str(s.path), "error": _one_line(e)})
                    continue
                with atomic_path(staging / zip_entry_name(s.sample_id)) as tmp:
                    tmp.write_bytes(data)
            return [], failed

        failures = _run_sharded(state, todo, 16, compute, None, f"images ({split})")
        state.wait_for_everyone()
        summary: dict[str, Any] = {}
        if state.is_main_process:
            staged = {
                p.name[:-4]: p
                for p in staging.iterdir()
                if p.name.endswith(".jpg") and not p.name.startswith(".")
            }
            names = _pack_zip(zip_path, staged) if staged or not zip_path.is_file() else have
            new_rows = [
                {"id": s.sample_id, "wnid": s.wnid, "label": s.label, "split": split}
                for s in selected
                if s.sample_id in names and s.sample_id not in old_by_id
            ]
            rows = old_rows + new_rows
            if not rows:
                raise DiffalignError(f"no readable images in {source}")
            write_classes(root / CLASSES, src.classes)
            write_manifest(manifest_path, rows)
            shutil.rmtree(staging, ignore_errors=True)
            failed_ids = {f["id"] for f in failures}
            summary = {
                "step": "images",
                "source": str(source),
                "layout": src.layout,
                "split": split,
                "num_classes": len(src.classes),
                "found": len(src.samples),
                "selected": len(selected),
                "num_samples": num_samples,
                "seed": seed,
                "written": len([s for s in todo if s.sample_id not in failed_ids]),
                "already_present": len(selected) - len(todo),
                "resumed_from_staging": resumed,
                "failed": len(failures),
                "failures": failures,
                "manifest_rows": len(rows),
                "rows_in_split": sum(1 for r in rows if r["split"] == split),
                "resolution": resolution,
                "quality": quality,
                "num_processes": state.num_processes,
                "seconds": round(time.time() - start, 3),
            }
            write_summary(summary_path(root, "images"), summary)
            _report_failures(failures, "images", summary_path(root, "images"))
        state.wait_for_everyone()
    return summary


def _pack_zip(zip_path: Path, staged: dict[str, Path]) -> set[str]:
    """Rewrite `zip_path` atomically with its old entries plus the staged images (stored:
    JPEG is already compressed). Returns the sample ids it holds."""
    from diffalign.engine.io import atomic_path
    from diffalign.engine.progress import progress
    from diffalign.repa.images import zip_entry_name

    names: set[str] = set()
    old = zipfile.ZipFile(zip_path) if zip_path.is_file() else None
    try:
        with atomic_path(zip_path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as out:
            if old is not None:
                for info in old.infolist():
                    out.writestr(zipfile.ZipInfo(info.filename, info.date_time), old.read(info))
                    if info.filename.endswith(".jpg"):
                        names.add(info.filename[:-4])
            for sid in progress(sorted(staged), desc="zip", unit="img"):
                if sid not in names:
                    out.write(staged[sid], arcname=zip_entry_name(sid))
                    names.add(sid)
    finally:
        if old is not None:
            old.close()
    return names


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# ---------------------------------------------------------------------------------------------
# Shared by vae and dino: the rows to encode and the images of a batch


def _rows_for(data_dir: Path, split: str | None) -> list[dict]:
    from diffalign.repa.images import read_manifest

    rows = read_manifest(data_dir / MANIFEST)
    if split:
        rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise DiffalignError(f"{data_dir / MANIFEST} has no rows of split '{split}'")
    return rows


def _load_batch(
    images, ids: list[str], pool=None
) -> tuple[list[str], torch.Tensor | None, list[dict]]:
    """(ids read, float [B, 3, H, W] in [0, 1], failures) for `ids` from the zip; decoded on
    `pool`'s threads when given (PIL releases the GIL while decoding)."""
    from diffalign.engine.reports import pil_to_tensor

    def one(sid):
        try:
            return sid, pil_to_tensor(images.read(sid)), None
        except Exception as e:  # a damaged entry: counted, never fatal
            return sid, None, {"id": sid, "error": _one_line(e)}

    results = list(pool.map(one, ids)) if pool is not None else [one(sid) for sid in ids]
    ok = [sid for sid, t, _ in results if t is not None]
    tensors = [t for _, t, _ in results if t is not None]
    failed = [f for _, _, f in results if f is not None]
    if not tensors:
        return ok, None, failed
    first = tensors[0].shape
    if any(t.shape != first for t in tensors):  # cannot happen with one images run
        failed += [
            {"id": sid, "error": f"size {list(t.shape)} != {list(first)}"}
            for sid, t in zip(ok, tensors, strict=True)
            if t.shape != first
        ]
        kept = [(sid, t) for sid, t in zip(ok, tensors, strict=True) if t.shape == first]
        ok, tensors = [sid for sid, _ in kept], [t for _, t in kept]
    return ok, torch.stack(tensors), failed


def _image_side(images, rows: list[dict]) -> int:
    for r in rows[:8]:
        try:
            w, h = images.read(r["id"]).size
        except DiffalignError:
            continue
        if w != h:
            raise DiffalignError(f"image {r['id']} in {images.path} is {w}x{h}, not square")
        return w
    raise DiffalignError(f"cannot read the first images of {images.path}")


@contextlib.contextmanager
def _writer_on_main(state, path: Path, shape, meta: dict):
    from diffalign.engine.lmdb_store import TensorLMDBWriter

    if state.is_main_process:
        with TensorLMDBWriter(path, shape, meta=meta) as w:
            yield w
    else:
        yield None


def _store_step(
    *,
    step: str,
    data_dir: Path,
    store: Path,
    split: str | None,
    shape: tuple[int, ...],
    meta: dict,
    key_of: Callable[[str], str],
    encode: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    num_workers: int,
    state,
    start: float,
    extra_summary: dict,
    overwrite: bool = False,
) -> dict:
    """The loop shared by `vae` and `dino`: resume, shard, encode, write, summarise.
    `overwrite`: the store is emptied here, once the model has loaded and the step is set up
    (a run refused before loses nothing)."""
    from diffalign.engine.lmdb_store import existing_valid_keys, tensor_to_record
    from diffalign.engine.reports import write_summary
    from diffalign.repa.images import ImageZip

    images = ImageZip(data_dir / IMAGES_ZIP)
    rows = _rows_for(data_dir, split)
    if overwrite:
        _empty_store(store, state)
    done = existing_valid_keys(store, shape)
    ids = [r["id"] for r in rows]
    todo = {sid for sid in ids if key_of(sid) not in done}
    state.wait_for_everyone()  # every rank has its to-do list before rank 0 opens the writer

    from concurrent.futures import ThreadPoolExecutor

    def prepare(ids):
        return _load_batch(images, ids, decoders)

    def compute(prepared):
        ok, pixels, failed = prepared
        if pixels is None:
            return [], failed
        out = encode(pixels)
        # the whole fixed batch ran; only its unfinished items are written
        records = [
            (key_of(sid), tensor_to_record(t))
            for sid, t in zip(ok, out, strict=True)
            if sid in todo
        ]
        return records, [f for f in failed if f["id"] in todo]

    with (
        ThreadPoolExecutor(max_workers=max(1, num_workers)) as decoders,
        _writer_on_main(state, store, shape, meta) as writer,
    ):
        if writer is not None:
            writer.update_meta(**meta)
        failures = _run_sharded(
            state,
            ids,
            batch_size,
            compute,
            writer.put_record if writer else None,
            step,
            prepare=prepare,
            needed=lambda chunk: not todo.isdisjoint(chunk),
            total=len(todo),
        )
    summary: dict[str, Any] = {}
    if state.is_main_process:
        summary = {
            "step": step,
            "store": str(store),
            "split": split,
            "rows": len(rows),
            "already_present": len(rows) - len(todo),
            "written": len(todo) - len(failures),
            "failed": len(failures),
            "failures": failures,
            "record_shape": list(shape),
            "dtype": "float16",
            "bytes_per_record": int(torch.tensor(shape).prod()) * 2,
            **extra_summary,
            "num_processes": state.num_processes,
            "seconds": round(time.time() - start, 3),
        }
        write_summary(summary_path(data_dir, step), summary)
        _report_failures(failures, "images", summary_path(data_dir, step))
    state.wait_for_everyone()
    return summary


def _check_store(store: Path, identity: dict) -> None:
    """Before any model loads or record is written (without `--overwrite`): a store made by
    another model or with other settings (its `__meta__` identity, `engine.identity`) is
    refused, partial or complete, so it never mixes records of two models and its meta never
    claims another one."""
    from diffalign.engine.identity import check_identity
    from diffalign.engine.lmdb_store import TensorLMDB

    if not (store / "data.mdb").is_file():
        return
    db = TensorLMDB(store)
    try:
        old, n = db.meta.get("identity"), len(db)
    finally:
        db.close()
    if old is None and n:
        raise DiffalignError(
            f"{store} holds {n} records but no record of the model and settings that made them "
            "(an older diffalign): pass --overwrite to rebuild it"
        )
    check_identity(
        old,
        identity,
        f"{store} holds records",
        hint="rerun with the model and settings it was made with, or pass --overwrite to "
        "rebuild it",
    )


def _empty_store(store: Path, state) -> None:
    """`--overwrite`: remove the store's records (rank 0; the others wait)."""
    if state.is_main_process:
        for name in ("data.mdb", "lock.mdb"):
            (store / name).unlink(missing_ok=True)
    state.wait_for_everyone()


# ---------------------------------------------------------------------------------------------
# vae

SD15_VAE_SCALING = 0.18215  # the VAE every SD 1.5 U-Net was trained on (seed 003 §3.2)
SD15_LATENT_CHANNELS = 4


def expected_vae(model: str | None) -> tuple[float, int, str]:
    """(scaling factor, latent channels, where from) of the VAE the U-Net of `model` (the SD 1.5
    model `repa train` trains) was trained with: its pipeline's `vae/config.json` when `model`
    is a local folder, else SD 1.5's (0.18215, 4): `repa train` trains SD 1.5 U-Nets only."""
    from diffalign.engine.loading import resolve_model

    resolved = None
    if model is not None:
        try:
            resolved = resolve_model(model, "sd15")
        except DiffalignError:
            pass
    if resolved is not None and resolved.kind == "folder":
        cfg = Path(resolved.source) / "vae" / "config.json"
        if cfg.is_file():
            try:
                c = json.loads(cfg.read_text(encoding="utf-8"))
                return float(c["scaling_factor"]), int(c["latent_channels"]), str(cfg)
            except (OSError, ValueError, KeyError, TypeError):
                pass
    return SD15_VAE_SCALING, SD15_LATENT_CHANNELS, "SD 1.5"


def check_vae_fits(scaling: float, channels: int, unet_model: str | None, what: str) -> None:
    """Refuse (one line) latents whose VAE is not the one the trained U-Net (`unet_model`'s;
    None: an SD 1.5 U-Net) was trained with: another scaling factor or latent channel count,
    e.g. SDXL's 0.13025."""
    want_scaling, want_channels, source = expected_vae(unet_model)
    if abs(float(scaling) - want_scaling) > 1e-6 or int(channels) != want_channels:
        unet = f"the U-Net of {unet_model}" if unet_model else "an SD 1.5 U-Net"
        raise DiffalignError(
            f"{what} has scaling factor {scaling} and {channels} latent channels; {unet} was "
            f"trained on a VAE with {want_scaling} and {want_channels} ({source}): use an "
            "SD 1.5 VAE"
        )


def preprocess_vae(
    data_dir: str | os.PathLike,
    model: str = "sd15",
    *,
    split: str | None = None,
    batch_size: int = 16,
    device: str | None = None,
    dtype: str = "float32",
    num_workers: int = 4,
    unet_model: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Seed §3.2: VAE posterior mode x scaling factor -> `vae_latents.lmdb`, fp16, key = id.

    `model`: an SD 1.5 pipeline folder, preset (`sd15`) or Hub id; only its VAE is loaded. The
    VAE must be the one the U-Net that will train on the store was trained with: that of
    `unet_model` when given (`expected_vae`), else SD 1.5's (`repa train` checks the store's
    VAE against its model again). The store records its identity (the
    VAE's, dtype, batch size): a re-run with another is refused (`overwrite`: rebuilt). Items run
    in fixed batches, so a resumed run writes the bytes an uninterrupted one writes.
    """
    from diffalign.engine.distributed import process_state
    from diffalign.engine.identity import model_identity
    from diffalign.engine.io import output_lock
    from diffalign.engine.loading import load_vae

    start = time.time()
    root = Path(data_dir)
    _rows_for(root, split)  # a missing manifest fails before the model loads
    state = process_state(_resolve_device(device))
    store = root / VAE_LMDB
    identity = {
        "kind": "vae_latents",
        "model": model_identity(model, ("vae",)),
        "dtype": dtype,
        "batch_size": batch_size,  # the encoder's numerics depend on the batch it runs in
    }
    with output_lock(store, "LMDB store"):
        if not overwrite:
            _check_store(store, identity)
        vae = load_vae(model, dtype=dtype, family="sd15").to(state.device).eval()
        vae.requires_grad_(False)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        scaling = float(vae.config.scaling_factor)
        channels = int(vae.config.latent_channels)
        check_vae_fits(scaling, channels, unet_model, f"the VAE of {model}")
        from diffalign.repa.images import ImageZip

        side = _image_side(ImageZip(root / IMAGES_ZIP), _rows_for(root, split))
        if side % factor:
            raise DiffalignError(f"image side {side} is not a multiple of the VAE factor {factor}")
        shape = (int(vae.config.latent_channels), side // factor, side // factor)
        param = next(vae.parameters())

        @torch.no_grad()
        def encode(pixels: torch.Tensor) -> torch.Tensor:
            x = (pixels * 2.0 - 1.0).to(param.device, param.dtype)
            return vae.encode(x).latent_dist.mode().float().cpu() * scaling

        meta = {
            "kind": "vae_latents",
            "model": str(model),
            "scaling_factor": scaling,
            "latent_channels": channels,
            "identity": identity,
        }
        return _store_step(
            step="vae",
            data_dir=root,
            store=store,
            split=split,
            shape=shape,
            meta=meta,
            key_of=lambda sid: sid,
            encode=encode,
            batch_size=batch_size,
            num_workers=num_workers,
            state=state,
            start=start,
            extra_summary={"model": str(model), "scaling_factor": scaling, "vae_dtype": dtype},
            overwrite=overwrite,
        )


# ---------------------------------------------------------------------------------------------
# dino


def preprocess_dino(
    data_dir: str | os.PathLike,
    dino_model: str = "dinov2-large",
    *,
    token_layout: str = "grid",
    grid: int = 16,
    split: str | None = None,
    batch_size: int = 16,
    device: str | None = None,
    dtype: str = "float32",
    num_workers: int = 4,
    overwrite: bool = False,
) -> dict:
    """Seed §3.3: DINOv2 at 518 px -> 16 x 16 pooled patch tokens, L2-normalised ->
    `dino_tokens.lmdb`, fp16, key `{id}_mid` (`token_layout`: see `repa.teacher`). The store
    records its identity (model, layout, grid, dtype, batch size): a re-run with another is
    refused (`overwrite`: rebuilt)."""
    from diffalign.engine.distributed import process_state
    from diffalign.engine.identity import model_identity
    from diffalign.engine.io import output_lock
    from diffalign.engine.lmdb_store import TensorLMDB
    from diffalign.repa.teacher import (
        TOKEN_LAYOUTS,
        _resolve_dino,
        check_grid,
        dino_tokens,
        load_dino,
    )

    if token_layout not in TOKEN_LAYOUTS:
        raise DiffalignError(f"--token-layout must be one of {', '.join(TOKEN_LAYOUTS)}")
    start = time.time()
    root = Path(data_dir)
    _rows_for(root, split)
    state = process_state(_resolve_device(device))
    store = root / DINO_LMDB
    identity = {
        "kind": "dino_tokens",
        "model": model_identity(_resolve_dino(dino_model)[0]),
        "token_layout": token_layout,
        "grid": grid,
        "dtype": dtype,
        "batch_size": batch_size,
    }
    with output_lock(store, "LMDB store"):
        if (store / "data.mdb").is_file() and not overwrite:
            db = TensorLMDB(store)
            old = db.meta
            db.close()
            if (
                old.get("token_layout", token_layout) != token_layout
                or old.get("grid", grid) != grid
            ):
                raise DiffalignError(
                    f"{store} holds {old.get('token_layout')} tokens on a {old.get('grid')}-grid; "
                    f"asked for {token_layout} on {grid}: use the same options or pass "
                    "--overwrite to rebuild it"
                )
            _check_store(store, identity)
        model = load_dino(dino_model, state.device, dtype)
        check_grid(model, grid, token_layout)
        shape = (grid * grid, int(model.config.hidden_size))

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            return dino_tokens(model, pixels, grid=grid, layout=token_layout).cpu()

        meta = {
            "kind": "dino_tokens",
            "model": str(dino_model),
            "token_layout": token_layout,
            "grid": grid,
            "key_suffix": DINO_KEY_SUFFIX,
            "identity": identity,
        }
        return _store_step(
            step="dino",
            data_dir=root,
            store=store,
            split=split,
            shape=shape,
            meta=meta,
            key_of=dino_key,
            encode=encode,
            batch_size=batch_size,
            num_workers=num_workers,
            state=state,
            start=start,
            extra_summary={"model": str(dino_model), "token_layout": token_layout, "grid": grid},
            overwrite=overwrite,
        )


# ---------------------------------------------------------------------------------------------
# clip


def class_prompts(names: Sequence[str], template: str = PROMPT_TEMPLATE) -> list[str]:
    """Seed §3.4: `a photo of a {name}` for every class, then the empty (null) prompt."""
    if "{name}" not in template:
        raise DiffalignError("--prompt-template must contain {name}")
    return [template.replace("{name}", n) for n in names] + [""]


def load_text_encoder(model: str, device, dtype: str = "float32"):
    """(CLIPTokenizer, CLIPTextModel) of an SD 1.5 pipeline folder / preset / Hub id."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffalign.engine.loading import (
        _hub_errors,
        _tf_dtype_kw,
        damaged_weights,
        hub_offline,
        model_not_found,
        parse_dtype,
        require_component,
        resolve_model,
    )

    resolved = resolve_model(model, "sd15")
    if resolved.kind == "single_file":
        raise DiffalignError(
            f"--model {model}: the clip step needs an SD 1.5 pipeline folder or Hub id"
        )
    local = resolved.kind == "folder"
    if local and not (Path(resolved.source) / "text_encoder" / "config.json").is_file():
        raise ModelNotFoundError(model, resolved.download_name, "no text_encoder/ in the folder")
    if local:
        from diffalign.engine.rewards.files import check_tokenizer_files

        for name, cls in (("tokenizer", "CLIPTokenizer"), ("text_encoder", "CLIPTextModel")):
            require_component(resolved.source, name, "transformers", cls, resolved.download_name)
        # without its vocabulary transformers builds an empty tokenizer: every class prompt
        # would become the same tokens and get the same embedding
        check_tokenizer_files(Path(resolved.source) / "tokenizer", "bpe", "SD 1.5 tokenizer folder")
    try:
        kw = {"local_files_only": local or hub_offline()}
        tokenizer = CLIPTokenizer.from_pretrained(resolved.source, subfolder="tokenizer", **kw)
        encoder = CLIPTextModel.from_pretrained(
            resolved.source, subfolder="text_encoder", **_tf_dtype_kw(parse_dtype(dtype)), **kw
        )
    except _hub_errors() as e:
        if local:
            name = resolved.download_name
            damaged = damaged_weights(model, resolved.source, name, "text_encoder")
            if damaged is not None:
                raise damaged from None
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not local and hub_offline():
            detail = "not in the local Hugging Face cache and HF_HUB_OFFLINE=1"
        raise model_not_found(model, resolved, detail[:240]) from None
    encoder.requires_grad_(False)
    return tokenizer, encoder.eval().to(device)


def load_class_embeddings(path: str | os.PathLike) -> tuple[torch.Tensor, list[str]]:
    """(`embeddings` [classes + 1, 77, D], prompts) from `clip_embeddings.safetensors`."""
    from diffalign.engine.io import load_tensors

    tensors, meta = load_tensors(path)
    if "embeddings" not in tensors:
        raise DiffalignError(f"{path}: no 'embeddings' tensor")
    emb = tensors["embeddings"]
    try:
        prompts = json.loads(meta.get("prompts", "null"))
    except ValueError:
        prompts = None
    if emb.ndim != 3 or not isinstance(prompts, list) or len(prompts) != emb.shape[0]:
        raise DiffalignError(f"{path}: expected [classes + 1, tokens, dim] embeddings and prompts")
    return emb, prompts


def _clip_identity(path: Path) -> dict | None:
    """The identity `clip_embeddings.safetensors` records (None: an older file)."""
    from diffalign.engine.io import load_tensors

    raw = load_tensors(path)[1].get("identity")
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        raise DiffalignError(f"{path}: unreadable identity record") from None


def preprocess_clip(
    data_dir: str | os.PathLike,
    model: str = "sd15",
    *,
    class_names: str | os.PathLike | None = None,
    prompt_template: str = PROMPT_TEMPLATE,
    batch_size: int = 64,
    device: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> dict:
    """Seed §3.4: class prompts + the empty prompt through SD 1.5's tokenizer and CLIP text
    encoder (77 tokens) -> `clip_embeddings.safetensors` (`embeddings`, fp16). The file records
    its identity (text encoder, prompts, dtype): the same is skipped, another is
    refused (`overwrite`: recomputed); a class list that does not cover the manifest's labels
    is refused before anything is replaced."""
    from diffalign.engine.distributed import process_state
    from diffalign.engine.identity import check_identity, model_identity
    from diffalign.engine.io import output_lock, save_tensors
    from diffalign.engine.reports import write_summary
    from diffalign.repa.images import read_classes, read_manifest, read_synsets

    start = time.time()
    root = Path(data_dir)
    if class_names:
        synsets = read_synsets(class_names)
        names, wnids = [n for _, n in synsets], [w for w, _ in synsets]
        if (root / CLASSES).is_file():
            ours = [c["wnid"] for c in read_classes(root / CLASSES)]
            if ours != wnids:
                raise DiffalignError(
                    f"{class_names} lists other classes (or another order) than "
                    f"{root / CLASSES}, whose order the manifest's labels follow"
                )
    else:
        classes = read_classes(root / CLASSES)
        names, wnids = [c["name"] for c in classes], [c["wnid"] for c in classes]
    prompts = class_prompts(names, prompt_template)
    if (root / MANIFEST).is_file():
        labels = [int(r["label"]) for r in read_manifest(root / MANIFEST)]
        if labels and max(labels) >= len(names):
            raise DiffalignError(
                f"{root / MANIFEST} has label {max(labels)}, the class list only "
                f"{len(names)} classes: fix the class list (the embeddings are kept)"
            )
    out_file = root / CLIP_FILE
    identity = {
        "kind": "clip_embeddings",
        "model": model_identity(model, ("tokenizer", "text_encoder")),
        "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "dtype": dtype,
    }  # no batch size: the file is written whole by one run, never completed by another
    state = process_state(_resolve_device(device))
    with output_lock(root, "data folder"):
        if out_file.is_file() and not overwrite:
            try:
                load_class_embeddings(out_file)
                old = _clip_identity(out_file)
                readable = True
            except DiffalignError:
                readable = False  # a damaged file is redone
            if readable:
                if old is None:
                    raise DiffalignError(
                        f"{out_file} records no model and settings that made it (an older "
                        "diffalign): pass --overwrite to recompute it"
                    )
                check_identity(
                    old,
                    identity,
                    f"{out_file} holds embeddings",
                    hint="rerun with the model and settings it was made with, or pass "
                    "--overwrite to recompute it",
                )
                summary = {"step": "clip", "skipped": "already done", "file": str(out_file)}
                if state.is_main_process:
                    print(f"{out_file} already holds these {len(prompts)} prompts")
                state.wait_for_everyone()
                return summary
        tokenizer, encoder = load_text_encoder(model, state.device, dtype)
        max_len = int(tokenizer.model_max_length)
        indexed = list(enumerate(prompts))

        @torch.no_grad()
        def compute(batch):
            ids = tokenizer(
                [p for _, p in batch],
                padding="max_length",
                max_length=max_len,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(state.device)
            hidden = encoder(ids)[0].float().cpu()
            return [
                (str(i), h.half().numpy().tobytes())
                for (i, _), h in zip(batch, hidden, strict=True)
            ], []

        rows: dict[int, bytes] = {}
        _run_sharded(
            state, indexed, batch_size, compute, lambda k, v: rows.__setitem__(int(k), v), "clip"
        )
        summary: dict[str, Any] = {}
        if state.is_main_process:
            dim = int(encoder.config.hidden_size)
            emb = torch.stack(
                [
                    torch.frombuffer(bytearray(rows[i]), dtype=torch.float16).view(max_len, dim)
                    for i in range(len(prompts))
                ]
            )
            save_tensors(
                out_file,
                {"embeddings": emb},
                metadata={
                    "prompts": json.dumps(prompts),
                    "wnids": json.dumps(wnids),
                    "model": str(model),
                    "template": prompt_template,
                    "null_index": str(len(prompts) - 1),
                    "identity": json.dumps(identity),
                },
            )
            summary = {
                "step": "clip",
                "file": str(out_file),
                "model": str(model),
                "num_classes": len(names),
                "shape": list(emb.shape),
                "dtype": "float16",
                "template": prompt_template,
                "num_processes": state.num_processes,
                "seconds": round(time.time() - start, 3),
            }
            write_summary(summary_path(root, "clip"), summary)
        state.wait_for_everyone()
    return summary
