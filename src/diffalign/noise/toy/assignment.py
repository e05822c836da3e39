"""Assigned-noise inversion and the matched-noise dataset for the toy generators (spec N).

For each target image ``x`` with label ``y`` we draw a base noise ``eps ~ N(0, I)`` (seeded per
item, so the draw does not depend on batching, sharding or resuming) and optimise a patch-wise
orthogonal ``Q`` so that ``G(Q eps, y)`` matches ``x``. The items of a batch are optimised
together with one ``PatchOrthogonal(num_transforms=B)`` (item ``i`` has its own ``Q_i``); their
losses are summed, so each ``Q_i`` only sees its own item's gradient.

`assign_noise` is the math (tensors in, tensors out). `assign` is the resumable job: it writes

    OUT/assign_config.json            settings; a re-run with other settings is refused
    OUT/manifest.jsonl                one line per finished item (written after its noise file)
    OUT/failures.jsonl                items that could not be assigned (NaN target or loss)
    OUT/samples/NNNNNN/noise.safetensors   noise (= Q eps), base_noise, q, target
    OUT/samples/NNNNNN/meta.json
    OUT/summary.json, assign_loss.png, assign_examples.png,
    OUT/orthogonal_gaussian_init.{png,json}, orthogonal_gaussian_final.{png,json}

Re-running skips items whose manifest line and noise file are both fine; an item whose noise
file is missing or corrupt is assigned again. Items are optimised in fixed batches (all items,
in order, `batch_size` at a time); a batch with an unfinished item is run whole again and only
its unfinished items are written, so a resumed run gives the same bytes as an uninterrupted one.
Each noise file records its item's id and label in its safetensors metadata; a manifest record
whose file belongs to another item is refused, and `noise_file` paths must stay inside the
dataset folder (`engine.io.resolve_inside`). The folder is locked for the whole run
(`engine.io.output_lock`). Under ``accelerate launch`` rank ``r`` of ``w`` takes the batches
``b % w == r`` (the 1-process batches: the same bytes) and appends to
``manifest.rank-RR.jsonl``; rank 0 merges the parts into ``manifest.jsonl`` at the end (a crash
leaves the parts, which the next run reads).

One implementation with the real generators: the math is `diffalign.noise.assign.assign_noise`
and the resumable, sharded, batched job is `diffalign.noise.jobs.run_assignment_job` (the same
runner as `diffalign noise build-dataset`); this module keeps only what is toy-specific (items
from a `ToyData` split, labels, the toy file layout and example grid).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from diffalign.engine.errors import DiffalignError
from diffalign.engine.identity import file_sha256
from diffalign.engine.io import (
    load_tensors,
    output_lock,
    read_json_object,
    read_jsonl,
    resolve_inside,
    save_tensors,
    write_json,
)
from diffalign.noise.assign import AssignResult, base_noise
from diffalign.noise.assign import assign_noise as _generic_assign_noise
from diffalign.noise.assign import item_id as _item_id
from diffalign.noise.jobs import (
    AssignmentJob,
    check_job_record,
    finished_noises,
    noise_gaussianity,
    run_assignment_job,
)

__all__ = ["AssignResult", "assign", "assign_noise", "base_noise", "load_matched_pairs"]

# ----------------------------------------------------------------------------- the math
# (one implementation for every generator: diffalign.noise.assign; the toy passes its labels as
# the encoded prompts and its [-1, 1] targets as the target "latents")


def assign_noise(
    generator: torch.nn.Module,
    eps: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor,
    steps: int = 100,
    lr: float = 0.05,
    patch_size: int = 2,
    parametrization: str = "matrix_exp",
    l1_weight: float = 0.0,
) -> AssignResult:
    """Optimise one orthogonal ``Q_i`` per item so ``G(Q_i eps_i, y_i)`` matches ``x_i``: the
    generic :func:`diffalign.noise.assign.assign_noise` with the toy objective
    ``mean (G - x)^2 + l1_weight * mean |G - x|`` on the [-1, 1] output (the pixel L1 of the
    generic loss is taken on [0, 1] images, hence the factor 2)."""
    from diffalign.noise.toy.onestep import ToyOneStepGenerator

    if len(labels) != len(targets) or len(labels) != eps.shape[0]:
        raise DiffalignError(
            f"assign_noise: {eps.shape[0]} noises, {len(labels)} labels, {len(targets)} targets "
            "must match"
        )
    flags = [p.requires_grad for p in generator.parameters()]
    was_training = generator.training
    try:
        gen = (
            generator
            if isinstance(generator, ToyOneStepGenerator)
            else ToyOneStepGenerator(generator)
        )
        target_image = gen.decode(targets) if l1_weight else None
        return _generic_assign_noise(
            gen,
            eps,
            {"labels": labels},
            targets,
            target_image,
            steps=steps,
            lr=lr,
            patch_size=patch_size,
            parametrization=parametrization,
            latent_loss_weight=1.0,
            pixel_l1_weight=2.0 * l1_weight,
        )
    finally:
        for p, f in zip(generator.parameters(), flags):
            p.requires_grad_(f)
        generator.train(was_training)


# ----------------------------------------------------------------------------- the job


def sample_dir(output_dir: Path, item_id: int) -> Path:
    return output_dir / "samples" / f"{int(item_id):06d}"


def check_noise_file(
    path: Path, latent_shape, item_id: int | None = None, label: int | None = None
) -> str | None:
    """None if `path` holds a finite noise of `latent_shape` (for item `item_id` with `label`,
    as its metadata records), else the reason it is unusable."""
    if not path.is_file():
        return "noise file missing"
    try:
        tensors, meta = load_tensors(path)
    except DiffalignError as e:
        return f"noise file corrupt ({e})"
    problem = _metadata_mismatch(meta, item_id, label)
    if problem is not None:
        return problem
    noise = tensors.get("noise")
    if noise is None or tuple(noise.shape) != tuple(latent_shape):
        return f"noise file has no 'noise' of shape {tuple(latent_shape)}"
    if "target" not in tensors or "base_noise" not in tensors:
        return "noise file lacks 'target' or 'base_noise'"
    if not torch.isfinite(noise).all():
        return "noise file holds NaN/inf"
    return None


def _metadata_mismatch(meta: dict, item_id: int | None, label: int | None) -> str | None:
    """Why a noise file's metadata (`id`, `label`) does not belong to this record, or None."""
    if item_id is not None and meta.get("id") != str(item_id):
        return f"noise file belongs to item {meta.get('id', '(no id recorded)')}, not {item_id}"
    if label is not None and meta.get("label") not in (None, str(label)):
        return f"noise file holds label {meta.get('label')}, the record says {label}"
    return None


