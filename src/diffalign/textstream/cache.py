"""`diffalign textstream cache`: VAE latents and text embeddings of image-caption pairs, the
training data of learned residual weights (spec T: learned weights; spec E: Data, LMDB).

Layout of a cache folder (every LMDB record fp16, key = the pair's id):

    job.json                    what made the cache: model identity (`engine.identity`),
                                resolution, text length, pairs digest; a re-run (or
                                `train-weights`) that differs is refused
    pairs.jsonl                 {"id", "caption", "image"} per pair, in dataset order
    latents.lmdb/               [C, R/f, R/f] = (VAE posterior mean - shift_factor) * scaling_factor
    prompt_embeds.lmdb/         [L, D] the pipeline's joint text embeddings (SD3: CLIP-L + CLIP-G
                                zero-padded to the T5 width, 77 tokens, then the T5 tokens)
    pooled_prompt_embeds.lmdb/  [P] the pooled CLIP embeddings (SD3: CLIP-L | CLIP-G)
    summary.json                counts, failures, seconds

The text stores also hold the key `__empty__`: the empty prompt's embeddings (the unconditional
branch of classifier-free guidance for validation images). Images are resized (shorter side)
and centre-cropped to `--resolution` (`engine.pairs.center_crop_resize`).

Work is split in fixed batches of `batch_size` pairs (batch k = pairs k*B .. k*B+B-1); under
`accelerate launch` rank r encodes batches r, r+N, ... and rank 0 writes every rank's records.
A re-run skips the batches whose records are all present and recomputes any other batch whole,
so a killed run finished by a re-run, a straight run and an N-process run hold the same records.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError

JOB_FILE = "job.json"
PAIRS_FILE = "pairs.jsonl"
LATENTS = "latents.lmdb"
PROMPT_EMBEDS = "prompt_embeds.lmdb"
POOLED = "pooled_prompt_embeds.lmdb"
EMPTY_KEY = "__empty__"
CACHE_FORMAT = "diffalign-textstream-cache-v1"
_FINGERPRINT_BLOCK = 1 << 20
_MODEL_FILE_SUFFIXES = (".json", ".txt", ".model", ".safetensors", ".bin", ".sft")


# ---------------------------------------------------------------------------------------------
# reading a cache


@dataclass
class CacheInfo:
    """A cache folder's job record and pairs (see the module docstring)."""

    root: Path
    job: dict[str, Any]
    pairs: list[dict[str, Any]]

    @property
    def resolution(self) -> int:
        return int(self.job["resolution"])

    def store(self, name: str):
        from diffalign.engine.lmdb_store import TensorLMDB

        return TensorLMDB(self.root / name)

    def complete_ids(self) -> list[str]:
        """Ids of the pairs whose three records are all present, in dataset order."""
        stores = [self.store(n) for n in (LATENTS, PROMPT_EMBEDS, POOLED)]
        try:
            return [p["id"] for p in self.pairs if all(s.is_valid(p["id"]) for s in stores)]
        finally:
            for s in stores:
                s.close()


def open_cache(path: str | os.PathLike) -> CacheInfo:
    """Read `job.json` and `pairs.jsonl` of a cache folder (one error line if it is not one)."""
    from diffalign.engine.io import read_json, read_jsonl

    root = Path(path)
    if not (root / JOB_FILE).is_file() or not (root / PAIRS_FILE).is_file():
        raise DiffalignError(
            f"{root} is not a text-stream cache (no {JOB_FILE} / {PAIRS_FILE}); make one with "
            "`diffalign textstream cache`"
        )
    job = read_json(root / JOB_FILE)
    if not isinstance(job, dict) or job.get("format") != CACHE_FORMAT:
        raise DiffalignError(f"{root / JOB_FILE}: not a text-stream cache record")
    for name in (LATENTS, PROMPT_EMBEDS, POOLED):
        if not (root / name / "data.mdb").is_file():
            raise DiffalignError(f"{root}: {name} is missing (re-run `diffalign textstream cache`)")
    return CacheInfo(root, job, read_jsonl(root / PAIRS_FILE))


# ---------------------------------------------------------------------------------------------
# building a cache


