"""The matched-noise dataset builder (spec N; seed 001 "Step 2: build a matched-noise dataset").

Input: ``DATA_ROOT/pairs.jsonl``, one JSON object a line with a prompt (``--prompt-field``,
default ``prompt``) and an image path (``--image-field``, default ``image``; relative to
DATA_ROOT or absolute). Item ``i`` is the ``i``-th non-empty line. Output (the seed's layout;
the noise file is safetensors instead of a pickle):

    OUT/dataset_config.json       settings; a re-run with other settings is refused
    OUT/manifest.jsonl            one line per finished item, sorted by id
    OUT/failures.jsonl            items that could not be assigned, with the reason
    OUT/summary.json              counts, mean losses, samples/s, diagnostics
    OUT/orthogonal_gaussian_{init,final}.{png,json}   base vs assigned noises of the dataset
    OUT/samples/NNNNNN_slug/best_input_noise.safetensors   noise (= Q eps), base_noise, q
    OUT/samples/NNNNNN_slug/meta.json, target.png, run_outputs/{loss_curve.{json,png},
                                      step_NNNN.png, best.png, intermediates.png}

Every item is assigned with :func:`diffalign.noise.assign.assign_noise` (one ``Q`` per item, a
batch of items at once). Resumable: a re-run skips items whose manifest line, noise file
(item id and prompt in its metadata), ``target.png`` and ``meta.json`` are fine, and redoes the
others; items run in fixed batches (all items in order, ``batch_size`` at a time), a batch
with unfinished work is run whole again and only its unfinished items are written, so a killed
and re-run build gives the same manifest as an uninterrupted one. Per-item problems (missing or
unreadable image, wrong size, missing prompt field, NaN loss) go to failures.jsonl and the run
goes on. Under ``accelerate launch`` rank ``r`` of ``w`` takes the batches ``b % w == r`` (the
1-process batches: the same noises) and appends to ``manifest.rank-RR.jsonl``; rank 0 merges
the parts at the end.
The folder is locked for the whole run; manifest paths are relative and read back through
``engine.io.resolve_inside``. The resume/shard/batch machinery is the shared runner
:func:`diffalign.noise.jobs.run_assignment_job` (also `noise toy assign`'s); this module says
what a pair is, when its sample is complete and how a batch is assigned and written.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError
from diffalign.engine.identity import file_sha256
from diffalign.engine.io import (
    TEXT_ENCODING,
    earlier_units,
    output_lock,
    resolve_inside,
    write_json,
)
from diffalign.noise.assign import (
    NOISE_FILE,
    _check_settings,
    assign_noise,
    base_noise,
    check_noise_file,
    load_target_image,
    prompt_sha,
    save_noise_file,
    save_png,
    snapshot_schedule,
    write_run_outputs,
)
from diffalign.noise.jobs import (
    AssignmentJob,
    check_job_record,
    finished_noises,
    noise_gaussianity,
    run_assignment_job,
)


@dataclass
class AssignSettings:
    """Assignment options of `build-dataset` (the seed's defaults)."""

    steps: int = 40
    lr: float = 5e-4
    patch_size: int = 2
    parametrization: str = "matrix_exp"
    latent_loss_weight: float = 1.0
    pixel_l1_weight: float = 0.1
    seed: int = 0
    resize: bool = False


@dataclass
class PairItem:
    id: int
    prompt: str | None = None
    image: str | None = None  # as written in pairs.jsonl
    image_path: Path | None = None
    error: str | None = None


def slugify(text: str, length: int = 40) -> str:
    """Lower-case ASCII words joined by ``_`` (the sample folder's suffix)."""
    slug = re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")[:length].strip("_")
    return slug or "item"


def sample_dir_name(item: int, prompt: str | None) -> str:
    return f"{int(item):06d}_{slugify(prompt or '')}"


def read_pairs(
    data_root: str | os.PathLike,
    prompt_field: str = "prompt",
    image_field: str = "image",
    pairs_file: str = "pairs.jsonl",
) -> list[PairItem]:
    """The items of ``DATA_ROOT/pairs.jsonl``; a line's problem is kept as the item's error."""
    root = Path(data_root)
    path = root / pairs_file
    if not root.is_dir():
        raise DiffalignError(f"--data-root {root} is not a folder")
    if not path.is_file():
        raise DiffalignError(f"{path} not found (--data-root must hold {pairs_file})")
    try:
        lines = path.read_text(encoding=TEXT_ENCODING).splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DiffalignError(f"{path} cannot be read ({type(e).__name__})") from None
    items: list[PairItem] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        item = PairItem(id=len(items))
        items.append(item)
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            item.error = f"{path.name}:{lineno} is not JSON"
            continue
        if not isinstance(rec, dict):
            item.error = f"{path.name}:{lineno} is not a JSON object"
            continue
        prompt, image = rec.get(prompt_field), rec.get(image_field)
        if isinstance(prompt, str) and prompt.strip():
            item.prompt = prompt
        else:
            item.error = f"{path.name}:{lineno}: no prompt field '{prompt_field}'"
        if isinstance(image, str) and image.strip():
            item.image = image
            p = Path(image).expanduser()
            item.image_path = p if p.is_absolute() else root / p
        elif item.error is None:
            item.error = f"{path.name}:{lineno}: no image field '{image_field}'"
    if not items:
        raise DiffalignError(f"{path}: no items")
    return items


def _sample_ok(out: Path, rec: dict, item: PairItem, latent_shape) -> str | None:
    """None when a manifest record's sample is complete and belongs to `item`."""
    if rec.get("prompt") != item.prompt:
        return "the manifest line was made for another prompt"
    try:
        noise_path = resolve_inside(out, str(rec.get("noise_file")), "noise_file")
        target = resolve_inside(out, str(rec.get("target_image")), "target_image")
        sdir = resolve_inside(out, str(rec.get("sample_dir")), "sample_dir")
    except DiffalignError as e:
        return str(e)
    problem = check_noise_file(noise_path, latent_shape, item.id, item.prompt)
    if problem is not None:
        return problem
    if not target.is_file():
        return "target.png missing"
    if not (sdir / "meta.json").is_file():
        return "meta.json missing"
    return None


def build_dataset(
    generator,
    data_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    settings: AssignSettings | None = None,
    prompt_field: str = "prompt",
    image_field: str = "image",
    batch_size: int = 4,
    max_items: int | None = None,
    num_intermediates: int = 3,
    plots: bool = True,
    model_info: dict | None = None,
    desc: str = "build-dataset",
    overwrite: bool = False,
) -> dict:
    """Build (or resume) a matched-noise dataset (module doc); returns the summary (rank 0).
    ``overwrite``: start over in a folder that holds a dataset (`run_assignment_job`)."""
    t0 = time.time()
    s = settings or AssignSettings()
    out = Path(output_dir)
    latent_shape = tuple(generator.latent_shape())
    _check_settings(
        s.steps, s.lr, s.patch_size, s.latent_loss_weight, s.pixel_l1_weight, latent_shape
    )
    if batch_size < 1:
        raise DiffalignError(f"--batch-size must be >= 1, got {batch_size}")
    if max_items is not None and max_items < 1:
        raise DiffalignError(f"--max-items must be >= 1, got {max_items}")
    items = read_pairs(data_root, prompt_field, image_field)
    if max_items is not None:
        items = items[:max_items]
    if out.exists() and not out.is_dir():
        raise DiffalignError(f"--output-dir {out} exists and is not a folder")
    config = dataset_config(data_root, items, prompt_field, image_field, batch_size, s)
    config.update(
        generator=generator.name,
        model=model_record(model_info),
        latent_shape=list(latent_shape),
        image_size=list(generator.image_size()),
    )
    job = PairsJob(generator, items, s, latent_shape, num_intermediates, plots)
    job.out = out
    with output_lock(out, "dataset folder"):
        return run_assignment_job(job, out, config, batch_size, desc, t0, overwrite)


# dataset_config.json's entries known only once the generator loads
LOADED_KEYS = ("generator", "model", "latent_shape", "image_size")


def dataset_config(
    data_root,
    items: list,
    prompt_field: str,
    image_field: str,
    batch_size: int,
    settings,
    pairs_sha256: str | None = None,
) -> dict:
    """A build's dataset_config.json (its identity, `engine.identity`), its `LOADED_KEYS` None:
    `build_dataset` fills them in once the generator is loaded. `pairs_sha256`: pairs.jsonl's,
    when already hashed."""
    return {
        "data_root": str(Path(data_root).resolve()),
        "pairs_sha256": pairs_sha256 or file_sha256(Path(data_root) / "pairs.jsonl"),
        "prompt_field": prompt_field,
        "image_field": image_field,
        **dict.fromkeys(LOADED_KEYS),
        "batch_size": batch_size,
        "num_items": len(items),
        **asdict(settings),
    }


def check_dataset_before_loading(data_root, output_dir, **options) -> None:
    """`build_dataset`'s refusal of a folder that holds a dataset made with other settings,
    before the generator loads: ``options`` are `build_dataset`'s keywords (its defaults apply);
    its `LOADED_KEYS` are compared once the generator has loaded."""
    check_datasets_before_loading(data_root, [(output_dir, options)])


def check_datasets_before_loading(data_root, builds: list[tuple[Any, dict]]) -> None:
    """`check_dataset_before_loading` of each ``(output_dir, options)`` of one `data_root`
    (the EM loop's E-steps), its pairs read and hashed once for them all."""
    from diffalign.engine.config_values import call_arguments

    pairs: dict[tuple[str, str], list] = {}  # by (prompt_field, image_field)
    digest = None
    for output_dir, options in builds:
        a = call_arguments(build_dataset, None, data_root, output_dir, **options)
        if a["overwrite"]:
            continue
        fields = (a["prompt_field"], a["image_field"])
        if fields not in pairs:
            pairs[fields] = read_pairs(data_root, *fields)
        digest = digest or file_sha256(Path(data_root) / "pairs.jsonl")
        items = pairs[fields]
        if a["max_items"] is not None:
            items = items[: a["max_items"]]
        settings = a["settings"] or AssignSettings()
        config = dataset_config(
            data_root, items, *fields, a["batch_size"], settings, pairs_sha256=digest
        )
        check_job_record(PairsJob, Path(output_dir), config, free=LOADED_KEYS)


class PairsJob(AssignmentJob):
    """build-dataset's items: the pairs of pairs.jsonl on a one-step generator."""

    config_file = "dataset_config.json"
    config_ignore = ("data_root",)  # the pairs (by hash) must match, not where they lie
    what = "dataset"

    def __init__(self, generator, items, settings, latent_shape, num_intermediates, plots):
        self.generator, self.items, self.s = generator, {it.id: it for it in items}, settings
        self.latent_shape = tuple(latent_shape)
        self.size = tuple(generator.image_size())
        self.snaps = snapshot_schedule(settings.steps, num_intermediates)
        self.plots = plots
        self.out: Path | None = None

    def item_ids(self) -> list[int]:
        return sorted(self.items)

    def item_dirs(self, item: int) -> list[Path]:
        sdir = self.out / "samples" / sample_dir_name(item, self.items[item].prompt)
        return [sdir, sdir / "run_outputs"]

    def earlier_units(self, out: Path) -> list[Path]:
        return [
            *earlier_units(out / "samples", r"\d{6}_.*", folders=True),
            *earlier_units(out, r"orthogonal_gaussian_(init|final)\.(json|png)"),
        ]

    def check_done(self, item: int, record: dict) -> str | None:
        return _sample_ok(self.out, record, self.items[item], self.latent_shape)

    def run_batch(self, ids, todo, writer) -> None:
        s, gen = self.s, self.generator
        good, targets = [], []
        for i in ids:
            it = self.items[i]
            err = it.error
            if err is None:
                try:
                    targets.append(load_target_image(it.image_path, self.size, s.resize))
                    good.append(it)
                    continue
                except DiffalignError as e:
                    err = str(e)
            if i in todo:
                writer.fail({"id": i, "prompt": it.prompt, "image": it.image, "error": err})
        if not good:
            return
        x = torch.stack(targets)
        eps = base_noise([it.id for it in good], self.latent_shape, s.seed)
        res = assign_noise(
            gen,
            eps,
            gen.encode_prompts([it.prompt for it in good]),
            gen.encode_images(x),
            x if s.pixel_l1_weight else None,
            steps=s.steps,
            lr=s.lr,
            patch_size=s.patch_size,
            parametrization=s.parametrization,
            latent_loss_weight=s.latent_loss_weight,
            pixel_l1_weight=s.pixel_l1_weight,
            snapshot_steps=self.snaps,
            keep_images=True,
        )
        for j, it in enumerate(good):
            if it.id not in todo:  # finished earlier; run again only as a neighbour
                continue
            vals = (res.loss_before[j], res.loss_after[j], res.mse_after[j], res.noise[j])
            if not all(torch.isfinite(v).all() for v in vals):
                writer.fail(
                    {
                        "id": it.id,
                        "prompt": it.prompt,
                        "image": it.image,
                        "error": "loss is NaN/inf (try --dtype fp32 or another --vae)",
                    }
                )
                continue
            writer.done(_write_sample(self.out, it, j, res, eps, x, s, self.plots))

    def finalize(self, out: Path, records: list[dict], failures: list[dict]) -> dict:
        return _dataset_diagnostics(out, records, self.s.patch_size, self.plots)


def _write_sample(out, it: PairItem, j, res, eps, x, s, plots) -> dict:
    """One sample folder: target.png, run_outputs/, the noise file, meta.json; returns the
    manifest record (appended last, so a line always names a complete sample)."""
    name = sample_dir_name(it.id, it.prompt)
    sdir = out / "samples" / name
    save_png(sdir / "target.png", x[j])
    curve = write_run_outputs(
        sdir / "run_outputs", res, j, x[j], f"#{it.id}: {it.prompt[:50]}", plots=plots
    )
    meta = {"id": it.id, "prompt_sha": prompt_sha(it.prompt), "patch_size": s.patch_size}
    save_noise_file(sdir / NOISE_FILE, res.noise[j], eps[j], res.q[j], meta)
    record = {
        "id": it.id,
        "prompt": it.prompt,
        "image": it.image,
        "sample_dir": f"samples/{name}",
        "noise_file": f"samples/{name}/{NOISE_FILE}",
        "target_image": f"samples/{name}/target.png",
        "loss_before": curve["loss_before"],
        "loss_after": curve["loss_after"],
        "latent_mse_before": float(res.mse_before[j]),
        "latent_mse_after": float(res.mse_after[j]),
        "best_step": curve["best_step"],
    }
    write_json(sdir / "meta.json", record)
    return record


def _dataset_diagnostics(out: Path, records: list[dict], patch_size: int, plots: bool) -> dict:
    """Mean losses and the base-vs-assigned noise diagnostics of the finished samples."""
    summary: dict = {}
    if not records:
        return summary
    lb = torch.tensor([r["loss_before"] for r in records])
    la = torch.tensor([r["loss_after"] for r in records])
    summary.update(
        loss_before_mean=float(lb.mean()),
        loss_after_mean=float(la.mean()),
        latent_mse_before_mean=float(
            torch.tensor([r["latent_mse_before"] for r in records]).mean()
        ),
        latent_mse_after_mean=float(torch.tensor([r["latent_mse_after"] for r in records]).mean()),
        relative_reduction=float(1 - la.mean() / lb.mean()) if lb.mean() > 0 else 0.0,
    )
    noises = finished_noises(out, records)
    if noises is not None:
        summary.update(noise_gaussianity(out, *noises, patch_size, plots))
    return summary


# ----------------------------------------------------------------------------- reading it back


def seed_record(r: dict) -> dict:
    """A record of the seed's `build_assigned_noise_dataset` manifest (``sample_id``,
    ``best_input_noise_path``, ``target_image_path``, ``prompt``: absolute paths of the machine
    that built it) as ours: the files are read from ``samples/<sample_id>/`` beside the
    manifest, wherever the folder now is. Other records are returned unchanged."""
    keys = ("sample_id", "best_input_noise_path", "target_image_path")
    if not all(isinstance(r.get(k), str) for k in keys):
        return r
    sdir = f"samples/{r['sample_id']}"
    return {
        **r,
        "noise_file": f"{sdir}/{Path(r['best_input_noise_path']).name}",
        "target_image": f"{sdir}/{Path(r['target_image_path']).name}",
    }


MODEL_PATH_KEYS = ("model", "vae", "weights")  # the model_info entries naming files or Hub ids


def model_record(model_info: dict | None) -> dict:
    """`model_info` with its model, VAE and weights named by identity (resolved path, config and
    weights hashes, or Hub revision: `engine.identity.model_identity`), as build-dataset records
    it in dataset_config.json and `noise sft` compares it."""
    from diffalign.engine.identity import model_identity

    info = dict(model_info or {})
    for k in MODEL_PATH_KEYS:
        if info.get(k) is not None:
            info[k] = model_identity(info[k])
    return info


class BuiltDataset:
    """A `build-dataset` folder (or its manifest.jsonl, or a manifest made by hand) as one run
    reads it: its dataset_config.json, its manifest's records (`load_dataset_manifest`) and the
    manifest's sha256, each read once, when first asked for (the readers' errors come where
    they came before). The functions here take it or the path (read afresh)."""

    def __init__(self, path: str | os.PathLike):
        self.path = path  # as given: the messages name it so
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        self.config_path = folder / "dataset_config.json"

    @functools.cached_property
    def has_config(self) -> bool:
        return self.config_path.is_file()

    @functools.cached_property
    def config(self) -> Any:
        """The parsed dataset_config.json; None when there is none."""
        from diffalign.engine.io import read_json

        return read_json(self.config_path) if self.has_config else None

    @functools.cached_property
    def _manifest(self) -> tuple[list[dict], Path]:
        return load_dataset_manifest(self.path)

    @property
    def records(self) -> list[dict]:
        return self._manifest[0]

    @functools.cached_property
    def manifest_sha256(self) -> str:
        path = Path(self.path)
        return file_sha256(path / "manifest.jsonl" if path.is_dir() else path)


def as_dataset(dataset: str | os.PathLike | BuiltDataset) -> BuiltDataset:
    """`dataset` when it was read already, else its folder or manifest to read."""
    return dataset if isinstance(dataset, BuiltDataset) else BuiltDataset(dataset)


def check_dataset_generator(
    manifest_path: str | os.PathLike | BuiltDataset,
    generator: str,
    record: dict,
    allow: bool = False,
) -> str | None:
    """Refuse (one line) to train `generator` with the model `record` (`model_record`) on a
    dataset whose dataset_config.json says another generator or model assigned its noises; with
    `allow` the line is returned as a warning instead. None: the same, or nothing recorded."""
    from diffalign.engine.identity import identity_differences
    from diffalign.engine.io import json_object

    dataset = as_dataset(manifest_path)
    cfg_path = dataset.config_path
    if not dataset.has_config:
        return None  # a manifest made by hand records no generator
    built = json_object(dataset.config, cfg_path)
    old_model = built.get("model") if isinstance(built.get("model"), dict) else {}
    # a dataset built through the Python API without model_info records the generator only
    keys = MODEL_PATH_KEYS if old_model.get("model") is not None else ()
    then = {"generator": built.get("generator"), **{k: old_model.get(k) for k in keys}}
    now = {"generator": generator, **{k: record.get(k) for k in keys}}
    steps = (old_model.get("num_steps"), record.get("num_steps"))
    if None not in steps:  # a few-step generator's noises are assigned for its step count
        then["num_steps"], now["num_steps"] = steps
    diff = identity_differences(then, now)
    if not diff:
        return None
    line = (
        f"{cfg_path.parent} was built with {_describe(then)}, this run trains {_describe(now)} "
        f"(differs: {', '.join(diff)}); its noises were assigned for that model"
    )
    if allow:
        return line
    raise DiffalignError(f"{line}: pass --allow-other-generator to train on it anyway")


def recorded_image_size(dataset: str | os.PathLike | BuiltDataset) -> tuple[int, int] | None:
    """The (height, width) a `build-dataset` folder (or its manifest.jsonl) records in its
    dataset_config.json; None when it records none (a manifest made by hand)."""
    cfg = as_dataset(dataset).config
    size = cfg.get("image_size") if isinstance(cfg, dict) else None
    if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return int(size[0]), int(size[1])
    return None


def dataset_image_size(
    dataset: str | os.PathLike | BuiltDataset, height: int | None, width: int | None
) -> tuple[int | None, int | None]:
    """The image size to train on `dataset` with: the one its dataset_config.json records (its
    noises and targets have that size) unless ``height`` / ``width`` are given; a given size
    that contradicts the recorded one is a one-line error. (None, None): nothing recorded or
    given, the model's default."""
    dataset = as_dataset(dataset)
    recorded = recorded_image_size(dataset)
    if recorded is None:
        return height, width
    given = (height or recorded[0], width or recorded[1])
    if given != recorded:
        raise DiffalignError(
            f"--height/--width {given[0]}x{given[1]} contradict the image size "
            f"{recorded[0]}x{recorded[1]} of {dataset.config_path}: leave them out "
            "(the dataset's size is the default) or rebuild the dataset at that size"
        )
    return recorded


def check_generator_size(dataset: str | os.PathLike | BuiltDataset, generator) -> None:
    """Refuse (one line) a generator set to another image size than `dataset` records."""
    dataset = as_dataset(dataset)
    recorded = recorded_image_size(dataset)
    size = tuple(generator.image_size())
    if recorded is not None and size != recorded:
        raise DiffalignError(
            f"{dataset.config_path.parent} holds {recorded[0]}x{recorded[1]} images "
            f"and noises, the generator makes {size[0]}x{size[1]}: load it with height="
            f"{recorded[0]}, width={recorded[1]} (the CLI's default for this dataset)"
        )


def _describe(rec: dict) -> str:
    model = rec.get("model")
    if isinstance(model, dict):
        model = model.get("path") or model.get("hub_id")
    n = rec.get("num_steps")
    steps = "" if n is None else f", {n} step{'' if n == 1 else 's'}"
    return f"{rec.get('generator')} ({model}{steps})"


def recorded_num_steps(dataset: str | os.PathLike | BuiltDataset) -> int | None:
    """The sampling steps of the generator a `build-dataset` folder (or its manifest.jsonl) was
    assigned with (dataset_config.json); None when it records none."""
    cfg = as_dataset(dataset).config
    model = cfg.get("model") if isinstance(cfg, dict) else None
    steps = model.get("num_steps") if isinstance(model, dict) else None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def _first_failure(folder: Path) -> str:
    """``"; N failed, the first: <reason> (failures.jsonl)"``, or "" when none failed."""
    from diffalign.engine.io import read_jsonl

    path = folder / "failures.jsonl"
    fails = read_jsonl(path, skip_bad=True) if path.is_file() else []
    if not fails:
        return ""
    first = fails[0] if isinstance(fails[0], dict) else {}
    reason = str(first.get("error", "no reason recorded")).splitlines()[0][:200]
    return f"; {len(fails)} failed, item {first.get('id')} first: {reason} (see {path})"


def load_dataset_manifest(manifest_path: str | os.PathLike) -> tuple[list[dict], Path]:
    """Records of a `build-dataset` manifest (or the seed's, :func:`seed_record`) with
    ``noise_path`` / ``target_path`` resolved inside the dataset folder (a path that leaves it
    is a one-line error)."""
    path = Path(manifest_path)
    if path.is_dir():
        path = path / "manifest.jsonl"
    if not path.is_file():
        raise DiffalignError(f"manifest {path} not found")
    from diffalign.engine.io import read_jsonl

    records = read_jsonl(path)
    if not records:
        raise DiffalignError(f"{path}: no finished samples{_first_failure(path.parent)}")
    root = path.parent
    out = []
    for i, r in enumerate(records, 1):
        if isinstance(r, dict) and "noise_file" not in r:
            r = seed_record(r)
        if not isinstance(r, dict) or not all(
            k in r for k in ("noise_file", "target_image", "prompt")
        ):
            raise DiffalignError(
                f"{path}:{i}: a record needs 'noise_file', 'target_image' and 'prompt'"
            )
        if not isinstance(r["prompt"], str):
            raise DiffalignError(f"{path}:{i}: 'prompt' is not a string")
        r = dict(r)
        r["noise_path"] = resolve_inside(root, str(r["noise_file"]), f"{path}:{i}: noise_file")
        r["target_path"] = resolve_inside(root, str(r["target_image"]), f"{path}:{i}: target_image")
        out.append(r)
    return out, root
