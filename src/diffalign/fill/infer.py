"""`diffalign fill infer`: in-context inpainting of the target panel with the trained LoRA and
semantic cross-attention (spec F: Infer; seed 004, inference flow).

The sampler is the FLUX Fill pipeline's denoising loop (its `retrieve_timesteps` with the
resolution shift `calculate_shift`, the flow-match Euler scheduler, `timestep / 1000`, the
guidance embedding, no CFG batch doubling) with the semantic module applied to the noisy latent
tokens at every step. Without a module (or with its scales at 0) the result equals a plain
`FluxFillPipeline` carrying the same LoRA for the same noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffalign.engine.errors import DiffalignError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ----------------------------------------------------------------------------------------------
# the sampler


def flow_timesteps(scheduler: Any, steps: int, image_seq_len: int, device: Any) -> torch.Tensor:
    """The pipeline's schedule: sigmas `linspace(1, 1/steps, steps)` shifted by
    `calculate_shift(image_seq_len)` through `retrieve_timesteps`."""
    from diffusers.pipelines.flux.pipeline_flux_fill import calculate_shift, retrieve_timesteps

    sigmas = np.linspace(1.0, 1 / steps, steps)
    cfg = scheduler.config
    mu = calculate_shift(
        image_seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)  # the pipeline's get_timesteps at strength 1
    return timesteps


def fresh_scheduler(pipe: Any) -> Any:
    """A scheduler of the pipeline's class and config with its own state."""
    return type(pipe.scheduler).from_config(pipe.scheduler.config)


@torch.no_grad()
def sample_latents(
    model: Any,
    scheduler: Any,
    *,
    noise: torch.Tensor,
    cond: torch.Tensor,
    img_ids: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    text_ids: torch.Tensor,
    steps: int,
    semantic_tokens: torch.Tensor | None = None,
    guidance: float | None = None,
    progress: Callable | None = None,
) -> torch.Tensor:
    """Packed latents [B, L, C] after `steps` flow-match Euler steps from `noise`, the semantic
    module enhancing the noisy tokens at every step (seed 004, inference step 4)."""
    latents = noise
    timesteps = flow_timesteps(scheduler, steps, noise.shape[1], noise.device)
    iterator = progress(timesteps) if progress is not None else timesteps
    for t in iterator:
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        pred = model(
            latents,
            cond,
            timestep / 1000,
            prompt_embeds,
            pooled_prompt_embeds,
            text_ids,
            img_ids,
            semantic_tokens=semantic_tokens,
            guidance=guidance,
        )
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return latents


