"""One evaluation for every toy method, on held-out data (spec N: Toy branch).

For a generator:

(a) **held-out reconstruction**: assign a fixed held-out subset (the first `recon_items` test
    items, base noise seeded per item) with the generator and report the mean MSE with
    ``Q = I`` (`recon_mse_before`) and with the optimised ``Q`` (`recon_mse_after`);
(b) **random-noise sample quality**: generate `num_samples` images from fixed random noise with
    balanced labels, and report the accuracy of a classifier trained on the real train split
    (`accuracy`) and the Frechet distance between generated and held-out real images in that
    classifier's penultimate feature space (`fd`).

References, computed once: the classifier's own held-out accuracy and the Frechet distance
between real train images and the held-out images (the floor that sampling noise sets).
Nothing here is tuned toward a method: every generator goes through the same code and inputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from diffalign.engine.errors import DiffalignError
from diffalign.engine.train import OptimizerSpec, StepContext, TrainConfig, TrainTask, train
from diffalign.noise.toy.data import ToyData
from diffalign.noise.toy.models import Classifier, ToyModelConfig, build_model, save_model

# ----------------------------------------------------------------------------- Frechet distance


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``[N, F]`` features, float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise DiffalignError(f"need at least 2 feature vectors [N, F], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Frechet distance between N(mu1, S1) and N(mu2, S2):
    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2})``.

    The trace term uses symmetric eigen-decompositions (``tr sqrt(S1 S2)`` equals the trace of
    the square root of the symmetric PSD matrix ``S1^{1/2} S2 S1^{1/2}``), which is stable for
    singular covariances; tiny negative eigenvalues from rounding are clipped to 0.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise DiffalignError(
            f"frechet_distance: shapes differ (mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {s1.shape} vs {s2.shape})"
        )
    w1, v1 = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    m = root1 @ s2 @ root1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(w, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


# ----------------------------------------------------------------------------- classifier


class ClassifierTask(TrainTask):
    """Cross-entropy training of the evaluation classifier on the real train split."""

    def __init__(self, data: ToyData, lr: float = 1e-3, batch_size: int = 128) -> None:
        cfg = ToyModelConfig.for_dataset("classifier", data.name)
        self.model: Classifier = build_model(cfg)  # type: ignore[assignment]
        self.data, self.lr, self.batch_size = data, lr, min(batch_size, len(data))

    def trainable(self):
        return {"classifier": self.model}

    def optimizers(self):
        return {"main": OptimizerSpec([{"params": self.model.parameters()}], lr=self.lr)}

    def train_dataloader(self):
        ds = TensorDataset(self.data.images, self.data.labels)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def training_step(self, batch, step: int, ctx: StepContext) -> dict:
        x, y = batch
        logits = self.model(x)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(1) == y).float().mean()}

    def export(self, out_dir: Path) -> None:
        save_model(self.model, out_dir, {"dataset": self.data.name, "split": self.data.split})


def train_classifier(
    train_data: ToyData,
    output_dir: str | os.PathLike,
    max_steps: int = 600,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Classifier:
    """Train the evaluation classifier through the shared loop; returns it in eval mode."""
    torch.manual_seed(seed)
    task = ClassifierTask(train_data, lr, batch_size)
    train(
        task,
        TrainConfig(
            output_dir=str(output_dir),
            max_steps=max_steps,
            lr_scheduler="cosine",
            checkpoint_every=0,
            best_metric=None,
            log_every=max(1, max_steps // 20),
            seed=seed,
            tracker="none",
            progress=progress,
            run_name="classifier",
            overwrite=overwrite,
        ),
    )
    # the loop leaves it on the accelerator's device; the toy branch works on the CPU
    return task.model.cpu().eval()


@torch.no_grad()
def classify(classifier: Classifier, images: torch.Tensor, batch: int = 1024):
    """(logits [N, K], penultimate features [N, F]) in batches."""
    classifier.eval()
    feats, logits = [], []
    device = next(classifier.parameters()).device
    for i in range(0, len(images), batch):
        f = classifier.features(images[i : i + batch].to(device))
        feats.append(f)
        logits.append(classifier.head(f))
    return torch.cat(logits), torch.cat(feats)


# ----------------------------------------------------------------------------- evaluation


@dataclass
class EvalSettings:
    """The evaluation inputs; identical for every method compared."""

    num_samples: int = 1000
    recon_items: int = 300
    assign_steps: int = 100
    assign_lr: float = 0.05
    patch_size: int = 2
    parametrization: str = "matrix_exp"
    seed: int = 0

    def validate(self) -> None:
        """One-line errors for settings the metrics cannot be computed with."""
        import math

        if self.num_samples < 2:
            raise DiffalignError(
                f"--num-samples must be >= 2 (the Frechet distance needs a covariance), "
                f"got {self.num_samples}"
            )
        if self.recon_items < 1:
            raise DiffalignError(f"--recon-items must be >= 1, got {self.recon_items}")
        if self.assign_steps < 0:
            raise DiffalignError(f"--assign-steps must be >= 0, got {self.assign_steps}")
        if self.patch_size < 1:
            raise DiffalignError(f"--patch-size must be >= 1, got {self.patch_size}")
        if not math.isfinite(self.assign_lr) or self.assign_lr <= 0:
            raise DiffalignError(f"the assignment learning rate must be > 0, got {self.assign_lr}")
        if not 0 <= self.seed <= 2**63 - 1:
            raise DiffalignError(f"--seed must be between 0 and 2**63 - 1, got {self.seed}")


def sample_inputs(latent_shape, n: int, num_classes: int = 10, seed: int = 0):
    """Fixed evaluation noise and balanced labels (class ``i % K``)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    z = torch.randn((n, *latent_shape), generator=g)
    return z, torch.arange(n) % num_classes


