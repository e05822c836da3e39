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
file is missing or corrupt is assigned again. Items are optimised in fixed batches (this
process's items, in order, `batch_size` at a time); a batch with an unfinished item is run
whole again and only its unfinished items are written, so a resumed run gives the same bytes as
an uninterrupted one. Each noise file records its item's id and label in its safetensors
metadata; a manifest record whose file belongs to another item is refused, and `noise_file`
paths must stay inside the dataset folder (`engine.io.resolve_inside`). The folder is locked
for the whole run (`engine.io.output_lock`). Under ``accelerate launch`` rank ``r`` of ``w``
takes the items ``i % w == r`` and appends to ``manifest.rank-RR.jsonl``; rank 0 merges the
parts into ``manifest.jsonl`` at the end (a crash leaves the parts, which the next run reads).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import (
    append_jsonl,
    clean_stale_temporaries,
    load_tensors,
    locked_output_dir,
    read_json,
    read_jsonl,
    resolve_inside,
    save_tensors,
    write_json,
)
from diffalign.engine.progress import progress
from diffalign.noise.toy.losses import per_item_reconstruction

# ----------------------------------------------------------------------------- the math


@dataclass
class AssignResult:
    """Per-item result of `assign_noise` (all tensors on CPU)."""

    noise: torch.Tensor  # [N, C, H, W]  best Q eps
    q: torch.Tensor  # [N, D, D]     best Q
    loss_before: torch.Tensor  # [N]  objective at Q = I
    loss_after: torch.Tensor  # [N]  best objective
    mse_before: torch.Tensor  # [N]
    mse_after: torch.Tensor  # [N]
    curve: list[float] = field(default_factory=list)  # mean objective per step


def base_noise(item_ids, latent_shape, seed: int = 0) -> torch.Tensor:
    """The fixed base noise ``eps_i`` of each item: ``N(0, I)`` from a per-item seeded generator."""
    out = []
    for i in item_ids:
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(i)) % 2**63)
        out.append(torch.randn(tuple(latent_shape), generator=g))
    return torch.stack(out) if out else torch.empty((0, *latent_shape))


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
    """Optimise one orthogonal ``Q_i`` per item so ``G(Q_i eps_i, y_i)`` matches ``x_i``.

    Adam on the skew parameters of `PatchOrthogonal`; the best ``Q`` seen per item is kept
    (step 0 is ``Q = I``, so ``loss_after <= loss_before`` always). The generator's weights are
    not changed and get no gradients.
    """
    from diffalign.noise import PatchOrthogonal
    from diffalign.noise.orthogonal import apply_patch_orthogonal

    n, c = eps.shape[0], eps.shape[1]
    if n == 0:
        raise DiffalignError("assign_noise: empty batch")
    if not (len(labels) == len(targets) == n):
        raise DiffalignError(
            f"assign_noise: {n} noises, {len(labels)} labels, {len(targets)} targets must match"
        )
    q = PatchOrthogonal(c, patch_size, parametrization, init="identity", num_transforms=n)
    opt = torch.optim.Adam(q.parameters(), lr=lr)
    was_training = generator.training
    flags = [p.requires_grad for p in generator.parameters()]
    generator.eval()
    for p in generator.parameters():
        p.requires_grad_(False)

    def matrices() -> torch.Tensor:
        m = q.matrix()
        return m if m.ndim == 3 else m[None]

    best_loss = torch.full((n,), float("inf"))
    best_q = torch.eye(q.dim).expand(n, q.dim, q.dim).clone()
    loss_before = mse_before = None
    curve: list[float] = []
    try:
        for step in range(steps + 1):
            qm = matrices()
            out = generator(apply_patch_orthogonal(eps, qm, patch_size), labels)
            loss = per_item_reconstruction(out, targets, l1_weight)
            with torch.no_grad():
                if step == 0:
                    loss_before = loss.detach().clone()
                    mse_before = per_item_reconstruction(out, targets).detach().clone()
                better = loss.detach() < best_loss
                best_loss = torch.where(better, loss.detach(), best_loss)
                best_q[better] = qm.detach()[better]
                curve.append(float(loss.detach().mean()))
            if step == steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
        with torch.no_grad():
            noise = apply_patch_orthogonal(eps, best_q, patch_size)
            mse_after = per_item_reconstruction(generator(noise, labels), targets)
    finally:
        for p, f in zip(generator.parameters(), flags):
            p.requires_grad_(f)
        generator.train(was_training)
    # items whose loss was never finite keep Q = I and an infinite best loss
    return AssignResult(
        noise=noise,
        q=best_q,
        loss_before=loss_before,
        loss_after=torch.where(torch.isfinite(best_loss), best_loss, loss_before),
        mse_before=mse_before,
        mse_after=mse_after,
        curve=curve,
    )


