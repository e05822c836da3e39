"""Model loading shared by every command (spec E: Model loading).

`--model` may be a local diffusers folder, a Hub id (`org/name`), a preset name (`sd3`, `sd3.5`,
...) or a single-file `.safetensors` checkpoint. Presets are looked up in the project-local
`models/<download name>/` (or `$DIFFALIGN_MODELS_DIR`), then the legacy `third_party_weights/`,
then the Hub. Hub access honours `HF_HUB_OFFLINE`. Anything missing ends in one
`ModelNotFoundError` line naming the model and the `diffalign download --only NAME` command.

Precedence for a name that could be several things: an existing local path; a preset name (its
`models/` folder, else its Hub repo); a Hub id whose `diffalign download` copy is complete
(`downloaded_copy`: the asset of that repo, its download record listing every source; one
notice line names the folder); the Hub id itself (Hugging Face cache, then the network). A
downloaded folder that is incomplete or was not written by `diffalign download` is not used
for a Hub id, and the "not found" line names it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffalign.engine.download import asset_of_repo, folder_status, hub_offline, models_dir
from diffalign.engine.errors import DiffalignError, ModelNotFoundError, library_output_held
from diffalign.engine.progress import quiet_library_bars

if TYPE_CHECKING:  # heavy imports only for type checkers
    import torch
    from diffusers import StableDiffusion3Pipeline


@dataclass(frozen=True)
class Preset:
    """A short model name: its Hub repo, model family and the `diffalign download` asset name."""

    name: str
    repo_id: str
    family: str
    download_name: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("sd3", "stabilityai/stable-diffusion-3-medium-diffusers", "sd3", "sd3"),
        Preset("sd3.5", "stabilityai/stable-diffusion-3.5-large", "sd3", "sd3.5"),
        Preset("sd3.5-large", "stabilityai/stable-diffusion-3.5-large", "sd3", "sd3.5"),
        Preset("sd3.5-medium", "stabilityai/stable-diffusion-3.5-medium", "sd3", "sd3.5-medium"),
        Preset("sdxl-turbo", "stabilityai/sdxl-turbo", "sdxl", "sdxl-turbo"),
        Preset("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15", "sd15"),
        Preset("flux-fill", "black-forest-labs/FLUX.1-Fill-dev", "flux-fill", "flux-fill"),
        Preset("sd-turbo", "stabilityai/sd-turbo", "sd21", "sd-turbo"),
        Preset("sdxl-base", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", "sdxl-base"),
        Preset("flux-dev", "black-forest-labs/FLUX.1-dev", "flux", "flux-dev"),
        Preset("flux-schnell", "black-forest-labs/FLUX.1-schnell", "flux", "flux-schnell"),
        Preset("qwen-image", "Qwen/Qwen-Image", "qwen-image", "qwen-image"),
        Preset(
            "sd3.5-large-turbo",
            "stabilityai/stable-diffusion-3.5-large-turbo",
            "sd3.5-large-turbo",
            "sd3.5-large-turbo",
        ),
        Preset(
            "sana-sprint",
            "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers",
            "sana-sprint",
            "sana-sprint",
        ),
        Preset(
            "pixart-dmd", "PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512", "pixart-dmd", "pixart-dmd"
        ),
    )
}

LEGACY_MODELS_DIR = "third_party_weights"
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft")
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# the first conv of an original-layout (LDM) U-Net: present in every SD 1.x / 2.x / XL file
_LDM_UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class DownloadedCopy:
    """The `diffalign download` folder of Hub repo `repo_id` (asset `asset`); `status` is
    `download.folder_status`'s: only a "present" (complete) one stands in for the Hub id."""

    repo_id: str
    asset: str
    folder: Path
    status: str


@dataclass(frozen=True)
class ResolvedModel:
    """Where a `--model` value points: `kind` is "folder", "hub" or "single_file"."""

    source: str
    kind: str
    preset: str | None = None
    download_name: str | None = None


def _download_name_for_repo(repo_id: str) -> str | None:
    for p in PRESETS.values():
        if p.repo_id == repo_id:
            return p.download_name
    return None


def _preset_local_folder(preset: Preset) -> Path | None:
    for base in (models_dir(), Path(LEGACY_MODELS_DIR)):
        folder = base / preset.download_name
        if (folder / "model_index.json").is_file():
            return folder.absolute()
    return None


