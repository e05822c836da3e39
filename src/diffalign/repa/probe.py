"""Using a trained U-REPA model: extract pooled features, then linear-probe and kNN them
(seed 003, section 11.1).

`extract_features` runs the trained U-Net (EMA weights by default) on each sample's latent noised
to one chosen timestep (seed 11.1: t = 500) with the EMPTY prompt (a class prompt would hand the
label to the features), and pools three feature sets per sample, `--pool mean` over tokens (or
`first`, the seed's "[CLS] equivalent"):

- `aligned`: the AlignHead tokens of each aligned layer (`aligned/<layer>`),
- `unaligned`: the same block's raw features in the untouched U-Net (LoRA disabled, no head),
- `teacher`: the teacher's own tokens (from `dino_tokens.lmdb`, or DINOv2 on the images).

`probe_features` fits, on one seeded stratified train/test split, a logistic-regression linear
probe and a cosine kNN classifier on each set and writes one table (summary.json + a PNG).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import load_tensors, read_json, read_json_object, save_tensors, write_json
from diffalign.engine.train import load_trainable_state
from diffalign.repa.model import RepaModel, RepaSpec, load_sd15_unet

FEATURES_FILE = "features.safetensors"
POOLS = ("mean", "first")


def _weights_source(path: Path, use_ema: bool) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(info with 'spec' and 'model', {'unet': tensors, 'heads': tensors}) of an export folder,
    a run folder (its checkpoint-final) or a resumable checkpoint folder."""
    if (path / "checkpoint-final" / "repa_model.json").is_file() and not (
        path / "repa_model.json"
    ).is_file():
        path = path / "checkpoint-final"
    if (path / "repa_model.json").is_file():  # an export: EMA weights already applied
        info = read_json(path / "repa_model.json")
        if not isinstance(info, dict) or "spec" not in info:
            raise DiffalignError(f"{path / 'repa_model.json'}: no U-REPA spec recorded")
        tensors = {n: load_tensors(path / f"{n}.safetensors")[0] for n in ("unet", "heads")}
        return info, tensors
    if (path / "state.json").is_file():
        state = read_json_object(path / "state.json")
        task = state.get("task") or {}
        if "teacher_dim" not in task:
            raise DiffalignError(f"{path} is not a U-REPA checkpoint (no U-REPA configuration)")
        spec = RepaSpec.from_dict(task).to_dict()
        info = {"spec": spec, "model": task.get("model", "sd15"), **task}
        if use_ema and (path / "ema.safetensors").is_file():
            ema, _ = load_tensors(path / "ema.safetensors")
            tensors: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "heads": {}}
            for k, v in ema.items():
                mod, _, name = k.partition(".")
                if mod in tensors:
                    tensors[mod][name] = v
            # buffers are not EMA'd: take them from the live weights
            for mod in tensors:
                live, _ = load_tensors(path / f"{mod}.safetensors")
                for k, v in live.items():
                    tensors[mod].setdefault(k, v)
        else:
            tensors = {n: load_tensors(path / f"{n}.safetensors")[0] for n in ("unet", "heads")}
        return info, tensors
    raise DiffalignError(
        f"{path}: not a U-REPA run, export (repa_model.json) or checkpoint folder (state.json)"
    )


def read_trained(weights: str | os.PathLike, use_ema: bool = True) -> tuple[dict, dict, RepaSpec]:
    """(info, tensors, spec) of a trained run's `weights`: no model loads (a bad folder or
    spec is one line before any data or model is touched)."""
    info, tensors = _weights_source(Path(weights), use_ema)
    return info, tensors, RepaSpec.from_dict(info["spec"])


