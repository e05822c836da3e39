"""Reward-driven test-time optimisation of the orthogonal noise transform (spec N; seed 001
`cli_sdxl_reward` / `cli_pickscore` / `cli_imagereward` / `cli_hpsv2`).

For prompts ``p_1..p_P`` with base noises ``z_i`` (the seed: the same seeded noise for every
prompt), one patch-wise orthogonal ``Q_i`` per prompt (:class:`PatchOrthogonal` with
``num_transforms = P``) is optimised to maximise

    ``R(G(Q_i z_i, p_i), p_i) - w * mean((sigma Q_i z_i - sigma z_i)^2)``

through any :class:`~diffalign.noise.onestep.OneStepGenerator` ``G`` and any reward ``R``
(``forward(images in [0, 1], prompts) -> [B]``, higher is better). The drift term is the seed's
``noise_l2_weight`` regulariser on the seed's sigma-scaled noise (``sigma = G.init_noise_sigma()``:
14.6 on SDXL-Turbo, so the same ``w`` weighs 214x more than on ``z``; 1 for flow matching and
the toy). ``Q_i`` starts at ``I`` or, with ``init_std``, at the seed's ``A = init_std * randn``
(``S = A - A^T``, :mod:`diffalign.noise.orthogonal`). The loss is the *sum* over prompts and the SGD clip is applied
per prompt, so optimising P prompts as one batch gives each prompt the update it would get
alone (tested). Optimisers: ``adam`` (the seed's AdamW) or ``sgd`` (ReNO's: Nesterov momentum 0.9,
gradient-norm clip 0.1).

:func:`optimize_prompts` is the method (no I/O); :func:`run_optimize` writes the seed's layout.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError
from diffalign.noise.onestep import OneStepGenerator, repeat_embeds, select_embeds
from diffalign.noise.orthogonal import (
    PARAMETRIZATIONS,
    PatchOrthogonal,
    apply_patch_orthogonal,
    orthogonality_error,
)

OPTIMIZERS = ("adam", "sgd")
SGD_DEFAULT_CLIP = 0.1  # ReNO


@dataclass
class OptimizeSettings:
    """Optimisation settings (seed defaults: 30 steps, AdamW lr 5e-4, patch 2, drift 1e-3;
    ``init_std`` 0 is the spec's Q = I start, the seed's is 1e-4)."""

    steps: int = 30
    lr: float = 5e-4
    optimizer: str = "adam"
    patch_size: int = 2
    parametrization: str = "matrix_exp"
    noise_l2_weight: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    grad_clip: float | None = None  # None: 0.1 for sgd (ReNO), off for adam
    images_per_prompt: int = 1
    init_std: float = 0.0

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise DiffalignError(
                f"unknown optimizer '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}"
            )
        if self.parametrization not in PARAMETRIZATIONS:
            raise DiffalignError(
                f"unknown parametrization '{self.parametrization}'; choose one of "
                f"{', '.join(PARAMETRIZATIONS)}"
            )
        for name in ("steps", "images_per_prompt", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (name != "steps"):
                raise DiffalignError(f"--{name.replace('_', '-')} must be a positive integer")
        for name in ("lr", "noise_l2_weight", "weight_decay", "momentum", "init_std"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise DiffalignError(f"--{name.replace('_', '-')} must be finite and >= 0")
        if self.grad_clip is not None and not (
            self.grad_clip > 0 and math.isfinite(self.grad_clip)
        ):
            raise DiffalignError("--grad-clip must be a positive number")

    def clip(self) -> float | None:
        if self.grad_clip is not None:
            return self.grad_clip
        return SGD_DEFAULT_CLIP if self.optimizer == "sgd" else None


@dataclass
class PromptResult:
    """What one prompt's optimisation gives (tensors on the CPU)."""

    prompt: str
    reward_history: list[float]  # steps + 1 values: step 0 is the starting Q (I by default)
    term_history: dict[str, list[float]]
    drift_history: list[float]
    best_step: int
    best_reward: float
    base_noise: torch.Tensor  # [K, C, h, w]
    init_images: torch.Tensor  # [K, 3, H, W] in [0, 1]
    best_images: torch.Tensor
    best_noise: torch.Tensor  # Q_best z
    q_best: torch.Tensor  # [D, D]
    q_final: torch.Tensor
    weight_best: torch.Tensor  # the free parameter A of Q_best (PatchOrthogonal.weight[i])
    error: str | None = None
    failed_step: int | None = None
    q_init: torch.Tensor | None = None  # the starting Q (None: the identity)

    @property
    def ok(self) -> bool:
        return self.error is None