def downloaded_copy(repo_id: str) -> DownloadedCopy | None:
    """The folder `diffalign download` writes for Hub repo `repo_id` (`download.asset_of_repo`),
    in `models/` then the legacy `third_party_weights/`: the first complete one, else the first
    that is there but incomplete or foreign, else None (no such asset, or no folder)."""
    asset = asset_of_repo(repo_id)
    if asset is None:
        return None
    found = []
    for base in (models_dir(), Path(LEGACY_MODELS_DIR)):
        folder = base / asset.name
        status = folder_status(asset, folder)
        if status == "present":
            return DownloadedCopy(repo_id, asset.name, folder.absolute(), status)
        if status != "fetch":
            found.append(DownloadedCopy(repo_id, asset.name, folder.absolute(), status))
    return found[0] if found else None


_NOTED: set[tuple[str, ...]] = set()


def _note_once(key: tuple[str, ...], line: str) -> None:
    """`line` on stderr once per process for `key`, from rank 0 only (the other ranks load the
    same model)."""
    from diffalign.engine.progress import is_main_process

    if key in _NOTED or not is_main_process():
        return
    _NOTED.add(key)
    print(line, file=sys.stderr, flush=True)


def _notice_copy(copy: DownloadedCopy) -> None:
    """One line (rank 0, once per process) saying a Hub id runs from its downloaded folder."""
    _note_once(
        ("copy", copy.repo_id, str(copy.folder)),
        f"diffalign: {copy.repo_id}: using its `diffalign download` copy {copy.folder}",
    )


def resolve_hub_id(repo_id: str) -> ResolvedModel:
    """A Hub id: its complete downloaded folder if there is one (module doc), else the Hub."""
    copy = downloaded_copy(repo_id)
    if copy is not None and copy.status == "present":
        _notice_copy(copy)
        return ResolvedModel(str(copy.folder), "folder", None, copy.asset)
    name = _download_name_for_repo(repo_id) or (copy.asset if copy is not None else None)
    return ResolvedModel(repo_id, "hub", None, name)


def unused_copy_hint(
    copy: DownloadedCopy | None, option: str = "--model"
) -> tuple[str, str | None]:
    """For the "not found" line of a Hub id whose downloaded folder is there but was not used:
    (what to add to its detail, the fix to give instead of `download --only NAME`). An
    incomplete download keeps that fix (it fetches what is missing); a folder not written by
    `diffalign download` does not (download leaves it as is), so it is passed as a path."""
    if copy is None or copy.status == "present":
        return "", None
    if copy.status == "complete-missing":
        return f"; {copy.folder} is an incomplete `diffalign download` of it", None
    note = (
        f"; {copy.folder} is not used for it: it was not written by `diffalign download` "
        "(no download record)"
    )
    fix = (
        f"pass that folder itself with {option} {copy.folder}, or move it away and run "
        f"`diffalign download --only {copy.asset}`"
    )
    return note, fix


def model_not_found(model: str, resolved: ResolvedModel, detail: str) -> ModelNotFoundError:
    """The "not found" line of `model`, naming a Hub id's unused downloaded folder if any
    (`unused_copy_hint`: a complete one would have been used)."""
    copy = downloaded_copy(resolved.source) if resolved.kind == "hub" else None
    note, fix = unused_copy_hint(copy)
    return ModelNotFoundError(model, resolved.download_name, detail + note, fix)


def resolve_model(model: str, family: str | None = None) -> ResolvedModel:
    """Say what `model` names: a local folder or file, a preset, or a Hub id (spec E).

    Order (module doc): an existing local path; a preset name (then `models/<name>/`, legacy
    `third_party_weights/<name>/`, else its Hub repo); any `org/name` is a Hub id, run from its
    complete `diffalign download` folder when there is one. With `family` ("sd3", "sdxl", ...)
    a preset of another family is refused.
    """
    text = str(model).strip()
    if not text:
        raise DiffalignError("--model is empty")
    path = Path(text).expanduser()
    if path.is_dir():
        _note_shadowed_preset(text, path)
        return ResolvedModel(str(path), "folder")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in SINGLE_FILE_SUFFIXES:
            return ResolvedModel(str(path), "single_file")
        if suffix in _PICKLE_SUFFIXES:
            raise DiffalignError(
                f"{path}: pickled checkpoints ({suffix}) are never loaded; convert it to "
                ".safetensors or pass a diffusers folder"
            )
        raise DiffalignError(f"{path}: not a model folder or a .safetensors checkpoint")

    preset = PRESETS.get(text.lower())
    if preset is not None:
        if family is not None and preset.family != family:
            raise DiffalignError(
                f"--model {text} is a {preset.family} model; this command needs a {family} model "
                f"(presets: {', '.join(n for n, p in PRESETS.items() if p.family == family)})"
            )
        local = _preset_local_folder(preset)
        if local is not None:
            return ResolvedModel(str(local), "folder", preset.name, preset.download_name)
        return ResolvedModel(preset.repo_id, "hub", preset.name, preset.download_name)

    looks_like_path = (
        text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or "\\" in text
        or path.parts[0] in {models_dir().name, "models", LEGACY_MODELS_DIR}  # models/sd3 missing
    )
    if not looks_like_path and _HUB_ID.match(text):
        return resolve_hub_id(text)
    if looks_like_path or path.suffix:
        raise ModelNotFoundError(text, None, "no such file or folder")
    names = ", ".join(n for n, p in PRESETS.items() if family is None or p.family == family)
    raise ModelNotFoundError(
        text, None, f"not a local path, a preset ({names}) or a Hub id of the form org/name"
    )