# ----------------------------------------------------------------------------- the job


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dist_state():
    """(rank, world_size, state) — accelerate's PartialState only when launched distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from diffalign.engine.distributed import process_state

        state = process_state()
        return state.process_index, state.num_processes, state
    return 0, 1, None


def sample_dir(output_dir: Path, item_id: int) -> Path:
    return output_dir / "samples" / f"{int(item_id):06d}"


def _read_records(output_dir: Path, stem: str) -> dict[int, dict]:
    """Latest record per id from `<stem>.jsonl` and any leftover `<stem>.rank-*.jsonl` parts."""
    recs: dict[int, dict] = {}
    files = [output_dir / f"{stem}.jsonl", *sorted(output_dir.glob(f"{stem}.rank-*.jsonl"))]
    for f in files:
        if f.is_file():
            for r in read_jsonl(f, skip_bad=True):  # a line cut by a crash is just redone
                item = _item_id(r.get("id")) if isinstance(r, dict) else None
                if item is not None:  # an id that is not an item number is no item of ours
                    recs[item] = r
    return recs


def _item_id(value) -> int | None:
    """A record's item id as an int (ids are item numbers: `7` or `"7"`), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


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
    config = read_json(cfg_path) if cfg_path.is_file() else {}
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
    config = {
        "dataset": dataset,
        "split": data.split,
        "generator": str(weights),
        "generator_sha256": _file_sha256(weights),
        "latent_shape": list(latent_shape),
        "patch_size": patch_size,
        "parametrization": parametrization,
        "assign_steps": assign_steps,
        "lr": lr,
        "l1_weight": l1_weight,
        "seed": seed,
    }
    if output_dir.exists() and not output_dir.is_dir():
        raise DiffalignError(f"--output-dir {output_dir} exists and is not a folder")
    with locked_output_dir(output_dir, "assignment folder"):
        return _assign_locked(
            output_dir,
            config,
            data,
            generator,
            n_items,
            latent_shape,
            assign_steps,
            lr,
            patch_size,
            parametrization,
            l1_weight,
            batch_size,
            seed,
            desc,
            write_plots,
            t0,
        )


def _assign_locked(
    output_dir: Path,
    config: dict,
    data,
    generator,
    n_items: int,
    latent_shape: tuple,
    assign_steps: int,
    lr: float,
    patch_size: int,
    parametrization: str,
    l1_weight: float,
    batch_size: int,
    seed: int,
    desc: str,
    write_plots: bool,
    t0: float,
) -> dict:
    rank, world, state = _dist_state()
    cfg_path = output_dir / "assign_config.json"
    if cfg_path.is_file():
        old = read_json(cfg_path)
        diff = [k for k in config if k != "generator" and old.get(k) != config[k]]
        if diff:
            raise DiffalignError(
                f"{output_dir} holds an assignment made with other settings ({', '.join(diff)}); "
                "use another --output-dir"
            )
    elif rank == 0:
        write_json(cfg_path, config)
    if state is not None:
        state.wait_for_everyone()

    done = _read_records(output_dir, "manifest")
    todo, skipped, redo = [], 0, 0
    mine = [i for i in range(n_items) if i % world == rank]
    for i in mine:
        if i in done:
            rel = done[i].get("noise_file")
            noise_path = resolve_inside(
                output_dir, str(rel), f"{output_dir}/manifest.jsonl: item {i}'s noise_file"
            )
            problem = check_noise_file(noise_path, latent_shape, i, done[i].get("label"))
            if problem is None:
                skipped += 1
                continue
            redo += 1
            print(f"diffalign: item {i}: {problem}; assigning it again", flush=True)
        todo.append(i)
    todo_set = set(todo)
    # a kill mid-write leaves `.<name>.XXXXXXXX.tmp` beside the file: only in the folders of
    # items still to do (a finished item's files were renamed into place before its record)
    if rank == 0:
        clean_stale_temporaries(output_dir)
    for i in todo:
        clean_stale_temporaries(sample_dir(output_dir, i))
    # fixed batches of this process's items: a batch with work left is run whole, so every
    # item sees the same batch neighbours as in an uninterrupted run (bit-identical results)
    batches = [mine[s : s + batch_size] for s in range(0, len(mine), batch_size)]
    batches = [b for b in batches if todo_set.intersection(b)]

    suffix = "" if world == 1 else f".rank-{rank:02d}"
    manifest_file = output_dir / f"manifest{suffix}.jsonl"
    failures_file = output_dir / f"failures{suffix}.jsonl"
    curve_sum: list[float] = []
    n_batches = 0
    generator.requires_grad_(False)
    bar = progress(total=len(todo), desc=desc)
    for ids in batches:
        x = data.images[ids]
        y = data.labels[ids]
        ok = torch.isfinite(x.flatten(1)).all(1)
        for j in (~ok).nonzero().flatten().tolist():
            if ids[j] in todo_set:
                append_jsonl(
                    failures_file,
                    {"id": ids[j], "label": int(y[j]), "error": "target has NaN/inf"},
                )
        good = [ids[j] for j in ok.nonzero().flatten().tolist()]
        if good:
            idx = ok.nonzero().flatten()
            eps = base_noise(good, latent_shape, seed)
            res = assign_noise(
                generator,
                eps,
                y[idx],
                x[idx],
                assign_steps,
                lr,
                patch_size,
                parametrization,
                l1_weight,
            )
            n_batches += 1
            curve_sum = (
                [a + b for a, b in zip(curve_sum, res.curve)] if curve_sum else list(res.curve)
            )
            for j, item in enumerate(good):
                if item not in todo_set:  # finished earlier; run again only as a neighbour
                    continue
                _finish_item(
                    output_dir,
                    manifest_file,
                    failures_file,
                    item,
                    j,
                    res,
                    eps,
                    x[idx],
                    y[idx],
                    data,
                )
        bar.update(len(todo_set.intersection(ids)))
    bar.close()

    if state is not None:
        state.wait_for_everyone()
    summary = {}
    if rank == 0:
        summary = _finalize(
            output_dir, config, n_items, latent_shape, data, generator, patch_size, write_plots
        )
        summary.update(
            skipped_finished=skipped if world == 1 else None,
            redone_corrupt=redo if world == 1 else None,
            world_size=world,
            seconds=round(time.time() - t0, 3),
        )
        if curve_sum and write_plots:
            from diffalign.engine.reports import plot_curves

            plot_curves(
                output_dir / "assign_loss.png",
                {"mean objective": [v / n_batches for v in curve_sum]},
                title="assignment: reconstruction objective vs step (mean over batches)",
                ylabel="objective",
            )
        write_json(output_dir / "summary.json", summary)
    if state is not None:
        state.wait_for_everyone()
    return summary