def reference_metrics(
    classifier: Classifier, train_data: ToyData, test_data: ToyData, settings: EvalSettings
) -> dict:
    """Classifier held-out accuracy and real-train vs held-out Frechet distance."""
    logits, test_feats = classify(classifier, test_data.images)
    acc = float((logits.argmax(1) == test_data.labels).float().mean())
    g = torch.Generator().manual_seed(20_000 + settings.seed)
    n = min(settings.num_samples, len(train_data))
    idx = torch.randperm(len(train_data), generator=g)[:n]
    _, train_feats = classify(classifier, train_data.images[idx])
    fd = frechet_distance(*gaussian_stats(train_feats), *gaussian_stats(test_feats))
    return {"classifier_test_accuracy": acc, "fd_real_train_vs_test": fd, "fd_real_samples": n}


def evaluate_generator(
    generator: torch.nn.Module,
    classifier: Classifier,
    test_data: ToyData,
    settings: EvalSettings,
) -> dict:
    """Held-out reconstruction after assignment, and random-noise sample accuracy and FD."""
    from diffalign.noise.toy.assignment import assign_noise, base_noise

    cfg = generator.config
    if cfg.dataset != test_data.name:
        raise DiffalignError(
            f"generator trained on '{cfg.dataset}' cannot be evaluated on '{test_data.name}'"
        )
    generator.eval()
    n_rec = min(settings.recon_items, len(test_data))
    ids = list(range(n_rec))
    res = assign_noise(
        generator,
        base_noise(ids, cfg.latent_shape, 50_000 + settings.seed),
        test_data.labels[:n_rec],
        test_data.images[:n_rec],
        settings.assign_steps,
        settings.assign_lr,
        settings.patch_size,
        settings.parametrization,
    )
    z, labels = sample_inputs(
        cfg.latent_shape, settings.num_samples, cfg.num_classes, settings.seed
    )
    with torch.no_grad():
        samples = torch.cat(
            [generator(z[i : i + 1024], labels[i : i + 1024]) for i in range(0, len(z), 1024)]
        )
    logits, feats = classify(classifier, samples)
    _, real_feats = classify(classifier, test_data.images)
    return {
        "recon_mse_before": float(res.mse_before.mean()),
        "recon_mse_after": float(res.mse_after.mean()),
        "recon_items": n_rec,
        "accuracy": float((logits.argmax(1) == labels).float().mean()),
        "fd": frechet_distance(*gaussian_stats(feats), *gaussian_stats(real_feats)),
        "num_samples": settings.num_samples,
    }