def _note_shadowed_preset(text: str, folder: Path) -> None:
    """A local folder named like a preset (``./sd15``) is what loads: a path wins, also as the
    base of a kind such as ``hyper-sd15``. Rank 0 says so once per process, naming the folder,
    so that a stray folder is not taken for the preset's model unnoticed."""
    preset = PRESETS.get(text.lower())
    if preset is None:
        return
    local = _preset_local_folder(preset)
    if local is not None and local.resolve() == folder.resolve():  # the preset's own folder
        return
    used = folder.absolute()
    _note_once(
        ("shadow", preset.name, str(used)),
        f"diffalign: note: '{text}' loads the local folder {used}, not the {preset.name} preset "
        f"({local or preset.repo_id}): a local path wins; rename the folder or run elsewhere "
        "to use the preset",
    )


def check_model_available(model: str, family: str | None = None) -> ResolvedModel:
    """`resolve_model`, plus the cheap checks that a load would fail on, done before torch and
    diffusers are imported: a Hub model while offline must be in the local cache."""
    resolved = resolve_model(model, family)
    if resolved.kind == "hub" and hub_offline() and not _hub_config_cached(resolved.source):
        raise model_not_found(
            model, resolved, "not in the local Hugging Face cache and HF_HUB_OFFLINE=1"
        )
    return resolved


def check_vae_available(vae: str | None) -> None:
    """A `--vae` that names a local path must exist (checked before anything heavy loads)."""
    if vae is None:
        return
    path = Path(vae).expanduser()
    if path.exists():
        return
    text = str(vae)
    if path.suffix or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise DiffalignError(
            f"VAE '{vae}' not found: give a .safetensors file, an AutoencoderKL or pipeline "
            "folder, or a Hub id"
        )


_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """`"float32|fp32|float16|fp16|bfloat16|bf16"` (or a torch.dtype) -> torch.dtype."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).strip().lower().removeprefix("torch."))
    if name is None:
        raise DiffalignError(
            f"unknown dtype '{dtype}'; choose float32 (fp32), float16 (fp16) or bfloat16 (bf16)"
        )
    return getattr(torch, name)


def resolve_dtype(dtype: torch.dtype | str | None, device) -> torch.dtype:
    """`"auto"`: bfloat16 on a CUDA device, float32 elsewhere; anything else `parse_dtype`."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return parse_dtype(dtype)


def _dtype_kw(torch_dtype: torch.dtype) -> dict[str, Any]:
    """`dtype=` on diffusers that renamed it (0.36+), `torch_dtype=` on older ones."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401

        return {"dtype": torch_dtype}
    except ImportError:
        return {"torch_dtype": torch_dtype}


def _tf_dtype_kw(torch_dtype: torch.dtype) -> dict[str, Any]:
    """transformers renamed `torch_dtype` to `dtype` in 4.56."""
    import transformers
    from packaging.version import Version

    new = Version(transformers.__version__).release >= (4, 56)
    return {"dtype" if new else "torch_dtype": torch_dtype}


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exception types diffusers / huggingface_hub raise for a model that cannot be had, and
    safetensors' for a damaged weights file (transformers passes it on unwrapped)."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from huggingface_hub import errors as hf_errors

        errors += [
            hf_errors.LocalEntryNotFoundError,
            hf_errors.RepositoryNotFoundError,
            hf_errors.EntryNotFoundError,
            hf_errors.HfHubHTTPError,
        ]
    except ImportError:  # pragma: no cover
        pass
    try:
        from diffusers.loaders.single_file_utils import SingleFileComponentError

        errors.append(SingleFileComponentError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def safetensors_damage(path: Path) -> str | None:
    """Why the safetensors file `path` cannot be whole, or None: its 8-byte header length, its
    JSON header and the end of its last tensor read against the file's size (no tensor is
    loaded)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if size < 8 + n:
                return f"cut short: {size} bytes, its header alone needs {8 + n}"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"cannot be read: {e.strerror or type(e).__name__}"
    except ValueError:  # also UnicodeDecodeError
        return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    try:
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (TypeError, KeyError, IndexError, ValueError):
        return "its header does not describe tensors"
    if size < 8 + n + end:
        return f"cut short: {size} of {8 + n + end} bytes"
    return None