def _finish_item(output_dir, manifest_file, failures_file, item, j, res, eps, x, y, data) -> None:
    """Write one item's noise file atomically, then its meta.json, then its manifest line."""
    vals = (res.loss_before[j], res.loss_after[j], res.mse_after[j], res.noise[j])
    if not all(torch.isfinite(v).all() for v in vals):
        append_jsonl(failures_file, {"id": item, "label": int(y[j]), "error": "loss is NaN/inf"})
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
    append_jsonl(manifest_file, record)


def _finalize(
    output_dir, config, n_items, latent_shape, data, generator, patch_size, write_plots=True
) -> dict:
    """Merge manifest parts, rewrite manifest/failures de-duplicated, write diagnostics."""
    from diffalign.noise import gaussianity_report, write_gaussianity_diagnostics

    done = _read_records(output_dir, "manifest")
    fails = _read_records(output_dir, "failures")
    records = [done[i] for i in sorted(done)]
    failures = [fails[i] for i in sorted(fails) if i not in done]
    _rewrite_jsonl(output_dir / "manifest.jsonl", records)
    _rewrite_jsonl(output_dir / "failures.jsonl", failures)
    for part in output_dir.glob("*.rank-*.jsonl"):
        part.unlink()

    summary: dict = {
        "config": config,
        "num_items": n_items,
        "finished": len(records),
        "failed": len(failures),
    }
    if records:
        mb = torch.tensor([r["mse_before"] for r in records])
        ma = torch.tensor([r["mse_after"] for r in records])
        summary.update(
            mse_before_mean=float(mb.mean()),
            mse_after_mean=float(ma.mean()),
            relative_reduction=float(1 - ma.mean() / mb.mean()) if mb.mean() > 0 else 0.0,
        )
        eps, noise = [], []
        for r in records:
            try:
                t, _ = load_tensors(resolve_inside(output_dir, str(r["noise_file"]), "noise_file"))
                eps.append(t["base_noise"])
                noise.append(t["noise"])
            except (DiffalignError, KeyError):
                continue
        if eps:
            eps_t, noise_t = torch.stack(eps), torch.stack(noise)
            # init: the base noise against itself (Q = I); final: base vs assigned noise
            pairs = {"init": (eps_t, eps_t.clone()), "final": (eps_t, noise_t)}
            for key, (z, z2) in pairs.items():
                name = f"orthogonal_gaussian_{key}"
                if write_plots:
                    rep = write_gaussianity_diagnostics(
                        output_dir, name, z, z2, patch_size=patch_size
                    )
                else:
                    rep = gaussianity_report(z, z2, patch_size=patch_size)
                    write_json(output_dir / f"{name}.json", rep)
                summary[f"gaussianity_{key}"] = _small(rep)
            if write_plots:
                _example_grid(output_dir, records[:16], data, generator, eps_t[:16], noise_t[:16])
    return summary


def _small(report: dict) -> dict:
    """Scalars of a gaussianity report (lists and nested plots left out of summary.json)."""
    out = {}
    for k, v in (report or {}).items():
        if isinstance(v, int | float | str | bool) or v is None:
            out[k] = v
        elif isinstance(v, dict):
            sub = {kk: vv for kk, vv in v.items() if isinstance(vv, int | float | str | bool)}
            if sub:
                out[k] = sub
    return out


def _rewrite_jsonl(path: Path, records: list[dict]) -> None:
    from diffalign.engine.io import dumps_json, write_text

    write_text(path, "".join(dumps_json(r) + "\n" for r in records))


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