def load_trained(
    weights: str | os.PathLike,
    model: str | None = None,
    use_ema: bool = True,
    read: tuple[dict, dict, RepaSpec] | None = None,
) -> tuple[RepaModel, torch.Tensor, dict]:
    """(RepaModel with trained LoRA + heads, alphas_cumprod, info) from `weights` (`read`:
    its `read_trained` result, when the caller has it already)."""
    info, tensors, spec = read or read_trained(weights, use_ema)
    # runs from before `noise_schedule` existed trained on the model's own schedule
    unet, alphas, _ = load_sd15_unet(
        model or info.get("model", "sd15"), noise_schedule=info.get("noise_schedule", "model")
    )
    rm = RepaModel(unet, spec)
    load_trainable_state(unet, tensors["unet"], where=f"{weights} (LoRA)")
    load_trainable_state(rm.heads, tensors["heads"], where=f"{weights} (heads)")
    unet.eval()
    rm.heads.eval()
    return rm, alphas, info


def pool_tokens(x: torch.Tensor, pool: str) -> torch.Tensor:
    """`[B, N, D]` tokens or `[B, C, h, w]` maps -> `[B, D]`: mean, or the first token / pixel."""
    if pool not in POOLS:
        raise DiffalignError(f"unknown pool '{pool}' (choose mean or first)")
    if x.dim() == 4:
        x = x.flatten(2).transpose(1, 2)
    return x.mean(dim=1) if pool == "mean" else x[:, 0]


