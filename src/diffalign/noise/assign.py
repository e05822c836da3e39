"""Assigned-noise inversion on any one-step generator (spec N; seed 001 "Step 1: assign the best
noise for a single sample").

For a target image ``x`` and its prompt we draw a base noise ``eps ~ N(0, I)`` (seeded per item,
so the draw does not depend on batching, sharding or resuming) and optimise a patch-wise
orthogonal ``Q`` so that the generator's output for ``Q eps`` matches ``x``:

    loss = latent_loss_weight * mean (denoise(Q eps) - encode(x))^2
         + pixel_l1_weight    * mean |decode(denoise(Q eps)) - x|

(:func:`assign_loss`). For a diffusion generator ``denoise`` is the one-step ``x0`` latent and
``encode`` the VAE posterior mode; for the toy generator both are its own [-1, 1] output. The
items of a batch are optimised together with one ``PatchOrthogonal(num_transforms=B)``; their
losses are summed, so each ``Q_i`` only sees its own item's gradient. Works on the
:class:`~diffalign.noise.onestep.OneStepGenerator` interface only: the toy branch
(`diffalign noise toy assign`), `diffalign noise assign`, `build-dataset` and the EM loop all
call :func:`assign_noise`.

:func:`assign_image` is the single-target job (`diffalign noise assign`); the dataset builder is
:mod:`diffalign.noise.dataset`. The record helpers below are shared by every resumable
manifest writer of the capability.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import load_tensors, read_jsonl, save_tensors, write_json

# ----------------------------------------------------------------------------- the math


def assign_loss(
    latent: torch.Tensor,
    target_latent: torch.Tensor,
    image: torch.Tensor | None = None,
    target_image: torch.Tensor | None = None,
    latent_loss_weight: float = 1.0,
    pixel_l1_weight: float = 0.0,
) -> torch.Tensor:
    """``[B]``: ``w_lat * mean (latent - target_latent)^2 + w_pix * mean |image - target|``
    per item (seed 001: ``--latent_loss_weight``, ``--pixel_l1_weight``)."""
    diff = (latent.float() - target_latent.float()).flatten(1)
    loss = latent_loss_weight * diff.pow(2).mean(1)
    if pixel_l1_weight:
        if image is None or target_image is None:
            raise DiffalignError("assign_loss: a pixel L1 weight needs images and targets")
        pix = (image.float() - target_image.float()).flatten(1).abs().mean(1)
        loss = loss + pixel_l1_weight * pix
    return loss


def base_noise(item_ids: Iterable[int], latent_shape, seed: int = 0) -> torch.Tensor:
    """The fixed base noise ``eps_i`` of each item: ``N(0, I)`` from a per-item seeded generator."""
    out = []
    for i in item_ids:
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(i)) % 2**63)
        out.append(torch.randn(tuple(latent_shape), generator=g))
    return torch.stack(out) if out else torch.empty((0, *latent_shape))


@dataclass
class AssignResult:
    """Per-item result of `assign_noise` (all tensors on CPU)."""

    noise: torch.Tensor  # [N, C, h, w]  best Q eps
    q: torch.Tensor  # [N, D, D]     best Q
    loss_before: torch.Tensor  # [N]  objective at Q = I
    loss_after: torch.Tensor  # [N]  best objective
    mse_before: torch.Tensor  # [N]  latent MSE at Q = I
    mse_after: torch.Tensor  # [N]  latent MSE at the best Q
    curve: list[float] = field(default_factory=list)  # mean objective per step
    curves: torch.Tensor | None = None  # [steps + 1, N] objective per step and item
    best_step: torch.Tensor | None = None  # [N] step of the best Q
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> images [N,3,H,W]
    best_images: torch.Tensor | None = None  # [N, 3, H, W] decoded output at the best Q


def assign_noise(
    generator,
    eps: torch.Tensor,
    embeds: dict[str, torch.Tensor],
    target_latent: torch.Tensor,
    target_image: torch.Tensor | None = None,
    steps: int = 100,
    lr: float = 0.05,
    patch_size: int = 2,
    parametrization: str = "matrix_exp",
    latent_loss_weight: float = 1.0,
    pixel_l1_weight: float = 0.0,
    snapshot_steps: Sequence[int] = (),
    keep_images: bool = False,
    on_step=None,
) -> AssignResult:
    """Optimise one orthogonal ``Q_i`` per item so the generator's output for ``Q_i eps_i``
    matches target ``i`` (module doc). Adam on the skew parameters of `PatchOrthogonal`; the best
    ``Q`` seen per item is kept (step 0 is ``Q = I``, so ``loss_after <= loss_before``). The
    generator's weights are not changed and get no gradients. ``snapshot_steps``: steps whose
    decoded outputs are returned (intermediate images); ``keep_images``: also the best outputs;
    ``on_step(step, losses)``: called after each evaluation (e.g. a progress bar).
    """
    from diffalign.noise.orthogonal import PatchOrthogonal, apply_patch_orthogonal

    n, c = eps.shape[0], eps.shape[1]
    if n == 0:
        raise DiffalignError("assign_noise: empty batch")
    if len(target_latent) != n:
        raise DiffalignError(f"assign_noise: {n} noises but {len(target_latent)} targets")
    if pixel_l1_weight and target_image is None:
        raise DiffalignError("assign_noise: --pixel-l1-weight needs the target images")
    device = generator.device
    eps = eps.to(device)
    target_latent = target_latent.to(device)
    if target_image is not None:
        target_image = target_image.to(device)
    q = PatchOrthogonal(c, patch_size, parametrization, init="identity", num_transforms=n)
    q.to(device)
    opt = torch.optim.Adam(q.parameters(), lr=lr)
    was_training = generator.training
    flags = [p.requires_grad for p in generator.parameters()]
    generator.eval()
    for p in generator.parameters():
        p.requires_grad_(False)

    def matrices() -> torch.Tensor:
        m = q.matrix()
        return m if m.ndim == 3 else m[None]

    def objective(z: torch.Tensor, need_images: bool):
        latent = generator.denoise(z, embeds)
        images = generator.decode(latent) if (pixel_l1_weight or need_images) else None
        loss = assign_loss(
            latent, target_latent, images, target_image, latent_loss_weight, pixel_l1_weight
        )
        return loss, latent, images

    snaps = {int(s) for s in snapshot_steps}
    best_loss = torch.full((n,), float("inf"))
    best_q = torch.eye(q.dim).expand(n, q.dim, q.dim).clone()
    best_step = torch.zeros(n, dtype=torch.long)
    loss_before = mse_before = None
    per_step: list[torch.Tensor] = []
    snapshots: dict[int, torch.Tensor] = {}
    try:
        for step in range(steps + 1):
            qm = matrices()
            loss, latent, images = objective(
                apply_patch_orthogonal(eps, qm, patch_size), step in snaps
            )
            with torch.no_grad():
                lval = loss.detach().float().cpu()
                if step == 0:
                    loss_before = lval.clone()
                    mse_before = assign_loss(latent.detach(), target_latent).cpu()
                better = lval < best_loss
                best_loss = torch.where(better, lval, best_loss)
                best_q[better] = qm.detach().cpu()[better]
                best_step[better] = step
                per_step.append(lval)
                if step in snaps:
                    snapshots[step] = images.detach().float().cpu()
            if on_step is not None:
                on_step(step, lval)
            if step == steps:
                break
            opt.zero_grad(set_to_none=True)
            # a non-finite item gives no gradient to the others (each Q_i is its own)
            torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss)).sum().backward()
            opt.step()
        with torch.no_grad():
            noise = apply_patch_orthogonal(eps, best_q.to(device), patch_size)
            latent = generator.denoise(noise, embeds)
            mse_after = assign_loss(latent, target_latent).cpu()
            best_images = generator.decode(latent).float().cpu() if keep_images else None
    finally:
        for p, f in zip(generator.parameters(), flags):
            p.requires_grad_(f)
        generator.train(was_training)
    curves = torch.stack(per_step)
    return AssignResult(
        noise=noise.detach().cpu(),
        q=best_q,
        loss_before=loss_before,
        # items whose loss was never finite keep Q = I and report their (non-finite) start
        loss_after=torch.where(torch.isfinite(best_loss), best_loss, loss_before),
        mse_before=mse_before,
        mse_after=mse_after,
        curve=[float(v) for v in curves.mean(1)],
        curves=curves,
        best_step=best_step,
        snapshots=snapshots,
        best_images=best_images,
    )


def snapshot_schedule(steps: int, count: int) -> list[int]:
    """``count`` evenly spaced steps from 0 to ``steps`` (both ends included)."""
    if count <= 0:
        return []
    if count == 1 or steps == 0:
        return [0] if count == 1 else sorted({0, steps})
    return sorted({round(i * steps / (count - 1)) for i in range(count)})


# ----------------------------------------------------------------------------- records


def dist_state():
    """(rank, world_size, state) — accelerate's PartialState only when launched distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from diffalign.engine.distributed import process_state

        state = process_state()
        return state.process_index, state.num_processes, state
    from diffalign.engine.distributed import notice_single_process

    notice_single_process(1)
    return 0, 1, None