# ------------------------------------------------------------------ pure pieces


def clip_grad_norm_per_transform(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Clip each ``grad[i]`` to L2 norm ``max_norm`` in place, as ``torch.nn.utils.
    clip_grad_norm_`` would for that prompt alone (``scale = min(1, max / (norm + 1e-6))``).
    Returns the norms before clipping."""
    norms = grad.flatten(1).norm(dim=1)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    grad.mul_(scale.view(-1, *([1] * (grad.ndim - 1))))
    return norms


def drift_per_sample(zq: torch.Tensor, z: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """The seed's drift regulariser ``mean((sigma Q z - sigma z)^2)`` (its ``F.mse_loss`` on the
    sigma-scaled noises), one value per sample."""
    return ((sigma * zq.float() - sigma * z.float()) ** 2).flatten(1).mean(1)


def all_matrices(transform: PatchOrthogonal) -> torch.Tensor:
    """Every ``Q`` of a :class:`PatchOrthogonal` as ``[N, D, D]`` (also when N = 1)."""
    q = transform.matrix()
    return q.unsqueeze(0) if q.ndim == 2 else q


def make_optimizer(params, settings: OptimizeSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=settings.lr,
            momentum=settings.momentum,
            nesterov=settings.momentum > 0,
            weight_decay=settings.weight_decay,
        )
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def reward_terms(reward: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Per-term values ``[B]`` a combined reward kept from its last call (``last_terms``)."""
    terms = getattr(reward, "last_terms", None)
    if not isinstance(terms, dict):
        return {}
    return {str(k): v for k, v in terms.items() if isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------ the method


# on_step(step, active prompt indices, images [A*K, ...], rewards [A]) after each evaluation
StepCallback = Callable[[int, list[int], torch.Tensor, torch.Tensor], None]


def optimize_prompts(
    generator: OneStepGenerator,
    reward: torch.nn.Module,
    prompts: Sequence[str],
    base_noise: torch.Tensor,
    settings: OptimizeSettings,
    on_step: StepCallback | None = None,
    init_seed: int = 0,
) -> list[PromptResult]:
    """Optimise one orthogonal ``Q_i`` per prompt, all prompts in one batch (see module doc).

    ``base_noise``: ``[P * K, C, h, w]`` with ``K = settings.images_per_prompt`` noises per
    prompt, prompt-major. Evaluates ``steps + 1`` times (step 0 = the starting ``Q``: ``I``, or
    the seed's ``init_std`` start drawn with ``init_seed``, the same for every prompt) and updates
    ``steps`` times. ``on_step(step, active, images [A*K, ...], rewards [A])`` sees every
    evaluation of the ``A`` prompts still running. A prompt whose image, reward or gradient
    becomes NaN/inf (the reward raises, or returns it) is stopped and reported with ``error``;
    the others go on.
    """
    settings.validate()
    prompts = list(prompts)
    n_prompts, k = len(prompts), settings.images_per_prompt
    if n_prompts == 0:
        raise DiffalignError("no prompts to optimise")
    if base_noise.ndim != 4 or base_noise.shape[0] != n_prompts * k:
        raise DiffalignError(
            f"expected {n_prompts * k} base noises [B, C, h, w] for {n_prompts} prompts x {k}, "
            f"got {tuple(base_noise.shape)}"
        )
    device = generator.device
    z = base_noise.to(device=device, dtype=torch.float32)
    channels = z.shape[1]
    transform = PatchOrthogonal(
        channels,
        settings.patch_size,
        settings.parametrization,
        init="identity",
        num_transforms=n_prompts,
        seed=init_seed,
        init_std=settings.init_std,
    ).to(device)
    sigma = float(generator.init_noise_sigma())
    with torch.no_grad():
        q_start = all_matrices(transform).detach().cpu() if settings.init_std > 0 else None
    optimizer = make_optimizer(transform.parameters(), settings)
    clip = settings.clip()
    with torch.no_grad():
        embeds = repeat_embeds(generator.encode_prompts(prompts), k)
    flat_prompts = [p for p in prompts for _ in range(k)]

    alive = [True] * n_prompts
    errors: list[str | None] = [None] * n_prompts
    failed_step: list[int | None] = [None] * n_prompts
    history: list[list[float]] = [[] for _ in prompts]
    drift_hist: list[list[float]] = [[] for _ in prompts]
    term_hist: list[dict[str, list[float]]] = [{} for _ in prompts]
    best_reward = [-math.inf] * n_prompts
    best_step = [0] * n_prompts
    best_images: list[torch.Tensor | None] = [None] * n_prompts
    best_noise: list[torch.Tensor | None] = [None] * n_prompts
    best_q: list[torch.Tensor | None] = [None] * n_prompts
    best_w: list[torch.Tensor | None] = [None] * n_prompts
    init_images: list[torch.Tensor | None] = [None] * n_prompts

    def evaluate(active: list[int], grad: bool):
        """Images, per-prompt rewards [A], drift [A], terms and Q z for the active prompts."""
        rows = [i * k + j for i in active for j in range(k)]
        with torch.set_grad_enabled(grad):
            q = all_matrices(transform)[active]  # [A, D, D]
            zq = apply_patch_orthogonal(z[rows], q.repeat_interleave(k, dim=0), settings.patch_size)
            images = generator.generate(zq, select_embeds(embeds, rows))
            values = reward(images, [flat_prompts[r] for r in rows])
            if values.ndim != 1 or values.shape[0] != len(rows):
                raise DiffalignError(
                    f"the reward returned shape {tuple(values.shape)}, expected [{len(rows)}]"
                )
            per_prompt = values.float().view(len(active), k).mean(1)
            drift = drift_per_sample(zq, z[rows], sigma).view(len(active), k).mean(1)
        terms = {
            name: t.detach().float().view(len(active), k).mean(1).cpu()
            for name, t in reward_terms(reward).items()
            if t.numel() == len(rows)
        }
        return images, per_prompt, drift, terms, zq, q

    def fail(i: int, step: int, message: str) -> None:
        alive[i] = False
        errors[i] = message
        failed_step[i] = step

    step = 0
    while step <= settings.steps:
        last = step == settings.steps
        active = [i for i in range(n_prompts) if alive[i]]
        if not active:
            break
        try:
            images, per_prompt, drift, terms, zq, q = evaluate(active, grad=not last)
        except DiffalignError as e:
            if len(active) == 1:
                fail(active[0], step, str(e))
                continue
            # find which prompts fail on their own (a NaN image or reward), drop them, retry
            culprits = []
            for i in active:
                try:
                    with torch.no_grad():
                        evaluate([i], grad=False)
                except DiffalignError as e_i:
                    culprits.append((i, str(e_i)))
            if not culprits:
                raise
            for i, msg in culprits:
                fail(i, step, msg)
            continue
        r_cpu = per_prompt.detach().cpu()
        d_cpu = drift.detach().cpu()
        images_d = images.detach()  # stays on the device; copied only when kept or saved
        for a, i in enumerate(active):
            value = float(r_cpu[a])
            if not math.isfinite(value):
                fail(i, step, f"non-finite reward ({value}) at step {step}")
                continue
            history[i].append(value)
            drift_hist[i].append(float(d_cpu[a]))
            for name, t in terms.items():
                term_hist[i].setdefault(name, []).append(float(t[a]))
            mine = images_d[a * k : (a + 1) * k]
            if step == 0:
                init_images[i] = mine.float().cpu().clone()
            if value > best_reward[i]:
                best_reward[i], best_step[i] = value, step
                best_images[i] = mine.float().cpu().clone()
                best_noise[i] = zq[a * k : (a + 1) * k].detach().float().cpu().clone()
                best_q[i] = q[a].detach().cpu().clone()
                best_w[i] = transform.weight[i].detach().cpu().clone()
        if on_step is not None:
            on_step(step, active, images_d, r_cpu)
        if last:
            break
        keep = torch.tensor([alive[i] for i in active], device=per_prompt.device)
        if not bool(keep.any()):
            break
        objective = (-per_prompt + settings.noise_l2_weight * drift)[keep].sum()
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        grad = transform.weight.grad
        with torch.no_grad():
            bad = ~torch.isfinite(grad.flatten(1)).all(1)
            for i in torch.nonzero(bad).flatten().tolist():
                if alive[i]:
                    fail(i, step, f"non-finite gradient at step {step}")
            dead = ~torch.tensor(alive, device=grad.device)
            grad[dead] = 0.0
            if clip is not None:
                clip_grad_norm_per_transform(grad, clip)
        optimizer.step()
        # drop this step's tensors before the next forward (keeps the peak at one step's)
        del images, images_d, per_prompt, drift, zq, q, objective, grad
        step += 1

    with torch.no_grad():
        q_final = all_matrices(transform).detach().cpu()
    results = []
    for i, prompt in enumerate(prompts):
        base = z[i * k : (i + 1) * k].detach().cpu()
        if best_images[i] is None:  # failed at step 0: nothing to show
            shape_q = q_final[i]
            results.append(
                PromptResult(
                    prompt,
                    history[i],
                    term_hist[i],
                    drift_hist[i],
                    0,
                    math.nan,
                    base,
                    torch.empty(0),
                    torch.empty(0),
                    base.clone(),
                    torch.eye(shape_q.shape[-1]),
                    q_final[i],
                    torch.zeros_like(shape_q),
                    errors[i],
                    failed_step[i],
                    None if q_start is None else q_start[i],
                )
            )
            continue
        results.append(
            PromptResult(
                prompt,
                history[i],
                term_hist[i],
                drift_hist[i],
                best_step[i],
                best_reward[i],
                base,
                init_images[i],
                best_images[i],
                best_noise[i],
                best_q[i],
                q_final[i],
                best_w[i],
                errors[i],
                failed_step[i],
                None if q_start is None else q_start[i],
            )
        )
    return results


# ------------------------------------------------------------------ files (the seed's layout)


def _clear_earlier_run(out: Path, num_prompt_dirs: int) -> None:
    """With --overwrite: drop what an earlier run wrote that this one will not rewrite (its
    step_NNN.png beyond this run's steps, its prompt_{i}/ folders beyond this run's prompts),
    so the folder holds one run only. Only our own file names are touched."""
    import re
    import shutil

    for d in [out, *sorted(out.glob("prompt_*"))]:
        m = re.fullmatch(r"prompt_(\d+)", d.name) if d != out else None
        if m and int(m.group(1)) >= num_prompt_dirs and (d / "summary.json").is_file():
            shutil.rmtree(d)
            continue
        if d.is_dir():
            for f in d.glob("step_*.png"):
                if re.fullmatch(r"step_\d{3,}\.png", f.name):
                    f.unlink()


def prompt_dir_name(index: int) -> str:
    """The seed's per-prompt folder for multi-prompt runs: ``prompt_{i}``."""
    return f"prompt_{index}"


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """Prompts from a ``.txt`` (one a line) or any prompt file the engine reads (jsonl, ...)."""
    from diffalign.engine.prompts import load_prompts

    p = Path(path)
    if not p.is_file():
        raise DiffalignError(f"--prompts {p}: file not found")
    try:
        records = load_prompts(str(p))
    except UnicodeDecodeError:
        raise DiffalignError(f"--prompts {p}: not UTF-8 text") from None
    prompts = [r.prompt for r in records]
    if not prompts:
        raise DiffalignError(f"--prompts {p}: no prompts in the file")
    return prompts


def _save_images(path: Path, images: torch.Tensor) -> None:
    from diffalign.engine.reports import save_image_grid

    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    upscale = max(1, 128 // max(1, images.shape[-1]))
    save_image_grid(path, images, value_range=(0.0, 1.0), upscale=upscale)


def plot_reward_history(path: Path, result: PromptResult, title: str) -> None:
    """One panel per series (reward, each reward term, drift), as the seed's reward_history.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffalign.engine.io import atomic_path

    series = {"reward": result.reward_history, **result.term_history}
    series["drift mean((sigma Qz - sigma z)^2)"] = result.drift_history
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.6), dpi=90)
    axes = [axes] if len(series) == 1 else list(axes)
    for ax, (name, ys) in zip(axes, series.items()):
        ax.plot(range(len(ys)), ys, marker="." if len(ys) < 60 else None)
        if name == "reward" and ys:
            ax.axvline(
                result.best_step, color="k", ls=":", lw=1, label=f"best (step {result.best_step})"
            )
            ax.legend(fontsize=8)
        ax.set_xlabel("step (0 = base noise)")
        ax.set_ylabel(name)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title[:100], fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _prompt_summary(index: int, result: PromptResult) -> dict[str, Any]:
    h = result.reward_history
    out: dict[str, Any] = {
        "index": index,
        "prompt": result.prompt,
        "status": "ok" if result.ok else "failed",
        "error": result.error,
        "num_steps": max(0, len(h) - 1),
        "init_reward": h[0] if h else None,
        "final_reward": h[-1] if h else None,
        "best_reward": result.best_reward if h else None,
        "best_step": result.best_step,
        "reward_gain": (result.best_reward - h[0]) if h else None,
        "terms": {
            name: {"init": ys[0], "best": ys[result.best_step], "final": ys[-1]}
            for name, ys in result.term_history.items()
            if ys and result.best_step < len(ys)
        },
        "orthogonality_error_best": orthogonality_error(result.q_best),
        "orthogonality_error_final": orthogonality_error(result.q_final),
    }
    return out


def write_prompt_outputs(
    out: Path,
    index: int,
    result: PromptResult,
    patch_size: int,
    save_q_every: int = 0,
    sigma: float = 1.0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Per prompt (seed layout): init.png, best.png, final_best.png, best_noise.safetensors,
    adapter_final.safetensors, reward_history.{png,json}, orthogonal_gaussian_{init,final}.
    {png,json}, summary.json. Step images are written while optimising (step_NNN.png)."""
    from diffalign.engine.io import save_tensors, write_json
    from diffalign.noise.diagnostics import write_gaussianity_diagnostics

    out.mkdir(parents=True, exist_ok=True)
    summary = {**_prompt_summary(index, result), **(extra or {})}
    write_json(
        out / "reward_history.json",
        {
            "prompt": result.prompt,
            "steps": list(range(len(result.reward_history))),
            "reward": result.reward_history,
            "terms": result.term_history,
            "drift": result.drift_history,
            "best_step": result.best_step,
            "best_reward": summary["best_reward"],
        },
    )
    if result.reward_history:
        plot_reward_history(out / "reward_history.png", result, f"{index}: {result.prompt}")
    if result.init_images.numel():
        _save_images(out / "init.png", result.init_images)
        _save_images(out / "best.png", result.best_images)
        _save_images(out / "final_best.png", result.best_images)
        save_tensors(
            out / "best_noise.safetensors",
            {"noise": result.best_noise, "base_noise": result.base_noise},
            metadata={
                "prompt": result.prompt,
                "best_step": str(result.best_step),
                # z, not the seed's sigma * z (diffalign.noise.assign.read_noise_file)
                "sigma_scaled": "false",
                "init_noise_sigma": str(sigma),
            },
        )
        save_tensors(
            out / "adapter_final.safetensors",
            {"q_best": result.q_best, "q_final": result.q_final, "weight_best": result.weight_best},
            metadata={"patch_size": str(patch_size), "prompt": result.prompt},
        )
        if result.q_init is None:
            q0, z0, what = torch.eye(result.q_best.shape[-1]), result.base_noise, "Q = I"
        else:
            q0, what = result.q_init, "the seed's init_std start"
            z0 = apply_patch_orthogonal(result.base_noise, q0, patch_size)
        init = write_gaussianity_diagnostics(
            out,
            "orthogonal_gaussian_init",
            result.base_noise,
            z0,
            q=q0,
            patch_size=patch_size,
            title=f"Before optimisation: base noise vs Q z ({what})",
        )
        final = write_gaussianity_diagnostics(
            out,
            "orthogonal_gaussian_final",
            result.base_noise,
            result.best_noise,
            q=result.q_best,
            patch_size=patch_size,
            title="After optimisation: base noise vs Q_best z",
        )
        summary["diagnostics"] = {
            "init_qz_ks_statistic": init["z2"]["ks_statistic"],
            "final_qz_ks_statistic": final["z2"]["ks_statistic"],
            "final_qz_ks_pvalue": final["z2"]["ks_pvalue"],
            "final_patch_norm_max_abs_diff": final["patch_norm_max_abs_diff"],
        }
    write_json(out / "summary.json", summary)
    return summary


@dataclass
class RunReport:
    """What :func:`run_optimize` returns: the summary written and the per-prompt results."""

    summary: dict[str, Any]
    results: list[PromptResult] = field(default_factory=list)


def run_optimize(
    generator: OneStepGenerator,
    reward: torch.nn.Module,
    prompts: Sequence[str],
    output_dir: str | os.PathLike,
    settings: OptimizeSettings,
    *,
    batch_size: int = 1,
    height: int | None = None,
    width: int | None = None,
    seed: int = 42,
    save_every: int = 1,
    overwrite: bool = False,
    run_info: dict[str, Any] | None = None,
    show_progress: bool = True,
    final_steps: int | None = None,
) -> RunReport:
    """Optimise every prompt (``batch_size`` prompts per batch, one Q each) and write the seed's
    layout: one prompt -> files in ``output_dir``; several -> ``output_dir/prompt_{i}/`` plus
    ``summary.json``, ``metrics_per_prompt.json``, ``metrics_summary.json`` and
    ``failures.jsonl`` at the top. Every prompt starts from the same seeded base noise (as the
    seed does). ``final_steps``: also re-render each best noise with that many steps
    (``best_{K}step.png`` beside ``best.png``). Holds the output-folder lock for the whole run."""
    from diffalign.engine.io import append_jsonl, output_lock, write_json
    from diffalign.engine.progress import progress

    settings.validate()
    check_final_steps(generator, final_steps)
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise DiffalignError("no prompts given (use --prompt or --prompts FILE)")
    if any(not p.strip() for p in prompts):
        raise DiffalignError("a prompt is empty")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DiffalignError(f"--batch-size must be a positive integer, got {batch_size}")
    if save_every < 0:
        raise DiffalignError("--save-every must be >= 0")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise DiffalignError(f"--output-dir {out} exists and is not a folder")
    with output_lock(out, what="output folder"):
        if (out / "summary.json").exists() and not overwrite:
            raise DiffalignError(
                f"--output-dir {out} already holds a run (summary.json); pass --overwrite or "
                "choose another folder"
            )
        check_patch_size(generator, settings.patch_size, height, width)
        k = settings.images_per_prompt
        g = torch.Generator().manual_seed(int(seed))
        noise_one = generator.sample_noise(k, height, width, generator=g)
        latent = tuple(noise_one.shape[1:])
        # the earlier run's files go only once the run is set up: a refusal loses nothing
        (out / "failures.jsonl").unlink(missing_ok=True)
        single = len(prompts) == 1
        if overwrite:
            _clear_earlier_run(out, 0 if single else len(prompts))
        results: list[PromptResult] = []
        summaries: list[dict[str, Any]] = []
        timings: list[float] = []
        bar = progress(
            total=len(prompts) * (settings.steps + 1),
            desc="optimise",
            disable=None if show_progress else True,
        )
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            dirs = [out if single else out / prompt_dir_name(start + j) for j in range(len(chunk))]
            for d in dirs:
                d.mkdir(parents=True, exist_ok=True)

            def on_step(step, active, images, rewards, dirs=dirs):
                bar.update(len(active))
                if save_every and (step % save_every == 0 or step == settings.steps):
                    for a, j in enumerate(active):
                        _save_images(dirs[j] / f"step_{step:03d}.png", images[a * k : (a + 1) * k])

            t0 = time.perf_counter()
            chunk_results = optimize_prompts(
                generator,
                reward,
                chunk,
                noise_one.repeat(len(chunk), 1, 1, 1),
                settings,
                on_step=on_step,
                init_seed=seed,
            )
            timings.append((time.perf_counter() - t0) / max(1, settings.steps + 1))
            for j, (d, res) in enumerate(zip(dirs, chunk_results)):
                extra = {}
                if final_steps is not None and res.ok:
                    extra = render_final(generator, reward, res, final_steps, d)
                s = write_prompt_outputs(
                    d,
                    start + j,
                    res,
                    settings.patch_size,
                    sigma=generator.init_noise_sigma(),
                    extra=extra,
                )
                s["folder"] = "." if single else d.name
                summaries.append(s)
                results.append(res)
                if not res.ok:
                    append_jsonl(
                        out / "failures.jsonl",
                        {"index": start + j, "prompt": res.prompt, "error": res.error},
                    )
        bar.close()
        ok = [s for s in summaries if s["status"] == "ok"]
        top = {
            **(run_info or {}),
            "settings": asdict(settings),
            "seed": seed,
            "batch_size": batch_size,
            "num_prompts": len(prompts),
            "num_ok": len(ok),
            "num_failed": len(summaries) - len(ok),
            "seconds_per_step_per_batch": timings,
            "latent_shape": list(latent),
            # the drift term is on sigma * z, the seed's noise scale (module doc)
            "init_noise_sigma": float(generator.init_noise_sigma()),
        }
        if ok:
            top["mean_init_reward"] = sum(s["init_reward"] for s in ok) / len(ok)
            top["mean_best_reward"] = sum(s["best_reward"] for s in ok) / len(ok)
            top["mean_final_reward"] = sum(s["final_reward"] for s in ok) / len(ok)
            top["mean_reward_per_step"] = _mean_per_step([r for r in results if r.ok])
        if single:
            summary = {**summaries[0], **top}
            write_json(out / "summary.json", summary)
        else:
            write_json(out / "metrics_per_prompt.json", summaries)
            write_json(
                out / "metrics_summary.json",
                {
                    k2: top[k2]
                    for k2 in (
                        "num_ok",
                        "mean_init_reward",
                        "mean_best_reward",
                        "mean_final_reward",
                        "mean_reward_per_step",
                    )
                    if k2 in top
                },
            )
            summary = {**top, "prompts": summaries}
            write_json(out / "summary.json", summary)
        if not ok:
            first = summaries[0].get("error") if summaries else "no prompts"
            raise DiffalignError(
                f"every prompt failed (first: {first}); see {out / 'failures.jsonl'}"
            )
    return RunReport(summary, results)


def check_patch_size(
    generator: OneStepGenerator, patch_size: int, height: int | None, width: int | None
) -> None:
    """The latent of ``height x width`` images must split into ``patch_size`` patches."""
    latent = tuple(generator.latent_shape(height, width))
    if latent[-1] % patch_size or latent[-2] % patch_size:
        raise DiffalignError(
            f"the latent ({latent[-2]}x{latent[-1]}) is not divisible by --patch-size {patch_size}"
        )


def check_final_steps(generator: OneStepGenerator, final_steps: int | None) -> None:
    """``--final-steps K`` needs a generator with multi-step sampling and K in its range."""
    if final_steps is None:
        return
    most = generator.max_steps()
    if most <= 1:
        raise DiffalignError(
            f"--final-steps {final_steps}: {generator.name} has no multi-step sampling"
        )
    if isinstance(final_steps, bool) or not 1 <= int(final_steps) <= most:
        raise DiffalignError(
            f"--final-steps {final_steps} is outside {generator.name}'s range 1..{most}"
        )


def final_step_file(final_steps: int) -> str:
    """The re-rendered best image beside ``best.png`` (``best_4step.png``)."""
    return f"best_{final_steps}step.png"


def render_final(
    generator: OneStepGenerator,
    reward: torch.nn.Module,
    result: PromptResult,
    final_steps: int,
    out: Path,
) -> dict[str, Any]:
    """Re-render the best noise with ``final_steps`` steps of the same model (ReNO re-renders
    FLUX-schnell with 4), save it beside ``best.png`` and score it with the same reward."""
    k = result.best_noise.shape[0]
    with torch.no_grad():
        embeds = repeat_embeds(generator.encode_prompts([result.prompt]), k)
        images = generator.render(result.best_noise, embeds, final_steps).float()
        value = reward(images, [result.prompt] * k).float().mean()
    _save_images(out / final_step_file(final_steps), images.cpu())
    return {
        "final_steps": final_steps,
        "final_steps_image": final_step_file(final_steps),
        "final_steps_reward": float(value),
    }


def _mean_per_step(results: Sequence[PromptResult]) -> list[float]:
    n = max(len(r.reward_history) for r in results)
    out = []
    for s in range(n):
        vals = [r.reward_history[s] for r in results if s < len(r.reward_history)]
        out.append(sum(vals) / len(vals))
    return out