def build_cache(
    model: str,
    dataset: str | Sequence[str],
    output_dir: str | os.PathLike,
    *,
    resolution: int = 1024,
    datadir: str | None = None,
    limit: int | None = None,
    caption_field: str = "prompt",
    image_field: str = "image",
    max_sequence_length: int = 256,
    batch_size: int = 8,
    dtype: str = "auto",
    device: str | None = None,
    overwrite: bool = False,
    single_file_config: str | None = None,
) -> dict:
    """Encode every pair of `dataset` into the cache folder `output_dir` (module docstring);
    returns the summary (also `summary.json`, written by rank 0)."""
    from diffalign.engine.distributed import process_state
    from diffalign.engine.identity import model_identity
    from diffalign.engine.io import locked_output_dir
    from diffalign.engine.loading import check_model_available
    from diffalign.engine.pairs import load_image_captions

    started = time.time()
    for name, value in (
        ("--resolution", resolution),
        ("--batch-size", batch_size),
        ("--max-sequence-length", max_sequence_length),
    ):
        if int(value) < 1:
            raise DiffalignError(f"{name} must be at least 1 (got {value})")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise DiffalignError(f"--output-dir {out} exists and is not a folder")
    pair_set = load_image_captions(
        dataset, datadir, limit=limit, caption_field=caption_field, image_field=image_field
    )
    check_model_available(model, "sd3")
    state = process_state(device)
    job = {
        "format": CACHE_FORMAT,
        "family": "sd3",
        "model": model_identity(model),
        "resolution": int(resolution),
        "max_sequence_length": int(max_sequence_length),
        "pairs_sha256": _pairs_digest(pair_set.pairs),
    }
    with locked_output_dir(out, "text-stream cache"):
        _check_or_reset(out, job, overwrite, state)
        return _build_locked(
            out,
            job,
            pair_set,
            model=model,
            dataset=dataset,
            batch_size=int(batch_size),
            dtype=dtype,
            state=state,
            device=device,
            single_file_config=single_file_config,
            started=started,
        )


def _pairs_digest(pairs) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.id, p.caption, str(p.image)]).encode())
    return h.hexdigest()


def _check_or_reset(out: Path, job: dict, overwrite: bool, state) -> None:
    from diffalign.engine.identity import check_identity
    from diffalign.engine.io import read_json

    job_path = out / JOB_FILE
    if state.is_main_process and job_path.is_file():
        if overwrite:
            for name in (LATENTS, PROMPT_EMBEDS, POOLED):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in (JOB_FILE, PAIRS_FILE, "summary.json"):
                (out / name).unlink(missing_ok=True)
        else:
            saved = read_json(job_path)
            check_identity(
                {k: saved.get(k) for k in job},
                job,
                f"cache {out} was",
                hint="pass --overwrite to start over or choose another --output-dir",
            )
    state.wait_for_everyone()


def _dtype(dtype: str, device: torch.device) -> torch.dtype:
    from diffalign.engine.loading import parse_dtype

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(dtype)


def _load_pixels(pair, resolution: int) -> torch.Tensor:
    """`[3, R, R]` in [-1, 1] of one pair's image; unreadable files raise DiffalignError."""
    from PIL import Image, UnidentifiedImageError

    from diffalign.engine.pairs import center_crop_resize
    from diffalign.engine.reports import pil_to_tensor

    try:
        with Image.open(pair.image) as im:
            im.load()
            img = center_crop_resize(im, resolution)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DiffalignError(f"{pair.image}: cannot read image ({type(e).__name__})") from None
    return pil_to_tensor(img) * 2.0 - 1.0