def item_id(value) -> int | None:
    """A record's item id as an int (ids are item numbers: `7` or `"7"`), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def read_records(output_dir: Path, stem: str) -> dict[int, dict]:
    """Latest record per id from `<stem>.jsonl` and any leftover `<stem>.rank-*.jsonl` parts."""
    recs: dict[int, dict] = {}
    files = [output_dir / f"{stem}.jsonl", *sorted(output_dir.glob(f"{stem}.rank-*.jsonl"))]
    for f in files:
        if f.is_file():
            for r in read_jsonl(f, skip_bad=True):  # a line cut by a crash is just redone
                item = item_id(r.get("id")) if isinstance(r, dict) else None
                if item is not None:  # an id that is not an item number is no item of ours
                    recs[item] = r
    return recs


def rewrite_jsonl(path: Path, records: list[dict]) -> None:
    from diffalign.engine.io import dumps_json, write_text

    write_text(path, "".join(dumps_json(r) + "\n" for r in records))


def small_report(report: dict) -> dict:
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


# ----------------------------------------------------------------------------- images


def load_target_image(
    path: str | os.PathLike, size: tuple[int, int], resize: bool = False
) -> torch.Tensor:
    """An RGB image file as ``[3, H, W]`` in ``[0, 1]``. It must be ``size`` (H, W) unless
    ``resize`` (then: resize the short side and centre-crop, bicubic)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DiffalignError(f"target image {path} not found")
    try:
        with Image.open(path) as im:
            im.load()
            img = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DiffalignError(f"target image {path} cannot be read ({type(e).__name__})") from None
    h, w = size
    if (img.height, img.width) != (h, w):
        if not resize:
            raise DiffalignError(
                f"target image {path} is {img.width}x{img.height}, the generator makes "
                f"{w}x{h} (pass --resize to resize and centre-crop, or --height/--width)"
            )
        scale = max(h / img.height, w / img.width)
        nh, nw = max(h, round(img.height * scale)), max(w, round(img.width * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        top, left = (nh - h) // 2, (nw - w) // 2
        img = img.crop((left, top, left + w, top + h))
    import numpy as np

    arr = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0


def save_png(path: str | os.PathLike, image: torch.Tensor) -> None:
    """One ``[3, H, W]`` image in ``[0, 1]`` as an 8-bit PNG (atomically)."""
    from diffalign.engine.reports import save_image, tensor_to_pil

    save_image(path, tensor_to_pil(image.detach().float().cpu().clamp(0, 1), (0.0, 1.0)))


# ----------------------------------------------------------------------------- the noise file


NOISE_FILE = "best_input_noise.safetensors"


def save_noise_file(
    path: str | os.PathLike,
    noise: torch.Tensor,
    base: torch.Tensor,
    q: torch.Tensor,
    meta: dict,
) -> None:
    """``best_input_noise.safetensors``: ``noise`` (= Q eps, the generator's input), the base
    noise ``eps`` and ``Q``; the item's id, prompt hash and settings in the metadata, and
    ``sigma_scaled = false``: our noises are the standard-normal ``z``, not the seed's
    ``init_noise_sigma * z`` (:func:`read_noise_file` reads both)."""
    save_tensors(
        path,
        {"noise": noise.contiguous(), "base_noise": base.contiguous(), "q": q.contiguous()},
        metadata={**{k: str(v) for k, v in meta.items()}, SIGMA_SCALED_KEY: "false"},
    )


SIGMA_SCALED_KEY = "sigma_scaled"


def read_noise_file(path: str | os.PathLike, sigma: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The standard-normal noise ``z [C, h, w]`` (float32) of a noise file, and its metadata.

    Ours (``best_input_noise.safetensors``, ``sigma_scaled = false``, or older files without the
    key) hold ``z``; the seed's ``best_input_noise.pt`` (a bare tensor ``[1, C, h, w]``, read with
    ``weights_only=True``) and any file recording ``sigma_scaled = true`` hold the model's first
    latents ``sigma * z``, so they are divided by the generator's ``sigma``
    (:meth:`OneStepGenerator.init_noise_sigma`). The metadata says which it was."""
    import json

    tensors, meta = load_tensors(path)
    meta = dict(meta)
    if "noise" in tensors:
        noise = tensors["noise"]
        flag = meta.get(SIGMA_SCALED_KEY, "false")
        try:  # a .pt dict keeps its values JSON-encoded
            flag = json.loads(flag) if isinstance(flag, str) and flag.startswith('"') else flag
        except ValueError:
            pass
        scaled = str(flag).strip().lower() == "true"
    elif set(tensors) == {"tensor"}:  # the seed's torch.save(best_input_noise): sigma * z
        noise, scaled = tensors["tensor"], True
        meta["format"] = "seed"
    else:
        raise DiffalignError(
            f"{path}: no 'noise' tensor (not a best_input_noise file); found {sorted(tensors)}"
        )
    if noise.ndim == 4 and noise.shape[0] == 1:  # the seed saves its batch of one
        noise = noise[0]
    noise = noise.float()
    if scaled:
        if not (sigma > 0):
            raise DiffalignError(f"{path}: a sigma-scaled noise needs sigma > 0, got {sigma}")
        noise = noise / float(sigma)
    meta[SIGMA_SCALED_KEY] = "true" if scaled else "false"
    return noise, meta


def prompt_sha(prompt: str) -> str:
    return hashlib.sha256(str(prompt).encode("utf-8")).hexdigest()[:16]


def check_noise_file(
    path: Path, latent_shape, item: int | None = None, prompt: str | None = None
) -> str | None:
    """None if `path` holds a finite noise of `latent_shape` for item `item` (and `prompt`), as
    its metadata records; else the reason it is unusable."""
    if not path.is_file():
        return "noise file missing"
    try:
        noise, meta = read_noise_file(path)
    except DiffalignError as e:
        return f"noise file corrupt ({e})"
    if item is not None and meta.get("id") != str(item):
        return f"noise file belongs to item {meta.get('id', '(no id recorded)')}, not {item}"
    if prompt is not None and meta.get("prompt_sha") not in (None, prompt_sha(prompt)):
        return "noise file was made for another prompt"
    if tuple(noise.shape) != tuple(latent_shape):
        return f"noise file has no 'noise' of shape {tuple(latent_shape)}"
    if not torch.isfinite(noise).all():
        return "noise file holds NaN/inf"
    return None


# ----------------------------------------------------------------------------- one target


def _check_settings(steps, lr, patch_size, latent_loss_weight, pixel_l1_weight, latent_shape):
    import math

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DiffalignError(f"--steps must be >= 1 (0 steps assign nothing), got {steps}")
    if not math.isfinite(lr) or lr <= 0:
        raise DiffalignError(f"--lr must be > 0, got {lr}")
    for name, v in (
        ("--latent-loss-weight", latent_loss_weight),
        ("--pixel-l1-weight", pixel_l1_weight),
    ):
        if not math.isfinite(v) or v < 0:
            raise DiffalignError(f"{name} must be >= 0, got {v}")
    if latent_loss_weight == 0 and pixel_l1_weight == 0:
        raise DiffalignError("--latent-loss-weight and --pixel-l1-weight are both 0: no loss")
    if isinstance(patch_size, bool) or int(patch_size) < 1:
        raise DiffalignError(f"--patch-size must be a positive integer, got {patch_size}")
    if latent_shape[1] % patch_size or latent_shape[2] % patch_size:
        raise DiffalignError(
            f"--patch-size {patch_size} does not divide the latent {tuple(latent_shape)}"
        )


def write_run_outputs(
    run_dir: Path,
    result: AssignResult,
    j: int,
    target: torch.Tensor,
    title: str,
    plots: bool = True,
) -> dict:
    """Item ``j``'s loss curve (JSON, and PNG when ``plots``), intermediate images and best
    image into ``run_dir``; returns the curve record."""
    curve = [float(v) for v in result.curves[:, j]] if result.curves is not None else []
    rec = {
        "loss": curve,
        "best_step": int(result.best_step[j]) if result.best_step is not None else None,
        "loss_before": float(result.loss_before[j]),
        "loss_after": float(result.loss_after[j]),
    }
    write_json(run_dir / "loss_curve.json", rec)
    if plots and curve:
        from diffalign.engine.reports import plot_curves

        plot_curves(
            run_dir / "loss_curve.png",
            {"assignment loss": curve},
            title=title,
            ylabel="latent + pixel loss",
        )
    for step, images in sorted(result.snapshots.items()):
        save_png(run_dir / f"step_{step:04d}.png", images[j])
    if result.best_images is not None:
        save_png(run_dir / "best.png", result.best_images[j])
    if plots and result.snapshots:
        from diffalign.engine.reports import save_image_grid

        steps = sorted(result.snapshots)
        tiles = torch.stack([target.cpu(), *[result.snapshots[s][j] for s in steps]])
        if result.best_images is not None:
            tiles = torch.cat([tiles, result.best_images[j : j + 1]])
        labels = ["target", *[f"step {s}" for s in steps]]
        if result.best_images is not None:
            labels.append(f"best ({rec['best_step']})")
        save_image_grid(
            run_dir / "intermediates.png",
            tiles,
            ncols=len(tiles),
            value_range=(0.0, 1.0),
            pad=2,
            upscale=max(1, 128 // max(1, tiles.shape[-1])),
            col_labels=labels,
            title=title,
        )
    return rec


def check_assign_image_before_loading(
    prompt: str, output_dir: str | os.PathLike, overwrite: bool = False
) -> None:
    """`assign_image`'s refusals that need no generator, made by `noise assign` before it loads
    one: an empty prompt, an --output-dir that is a file or (without ``overwrite``) holds an
    earlier assignment. It has no resume: a folder that holds one is refused whatever the
    settings."""
    if not str(prompt).strip():
        raise DiffalignError("--prompt is empty")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise DiffalignError(f"--output-dir {out} exists and is not a folder")
    if not overwrite:
        _refuse_held_assignment(out)


def _refuse_held_assignment(out: Path) -> None:
    if (out / "summary.json").is_file():
        raise DiffalignError(
            f"--output-dir {out} already holds an assignment (summary.json); pass "
            "--overwrite to replace it or choose another --output-dir"
        )


def assign_image(
    generator,
    target_image: str | os.PathLike,
    prompt: str,
    output_dir: str | os.PathLike,
    steps: int = 40,
    lr: float = 5e-4,
    patch_size: int = 2,
    parametrization: str = "matrix_exp",
    latent_loss_weight: float = 1.0,
    pixel_l1_weight: float = 0.1,
    seed: int = 0,
    resize: bool = False,
    num_intermediates: int = 5,
    overwrite: bool = False,
) -> dict:
    """`diffalign noise assign`: one target image + prompt -> ``OUT/best_input_noise.safetensors``
    (the seed's ``best_input_noise.pt`` as safetensors), ``target.png``, ``best.png``,
    ``step_NNNN.png`` intermediates and ``intermediates.png``, ``loss_curve.{png,json}``,
    ``orthogonal_gaussian_{init,final}.{png,json}``, ``summary.json``. A folder that holds an
    earlier assignment (its summary.json) is refused unless ``overwrite``; the earlier run's
    step images are removed once the new one has succeeded."""
    from diffalign.engine.io import output_lock
    from diffalign.noise.diagnostics import write_gaussianity_diagnostics

    t0 = time.time()
    out = Path(output_dir)
    latent_shape = tuple(generator.latent_shape())
    _check_settings(steps, lr, patch_size, latent_loss_weight, pixel_l1_weight, latent_shape)
    check_assign_image_before_loading(prompt, out, overwrite)
    target = load_target_image(target_image, generator.image_size(), resize)
    from diffalign.engine.progress import progress

    with output_lock(out, "assignment folder"):
        if not overwrite:  # again under the lock: another run may have finished meanwhile
            _refuse_held_assignment(out)
        bar = progress(total=steps + 1, desc="assign")

        def tick(step: int, losses: torch.Tensor) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(losses[0]):.4g}")

        embeds = generator.encode_prompts([prompt])
        eps = base_noise([0], latent_shape, seed)
        target_latent = generator.encode_images(target[None])
        res = assign_noise(
            generator,
            eps,
            embeds,
            target_latent,
            target[None] if pixel_l1_weight else None,
            steps=steps,
            lr=lr,
            patch_size=patch_size,
            parametrization=parametrization,
            latent_loss_weight=latent_loss_weight,
            pixel_l1_weight=pixel_l1_weight,
            snapshot_steps=snapshot_schedule(steps, num_intermediates),
            keep_images=True,
            on_step=tick,
        )
        bar.close()
        if not (torch.isfinite(res.loss_after).all() and torch.isfinite(res.noise).all()):
            raise DiffalignError(
                "the assignment loss is NaN/inf from the first step (try --dtype float32 or "
                "another --vae); nothing was saved"
            )
        meta = {
            "id": 0,
            "prompt_sha": prompt_sha(prompt),
            "generator": generator.name,
            "patch_size": patch_size,
            "seed": seed,
        }
        for stale in out.glob("step_[0-9]*.png"):  # an earlier run's, not this one's steps
            stale.unlink()
        save_noise_file(out / NOISE_FILE, res.noise[0], eps[0], res.q[0], meta)
        save_png(out / "target.png", target)
        curve = write_run_outputs(out, res, 0, target, f"assignment: {prompt[:60]}")
        from diffalign.noise.orthogonal import orthogonality_error

        init = write_gaussianity_diagnostics(
            out, "orthogonal_gaussian_init", eps, eps.clone(), patch_size=patch_size
        )
        final = write_gaussianity_diagnostics(
            out, "orthogonal_gaussian_final", eps, res.noise, q=res.q[0], patch_size=patch_size
        )
        summary = {
            "prompt": prompt,
            "target_image": str(target_image),
            "generator": generator.name,
            "latent_shape": list(latent_shape),
            "settings": {
                "steps": steps,
                "lr": lr,
                "patch_size": patch_size,
                "parametrization": parametrization,
                "latent_loss_weight": latent_loss_weight,
                "pixel_l1_weight": pixel_l1_weight,
                "seed": seed,
                "resize": resize,
            },
            "loss_before": curve["loss_before"],
            "loss_after": curve["loss_after"],
            "latent_mse_before": float(res.mse_before[0]),
            "latent_mse_after": float(res.mse_after[0]),
            "best_step": curve["best_step"],
            "orthogonality_error": orthogonality_error(res.q[0]),
            "gaussianity_init": small_report(init),
            "gaussianity_final": small_report(final),
            "noise_file": NOISE_FILE,
            "seconds": round(time.time() - t0, 3),
        }
        write_json(out / "summary.json", summary)
    return summary


def load_noise(path: str | os.PathLike, sigma: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The assigned noise ``z [C, h, w]`` of a noise file (ours or the seed's ``.pt``, whose
    ``sigma * z`` is divided by ``sigma``) and its metadata (:func:`read_noise_file`)."""
    return read_noise_file(path, sigma)


__all__ = [
    "AssignResult",
    "assign_image",
    "assign_loss",
    "assign_noise",
    "base_noise",
    "check_noise_file",
    "load_noise",
    "load_target_image",
    "read_noise_file",
]