def damaged_weights(
    model: str,
    source: str | os.PathLike,
    download_name: str | None = None,
    subfolder: str | None = None,
) -> DiffalignError | None:
    """After a load from the local folder or single file `source` (only its `subfolder` when
    given) failed: the one-line error naming its first damaged or incomplete safetensors file
    (`safetensors_damage`), in place of a misleading "not found"; None when every weights file
    is whole (the failure is another one) or `source` is not local."""
    root = Path(source)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        top = root / subfolder if subfolder else root
        files = sorted(
            p
            for p in top.rglob("*.safetensors")
            if not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    else:
        return None
    for path in files:
        why = safetensors_damage(path)
        if why is not None:
            name = path.relative_to(root).as_posix() if path != root else str(path)
            fix = "replace the file"
            if download_name:
                fix = f"re-download it with `diffalign download --only {download_name}` or {fix}"
            return DiffalignError(f"{model}: {name} is damaged or incomplete ({why}); {fix}")
    return None


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 240 else line[:237] + "..."


_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
)
_WEIGHT_GLOBS = ("*.safetensors", "*.safetensors.index.json")
_PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.bin.index.json")


def check_component(folder: Path, name: str, library: str, class_name: str) -> str | None:
    """None if `folder/name` holds what a `library.class_name` component loads from, else why not.

    Models need `config.json` and `.safetensors` weights (pickled `.bin`/`.pt` weights are never
    loaded), tokenizers a vocabulary file (without one transformers builds a placeholder that
    maps every word to an unknown id), schedulers `scheduler_config.json`, image processors
    `preprocessor_config.json`.
    """
    sub = folder / name
    if not sub.is_dir():
        return f"component '{name}' ({class_name}) is missing: no folder {sub}"
    files = [p.name for p in sub.iterdir() if p.is_file()]
    if "Tokenizer" in class_name:
        if not any(f in files for f in _TOKENIZER_FILES) and not any(
            f.endswith(".model") for f in files
        ):
            return (
                f"component '{name}' ({class_name}) in {sub} has no vocabulary file "
                f"(one of {', '.join(_TOKENIZER_FILES)})"
            )
        return None
    if "Scheduler" in class_name:
        if "scheduler_config.json" not in files:
            return f"component '{name}' ({class_name}): no scheduler_config.json in {sub}"
        return None
    if any(k in class_name for k in ("Processor", "FeatureExtractor")):
        if "preprocessor_config.json" not in files:
            return f"component '{name}' ({class_name}): no preprocessor_config.json in {sub}"
        return None
    if library not in ("diffusers", "transformers"):
        return None  # a custom component: its own loader decides
    if "config.json" not in files:
        return f"component '{name}' ({class_name}): no config.json in {sub}"
    try:
        json.loads((sub / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"component '{name}' ({class_name}): {sub / 'config.json'} is not valid JSON ({e})"
    if any(any(sub.glob(g)) for g in _WEIGHT_GLOBS):
        return None
    pickled = sorted(p.name for g in _PICKLED_WEIGHTS for p in sub.glob(g))
    if pickled:
        return (
            f"component '{name}' ({class_name}) in {sub} has only pickled weights "
            f"({', '.join(pickled)}), which are never loaded; convert them to .safetensors"
        )
    return f"component '{name}' ({class_name}): no .safetensors weights in {sub}"


def _check_components(
    folder: Path, index: dict, skip: set[str], download_name: str | None = None
) -> None:
    """Every component `model_index.json` names must be present and loadable (spec E)."""
    for name, value in index.items():
        if name.startswith("_") or name in skip:
            continue
        if not isinstance(value, list | tuple) or len(value) != 2 or None in value:
            continue  # [null, null]: an optional component the checkpoint does not ship
        require_component(folder, name, str(value[0]), str(value[1]), download_name)


def require_component(
    folder: str | os.PathLike,
    name: str | None,
    library: str,
    class_name: str,
    download_name: str | None = None,
) -> None:
    """`check_component` as one DiffalignError line, for loaders that read a single component
    with `from_pretrained` (the U-Net, tokenizer or text encoder of a pipeline folder, a VAE or
    DINOv2 folder): `name` is the subfolder, None when `folder` is the component itself."""
    folder = Path(folder)
    base, sub = (folder, name) if name else (folder.parent, folder.name)
    problem = check_component(base, sub, library, class_name)
    if problem is not None:
        fix = (
            f"fetch it again with `diffalign download --only {download_name}`"
            if download_name
            else "copy the complete model folder"
        )
        raise DiffalignError(f"incomplete model folder {folder}: {problem}; {fix}")


def _check_folder(
    folder: Path,
    pipeline_cls: type,
    family: str,
    resolved: ResolvedModel,
    given: set[str] | frozenset[str] = frozenset(),
) -> None:
    """A pipeline folder must hold a model_index.json with the components `pipeline_cls` needs,
    each of them present and loadable (`given` components are passed in and not read)."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelNotFoundError(
            str(folder),
            resolved.download_name,
            "not a diffusers pipeline folder: no model_index.json",
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffalignError(f"{index_file}: not valid JSON ({e})") from None
    found, missing = _missing_components(pipeline_cls, index)
    if missing:
        raise DiffalignError(f"{folder} holds {found}, not a {family} model (missing {missing})")
    _check_components(folder, index, set(given), resolved.download_name)


def load_pipeline(
    model: str,
    pipeline_cls: type,
    family: str,
    *,
    dtype: torch.dtype | str = "float32",
    device: str | None = "cpu",
    single_file_config: str | None = None,
    expect: dict[str, type] | None = None,
    **components: Any,
):
    """Load `pipeline_cls` from a folder, Hub id, preset or single file (spec E).

    `components` are passed through (e.g. `vae=...`). `expect` maps a component name to the class
    it must be. Any "cannot find it" failure becomes one ModelNotFoundError line.
    """
    resolved = resolve_model(model, family)
    torch_dtype = parse_dtype(dtype)
    offline = hub_offline()
    errors = _hub_errors()
    quiet_library_bars()  # DIFFALIGN_NO_PROGRESS: no "Loading pipeline components..." bars
    try:
        if resolved.kind == "folder":
            _check_folder(Path(resolved.source), pipeline_cls, family, resolved, set(components))
            pipe = pipeline_cls.from_pretrained(
                resolved.source, **_dtype_kw(torch_dtype), **components
            )
        elif resolved.kind == "hub":
            pipe = pipeline_cls.from_pretrained(
                resolved.source, **_dtype_kw(torch_dtype), local_files_only=offline, **components
            )
        else:
            pipe = _load_single_file(
                model, resolved, pipeline_cls, family, single_file_config, torch_dtype, components
            )
    except DiffalignError:
        raise
    except errors as e:
        if resolved.kind != "hub":
            damaged = damaged_weights(model, resolved.source, resolved.download_name)
            if damaged is not None:
                raise damaged from None
        where = resolved.source if resolved.source != model else None
        detail = _first_line(e)
        if resolved.kind == "hub" and offline:
            detail = "not in the local Hugging Face cache and HF_HUB_OFFLINE=1"
        elif where:
            detail = f"{where}: {detail}"
        raise model_not_found(model, resolved, detail) from None

    for name, cls in (expect or {}).items():
        component = getattr(pipe, name, None)
        if not isinstance(component, cls):
            raise DiffalignError(
                f"--model {model}: its {name} is {type(component).__name__}, "
                f"not {cls.__name__} (is it a {family} model?)"
            )
    quiet_library_bars(pipe)  # and no per-step bars in the pipeline's __call__
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def _load_single_file(
    model: str,
    resolved: ResolvedModel,
    pipeline_cls: type,
    family: str,
    single_file_config: str | None,
    torch_dtype: torch.dtype,
    components: dict[str, Any],
):
    """`pipeline_cls` from the single file `resolved.source` and a diffusers config (module doc).

    Pipelines with diffusers' `from_single_file` load through it; for the others (Qwen-Image,
    SANA-Sprint, ...) a file holding only the denoiser loads through its model class's
    `from_single_file`, the rest from the config. Anything else is one refusal line.
    """
    offline = hub_offline()
    config = single_file_config or _single_file_config(resolved.source, family)
    if config is None:
        damaged = damaged_weights(model, resolved.source, resolved.download_name)
        if damaged is not None:  # an unreadable file has no layout to recognise
            raise damaged
        raise DiffalignError(
            f"--model {model}: cannot tell which {family} model this single file is (diffusers "
            "does not recognise its layout as a release we have a preset for); pass the matching "
            "diffusers folder or Hub id as --single-file-config where the command has it, or a "
            "diffusers folder as --model"
        )
    config_resolved = resolve_model(config, family)
    if config_resolved.kind == "single_file":
        raise DiffalignError(f"single-file config {config} must be a folder or Hub id")
    if config_resolved.kind == "hub" and offline and not _hub_config_cached(config_resolved.source):
        raise ModelNotFoundError(
            config_resolved.source,
            config_resolved.download_name,
            "config for the single-file checkpoint is not cached and HF_HUB_OFFLINE=1",
        )
    local_only = offline or config_resolved.kind == "folder"
    source = config_resolved.source
    index = pipeline_cls.load_config(source, local_files_only=local_only)  # read once (Hub)
    _check_config_pipeline(pipeline_cls, family, source, index)
    if not hasattr(pipeline_cls, "from_single_file"):
        name, denoiser_cls = _single_file_denoiser(model, pipeline_cls, index)
        denoiser = denoiser_cls.from_single_file(
            resolved.source,
            config=source,
            subfolder=name,
            local_files_only=local_only,
            **_dtype_kw(torch_dtype),
        )
        return pipeline_cls.from_pretrained(
            source,
            **_dtype_kw(torch_dtype),
            local_files_only=local_only,
            **{name: denoiser, **components},
        )
    not_in_file = _components_not_in_file(resolved.source, source, index, torch_dtype, local_only)
    return pipeline_cls.from_single_file(
        resolved.source,
        config=source,
        **_dtype_kw(torch_dtype),
        local_files_only=local_only,
        **{**not_in_file, **components},
    )


def _check_config_pipeline(pipeline_cls: type, family: str, config: str, index: dict):
    """A single file's config (`index`, its model_index.json) must name the components
    `pipeline_cls` needs (one line if not: diffusers would fail deep inside
    `from_single_file`)."""
    found, missing = _missing_components(pipeline_cls, index)
    if missing:
        raise DiffalignError(
            f"single-file config {config} holds {found}, not a {family} model (missing {missing})"
        )


def _missing_components(pipeline_cls: type, index: dict) -> tuple[str, str]:
    """The pipeline class `index` (a model_index.json) names, and the components
    `pipeline_cls` needs that it lacks, comma-separated (empty: none)."""
    expected, _ = pipeline_cls._get_signature_keys(pipeline_cls)
    required = set(expected) - set(pipeline_cls._optional_components)
    missing = ", ".join(sorted(k for k in required if k not in index))
    return index.get("_class_name", "an unknown pipeline"), missing


def _single_file_denoiser(model: str, pipeline_cls: type, index: dict):
    """(component name, class) of the denoiser of a pipeline diffusers cannot load from a single
    file as a whole (`index`: its config's model_index.json), when its model class can be (else
    one refusal line)."""
    import diffusers
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    for name in ("transformer", "unet"):
        cls = _entry_class(index.get(name))
        if cls in SINGLE_FILE_LOADABLE_CLASSES and hasattr(diffusers, cls):
            return name, getattr(diffusers, cls)
    held = next(
        (_entry_class(index[n]) or "its denoiser" for n in ("transformer", "unet") if n in index),
        "its denoiser",
    )
    raise DiffalignError(
        f"--model {model}: diffusers {diffusers.__version__} cannot load {pipeline_cls.__name__} "
        f"({held}) from a single file; pass a diffusers folder or Hub id as --model"
    )


def _hub_config_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # noqa: BLE001 - any failure means "not usable offline"
        return False
    return isinstance(hit, str)


def single_file_preset(path: str, family: str | None = None) -> Preset | None:
    """The preset of the release diffusers recognises in the single file `path` (of `family`
    when given), or None. The model type is read from the tensor names and shapes only (no
    weights loaded), with diffusers' own `infer_diffusers_model_type`."""
    try:
        from diffusers.loaders.single_file_utils import (
            DIFFUSERS_DEFAULT_PIPELINE_PATHS,
            infer_diffusers_model_type,
        )

        shapes = _checkpoint_shapes(path)
        model_type = infer_diffusers_model_type(shapes)
        repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]
    except Exception:  # noqa: BLE001 - unknown layout: the caller asks for an explicit config
        return None
    if model_type == "v1" and _LDM_UNET_KEY not in shapes:
        return None  # diffusers' fallback for any layout it does not know, not an SD 1.x U-Net
    for preset in PRESETS.values():
        if preset.repo_id == repo and family in (None, preset.family):
            return preset
    return None  # another family, or a repo we have no preset for


