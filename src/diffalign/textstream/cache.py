"""`diffalign textstream cache`: VAE latents and text embeddings of image-caption pairs, the
training data of learned residual weights (spec T: learned weights; spec E: Data, LMDB).

Layout of a cache folder (every LMDB record fp16, key = the pair's id):

    job.json                    what made the cache: model family ("sd3", "flux", "qwen-image"),
                                model identity (`engine.identity`), resolution, text length,
                                pairs digest; a re-run (or `train-weights`) that differs is
                                refused
    pairs.jsonl                 {"id", "caption", "image"} per pair, in dataset order
    latents.lmdb/               [C, R/f, R/f] normalised VAE posterior mean, unpacked:
                                SD3, FLUX.1: (mean - shift_factor) * scaling_factor;
                                Qwen-Image: (mean - latents_mean) / latents_std (per channel);
                                each image encoded on its own (a batch of one), so all its
                                captions hold the same bytes
    prompt_embeds.lmdb/         [L, D] the pipeline's text embeddings (SD3: CLIP-L + CLIP-G
                                zero-padded to the T5 width, 77 tokens, then the T5 tokens;
                                FLUX.1: the T5 tokens; Qwen-Image: Qwen2.5-VL tokens zero-padded
                                to L = max_sequence_length)
    pooled_prompt_embeds.lmdb/  SD3: [P] pooled CLIP-L | CLIP-G; FLUX.1: [P] pooled CLIP-L;
                                Qwen-Image (no pooled embedding): [L] its text mask, 1 = token,
                                0 = padding
    summary.json                counts, failures, seconds

The text stores also hold the key `__empty__`: the empty prompt's embeddings (the unconditional
branch of classifier-free guidance for validation images). Images are resized (shorter side)
and centre-cropped to `--resolution` (`engine.pairs.center_crop_resize`).

Work is split in fixed batches of `batch_size` pairs (batch k = pairs k*B .. k*B+B-1); under
`accelerate launch` rank r encodes batches r, r+N, ... and rank 0 writes every rank's records.
A re-run skips the batches whose records are all present and recomputes any other batch whole,
so a killed run finished by a re-run, a straight run and an N-process run hold the same records.

COCO has about five captions per image: each process VAE-encodes a distinct image once and
keeps its latent record (`LatentMemory`, up to `latent_memory_mb`) for its later batches that
need the image again. An image is encoded alone, so its latent never depends on the batch it
falls in (the VAE's float result does: on the CPU it changes with the batch size, and with
several threads with the position in the batch), which keeps the records independent of what
was reused, resumed or sharded.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
import shutil
import time
from bisect import bisect_right
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
    resolution: int | None = None,
    datadir: str | None = None,
    limit: int | None = None,
    caption_field: str = "prompt",
    image_field: str = "image",
    max_sequence_length: int | None = None,
    batch_size: int = 8,
    dtype: str = "auto",
    device: str | None = None,
    overwrite: bool = False,
    single_file_config: str | None = None,
    latent_memory_mb: float = 1024,
) -> dict:
    """Encode every pair of `dataset` into the cache folder `output_dir` (module docstring);
    returns the summary (also `summary.json`, written by rank 0)."""
    from diffalign.engine.distributed import process_state
    from diffalign.engine.identity import model_identity
    from diffalign.engine.io import output_lock
    from diffalign.engine.loading import check_model_available, resolve_dtype
    from diffalign.engine.pairs import load_image_captions

    started = time.time()
    if max_sequence_length is None:  # the model card's, as generation uses (families.DEFAULTS)
        from diffalign.textstream.families import DEFAULTS, model_variant

        variant = model_variant(model, single_file_config)
        max_sequence_length = DEFAULTS[variant].max_sequence_length
    if resolution is None or int(resolution) >= 1:  # the model's own size; one it can make
        from diffalign.textstream.sizes import fit_image_size, model_image_size

        size = model_image_size(model, single_file_config)
        resolution, _ = fit_image_size(
            size, resolution, resolution, str(model), option="--resolution"
        )
    for name, value in (
        ("--resolution", resolution),
        ("--batch-size", batch_size),
        ("--max-sequence-length", max_sequence_length),
    ):
        if int(value) < 1:
            raise DiffalignError(f"{name} must be at least 1 (got {value})")
    if not math.isfinite(latent_memory_mb) or latent_memory_mb < 0:
        raise DiffalignError(f"--latent-memory-mb must be a number >= 0 (got {latent_memory_mb})")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise DiffalignError(f"--output-dir {out} exists and is not a folder")
    pair_set = load_image_captions(
        dataset, datadir, limit=limit, caption_field=caption_field, image_field=image_field
    )
    fam = model_family(model, single_file_config)
    check_model_available(model, fam)
    state = process_state(device)
    torch_dtype = resolve_dtype(dtype, torch.device(device) if device else state.device)
    job = {
        "format": CACHE_FORMAT,
        "family": fam,
        "model": model_identity(model),
        "resolution": int(resolution),
        "max_sequence_length": int(max_sequence_length),
        "pairs_sha256": _pairs_digest(pair_set.pairs),
        # each image encoded alone (batch-independent latents; an older cache encoded batches)
        "latent_encoding": "per-image",
        # the encoders' dtype changes the stored bytes (auto: bf16 on CUDA, fp32 on the CPU)
        "dtype": str(torch_dtype).removeprefix("torch."),
    }
    if single_file_config is not None:  # a single file's text encoders and VAE come from it
        job["single_file_config"] = model_identity(single_file_config)
    with output_lock(out, "text-stream cache"):
        if not overwrite:
            _check_job(out, job, state)
        return _build_locked(
            out,
            job,
            pair_set,
            model=model,
            dataset=dataset,
            batch_size=int(batch_size),
            torch_dtype=torch_dtype,
            state=state,
            device=device,
            single_file_config=single_file_config,
            latent_memory_mb=float(latent_memory_mb),
            started=started,
            overwrite=overwrite,
        )


def model_family(model: str, single_file_config: str | None = None) -> str:
    """The cache family ("sd3", "flux", "qwen-image") of a `--model` value, read from its
    files or name without loading it."""
    from diffalign.textstream.families import family_of_variant, model_variant

    return family_of_variant(model_variant(model, single_file_config))


def _pairs_digest(pairs) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.id, p.caption, str(p.image)]).encode())
    return h.hexdigest()


def _check_job(out: Path, job: dict, state) -> None:
    """Before the model loads: a cache made by another model or with other settings is refused
    (`engine.identity`)."""
    from diffalign.engine.identity import check_identity
    from diffalign.engine.io import read_json_object

    job_path = out / JOB_FILE
    hint = "pass --overwrite to start over or choose another --output-dir"
    if state.is_main_process and job_path.is_file():
        saved = read_json_object(job_path)
        recorded = {k: v for k, v in job.items() if k in saved}
        # the settings both record first (a real change is named), then what an older
        # diffalign did not write
        check_identity({k: saved[k] for k in recorded}, recorded, f"cache {out} was", hint=hint)
        unrecorded = [k for k in job if k not in saved]
        if unrecorded:
            named = ", ".join(f"{k}: not recorded (made by an older diffalign)" for k in unrecorded)
            raise DiffalignError(f"cache {out} was made with other settings ({named}); {hint}")
    state.wait_for_everyone()


def _clear_cache(out: Path, state) -> None:
    """`--overwrite`: remove the earlier cache (rank 0; the others wait), only once the model
    has loaded (a run refused before loses nothing)."""
    if state.is_main_process and (out / JOB_FILE).is_file():
        for name in (LATENTS, PROMPT_EMBEDS, POOLED):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (JOB_FILE, PAIRS_FILE, "summary.json"):
            (out / name).unlink(missing_ok=True)
    state.wait_for_everyone()


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


def encode_image(flow, pipe, pixels: torch.Tensor) -> torch.Tensor:
    """The latent of one image `[3, R, R]` (`_load_pixels`) encoded alone, as the cache stores
    it: a batch of one, since the VAE's float result depends on its batch; alone it depends on
    the image only."""
    return flow.encode_images(pipe, pixels[None])[0]


def _build_locked(
    out: Path,
    job: dict,
    pair_set,
    *,
    model: str,
    dataset,
    batch_size: int,
    torch_dtype: torch.dtype,
    state,
    device: str | None,
    single_file_config: str | None,
    latent_memory_mb: float,
    started: float,
    overwrite: bool = False,
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
    todo: list[int] | None = None
    if (out / JOB_FILE).is_file() and not overwrite:  # a re-run: nothing left loads no model
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
    if overwrite:
        _clear_cache(out, state)
    if state.is_main_process and not (out / JOB_FILE).is_file():
        lines = [
            json.dumps({"id": p.id, "caption": p.caption, "image": str(p.image)}) for p in pairs
        ]
        write_text(out / PAIRS_FILE, "\n".join(lines) + "\n")
        record = {**job, "shapes": {k: list(v) for k, v in shapes.items()}, "made_with": model}
        if single_file_config is not None:
            record["made_with_config"] = single_file_config
        write_json(out / JOB_FILE, record)
    todo = _batches_to_do(out, shapes, batches)
    state.wait_for_everyone()  # every rank has read what is done before rank 0 writes

    world, rank = state.num_processes, state.process_index
    rounds = math.ceil(len(todo) / world)
    mine = [todo[r * world + rank] if r * world + rank < len(todo) else None for r in range(rounds)]
    record_mb = math.prod(shapes[LATENTS]) * 2 / 2**20  # one fp16 latent record
    memory = LatentMemory(
        _image_uses([batches[k] if k is not None else [] for k in mine]),
        capacity=int(latent_memory_mb / record_mb),
    )
    failures: list[dict] = []
    written = 0
    encoded_images = 0
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
        for r, k in enumerate(mine):
            records: list[tuple[str, str, bytes]] = []
            failed: list[dict] = []
            encoded = 0
            if k is not None:
                memory.now = r
                records, failed, encoded = _encode_batch(
                    flow, pipe, batches[k], job["resolution"], msl, memory
                )
            for part_records, part_failed, part_encoded in _gather_to_main(
                state, (records, failed, encoded)
            ):
                failures.extend(part_failed)
                encoded_images += part_encoded
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
            "images_encoded": encoded_images,
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


def _encode_batch(
    flow, pipe, batch, resolution: int, msl: int, memory: LatentMemory | None = None
) -> tuple[list, list[dict], int]:
    """Records `(store, key, bytes)` of one batch, its failures (a bad image is skipped) and the
    number of images VAE-encoded: each distinct image once, none that `memory` holds."""
    from diffalign.engine.lmdb_store import tensor_to_record

    memory = memory if memory is not None else LatentMemory({}, capacity=0)
    ok, latents, failed = [], [], []
    here: dict[str, bytes] = {}  # this batch's images, whatever the memory keeps
    for p in batch:
        image = str(p.image)
        record = here.get(image) or memory.get(image)
        if record is None:
            try:
                pixels = _load_pixels(p, resolution)
            except DiffalignError as e:
                failed.append({"id": p.id, "image": image, "error": str(e)})
                continue
            record = tensor_to_record(encode_image(flow, pipe, pixels))
        here[image] = record
        ok.append(p)
        latents.append(record)
    encoded = sum(1 for image in here if memory.get(image) is None)
    memory.keep(here)
    if not ok:
        return [], failed, 0
    pe, pooled = flow.encode_text(pipe, [p.caption for p in ok], msl)
    records = []
    for i, p in enumerate(ok):
        records.append((LATENTS, p.id, latents[i]))
        records.append((PROMPT_EMBEDS, p.id, tensor_to_record(pe[i])))
        records.append((POOLED, p.id, tensor_to_record(pooled[i])))
    return records, failed, encoded


def _image_uses(schedule: Sequence[Sequence[Any]]) -> dict[str, list[int]]:
    """Image path -> the steps (indices into `schedule`, a list of batches) that need it."""
    uses: dict[str, list[int]] = {}
    for step, batch in enumerate(schedule):
        for p in batch:
            steps = uses.setdefault(str(p.image), [])
            if not steps or steps[-1] != step:
                steps.append(step)
    return uses


class LatentMemory:
    """Latent records of images that later steps of this process need again.

    `uses[image]` lists the steps needing `image` (sorted); `now` is the current step. A record
    is kept while a later step needs it, at most `capacity` of them: when full, the one needed
    farthest ahead is dropped (Belady's rule; it is encoded again when its step comes).
    """

    def __init__(self, uses: dict[str, list[int]], capacity: int):
        self.now = 0
        self._uses = uses
        self._capacity = max(0, int(capacity))
        self._held: dict[str, bytes] = {}
        self._ahead: list[tuple[int, str]] = []  # (-next use, image); stale entries skipped

    def __len__(self) -> int:
        return len(self._held)

    def _next_use(self, image: str) -> int | None:
        steps = self._uses.get(image, ())
        i = bisect_right(steps, self.now)
        return steps[i] if i < len(steps) else None

    def get(self, image: str) -> bytes | None:
        return self._held.get(image)

    def keep(self, records: dict[str, bytes]) -> None:
        """After the step `now`: hold the records (image -> bytes) of the images it used that a
        later step needs, then drop the ones needed farthest ahead beyond `capacity`."""
        for image, record in records.items():
            nxt = self._next_use(image)
            if nxt is None or self._capacity == 0:
                self._held.pop(image, None)
                continue
            self._held[image] = record
            heapq.heappush(self._ahead, (-nxt, image))
        while len(self._held) > self._capacity:
            neg, far = heapq.heappop(self._ahead)
            if far in self._held and self._next_use(far) == -neg:
                del self._held[far]


def _gather_to_main(state, obj: Any) -> list[Any]:
    """Every rank's `obj` in rank order on rank 0 (an empty list elsewhere)."""
    if state.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    got = [None] * state.num_processes if state.is_main_process else None
    dist.gather_object(obj, got, dst=0)
    return got if state.is_main_process else []