def _build_locked(
    out: Path,
    job: dict,
    pair_set,
    *,
    model: str,
    dataset,
    batch_size: int,
    dtype: str,
    state,
    device: str | None,
    single_file_config: str | None,
    started: float,
) -> dict:
    import contextlib

    from diffalign.engine.io import read_json, write_json, write_text
    from diffalign.engine.lmdb_store import TensorLMDBWriter
    from diffalign.engine.progress import progress
    from diffalign.engine.reports import write_summary
    from diffalign.textstream.flow import family

    pairs = pair_set.pairs
    n_batches = math.ceil(len(pairs) / batch_size)
    batches = [pairs[k * batch_size : (k + 1) * batch_size] for k in range(n_batches)]
    run_device = torch.device(device) if device else state.device
    torch_dtype = _dtype(dtype, run_device)
    todo: list[int] | None = None
    if (out / JOB_FILE).is_file():  # a re-run: nothing left to do loads no model
        shapes = {k: tuple(v) for k, v in read_json(out / JOB_FILE)["shapes"].items()}
        todo = _batches_to_do(out, shapes, batches)
    flow = family(job["family"])
    msl = job["max_sequence_length"]
    if todo != []:
        pipe = flow.load(
            model, dtype=torch_dtype, device=str(run_device), single_file_config=single_file_config
        )
        empty_pe, empty_pooled = flow.encode_text(pipe, [""], msl)
        shapes = {
            LATENTS: flow.latent_shape(pipe, job["resolution"]),
            PROMPT_EMBEDS: tuple(empty_pe.shape[1:]),
            POOLED: tuple(empty_pooled.shape[1:]),
        }
    if state.is_main_process and not (out / JOB_FILE).is_file():
        lines = [
            json.dumps({"id": p.id, "caption": p.caption, "image": str(p.image)}) for p in pairs
        ]
        write_text(out / PAIRS_FILE, "\n".join(lines) + "\n")
        record = {**job, "shapes": {k: list(v) for k, v in shapes.items()}, "made_with": model}
        write_json(out / JOB_FILE, record)
    todo = _batches_to_do(out, shapes, batches)
    state.wait_for_everyone()  # every rank has read what is done before rank 0 writes

    world, rank = state.num_processes, state.process_index
    rounds = math.ceil(len(todo) / world)
    failures: list[dict] = []
    written = 0
    meta = {"kind": "textstream_cache", "resolution": job["resolution"]}
    with contextlib.ExitStack() as stack:
        writers = None
        if state.is_main_process:
            writers = {
                name: stack.enter_context(TensorLMDBWriter(out / name, shape, meta=meta))
                for name, shape in shapes.items()
            }
            if todo:
                for name, t in ((PROMPT_EMBEDS, empty_pe[0]), (POOLED, empty_pooled[0])):
                    writers[name].put(EMPTY_KEY, t)
        bar = progress(total=len(todo), desc="cache", unit="batch")
        for r in range(rounds):
            k = todo[r * world + rank] if r * world + rank < len(todo) else None
            records: list[tuple[str, str, bytes]] = []
            failed: list[dict] = []
            if k is not None:
                records, failed = _encode_batch(flow, pipe, batches[k], job["resolution"], msl)
            for part_records, part_failed in _gather_to_main(state, (records, failed)):
                failures.extend(part_failed)
                if writers is not None:
                    for store, key, record in part_records:
                        writers[store].put_record(key, record)
                    written += sum(1 for s, _, _ in part_records if s == LATENTS)
            bar.update(min(world, len(todo) - r * world))
        bar.close()
    summary: dict[str, Any] = {}
    if state.is_main_process:
        summary = {
            "output_dir": str(out),
            "model": str(model),
            "dataset": dataset if isinstance(dataset, str) else list(dataset),
            "resolution": job["resolution"],
            "max_sequence_length": job["max_sequence_length"],
            "pairs": len(pairs),
            "skipped_no_caption": pair_set.skipped_no_caption,
            "already_present": len(pairs) - sum(len(batches[k]) for k in todo),
            "written": written,
            "failed": len(failures),
            "failures": failures[:100],
            "shapes": {k: list(v) for k, v in shapes.items()},
            "dtype": str(torch_dtype).removeprefix("torch."),
            "num_processes": world,
            "seconds": round(time.time() - started, 3),
        }
        write_summary(out / "summary.json", summary)
    state.wait_for_everyone()
    return summary


def _batches_to_do(out: Path, shapes: dict, batches: list) -> list[int]:
    """Indices of the batches with a record missing in any store."""
    from diffalign.engine.lmdb_store import existing_valid_keys

    done = set.intersection(*(existing_valid_keys(out / n, s) for n, s in shapes.items()))
    return [k for k, b in enumerate(batches) if not all(p.id in done for p in b)]


def _encode_batch(flow, pipe, batch, resolution: int, msl: int) -> tuple[list, list[dict]]:
    """Records `(store, key, bytes)` of one batch and its failures (a bad image is skipped)."""
    from diffalign.engine.lmdb_store import tensor_to_record

    ok, pixels, failed = [], [], []
    for p in batch:
        try:
            pixels.append(_load_pixels(p, resolution))
            ok.append(p)
        except DiffalignError as e:
            failed.append({"id": p.id, "image": str(p.image), "error": str(e)})
    if not ok:
        return [], failed
    latents = flow.encode_images(pipe, torch.stack(pixels))
    pe, pooled = flow.encode_text(pipe, [p.caption for p in ok], msl)
    records = []
    for i, p in enumerate(ok):
        records.append((LATENTS, p.id, tensor_to_record(latents[i])))
        records.append((PROMPT_EMBEDS, p.id, tensor_to_record(pe[i])))
        records.append((POOLED, p.id, tensor_to_record(pooled[i])))
    return records, failed


def _gather_to_main(state, obj: Any) -> list[Any]:
    """Every rank's `obj` in rank order on rank 0 (an empty list elsewhere)."""
    if state.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    got = [None] * state.num_processes if state.is_main_process else None
    dist.gather_object(obj, got, dst=0)
    return got if state.is_main_process else []