def _single_file_config(path: str, family: str) -> str | None:
    """The diffusers config for a single file: the matching preset's local folder or name."""
    preset = single_file_preset(path, family)
    if preset is None:
        return None  # the caller asks for an explicit config
    local = _preset_local_folder(preset)
    return str(local) if local is not None else preset.name


def _checkpoint_shapes(path: str) -> dict[str, Any]:
    """Tensor names -> objects with `.shape` only, read from the safetensors header."""
    import torch
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: _ShapeOnly(torch.Size(f.get_slice(k).get_shape())) for k in f.keys()}


def _entry_class(value: Any) -> str | None:
    """The class name of a model_index.json entry ``[library, class]``, or None (no such entry,
    ``[null, null]``, or not of that form)."""
    if isinstance(value, list | tuple) and len(value) == 2 and isinstance(value[1], str):
        return value[1]
    return None


def _components_not_in_file(
    path: str, config: str, index: dict, torch_dtype: torch.dtype, local_only: bool
) -> dict[str, Any]:
    """Load from `config` (`index`: its model_index.json) the text encoders (and VAE) a
    single-file checkpoint does not contain.

    Single files often hold only the denoiser and VAE (e.g. `sd3.5_large.safetensors`); diffusers'
    `from_single_file` looks for such encoders under diffusers' weight names only and fails on the
    transformers `model.safetensors` of the config repo, so they are loaded here and passed in.
    """
    import importlib

    import diffusers
    from diffusers.loaders.single_file_utils import (
        is_clip_model_in_single_file,
        is_t5_in_single_file,
    )

    shapes = _checkpoint_shapes(path)
    loaded: dict[str, Any] = {}
    vae = index.get("vae")
    if isinstance(vae, list | tuple) and not any(
        k.startswith(("first_stage_model.", "vae.")) for k in shapes
    ):  # the config's own VAE class (FLUX, SD3: AutoencoderKL; others their own)
        vae_cls = getattr(diffusers, _entry_class(vae) or "", None)
        if not isinstance(vae_cls, type):
            raise DiffalignError(
                f"single-file config {config}: its vae entry {json.dumps(vae)} names no diffusers "
                "class; pass a diffusers folder or Hub id whose model_index.json names its VAE"
            )
        loaded["vae"] = vae_cls.from_pretrained(
            config, subfolder="vae", local_files_only=local_only, **_dtype_kw(torch_dtype)
        )
    for name, value in index.items():
        cls_name = _entry_class(value)
        if name.startswith("_") or cls_name is None or value[0] != "transformers":
            continue
        cls = getattr(importlib.import_module("transformers"), cls_name, None)
        if cls is None or not hasattr(cls, "from_pretrained") or "Tokenizer" in cls_name:
            continue
        in_file = is_clip_model_in_single_file(cls, shapes) or (
            "T5" in cls_name and is_t5_in_single_file(shapes)
        )
        if not in_file:
            loaded[name] = cls.from_pretrained(
                config, subfolder=name, local_files_only=local_only, **_tf_dtype_kw(torch_dtype)
            )
    return loaded