def format_table(results: dict[str, dict], titles: dict[str, str] | None = None) -> str:
    """Fixed-width table: method | held-out recon MSE (Q = I, assigned) | accuracy | FD."""
    titles = titles or {}
    width = max([14, *(len(titles.get(k, k)) for k in results)])
    head = (
        f"{'method':<{width}} | {'recon MSE Q=I':>13} | {'recon MSE assigned':>18} | "
        f"{'accuracy':>8} | {'FD':>8}"
    )
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        lines.append(
            f"{titles.get(name, name):<{width}} | {r['recon_mse_before']:>13.4f} | "
            f"{r['recon_mse_after']:>18.4f} | {r['accuracy']:>8.3f} | {r['fd']:>8.3f}"
        )
    return "\n".join(lines)


def evaluate_runs(
    generator_ckpts: list[str],
    output_dir: str | os.PathLike,
    names: list[str] | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    classifier_ckpt: str | None = None,
    classifier_steps: int = 600,
    settings: EvalSettings | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate several generators of one dataset with one classifier; writes summary.json."""

    settings = settings or EvalSettings()
    settings.validate()
    if classifier_steps < 1:
        raise DiffalignError(f"--classifier-steps must be >= 1, got {classifier_steps}")
    if names is not None and len(names) != len(generator_ckpts):
        raise DiffalignError(
            f"--names has {len(names)} entries but --generator-ckpt has {len(generator_ckpts)}"
        )
    names = names or [str(p) for p in generator_ckpts]
    from diffalign.engine.io import output_lock

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise DiffalignError(f"--output-dir {out} exists and is not a folder")
    with output_lock(out, "evaluation folder"):
        return _evaluate_locked(
            generator_ckpts,
            out,
            names,
            dataset,
            data_dir,
            classifier_ckpt,
            classifier_steps,
            settings,
            progress,
        )


def _evaluate_locked(
    generator_ckpts: list[str],
    out: Path,
    names: list[str],
    dataset: str | None,
    data_dir: str | None,
    classifier_ckpt: str | None,
    classifier_steps: int,
    settings: EvalSettings,
    progress: bool,
) -> dict:
    from diffalign.engine.io import write_json
    from diffalign.noise.toy.data import load_dataset
    from diffalign.noise.toy.models import load_model

    gens = []
    for path in generator_ckpts:
        g, cfg = load_model(path, "generator", dataset)
        dataset = cfg.dataset  # every later generator must match the first one's dataset
        gens.append(g)
        _, h, w = cfg.latent_shape
        if h % settings.patch_size or w % settings.patch_size:  # before any training
            raise DiffalignError(
                f"--patch-size {settings.patch_size} does not divide the {dataset} latent "
                f"{tuple(cfg.latent_shape)}"
            )
    train_data = load_dataset(dataset, "train", data_dir)
    test_data = load_dataset(dataset, "test", data_dir)
    if classifier_ckpt:
        classifier, _ = load_model(classifier_ckpt, "classifier", dataset)
    else:
        classifier = train_classifier(
            train_data,
            out / "classifier",
            classifier_steps,
            seed=settings.seed,
            overwrite=True,
            progress=progress,
        )
    results = {
        n: evaluate_generator(g, classifier, test_data, settings) for n, g in zip(names, gens)
    }
    summary = {
        "dataset": dataset,
        "methods": results,
        "reference": reference_metrics(classifier, train_data, test_data, settings),
        "eval_settings": settings.__dict__,
        "table": format_table(results),
    }
    write_json(out / "summary.json", summary)
    return summary