def draw_noise(
    generator: torch.Generator,
    latent_channels: int,
    height: int,
    width: int,
    vae_scale_factor: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Packed Gaussian noise [1, L, 4C] of one `height x width` image, drawn from `generator` as
    the pipeline's `prepare_latents` does (unpacked latent layout, in the latents' dtype)."""
    from diffusers import FluxFillPipeline
    from diffusers.utils.torch_utils import randn_tensor

    h = 2 * (int(height) // (vae_scale_factor * 2))
    w = 2 * (int(width) // (vae_scale_factor * 2))
    x = randn_tensor((1, latent_channels, h, w), generator=generator, dtype=dtype)
    return FluxFillPipeline._pack_latents(x, 1, latent_channels, h, w)


@torch.no_grad()
def decode_latents(pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Packed latents -> images [B, 3, H, W] in [0, 1] (the pipeline's own post-processing)."""
    x = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    x = (x / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
    image = pipe.vae.decode(x.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pt")


@torch.no_grad()
def sample_panels(
    pipe: Any,
    model: Any,
    encoder: Any,
    *,
    visible: torch.Tensor,
    semantic: torch.Tensor | None,
    prompts: Sequence[str],
    steps: int,
    guidance: float,
    seeds: Sequence[int],
    semantic_layout: str = "target-half",
    encode_text: Callable | None = None,
    return_diptych: bool = False,
    progress: Callable | None = None,
    max_sequence_length: int = 512,
) -> torch.Tensor:
    """Target panels [B, 3, P, P] in [0, 1] for visible panels in [0, 1] (the diptych
    `[visible | target]` with the target half masked, as in training)."""
    device = visible.device
    dtype = pipe.transformer.dtype  # the pipeline runs its latents in the model's dtype
    if getattr(model, "semantic", None) is not None and semantic is None:
        raise DiffalignError("the semantic module needs a semantic image (--semantic)")
    height, width = int(visible.shape[-2]), 2 * int(visible.shape[-1])  # the diptych
    # One CPU generator per image, drawn in FluxFillPipeline's order, so `--seed s` gives the
    # image of `pipe(..., generator=torch.Generator().manual_seed(s))` (batching changes
    # nothing): `prepare_latents` samples the VAE latents of the init image (at strength 1
    # they are multiplied by 0: only the draw is left), then the noise; `prepare_mask_latents`
    # then samples the masked image's latents. The semantic panel's sample comes last.
    noise, parts, sem = [], [], []
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(int(s))
        encoder.skip_vae_sample(g, 1, height, width)
        noise.append(
            draw_noise(
                g, pipe.vae.config.latent_channels, height, width, pipe.vae_scale_factor, dtype
            )
        )
        parts.append(encoder.encode_condition(visible[i : i + 1], generator=g))
        if getattr(model, "semantic", None) is not None:
            sem.append(
                encoder.encode_semantic(semantic[i : i + 1], layout=semantic_layout, generator=g)
            )
    cond = torch.cat([p["cond"] for p in parts])
    if encode_text is not None:
        text = encode_text(list(prompts))
    else:
        text = encoder.encode_prompts(list(prompts), max_sequence_length)
    text = {k: v.to(device=device, dtype=dtype) for k, v in text.items()}
    sem = torch.cat(sem) if sem else None
    noise = torch.cat(noise).to(device=device, dtype=dtype)
    latents = sample_latents(
        model,
        fresh_scheduler(pipe),
        noise=noise,
        cond=cond.to(dtype),
        img_ids=parts[0]["img_ids"].to(dtype),
        prompt_embeds=text["prompt_embeds"],
        pooled_prompt_embeds=text["pooled_prompt_embeds"],
        text_ids=text["text_ids"],
        steps=steps,
        semantic_tokens=sem.to(dtype) if sem is not None else None,
        guidance=guidance,
        progress=progress,
    )
    images = decode_latents(pipe, latents, height, width)
    if return_diptych:
        return images
    return images[..., width // 2 :]


# ----------------------------------------------------------------------------------------------
# reports


def to_pil(image: torch.Tensor):
    """[3, H, W] in [0, 1] -> PIL."""
    from diffalign.engine.reports import tensor_to_pil

    return tensor_to_pil(image, value_range=(0.0, 1.0))


def save_validation_grid(
    path: Path,
    visible: Sequence[torch.Tensor],
    prediction: Sequence[torch.Tensor],
    target: Sequence[torch.Tensor],
    semantic: Sequence[torch.Tensor],
    names: Sequence[str],
    title: str = "",
) -> None:
    """grid.png: one row per example, columns visible | prediction | target | semantic."""
    from diffalign.engine.reports import save_labelled_grid

    rows = [
        [to_pil(v), to_pil(p), to_pil(t), to_pil(s)]
        for v, p, t, s in zip(visible, prediction, target, semantic)
    ]
    save_labelled_grid(
        path, rows, list(names), ["visible", "prediction", "target", "semantic"], title=title
    )


# ----------------------------------------------------------------------------------------------
# inputs


def load_image(path: str | Path, what: str) -> torch.Tensor:
    """An RGB image as [3, H, W] float in [0, 1]; unreadable -> one line."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DiffalignError(f"{what}: file not found: {p}")
    try:
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise DiffalignError(f"{what}: cannot read image {p} ({type(e).__name__})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def image_size(path: str | Path, what: str) -> tuple[int, int]:
    """(width, height) of an image decoded whole, so a file cut short fails here, before the
    model loads and anything is replaced; a missing or unreadable file is one line."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DiffalignError(f"{what}: file not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise DiffalignError(f"{what}: cannot read image {p} ({type(e).__name__})") from None


def check_panels(name: str, visible: tuple[int, int], semantic: tuple[int, int] | None) -> None:
    """Sizes (width, height): sides divisible by 16; the semantic image the visible one's size."""
    w, h = visible
    if h % 16 or w % 16:
        raise DiffalignError(
            f"{name}: the visible panel is {w}x{h}; both sides must be divisible by 16"
        )
    if semantic is not None and tuple(semantic) != (w, h):
        sw, sh = semantic
        raise DiffalignError(
            f"{name}: the semantic image is {sw}x{sh}, the visible panel {w}x{h}; they must be "
            "the same size"
        )


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def read_input_dir(folder: str | Path) -> list[dict]:
    """(name, visible, semantic, prompt) records of a folder: `inputs.jsonl` lines
    `{"visible": ..., "semantic": ..., "prompt": ..., "name": optional}` (paths relative to the
    folder), else files `<name>_visible.<ext>` + `<name>_semantic.<ext>` + `<name>.txt`."""
    from diffalign.engine.io import iter_jsonl, read_text, resolve_inside

    root = Path(folder)
    if not root.is_dir():
        raise DiffalignError(f"--input-dir: not a folder: {root}")
    manifest = root / "inputs.jsonl"
    records: list[dict] = []
    if manifest.is_file():
        for lineno, obj in iter_jsonl(manifest):
            if not isinstance(obj, dict) or "visible" not in obj or "prompt" not in obj:
                raise DiffalignError(f"{manifest}:{lineno}: needs 'visible' and 'prompt' fields")
            if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
                raise DiffalignError(f"{manifest}:{lineno}: missing caption (empty 'prompt')")
            for key in ("visible", "semantic", "name"):
                if "\x00" in str(obj.get(key) or ""):  # no OS path can hold it
                    raise DiffalignError(f"{manifest}:{lineno}: '{key}' holds a NUL byte")
            where = f"{manifest}:{lineno}"  # like every manifest: paths stay inside the folder
            vis = resolve_inside(root, str(obj["visible"]), f"{where}: 'visible'")
            name = str(obj.get("name") or Path(str(obj["visible"])).stem)
            sem = None
            if obj.get("semantic"):
                sem = resolve_inside(root, str(obj["semantic"]), f"{where}: 'semantic'")
            records.append({"name": name, "visible": vis, "semantic": sem, "prompt": obj["prompt"]})
    else:
        for vis in sorted(root.iterdir()):
            if vis.suffix.lower() not in IMAGE_SUFFIXES or not vis.stem.endswith("_visible"):
                continue
            name = vis.stem[: -len("_visible")]
            txt = root / f"{name}.txt"
            if not txt.is_file():
                raise DiffalignError(f"--input-dir: missing caption {txt} for {vis.name}")
            prompt = read_text(txt, "caption").strip()
            if not prompt:
                raise DiffalignError(f"--input-dir: empty caption {txt}")
            records.append(
                {
                    "name": name,
                    "visible": vis,
                    "semantic": _find_image(root, f"{name}_semantic"),
                    "prompt": prompt,
                }
            )
    if not records:
        raise DiffalignError(
            f"--input-dir {root}: no inputs (want inputs.jsonl or <name>_visible.png + "
            "<name>_semantic.png + <name>.txt)"
        )
    names = [r["name"] for r in records]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DiffalignError(f"--input-dir {root}: name '{dup[0]}' appears twice")
    for r in records:
        if "/" in r["name"] or r["name"] in ("", ".", ".."):
            raise DiffalignError(f"--input-dir {root}: bad output name '{r['name']}'")
    return records


# ----------------------------------------------------------------------------------------------
# the command


def resolve_semantic_layout(layout: str | None, semantic_module: str | None, log=print) -> str:
    """The semantic layout to sample with: the one the module was trained with (recorded in
    its checkpoint's metadata; for older checkpoints, `semantic_layout` in the `fill_config.json`
    beside `--semantic-module`), else `layout`, else `target-half`. An explicit `layout` that
    contradicts the recorded one is one DiffalignError line; one that agrees is used."""
    from diffalign.engine.io import read_json
    from diffalign.fill.encode import SEMANTIC_LAYOUTS
    from diffalign.fill.weights import recorded_semantic_layout

    if layout is not None and layout not in SEMANTIC_LAYOUTS:
        raise DiffalignError(
            f"--semantic-layout must be one of {', '.join(SEMANTIC_LAYOUTS)}, got {layout!r}"
        )
    trained, where = None, None
    if semantic_module:
        p = Path(semantic_module)
        try:
            trained, where = recorded_semantic_layout(p), "its checkpoint"
        except DiffalignError:
            trained = None  # no or a bad module file: build_model reports it
        record = (p if p.is_dir() else p.parent) / "fill_config.json"
        if trained is None and record.is_file():
            try:
                trained, where = read_json(record).get("semantic_layout"), str(record)
            except (DiffalignError, AttributeError, OSError, UnicodeDecodeError):
                trained = None
            if trained not in SEMANTIC_LAYOUTS:
                trained = None
    if layout is None:
        if trained is not None:
            log(f"[fill] semantic layout {trained} (recorded in {where})")
        return trained or "target-half"
    if trained is not None and layout != trained:
        raise DiffalignError(
            f"--semantic-layout {layout}, but the semantic module was trained with {trained} "
            f"(recorded in {where}): drop --semantic-layout"
        )
    return layout


def check_device(device: str) -> torch.device:
    """`device` as a torch.device; an unknown name or an absent GPU is one line
    (engine.distributed.check_device)."""
    from diffalign.engine.distributed import check_device as check_device_name

    return torch.device(check_device_name(device))


def build_model(
    pipe: Any,
    lora: str | None,
    semantic_module: str | None,
    guidance: float,
):
    """The pipeline's transformer with `lora` loaded (pipe.load_lora_weights) and the module."""
    from diffalign.fill.model import SemanticFillTransformer
    from diffalign.fill.pipeline import latent_width
    from diffalign.fill.weights import load_lora_into_pipeline, load_semantic

    if lora:
        load_lora_into_pipeline(pipe, lora)
    module = None
    if semantic_module:
        module = load_semantic(semantic_module, latent_width(pipe))
        module = module.to(device=pipe.transformer.device, dtype=pipe.transformer.dtype)
    return SemanticFillTransformer(pipe.transformer, module, guidance).eval()


def _kept_entries(summary_path: Path, records: list[dict], todo: list) -> list[dict]:
    """The previous summary's entries of the images this run kept (a rerun after a stop)."""
    from diffalign.engine.io import read_json

    redone = {r["name"] for _, r in todo}
    kept = {r["name"] for r in records} - redone
    if not kept or not summary_path.is_file():
        return []
    try:
        old = read_json(summary_path).get("images", [])
    except (DiffalignError, AttributeError, OSError, UnicodeDecodeError):
        return []
    if not isinstance(old, list):
        return []
    return [e for e in old if isinstance(e, dict) and e.get("name") in kept]


SETTINGS_FILE = "infer_settings.json"  # the identity of the images in an output folder


def _input_digest(r: dict) -> str:
    """sha256 of one input (prompt, visible and semantic image bytes)."""
    import hashlib

    h = hashlib.sha256(r["prompt"].encode())
    for key in ("visible", "semantic"):
        h.update(Path(r[key]).read_bytes() if r.get(key) else b"-")
    return h.hexdigest()


def _read_inputs(out: Path) -> dict:
    """The input digests an earlier run recorded (images of other names stay described)."""
    from diffalign.engine.io import read_json

    inputs = read_json(out / SETTINGS_FILE).get("inputs")
    return inputs if isinstance(inputs, dict) else {}


def _check_output(out: Path, identity: dict, names: list[str], overwrite: bool) -> None:
    """A folder whose images another model, LoRA, module or setting made is refused, and so is
    an input of a name it holds with another prompt or image (`engine.identity`): a re-run
    never keeps an old image under new settings. New names may be added (a resume)."""
    from diffalign.engine.identity import check_identity
    from diffalign.engine.io import read_json_object

    if overwrite:
        return
    path = out / SETTINGS_FILE
    if path.is_file():
        old = read_json_object(path)
        old_inputs = old.get("inputs") if isinstance(old.get("inputs"), dict) else {}
        new_inputs = identity["inputs"]
        shared = [n for n in new_inputs if n in old_inputs]
        check_identity(
            {**old, "inputs": {n: old_inputs[n] for n in shared}},
            {**identity, "inputs": {n: new_inputs[n] for n in shared}},
            f"{out} holds images",
            hint="rerun with the settings it was made with, pass --overwrite to regenerate "
            "them, or choose another --output-dir",
            written=any(out.glob("*.png")),  # a run that failed before its first image
        )
    elif any((out / f"{n}.png").is_file() for n in names):
        raise DiffalignError(
            f"{out} holds images this run would keep but no record of what made them "
            f"({SETTINGS_FILE}): pass --overwrite to regenerate them or choose another --output-dir"
        )


def _earlier_units(out: Path, names: list[str], inputs: set[Path]) -> list[Path]:
    """What an earlier run left in `out` (`--overwrite` removes it): the images of every input
    its settings file records and of this run's inputs (`<name>.png`, `<name>_diptych.png`),
    and its summary.json; never one of this run's `inputs` (resolved paths)."""
    from diffalign.engine.io import earlier_units

    units = [out / "summary.json"]
    try:
        recorded = list(_read_inputs(out)) if (out / SETTINGS_FILE).is_file() else []
    except (DiffalignError, AttributeError):  # a damaged record: every image it may describe
        recorded = []
        units += earlier_units(out, r"[^.].*\.png")
    for n in dict.fromkeys([*recorded, *names]):
        units += [out / f"{n}.png", out / f"{n}_diptych.png"]
    return [p for p in dict.fromkeys(units) if p.is_file() and p.resolve() not in inputs]


def run_infer(
    *,
    model: str,
    output: str | Path,
    lora: str | None = None,
    semantic_module: str | None = None,
    visible: str | None = None,
    semantic: str | None = None,
    prompt: str | None = None,
    input_dir: str | None = None,
    steps: int = 50,
    guidance: float = 30.0,
    seed: int = 0,
    batch_size: int = 1,
    save_diptych: bool = False,
    semantic_layout: str | None = None,
    max_sequence_length: int = 512,
    dtype: str = "float32",
    device: str = "cpu",
    overwrite: bool = False,
    log: Callable = print,
) -> dict:
    """Inpaint the target panel of each input; writes `<name>.png` (+ `<name>_diptych.png`) and
    summary.json under an output-folder lock; outputs already there are kept (resume)."""
    from diffalign.engine.io import output_lock, remove_units, write_json
    from diffalign.engine.progress import progress
    from diffalign.engine.reports import save_image
    from diffalign.fill.encode import FillEncoder
    from diffalign.fill.pipeline import load_fill_pipeline

    if (input_dir is None) == (visible is None):
        raise DiffalignError("pass either --visible (with --prompt) or --input-dir")
    check_device(device)
    semantic_layout = resolve_semantic_layout(semantic_layout, semantic_module, log)
    if input_dir is not None:
        records = read_input_dir(input_dir)
    else:
        if not prompt or not prompt.strip():
            raise DiffalignError("--prompt is required with --visible (missing caption)")
        records = [
            {
                "name": Path(visible).stem.removesuffix("_visible") or Path(visible).stem,
                "visible": Path(visible),
                "semantic": Path(semantic) if semantic else None,
                "prompt": prompt,
            }
        ]
    if semantic_module and any(r["semantic"] is None for r in records):
        missing = next(r["name"] for r in records if r["semantic"] is None)
        raise DiffalignError(f"{missing}: the semantic module needs a semantic image (--semantic)")
    if not semantic_module and any(r["semantic"] is not None for r in records):
        log("[fill] no --semantic-module: the semantic images are not used")
    # check every input (decoded) before loading the model: a bad one fails fast
    for r in records:
        r["size"] = image_size(r["visible"], r["name"])
        use_semantic = r["semantic"] is not None and semantic_module
        sem_size = image_size(r["semantic"], r["name"]) if use_semantic else None
        check_panels(r["name"], r["size"], sem_size)

    out = Path(output)
    inputs = {p.resolve() for r in records for p in (r["visible"], r["semantic"]) if p}
    for r in records:
        for image in (f"{r['name']}.png", f"{r['name']}_diptych.png"):
            if (out / image).resolve() in inputs:
                raise DiffalignError(
                    f"{r['name']}: --output-dir {out} would write {image} over an input image; "
                    "choose another --output-dir"
                )
    t0 = time.perf_counter()
    from diffalign.engine.identity import model_identity

    # what decides the pixels (not the batching, the device or whether diptychs are kept)
    identity = {
        "model": model_identity(model),
        "lora": model_identity(lora),
        "semantic_module": model_identity(semantic_module),
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "semantic_layout": semantic_layout if semantic_module else None,
        "max_sequence_length": max_sequence_length,
        "dtype": dtype,
        "inputs": {r["name"]: _input_digest(r) for r in records},
    }
    names = [r["name"] for r in records]
    _check_output(out, identity, names, overwrite)  # before the model loads
    # model, LoRA and module are checked before the output folder is touched
    pipe = load_fill_pipeline(model, dtype)
    pipe = pipe.to(device)
    fill_model = build_model(pipe, lora, semantic_module, guidance)
    encoder = FillEncoder(pipe)
    with output_lock(out):
        _check_output(out, identity, names, overwrite)
        if overwrite:  # start over: no earlier image may count as done under these settings
            remove_units(_earlier_units(out, names, inputs))
        fresh = overwrite or not (out / SETTINGS_FILE).is_file() or not any(out.glob("*.png"))
        kept = {} if fresh else _read_inputs(out)
        write_json(out / SETTINGS_FILE, {**identity, "inputs": {**kept, **identity["inputs"]}})
        todo = [
            (i, r)
            for i, r in enumerate(records)
            if not (out / f"{r['name']}.png").is_file()  # --overwrite removed them all
            or (save_diptych and not (out / f"{r['name']}_diptych.png").is_file())
        ]
        done_before = len(records) - len(todo)
        bar = progress(total=len(todo), desc="fill infer")
        written = []
        i = 0
        while i < len(todo):
            chunk = [todo[i]]
            while (
                len(chunk) < batch_size
                and i + len(chunk) < len(todo)
                and todo[i + len(chunk)][1]["size"] == todo[i][1]["size"]
            ):
                chunk.append(todo[i + len(chunk)])
            i += len(chunk)
            vis = torch.stack([load_image(r["visible"], r["name"]) for _, r in chunk])
            vis = vis.to(device)
            sem = None
            if fill_model.semantic is not None:
                sem = torch.stack([load_image(r["semantic"], r["name"]) for _, r in chunk])
                sem = sem.to(device)
            dip = sample_panels(
                pipe,
                fill_model,
                encoder,
                visible=vis,
                semantic=sem,
                prompts=[r["prompt"] for _, r in chunk],
                steps=steps,
                guidance=guidance,
                seeds=[seed + idx for idx, _ in chunk],
                semantic_layout=semantic_layout,
                return_diptych=True,
                max_sequence_length=max_sequence_length,
            ).cpu()
            w = dip.shape[-1]
            for (idx, r), image in zip(chunk, dip):
                if save_diptych:
                    save_image(out / f"{r['name']}_diptych.png", to_pil(image))
                save_image(out / f"{r['name']}.png", to_pil(image[..., w // 2 :]))
                written.append({"name": r["name"], "seed": seed + idx, "prompt": r["prompt"]})
            bar.update(len(chunk))
        bar.close()
        summary = {
            "model": model,
            "lora": lora,
            "semantic_module": semantic_module,
            "semantic_module_shape": fill_model.semantic.config()
            if fill_model.semantic is not None
            else None,
            "semantic_scales": [float(s) for s in fill_model.semantic.scales()]
            if fill_model.semantic is not None
            else [],
            "steps": steps,
            "guidance": guidance,
            "seed": seed,
            "batch_size": batch_size,
            "inputs": len(records),
            "written": len(written),
            "kept_existing": done_before,
            "images": _kept_entries(out / "summary.json", records, todo) + written,
            "save_diptych": save_diptych,
            "semantic_layout": semantic_layout if fill_model.semantic is not None else None,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        write_json(out / "summary.json", summary)
    log(f"[fill] {len(written)} image(s) written to {out} ({done_before} already there)")
    return summary