@dataclass(frozen=True)
class _ShapeOnly:
    shape: Any


def load_vae(
    vae: str, *, config: str | None = None, dtype: torch.dtype | str = "float32", family="sd3"
):
    """An AutoencoderKL from a folder (its own or a pipeline's `vae/`), Hub id or single file.

    A single file needs a config: `config` (a pipeline folder or Hub id whose `vae/` holds it).
    """
    torch_dtype = parse_dtype(dtype)
    offline = hub_offline()
    path = Path(vae).expanduser()
    with library_output_held():  # a failed load: our line alone, not diffusers' before it
        loaded = _load_vae(vae, path, config, torch_dtype, family, offline)
    if config is not None:
        _check_vae_fits(vae, loaded.config, config, offline)
    return loaded


def _check_vae_fits(vae: str, got: Any, model: str, offline: bool) -> None:
    """Refuse a VAE whose latent space is not the model's own (another latent channel count or
    scaling): the denoiser would fail on its latents or decode them into noise."""
    from diffusers import AutoencoderKL

    try:  # `model` as the loaders read it: a preset names its local folder or Hub repo
        source = resolve_model(model).source
        own = AutoencoderKL.load_config(source, subfolder="vae", local_files_only=offline)
    except Exception:  # no readable config to compare with (a Hub id offline, ...)
        return
    for key in ("latent_channels", "scaling_factor", "shift_factor"):
        a, b = got.get(key), own.get(key)
        if b is None:  # an older config without the key: nothing to compare
            continue
        if a != b and not (isinstance(a, float) and isinstance(b, float) and abs(a - b) < 1e-6):
            raise DiffalignError(
                f"--vae {vae}: its {key} is {a}, the VAE of {model} has {b}; it is a VAE of "
                "another model family"
            )