@torch.no_grad()
def extract_features(
    weights: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    split: str = "val",
    timestep: int = 500,
    pool: str = "mean",
    batch_size: int = 32,
    max_samples: int | None = None,
    model: str | None = None,
    use_ema: bool = True,
    teacher_model: str | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Write `out_dir/features.safetensors` (+ `features.json`); returns the summary dict."""
    from torch.utils.data import DataLoader, Subset

    from diffalign.engine.distributed import process_state, rank_batches
    from diffalign.engine.io import output_lock
    from diffalign.engine.progress import progress as bar
    from diffalign.repa.data import RepaDataset, collate, load_class_table
    from diffalign.repa.losses import add_noise
    from diffalign.repa.preprocess import _gather_to_main

    if pool not in POOLS:
        raise DiffalignError(f"unknown pool '{pool}' (choose mean or first)")
    out_dir = Path(out_dir)
    root = Path(data_dir)
    # inputs are checked before the output folder is created, the data before the model loads
    trained = read_trained(weights, use_ema)
    cached = (root / "dino_tokens.lmdb").exists()
    # the features are taken with the empty prompt: no per-sample class embedding is read
    ds = RepaDataset(
        root, split, "cached" if cached else "online", max_samples, class_embeddings=False
    )
    if len(ds) == 0:
        raise ds.empty_split_error()
    rm, alphas, info = load_trained(weights, model, use_ema, read=trained)
    if not 0 <= timestep < len(alphas):
        raise DiffalignError(f"--timestep must be in [0, {len(alphas) - 1}], got {timestep}")
    if cached and ds.token_shape[-1] != rm.spec.teacher_dim:
        raise DiffalignError(
            f"teacher tokens in {root} are {ds.token_shape[-1]} wide; the model was trained "
            f"against {rm.spec.teacher_dim}"
        )
    state = process_state(device)
    device = torch.device(device) if device and state.num_processes == 1 else state.device
    with output_lock(out_dir):
        dino = None
        if not cached:
            from diffalign.repa.teacher import load_dino

            dino = load_dino(teacher_model or info.get("teacher_model", "dinov2-large"), device)
        null = load_class_table(root)[-1:]
        rm.unet.to(device)
        rm.heads.to(device)
        # rank r takes batches r, r + N, ... of the 1-process batches, and each sample's noise
        # is seeded by (seed, index): the features do not depend on the number of processes
        batches = rank_batches(range(len(ds)), batch_size, state.process_index, state.num_processes)
        mine = [i for batch in batches for i in batch]
        dl = DataLoader(Subset(ds, mine), batch_size=batch_size, shuffle=False, collate_fn=collate)
        feats: dict[str, list[torch.Tensor]] = {}
        labels: list[torch.Tensor] = []
        for batch in bar(dl, desc="extract", disable=None if progress else True):
            x0 = batch["latent"].float()
            b = x0.shape[0]
            noise = torch.stack(
                [
                    torch.randn(
                        x0.shape[1:], generator=torch.Generator().manual_seed(seed + int(i))
                    )
                    for i in batch["index"]
                ]
            )
            t = torch.full((b,), int(timestep), dtype=torch.long)
            zt = add_noise(x0, noise, alphas, t).to(device)
            cond = null.expand(b, -1, -1).to(device, torch.float32)
            t = t.to(device)
            _, _, tokens = rm.forward(zt, t, cond)
            rm.unet.disable_adapters()  # the untouched U-Net: same weights without the LoRA
            try:
                _, raw, _ = rm.forward(zt, t, cond)
            finally:
                rm.unet.enable_adapters()
            for layer in rm.spec.align_layers:
                feats.setdefault(f"aligned/{layer}", []).append(
                    pool_tokens(tokens[layer], pool).cpu()
                )
                feats.setdefault(f"unaligned/{layer}", []).append(
                    pool_tokens(raw[layer], pool).cpu()
                )
            if dino is not None:
                from diffalign.repa.teacher import dino_tokens

                teacher = dino_tokens(
                    dino,
                    batch["image"].to(device).float() / 255.0,
                    grid=rm.spec.grid,
                    layout=info.get("token_layout", "grid"),
                )
            else:
                teacher = batch["tokens"].float()
            feats.setdefault("teacher", []).append(pool_tokens(teacher, pool).cpu())
            labels.append(torch.as_tensor(batch["label"]))
        rm.hooks.remove()
        part = {k: torch.cat(v).float() for k, v in feats.items()}
        part["labels"] = torch.cat(labels).long()
        parts = _gather_to_main(state, (mine, part))
        summary: dict = {}
        if state.is_main_process:
            order = torch.as_tensor([i for idx, _ in parts for i in idx]).argsort()
            tensors = {k: torch.cat([p[k] for _, p in parts])[order].contiguous() for k in part}
            meta = {
                "weights": str(weights),
                "data_dir": str(root),
                "split": split,
                "timestep": int(timestep),
                "pool": pool,
                "prompt": "empty",
                "ema": bool(use_ema),
                "samples": len(ds),
                "num_processes": state.num_processes,
                "sets": sorted(k for k in tensors if k != "labels"),
                "ids": list(ds.ids),
            }
            save_tensors(
                out_dir / FEATURES_FILE, tensors, {"pool": pool, "timestep": str(timestep)}
            )
            write_json(out_dir / "features.json", meta)
            summary = {k: v for k, v in meta.items() if k != "ids"}
            summary["dims"] = {k: int(v.shape[1]) for k, v in tensors.items() if k != "labels"}
            write_json(out_dir / "summary.json", summary)
        state.wait_for_everyone()
        return summary


def _split(labels, test_fraction: float, seed: int):
    import numpy as np
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    n_test = max(1, int(round(test_fraction * len(labels))))
    if stratify is not None and n_test < len(set(labels.tolist())):
        stratify = None
    return train_test_split(idx, test_size=n_test, random_state=seed, stratify=stratify)


def probe_table(
    features: dict[str, torch.Tensor],
    labels: torch.Tensor,
    test_fraction: float = 0.25,
    seed: int = 0,
    knn_k: int = 5,
    max_iter: int = 1000,
) -> list[dict]:
    """Linear-probe and kNN test accuracy of each feature set on one seeded split."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    y = labels.numpy().astype(np.int64)
    if len(y) < 4:
        raise DiffalignError(f"probing needs at least 4 samples, got {len(y)}")
    if len(set(y.tolist())) < 2:
        raise DiffalignError("probing needs at least 2 classes among the samples")
    train_idx, test_idx = _split(y, test_fraction, seed)
    if len(set(y[train_idx].tolist())) < 2:
        raise DiffalignError("the training part of the split holds a single class: add samples")
    rows = []
    for name in sorted(features):
        x = features[name].float().numpy()
        scaler = StandardScaler().fit(x[train_idx])
        lin = LogisticRegression(max_iter=max_iter, random_state=seed)
        lin.fit(scaler.transform(x[train_idx]), y[train_idx])
        linear = float(lin.score(scaler.transform(x[test_idx]), y[test_idx]))
        k = max(1, min(knn_k, len(train_idx)))
        knn = KNeighborsClassifier(n_neighbors=k, metric="cosine")
        knn.fit(x[train_idx], y[train_idx])
        rows.append(
            {
                "features": name,
                "dim": int(x.shape[1]),
                "linear_probe_acc": linear,
                "knn_acc": float(knn.score(x[test_idx], y[test_idx])),
                "knn_k": k,
            }
        )
    return rows


def plot_probe(path: Path, rows: list[dict], title: str) -> None:
    """Grouped bars: one group per feature set, linear probe and kNN side by side, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffalign.engine.io import atomic_path

    names = [r["features"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 4), dpi=100)
    w = 0.38
    for off, key, label in (
        (-w / 2, "linear_probe_acc", "linear probe"),
        (w / 2, "knn_acc", "kNN"),
    ):
        vals = [r[key] for r in rows]
        bars = ax.bar([i + off for i in x], vals, width=w, label=label)
        for b_, v in zip(bars, vals):
            ax.text(b_.get_x() + b_.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=15, fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_xlabel("feature set")
    ax.set_ylim(0, 1.1)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def probe_features(
    features_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    test_fraction: float = 0.25,
    seed: int = 0,
    knn_k: int = 5,
) -> dict:
    """Probe every set in `features_dir/features.safetensors`; write summary.json + probe.png."""
    from diffalign.engine.io import output_lock

    src = Path(features_dir)
    path = src / FEATURES_FILE if src.is_dir() else src
    if not path.is_file():
        raise DiffalignError(f"{path} not found; run `diffalign repa extract` first")
    tensors, _ = load_tensors(path)
    if "labels" not in tensors:
        raise DiffalignError(f"{path} holds no labels: not a `repa extract` output")
    labels = tensors.pop("labels")
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise DiffalignError(
            f"{path}: labels must be a 1-D integer tensor, got {labels.dtype} {list(labels.shape)}"
        )
    if labels.numel() and int(labels.min()) < 0:
        raise DiffalignError(f"{path}: labels must be >= 0, got {int(labels.min())}")
    for k, v in tensors.items():
        if v.dim() != 2 or v.shape[0] != labels.shape[0]:
            raise DiffalignError(f"{path}: '{k}' has shape {list(v.shape)}, not [N, D]")
        if not torch.isfinite(v.float()).all():
            raise DiffalignError(f"{path}: '{k}' holds non-finite values (NaN or inf)")
    if not 0.0 < test_fraction < 1.0:
        raise DiffalignError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    meta_path = path.parent / "features.json"
    meta = read_json_object(meta_path) if meta_path.is_file() else {}
    out_dir = Path(out_dir)
    with output_lock(out_dir):
        rows = probe_table(tensors, labels, test_fraction, seed, knn_k)
        summary = {
            "features": str(path),
            "samples": int(labels.shape[0]),
            "classes": int(len(set(labels.tolist()))),
            "test_fraction": test_fraction,
            "seed": seed,
            "timestep": meta.get("timestep"),
            "pool": meta.get("pool"),
            "table": rows,
        }
        plot_probe(
            out_dir / "probe.png",
            rows,
            f"U-REPA probes (t={meta.get('timestep')}, pool={meta.get('pool')})\n"
            f"{summary['samples']} samples, {summary['classes']} classes",
        )
        write_json(out_dir / "summary.json", summary)
        return summary