def load_manifest(manifest_path: str | Path) -> tuple[list[dict], dict]:
    """Manifest records (noise paths made absolute) and the assignment config beside it."""
    manifest_path = Path(manifest_path)
    if manifest_path.is_dir():
        manifest_path = manifest_path / "manifest.jsonl"
    records = read_jsonl(manifest_path)
    if not records:
        raise DiffalignError(f"{manifest_path}: no finished items")
    cfg_path = manifest_path.parent / "assign_config.json"
    config = read_json_object(cfg_path) if cfg_path.is_file() else {}
    for i, r in enumerate(records, 1):
        if not isinstance(r, dict) or "noise_file" not in r or "label" not in r:
            raise DiffalignError(f"{manifest_path}:{i}: record needs 'noise_file' and 'label'")
        if "id" in r and _item_id(r["id"]) is None:
            raise DiffalignError(f"{manifest_path}:{i}: id {r['id']!r} is not an item number")
        where = f"{manifest_path}:{i}: noise_file"
        r["noise_path"] = str(resolve_inside(manifest_path.parent, str(r["noise_file"]), where))
    return records, config


def load_matched_pairs(
    manifest_path: str | Path,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(noise [N,C,H,W], labels [N], targets [N,C,H,W], config) from an assignment manifest.

    A missing or corrupt noise file is a one-line error naming the item.
    """
    records, config = load_manifest(manifest_path)
    noises, labels, targets = [], [], []
    for r in records:
        try:
            tensors, meta = load_tensors(r["noise_path"])
        except DiffalignError as e:
            raise DiffalignError(f"item {r.get('id')}: {e}") from None
        item = _item_id(r.get("id"))
        label = r["label"] if isinstance(r["label"], int) else None
        problem = _metadata_mismatch(meta, item, label)
        if problem is not None:
            raise DiffalignError(f"{r['noise_path']}: {problem} (manifest {manifest_path})")
        if "noise" not in tensors or "target" not in tensors:
            raise DiffalignError(f"{r['noise_path']}: missing 'noise' or 'target'")
        if not (torch.isfinite(tensors["noise"]).all() and torch.isfinite(tensors["target"]).all()):
            raise DiffalignError(f"item {r.get('id')}: {r['noise_path']} holds NaN/inf values")
        label = r["label"]
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise DiffalignError(
                f"item {r.get('id')}: label {label!r} is not a non-negative integer"
            )
        noises.append(tensors["noise"])
        targets.append(tensors["target"])
        labels.append(label)
    for what, items in (("noise", noises), ("target", targets)):
        shapes = {tuple(t.shape) for t in items}
        if len(shapes) != 1:
            raise DiffalignError(
                f"{manifest_path}: {what} tensors have different shapes {sorted(shapes)}"
            )
    return torch.stack(noises), torch.tensor(labels), torch.stack(targets), config


def assign(
    generator_ckpt: str | os.PathLike,
    output_dir: str | os.PathLike,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "train",
    max_items: int | None = None,
    assign_steps: int = 100,
    lr: float = 0.05,
    patch_size: int = 2,
    parametrization: str = "matrix_exp",
    l1_weight: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
    data=None,
    desc: str = "assign",
    write_plots: bool = True,
) -> dict:
    """Build (or resume) a matched-noise dataset; returns the summary (also in summary.json).

    `data` (a `ToyData`) overrides loading `dataset`/`split` (used by tests and the demo);
    `write_plots=False` skips the PNGs (the diagnostics JSON is still written).
    """
    from diffalign.noise.toy.data import load_dataset
    from diffalign.noise.toy.models import load_model, resolve_weights

    t0 = time.time()
    output_dir = Path(output_dir)
    weights = resolve_weights(generator_ckpt)
    generator, gcfg = load_model(weights, "generator", dataset)
    dataset = gcfg.dataset
    if data is None:
        data = load_dataset(dataset, split, data_dir)
    elif data.name != dataset:
        raise DiffalignError(f"data is '{data.name}' but the generator was trained on '{dataset}'")
    if assign_steps < 0 or batch_size <= 0:
        raise DiffalignError("--assign-steps must be >= 0 and --batch-size > 0")
    if max_items is not None and max_items < 1:
        raise DiffalignError(f"--max-items must be >= 1, got {max_items}")
    if not math.isfinite(lr) or lr <= 0:
        raise DiffalignError(f"the assignment learning rate must be > 0, got {lr}")
    if not math.isfinite(l1_weight) or l1_weight < 0:
        raise DiffalignError(f"--l1-weight must be >= 0, got {l1_weight}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise DiffalignError(f"--patch-size must be a positive integer, got {patch_size}")
    if not 0 <= int(seed) <= 2**63 - 1:
        raise DiffalignError(f"--seed must be between 0 and 2**63 - 1, got {seed}")
    latent_shape = tuple(gcfg.latent_shape)
    if latent_shape[1] % patch_size or latent_shape[2] % patch_size:
        raise DiffalignError(
            f"--patch-size {patch_size} does not divide the {dataset} latent {latent_shape}"
        )
    n_items = len(data) if max_items is None else min(len(data), int(max_items))
    config = _assign_config(
        weights, data.split, patch_size, parametrization, assign_steps, lr, l1_weight, seed
    )
    config.update(dataset=dataset, latent_shape=list(latent_shape))
    if output_dir.exists() and not output_dir.is_dir():
        raise DiffalignError(f"--output-dir {output_dir} exists and is not a folder")
    job = ToyAssignJob(
        output_dir,
        data,
        generator,
        n_items,
        latent_shape,
        assign_steps,
        lr,
        patch_size,
        parametrization,
        l1_weight,
        seed,
        write_plots,
    )
    with output_lock(output_dir, "assignment folder"):
        summary = run_assignment_job(job, output_dir, config, batch_size, desc, t0)
    if summary:
        summary["redone_corrupt"] = summary.get("redone_damaged")
    return summary


# assign_config.json's entries known once the generator's config is read
_LOADED_KEYS = ("dataset", "latent_shape")


def _assign_config(
    weights: Path, split, patch_size, parametrization, assign_steps, lr, l1_weight, seed
) -> dict:
    """An assignment's assign_config.json (its identity), its `_LOADED_KEYS` None."""
    return {
        "dataset": None,
        "split": split,
        "generator": str(weights),
        "generator_sha256": file_sha256(weights),
        "latent_shape": None,
        "patch_size": patch_size,
        "parametrization": parametrization,
        "assign_steps": assign_steps,
        "lr": lr,
        "l1_weight": l1_weight,
        "seed": seed,
    }


def check_assign_before_loading(**arguments) -> None:
    """`assign`'s refusal of a folder that holds an assignment made with other settings, before
    the generator (and the data) load; ``arguments``: `assign`'s (its defaults apply)."""
    from diffalign.engine.config_values import call_arguments
    from diffalign.noise.toy.models import resolve_weights

    a = call_arguments(assign, **arguments)
    split = a["split"] if a["data"] is None else a["data"].split
    config = _assign_config(
        resolve_weights(a["generator_ckpt"]), split, a["patch_size"], a["parametrization"],
        a["assign_steps"], a["lr"], a["l1_weight"], a["seed"],
    )  # fmt: skip
    check_job_record(ToyAssignJob, Path(a["output_dir"]), config, free=_LOADED_KEYS)


class ToyAssignJob(AssignmentJob):
    """`noise toy assign`'s items: the first `n_items` of a toy dataset split, on the toy GAN
    (the runner, `diffalign.noise.jobs.run_assignment_job`, is build-dataset's too)."""

    config_file = "assign_config.json"
    config_ignore = ("generator",)  # the weights' path may move; their sha256 must match
    what = "assignment"
    restart_hint = (  # `noise toy assign` and `noise toy em` have no --overwrite
        "rerun with the settings it was made with, or write to another --output-dir"
    )

    def __init__(
        self,
        output_dir,
        data,
        generator,
        n_items,
        latent_shape,
        assign_steps,
        lr,
        patch_size,
        parametrization,
        l1_weight,
        seed,
        write_plots,
    ) -> None:
        self.out, self.data, self.generator, self.n_items = output_dir, data, generator, n_items
        self.latent_shape = tuple(latent_shape)
        self.settings = (assign_steps, lr, patch_size, parametrization, l1_weight)
        self.patch_size, self.seed, self.write_plots = patch_size, seed, write_plots
        self.curve_sum: list[float] = []
        self.n_batches = 0
        generator.requires_grad_(False)

    def item_ids(self) -> list[int]:
        return list(range(self.n_items))

    def item_dirs(self, item: int) -> list[Path]:
        return [sample_dir(self.out, item)]

    def check_done(self, item: int, record: dict) -> str | None:
        noise_path = resolve_inside(
            self.out,
            str(record.get("noise_file")),
            f"{self.out}/manifest.jsonl: item {item}'s noise_file",
        )
        return check_noise_file(noise_path, self.latent_shape, item, record.get("label"))

    def run_batch(self, ids, todo, writer) -> None:
        x = self.data.images[ids]
        y = self.data.labels[ids]
        ok = torch.isfinite(x.flatten(1)).all(1)
        for j in (~ok).nonzero().flatten().tolist():
            if ids[j] in todo:
                writer.fail({"id": ids[j], "label": int(y[j]), "error": "target has NaN/inf"})
        good = [ids[j] for j in ok.nonzero().flatten().tolist()]
        if not good:
            return
        idx = ok.nonzero().flatten()
        eps = base_noise(good, self.latent_shape, self.seed)
        res = assign_noise(self.generator, eps, y[idx], x[idx], *self.settings)
        self.n_batches += 1
        self.curve_sum = (
            [a + b for a, b in zip(self.curve_sum, res.curve)]
            if self.curve_sum
            else list(res.curve)
        )
        for j, item in enumerate(good):
            if item not in todo:  # finished earlier; run again only as a neighbour
                continue
            _finish_item(self.out, writer, item, j, res, eps, x[idx], y[idx], self.data)

    def finalize(self, out: Path, records: list[dict], failures: list[dict]) -> dict:
        summary = _diagnostics(
            out, records, self.data, self.generator, self.patch_size, self.write_plots
        )
        if self.curve_sum and self.write_plots:
            from diffalign.engine.reports import plot_curves

            plot_curves(
                out / "assign_loss.png",
                {"mean objective": [v / self.n_batches for v in self.curve_sum]},
                title="assignment: reconstruction objective vs step (mean over batches)",
                ylabel="objective",
            )
        return summary


def _finish_item(output_dir, writer, item, j, res, eps, x, y, data) -> None:
    """Write one item's noise file atomically, then its meta.json, then its manifest line."""
    vals = (res.loss_before[j], res.loss_after[j], res.mse_after[j], res.noise[j])
    if not all(torch.isfinite(v).all() for v in vals):
        writer.fail({"id": item, "label": int(y[j]), "error": "loss is NaN/inf"})
        return
    folder = sample_dir(output_dir, item)
    rel = f"samples/{int(item):06d}/noise.safetensors"
    meta = {
        "id": int(item),
        "label": int(y[j]),
        "dataset": data.name,
        "split": data.split,
    }
    save_tensors(
        output_dir / rel,
        {"noise": res.noise[j], "base_noise": eps[j], "q": res.q[j], "target": x[j]},
        metadata={k: str(v) for k, v in meta.items()},
    )
    record = {
        **meta,
        "noise_file": rel,
        "loss_before": float(res.loss_before[j]),
        "loss_after": float(res.loss_after[j]),
        "mse_before": float(res.mse_before[j]),
        "mse_after": float(res.mse_after[j]),
    }
    write_json(folder / "meta.json", record)
    writer.done(record)


def _diagnostics(output_dir, records, data, generator, patch_size, write_plots=True) -> dict:
    """Mean MSEs and the base-vs-assigned noise diagnostics of the finished items."""
    summary: dict = {}
    if records:
        mb = torch.tensor([r["mse_before"] for r in records])
        ma = torch.tensor([r["mse_after"] for r in records])
        summary.update(
            mse_before_mean=float(mb.mean()),
            mse_after_mean=float(ma.mean()),
            relative_reduction=float(1 - ma.mean() / mb.mean()) if mb.mean() > 0 else 0.0,
        )
        noises = finished_noises(output_dir, records)
        if noises is not None:
            eps_t, noise_t = noises
            summary.update(noise_gaussianity(output_dir, eps_t, noise_t, patch_size, write_plots))
            if write_plots:
                _example_grid(output_dir, records[:16], data, generator, eps_t[:16], noise_t[:16])
    return summary


def _example_grid(output_dir, records, data, generator, eps, noise) -> None:
    """Rows: target | G(eps) (Q = I) | G(Q eps) for the first items."""
    from diffalign.engine.reports import save_image_grid

    ids = [r["id"] for r in records][: len(eps)]
    labels = torch.tensor([r["label"] for r in records][: len(eps)])
    with torch.no_grad():
        before = generator(eps, labels)
        after = generator(noise, labels)
    targets = data.images[ids]
    save_image_grid(
        output_dir / "assign_examples.png",
        torch.cat([targets, before, after]),
        ncols=len(ids),
        pad=1,
        upscale=max(1, 64 // targets.shape[-1]),
        row_labels=["target", "G(eps)", "G(Q eps)"],
        col_labels=[f"#{i} y={int(y)}" for i, y in zip(ids, labels)],
        title="assignment: target | base noise (Q = I) | assigned noise",
    )