# where a single file keeps VAE weights: a whole checkpoint's, diffusers' or a VAE file's own
_VAE_PREFIXES = ("first_stage_model.", "vae.", "encoder.", "decoder.")


def _vae_config(vae: str, config: str | None, family: str | None) -> ResolvedModel:
    """The config a single-file VAE loads with: `config` (a folder or Hub id; a single-file
    model: the config its release has), else that of the release the VAE file itself is."""
    source = config if config is not None else vae
    resolved = resolve_model(source, family)
    if resolved.kind != "single_file":
        return resolved
    preset = single_file_preset(resolved.source, family)
    if preset is None:
        damaged = damaged_weights(source, resolved.source)
        if damaged is not None:  # an unreadable file has no layout to recognise
            raise damaged
        raise DiffalignError(
            f"VAE {vae}: cannot tell which model's VAE config it loads with (diffusers does not "
            f"recognise {Path(resolved.source).name}); pass a diffusers folder or Hub id as the "
            "model (or as --single-file-config where the command has it)"
        )
    local = _preset_local_folder(preset)
    return resolve_model(str(local) if local is not None else preset.name, family)


def _load_vae(vae: str, path: Path, config: str | None, torch_dtype, family: str, offline: bool):
    from diffusers import AutoencoderKL

    sub = "vae" if (path / "vae" / "config.json").is_file() else None  # a pipeline folder's
    try:
        if path.is_dir():
            if sub is None and not (path / "config.json").is_file():
                raise ModelNotFoundError(vae, None, "not an AutoencoderKL folder: no config.json")
            require_component(path, sub, "diffusers", "AutoencoderKL")
            return AutoencoderKL.from_pretrained(str(path), subfolder=sub, **_dtype_kw(torch_dtype))
        if path.is_file():
            resolved = resolve_model(str(path))  # refuses pickles
            cfg = _vae_config(vae, config, family)
            if not any(k.startswith(_VAE_PREFIXES) for k in _checkpoint_shapes(resolved.source)):
                raise DiffalignError(
                    f"{vae} holds no VAE weights (no {', '.join(p + '*' for p in _VAE_PREFIXES)} "
                    "tensors): pass a diffusers folder with a vae/ or a VAE file"
                )
            return AutoencoderKL.from_single_file(
                resolved.source,
                config=cfg.source,
                subfolder="vae",
                **_dtype_kw(torch_dtype),
                local_files_only=offline or cfg.kind == "folder",
            )
        try:
            resolved = resolve_model(vae)
        except ModelNotFoundError:
            raise DiffalignError(
                f"VAE '{vae}' not found: give a .safetensors file, an AutoencoderKL or pipeline "
                "folder, or a Hub id"
            ) from None
        return AutoencoderKL.from_pretrained(
            resolved.source, subfolder="vae", **_dtype_kw(torch_dtype), local_files_only=offline
        )
    except DiffalignError:
        raise
    except _hub_errors() as e:
        damaged = damaged_weights(vae, path, subfolder=sub) if path.exists() else None
        if damaged is not None:
            raise damaged from None
        raise ModelNotFoundError(vae, None, f"VAE: {_first_line(e)}") from None


def load_sd3_pipeline(
    model: str,
    *,
    dtype: torch.dtype | str = "float32",
    device: str = "cpu",
    vae: str | None = None,
    single_file_config: str | None = None,
) -> StableDiffusion3Pipeline:
    """A StableDiffusion3Pipeline (SD3 / SD3.5) from any `--model` form (spec E, seed 002).

    `vae` replaces the checkpoint's VAE (a folder or a single-file AutoencoderKL, as in the
    seed's `--vae models/sd3_vae.safetensors`).
    """
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    components: dict[str, Any] = {}
    if vae is not None:
        config = single_file_config
        if config is None:
            resolved = resolve_model(model, "sd3")
            config = (
                resolved.source
                if resolved.kind != "single_file"
                else _single_file_config(resolved.source, "sd3")
            )
        components["vae"] = load_vae(vae, config=config, dtype=dtype)
    return load_pipeline(
        model,
        StableDiffusion3Pipeline,
        "sd3",
        dtype=dtype,
        device=device,
        single_file_config=single_file_config,
        expect={"transformer": SD3Transformer2DModel},
        **components,
    )
