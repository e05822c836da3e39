"""`diffalign download`: fetch the real assets into the project-local `models/` (spec E, seed 001).

Layout (seed 001): `models/<name>/...`, e.g. `models/sd3/model_index.json`,
`models/Aesthetic/sac+logos+ava1-l14-linearMSE.pth`, `models/HPSv2/HPS_v2.1_compressed.pt`.
`diffalign.engine.loading` looks for presets there (and in the legacy `third_party_weights/`).

Each asset is downloaded into a temporary folder beside its target and renamed into place when
complete, so an interrupted or failed download never leaves a half-written `models/<name>/`.
A finished asset carries a `.diffalign-download.json` marker and is skipped next time.
An asset assembled from several repos (`pixart-dmd`: the DMD transformer + scheduler with
PixArt-alpha 512px's T5, tokenizer and VAE) gets its composed files (the pipeline's
`model_index.json`, `Assembly`) written in that temporary folder before the move.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from diffalign.engine.errors import DiffalignError

# where `download` writes and `engine.loading` looks (re-exported there)
MODELS_DIR_ENV = "DIFFALIGN_MODELS_DIR"


def models_dir() -> Path:
    """The project-local model folder: `$DIFFALIGN_MODELS_DIR` or `./models`."""
    return Path(os.environ.get(MODELS_DIR_ENV) or "models")


def hub_offline() -> bool:
    """True when `HF_HUB_OFFLINE` is set (read at call time, not at import)."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return False


_default_models_dir = models_dir  # `plan_downloads` / `download` have a parameter of this name

MARKER = ".diffalign-download.json"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
# the LAION improved-aesthetic-predictor MLP (ViT-L/14 head). The authors host it on GitHub only;
# this Hub mirror carries the identical file under its original name.
AESTHETIC_REPO = "camenduru/improved-aesthetic-predictor"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
# tokenizer + image processor of the OpenCLIP ViT-H/14 that PickScore and HPSv2 fine-tune
CLIP_H_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
_PROCESSOR_FILES = (
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)
# a diffusers pipeline repo: the per-component folders in fp32 safetensors; root single-file
# checkpoints, fp16 duplicates, pickles, ONNX/OpenVINO exports and the safety checker left out
_DIFFUSERS_ALLOW = ("model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors")
_DIFFUSERS_IGNORE = (
    "*.fp16.*",
    "*.bin",
    "*.ckpt",
    "*.pt",
    "*onnx*",
    "*openvino*",
    "*.msgpack",
    "text_encoders/*",
    "safety_checker/*",
)
_TRANSFORMERS_ALLOW = ("*.json", "*.txt", "*.safetensors")


@dataclass(frozen=True)
class Source:
    """Files of one Hub repo, placed under `models/<asset>/<subdir>/`.

    `weights`: globs of which at least one file must arrive for the source to count as complete;
    `fallback_patterns` are fetched only when none did (e.g. `pytorch_model.bin` for repos without
    safetensors).
    """

    repo_id: str
    allow_patterns: tuple[str, ...]
    ignore_patterns: tuple[str, ...] = ()
    subdir: str = ""
    weights: tuple[str, ...] = ("*.safetensors",)
    fallback_patterns: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Identity recorded in the marker: a changed plan re-fetches this source."""
        return f"{self.repo_id}|{','.join(self.allow_patterns)}|{self.subdir}"


@dataclass(frozen=True)
class Assembly:
    """Files composed from an asset's fetched sources before it moves into place.

    `run(new, old)` writes into `new` (the temp folder of the files just fetched), reading a
    file from `new`, else from `old` (the target, holding the sources fetched before); raises
    `DiffalignError` when what arrived cannot be assembled. `description`: the dry run's line.
    """

    description: str
    run: Callable[[Path, Path], None]


@dataclass(frozen=True)
class Asset:
    """A downloadable asset: `diffalign download --only NAME` -> `models/NAME/`."""

    name: str
    description: str
    sources: tuple[Source, ...]
    default: bool = False
    gated: bool = False
    extra: dict[str, str] = field(default_factory=dict)
    assembly: Assembly | None = None


def _diffusers(repo: str) -> tuple[Source, ...]:
    return (Source(repo, _DIFFUSERS_ALLOW, _DIFFUSERS_IGNORE),)


def _transformers(repo: str, subdir: str = "") -> Source:
    return Source(
        repo,
        _TRANSFORMERS_ALLOW,
        ("*.msgpack", "*.h5", "*onnx*"),
        subdir,
        fallback_patterns=("pytorch_model.bin",),
    )


def _processor(subdir: str = "processor") -> Source:
    return Source(CLIP_H_REPO, _PROCESSOR_FILES, subdir=subdir, weights=())


# PixArt-alpha DMD ships only its transformer and scheduler; the rest of PixArtAlphaPipeline
# (T5, tokenizer, VAE) is PixArt-alpha's (the release's demo and ReNO take them from 1024-MS)
PIXART_DMD_REPO = "PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512"
PIXART_BASE_REPO = "PixArt-alpha/PixArt-XL-2-512x512"


class PipelinePart(NamedTuple):
    """One module of a pipeline assembled from several repos: its subfolder, the repo it comes
    from, the config file naming its class, whether it holds weights (`*.safetensors`)."""

    subfolder: str
    repo_id: str
    config: str
    has_weights: bool


_PIXART_DMD_PARTS: tuple[PipelinePart, ...] = (
    PipelinePart("transformer", PIXART_DMD_REPO, "config.json", True),
    PipelinePart("scheduler", PIXART_DMD_REPO, "scheduler_config.json", False),
    PipelinePart("text_encoder", PIXART_BASE_REPO, "config.json", True),
    PipelinePart("tokenizer", PIXART_BASE_REPO, "tokenizer_config.json", False),
    PipelinePart("vae", PIXART_BASE_REPO, "config.json", True),
)


def _pipeline_sources(parts: Sequence[PipelinePart], index_from: str) -> tuple[Source, ...]:
    """One source per repo of a pipeline assembled from parts: only its subfolders (fp32
    safetensors, as `_diffusers`), and `model_index.json` from `index_from`."""
    sources = []
    for repo in dict.fromkeys(p.repo_id for p in parts):
        mine = [p.subfolder for p in parts if p.repo_id == repo]
        allow = tuple(
            f"{sub}/*.{ext}" for sub in mine for ext in ("json", "txt", "model", "safetensors")
        )
        if repo == index_from:
            allow = ("model_index.json", *allow)
        weighted = [p.subfolder for p in parts if p.repo_id == repo and p.has_weights]
        weights = tuple(f"{sub}/*.safetensors" for sub in weighted)
        # a repo without safetensors (the DMD release's transformer is one pickled `.bin`):
        # its single-file pickles, converted by the assembly (`_pickles_to_safetensors`)
        fallback = tuple(f"{sub}/{name}" for sub in weighted for name in _PICKLED_WEIGHTS)
        sources.append(
            Source(repo, allow, _DIFFUSERS_IGNORE, weights=weights, fallback_patterns=fallback)
        )
    return tuple(sources)


_PICKLED_WEIGHTS = ("diffusion_pytorch_model.bin", "pytorch_model.bin")


def _pickles_to_safetensors(new: Path, parts: Sequence[PipelinePart]) -> None:
    """A part fetched as a single pickled weights file only: re-written as safetensors (read
    with weights_only=True, the pickle removed), so the folder loads without pickles."""
    from diffalign.engine.io import load_tensors, save_tensors

    for part in parts:
        folder = new / part.subfolder
        if not part.has_weights or _has_match(folder, ("*.safetensors",)):
            continue
        for name in _PICKLED_WEIGHTS:
            pickled = folder / name
            if pickled.is_file():
                tensors, _ = load_tensors(pickled)
                if not tensors:
                    raise DiffalignError(
                        f"{part.repo_id}: {part.subfolder}/{name} holds no tensors"
                    )
                save_tensors(pickled.with_suffix(".safetensors"), tensors)
                pickled.unlink()


def _read_config(path: Path, name: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffalignError(f"{name} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise DiffalignError(f"{name} is not a JSON object")
    return data


def _class_in_config(config: dict) -> list[str] | None:
    """[library, class] a component's own config names: a diffusers `_class_name`, a
    transformers model's `architectures[0]`, a tokenizer's `tokenizer_class`."""
    if isinstance(config.get("_class_name"), str):
        return ["diffusers", config["_class_name"]]
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return ["transformers", archs[0]]
    if isinstance(config.get("tokenizer_class"), str):
        return ["transformers", config["tokenizer_class"]]
    return None


def write_pipeline_index(
    new: Path,
    old: Path,
    pipeline_class: str,
    parts: Sequence[PipelinePart],
    index_from: str,
) -> None:
    """Write `new/model_index.json` of a pipeline assembled from `parts` (an `Assembly.run`).

    `index_from`'s own `model_index.json`, when it came, is the base: its `_` keys and its
    entries for its own parts; a part from another repo takes the class its config names (the
    base repo's entry would name the base's scheduler, e.g. DPM-Solver for PixArt-alpha).
    Without that index every entry comes from the parts' configs.
    """
    from diffalign.engine.io import write_json

    def find(rel: str) -> Path | None:
        return next((root / rel for root in (new, old) if (root / rel).is_file()), None)

    found = find("model_index.json")
    base = _read_config(found, f"{index_from}'s model_index.json") if found is not None else {}
    if base and base.get("_class_name") != pipeline_class:
        raise DiffalignError(
            f"{index_from}'s model_index.json names {base.get('_class_name')!r}, not "
            f"{pipeline_class}: not the pipeline this asset assembles"
        )
    index: dict = {k: v for k, v in base.items() if k.startswith("_")}
    index["_class_name"] = pipeline_class
    for sub, repo, config_name, has_weights in parts:
        path = find(f"{sub}/{config_name}")
        if path is None:
            raise DiffalignError(f"{repo} sent no {sub}/{config_name}")
        folders = [root / sub for root in (new, old) if (root / sub).is_dir()]
        if has_weights and not any(_has_match(f, ("*.safetensors",)) for f in folders):
            raise DiffalignError(f"{repo} sent no {sub}/*.safetensors")
        config = _read_config(path, f"{repo}'s {sub}/{config_name}")
        entry = base.get(sub) if repo == index_from else None
        if not (isinstance(entry, list) and len(entry) == 2):
            entry = _class_in_config(config)
        if entry is None:
            raise DiffalignError(f"{repo}: {sub}/{config_name} names no class")
        index[sub] = entry
        if "_diffusers_version" not in index and "_diffusers_version" in config:
            index["_diffusers_version"] = config["_diffusers_version"]
    write_json(new / "model_index.json", index)


def _assemble_pixart_dmd(new: Path, old: Path) -> None:
    _pickles_to_safetensors(new, _PIXART_DMD_PARTS)
    write_pipeline_index(new, old, "PixArtAlphaPipeline", _PIXART_DMD_PARTS, PIXART_BASE_REPO)


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "sd3",
            "Stable Diffusion 3 medium (diffusers)",
            _diffusers("stabilityai/stable-diffusion-3-medium-diffusers"),
            default=True,
            gated=True,
        ),
        Asset(
            "sd3.5",
            "Stable Diffusion 3.5 large (diffusers)",
            _diffusers("stabilityai/stable-diffusion-3.5-large"),
            default=True,
            gated=True,
        ),
        Asset(
            "sd3.5-medium",
            "Stable Diffusion 3.5 medium (diffusers)",
            _diffusers("stabilityai/stable-diffusion-3.5-medium"),
            gated=True,
        ),
        Asset(
            "sdxl-turbo",
            "SDXL-Turbo one-step generator (diffusers)",
            _diffusers("stabilityai/sdxl-turbo"),
            default=True,
        ),
        Asset(
            "sd15",
            "Stable Diffusion 1.5 (diffusers, no safety checker)",
            _diffusers("stable-diffusion-v1-5/stable-diffusion-v1-5"),
            default=True,
        ),
        Asset(
            "flux-fill",
            "FLUX.1-Fill-dev (diffusers)",
            _diffusers("black-forest-labs/FLUX.1-Fill-dev"),
            gated=True,
            default=True,
        ),
        Asset(
            "dinov2-large",
            "DINOv2 ViT-L/14 (transformers)",
            (_transformers("facebook/dinov2-large"),),
            default=True,
        ),
        Asset(
            "CLIP-ViT-L-14",
            "OpenAI CLIP ViT-L/14 (transformers)",
            (_transformers("openai/clip-vit-large-patch14"),),
            default=True,
        ),
        Asset(
            "PickScore_v1",
            "PickScore v1 (CLIP-H/14) + its processor in processor/",
            (_transformers("yuvalkirstain/PickScore_v1"), _processor()),
            default=True,
        ),
        Asset(
            "ImageReward",
            "ImageReward.pt + med_config.json, BERT tokenizer in bert-base-uncased/",
            (
                Source(
                    "THUDM/ImageReward",
                    ("ImageReward.pt", "med_config.json"),
                    weights=("ImageReward.pt",),
                ),
                Source(
                    "google-bert/bert-base-uncased",
                    ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "config.json"),
                    subdir="bert-base-uncased",
                    weights=(),
                ),
            ),
            default=True,
        ),
        Asset(
            "HPSv2",
            "HPSv2 checkpoint (--hps-version) + CLIP-H/14 processor in processor/",
            (Source("xswu/HPSv2", ("{hps_file}",), weights=("{hps_file}",)), _processor()),
            default=True,
        ),
        Asset(
            "Aesthetic",
            f"LAION improved aesthetic predictor MLP ({AESTHETIC_FILE}; needs CLIP-ViT-L-14)",
            (Source(AESTHETIC_REPO, (AESTHETIC_FILE,), weights=(AESTHETIC_FILE,)),),
            default=True,
        ),
        Asset(
            "sd-turbo",
            "SD-Turbo one-step generator (SD 2.1 U-Net; diffusers)",
            _diffusers("stabilityai/sd-turbo"),
        ),
        Asset(
            "sdxl-base",
            "SDXL base 1.0 (diffusers): the base model of hyper-sdxl",
            _diffusers("stabilityai/stable-diffusion-xl-base-1.0"),
        ),
        Asset(
            "hyper-sd",
            "Hyper-SD 1-step weights: Hyper-SD15-1step-lora.safetensors (LoRA for sd15) and "
            "Hyper-SDXL-1step-Unet.safetensors (U-Net for sdxl-base)",
            (
                Source(
                    "ByteDance/Hyper-SD",
                    ("Hyper-SD15-1step-lora.safetensors", "Hyper-SDXL-1step-Unet.safetensors"),
                    weights=(
                        "Hyper-SD15-1step-lora.safetensors",
                        "Hyper-SDXL-1step-Unet.safetensors",
                    ),
                ),
            ),
        ),
        Asset(
            "flux-dev",
            "FLUX.1-dev text-to-image (diffusers; guidance-distilled, 28-50 steps)",
            _diffusers("black-forest-labs/FLUX.1-dev"),
            gated=True,
        ),
        Asset(
            "flux-schnell",
            "FLUX.1-schnell text-to-image (diffusers; 1-4 steps, no guidance)",
            _diffusers("black-forest-labs/FLUX.1-schnell"),
        ),
        Asset(
            "qwen-image",
            "Qwen-Image text-to-image (diffusers; Qwen2.5-VL text encoder, 60 MMDiT blocks)",
            _diffusers("Qwen/Qwen-Image"),
        ),
        Asset(
            "sd3.5-large-turbo",
            "SD3.5-Large-Turbo few-step generator (diffusers)",
            _diffusers("stabilityai/stable-diffusion-3.5-large-turbo"),
            gated=True,
        ),
        Asset(
            "sana-sprint",
            "SANA-Sprint 1.6B 1024px few-step generator (diffusers)",
            _diffusers("Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers"),
        ),
        Asset(
            "pixart-dmd",
            "PixArt-alpha DMD 512px one-step pipeline: the DMD transformer + scheduler, T5 text "
            f"encoder, tokenizer and VAE of {PIXART_BASE_REPO} (diffusers, one folder)",
            _pipeline_sources(_PIXART_DMD_PARTS, index_from=PIXART_BASE_REPO),
            assembly=Assembly(
                "model_index.json naming PixArtAlphaPipeline (transformer, scheduler of "
                f"{PIXART_DMD_REPO}; text_encoder, tokenizer, vae of {PIXART_BASE_REPO})",
                _assemble_pixart_dmd,
            ),
        ),
    )
}
# other names accepted by --only (the seed's / issue's spellings) -> the asset's folder name
ASSET_ALIASES: dict[str, str] = {"PickScore": "PickScore_v1"}
# what `diffalign download` fetches without --only: the assets spec E lists (SD3, SD3.5,
# SDXL-Turbo, SD 1.5, FLUX.1-Fill, DINOv2-L/14, CLIP ViT-L/14 and the four reward files)
DEFAULT_ASSETS: tuple[str, ...] = tuple(a.name for a in ASSETS.values() if a.default)


@dataclass
class PlannedAsset:
    """One asset of a plan: where it goes, what it needs and whether it is already there."""

    asset: Asset
    target: Path
    sources: list[Source]
    missing: list[Source]
    status: str  # "present" | "fetch" | "complete-missing" | "foreign"


def _expand(source: Source, hps_version: str) -> Source:
    fmt = {"hps_file": HPS_FILES[hps_version]}
    return Source(
        source.repo_id,
        tuple(p.format(**fmt) for p in source.allow_patterns),
        source.ignore_patterns,
        source.subdir,
        tuple(p.format(**fmt) for p in source.weights),
        source.fallback_patterns,
    )


def _read_marker(target: Path) -> Any:
    """The download record of `target` (JSON), or None when it has none (or it cannot be read);
    a damaged one (not UTF-8 or not JSON) is an empty record: it lists no source, so the folder
    is an incomplete download."""
    try:
        raw = (target / MARKER).read_bytes()
    except OSError:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError, json.JSONDecodeError
        return {}


def plan_downloads(
    only: Sequence[str] | None = None,
    models_dir: str | os.PathLike | None = None,
    hps_version: str = "v2.1",
) -> list[PlannedAsset]:
    """The download plan: each asset's target folder, sources and present/missing status."""
    if hps_version not in HPS_FILES:
        raise DiffalignError(
            f"--hps-version must be one of {', '.join(HPS_FILES)}, got '{hps_version}'"
        )
    if only is not None and not [n for n in only if str(n).strip()]:
        raise DiffalignError(
            f"--only names no asset (got {list(only)!r}); choose from: {', '.join(ASSETS)}"
        )
    names = list(dict.fromkeys(only)) if only else list(DEFAULT_ASSETS)
    by_lower = {n.lower(): n for n in ASSETS}
    by_lower.update({alias.lower(): real for alias, real in ASSET_ALIASES.items()})
    resolved = []
    for name in names:
        real = by_lower.get(name.lower())
        if real is None:
            raise DiffalignError(
                f"unknown asset '{name}'; choose from: {', '.join([*ASSETS, *ASSET_ALIASES])}"
            )
        resolved.append(real)
    base = Path(models_dir) if models_dir is not None else _default_models_dir()
    if base.exists() and not base.is_dir():
        raise DiffalignError(f"--dir {base} exists and is not a folder")
    plan = []
    for name in dict.fromkeys(resolved):
        asset = ASSETS[name]
        target = base / name
        sources = [_expand(s, hps_version) for s in asset.sources]
        missing, status = _folder_status(sources, target)
        plan.append(PlannedAsset(asset, target, sources, missing, status))
    return plan


def _listed_sources(marker: Any) -> set[str]:
    """The source keys a download record lists (one that is not {"sources": [...]}: none)."""
    listed = marker.get("sources") if isinstance(marker, dict) else None
    return {k for k in listed if isinstance(k, str)} if isinstance(listed, list) else set()


def _folder_status(sources: list[Source], target: Path) -> tuple[list[Source], str]:
    """(missing sources, status) of an asset's folder, from its download record (the marker)."""
    marker = _read_marker(target)
    if marker is not None:
        done = _listed_sources(marker)
        missing = [s for s in sources if s.key not in done]
        return missing, "present" if not missing else "complete-missing"
    if target.is_dir() and any(target.iterdir()):
        return [], "foreign"
    return list(sources), "fetch"


def asset_of_repo(repo_id: str) -> Asset | None:
    """The asset that is a copy of Hub repo `repo_id`: its first source is that repo, fetched
    into the folder's root. A repo that only lends some files to an asset (PixArt-alpha's T5
    and VAE in `pixart-dmd`, the CLIP-H processor in `PickScore_v1/processor/`) has none."""
    for asset in ASSETS.values():
        own = asset.sources[0]
        if own.repo_id == repo_id and not own.subdir:
            return asset
    return None


def folder_status(asset: Asset, target: str | os.PathLike, hps_version: str = "v2.1") -> str:
    """What `diffalign download` finds in `target` for `asset`, the status of its plan:
    "present" (its record lists every source: complete), "complete-missing" (a record without
    some sources: `download --only NAME` fetches them), "foreign" (not written by `download`,
    which leaves it as is) or "fetch" (absent or empty)."""
    sources = [_expand(s, hps_version) for s in asset.sources]
    return _folder_status(sources, Path(target))[1]


def _has_match(folder: Path, globs: Sequence[str]) -> bool:
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return any(
        fnmatch.fnmatch(f, g) or fnmatch.fnmatch(Path(f).name, g) for f in files for g in globs
    )


def _fetch_source(source: Source, dest: Path, token: str | None) -> None:
    """Download one source into `dest` (a temp folder) with huggingface_hub."""
    from huggingface_hub import snapshot_download

    dest.mkdir(parents=True, exist_ok=True)
    kw = {"local_dir": str(dest), "token": token}
    snapshot_download(
        source.repo_id,
        allow_patterns=list(source.allow_patterns),
        ignore_patterns=list(source.ignore_patterns) or None,
        **kw,
    )
    if source.weights and not _has_match(dest, source.weights):
        if source.fallback_patterns:
            snapshot_download(source.repo_id, allow_patterns=list(source.fallback_patterns), **kw)
        if not _has_match(dest, (*source.weights, *source.fallback_patterns)):
            raise DiffalignError(
                f"{source.repo_id} has no files matching {', '.join(source.weights)}"
            )
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # huggingface_hub's local_dir metadata


class _FetchError(Exception):
    """A source failed: carries the source and the original exception."""

    def __init__(self, source: Source, cause: BaseException):
        super().__init__(str(cause))
        self.source, self.cause = source, cause


def _failure_line(name: str, source: Source, exc: BaseException, gated: bool) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    first = text.splitlines()[0] if text else ""
    if len(first) > 200:
        first = first[:197] + "..."
    kind = type(exc).__name__
    repo = source.repo_id
    if hub_offline():
        return f"{name}: cannot download {repo}: HF_HUB_OFFLINE is set (unset it to download)"
    hint = ""
    if kind == "GatedRepoError" or (gated and ("401" in text or "403" in text)):
        hint = f" (accept the licence at https://huggingface.co/{repo}, then pass --token or run `hf auth login`)"
    return f"{name}: download of {repo} failed: {kind}: {first}{hint}"


def _install(planned: PlannedAsset, token: str | None) -> None:
    """Fetch the missing sources into a temp folder beside the target, then move them in."""
    target = planned.target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".download", dir=target.parent))
    try:
        for source in planned.missing:
            try:
                _fetch_source(source, tmp / source.subdir if source.subdir else tmp, token)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - reported per asset by the caller
                raise _FetchError(source, e) from e
        if planned.asset.assembly is not None:
            planned.asset.assembly.run(tmp, target)
        marker = {
            "asset": planned.asset.name,
            "sources": sorted(
                {*_listed_sources(_read_marker(target)), *(s.key for s in planned.missing)}
            ),
            "repos": sorted({s.repo_id for s in planned.sources}),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if not target.exists() or not any(target.iterdir()):
            if target.exists():
                target.rmdir()
            os.replace(tmp, target)
            return
        # completing an existing asset (e.g. another HPS version): move file by file, marker last
        for path in sorted(tmp.rglob("*")):
            if path.is_file() and path.name != MARKER:
                dest = target / path.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, dest)
        os.replace(tmp / MARKER, target / MARKER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_assets(
    only: Sequence[str] | None = None,
    models_dir: str | os.PathLike | None = None,
    *,
    hps_version: str = "v2.1",
    token: str | None = None,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
    err: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Download the assets (`only` or the defaults); returns name -> status.

    Statuses: "present" (skipped), "foreign" (folder exists, not ours: left untouched),
    "fetched", "planned" (dry run) or "failed". A failure is reported on one line and the other
    assets are still attempted.
    """
    import sys

    from diffalign.engine.io import undo_new_folders

    err = err or (lambda line: print(line, file=sys.stderr))
    plan = plan_downloads(only, models_dir, hps_version)
    result: dict[str, str] = {}
    for item in plan:
        name = item.asset.name
        if item.status == "present":
            log(f"{name}: already complete in {item.target}, skipped")
            result[name] = "present"
            continue
        if item.status == "foreign":
            log(
                f"{name}: {item.target} exists but was not written by `diffalign download`; left as is"
            )
            result[name] = "foreign"
            continue
        if dry_run:
            for s in item.missing:
                dest = item.target / s.subdir if s.subdir else item.target
                log(f"{name}: would fetch {s.repo_id} [{', '.join(s.allow_patterns)}] -> {dest}")
            if item.asset.assembly is not None:
                log(f"{name}: would write {item.asset.assembly.description}")
            result[name] = "planned"
            continue
        log(f"{name}: fetching into {item.target} ...")
        try:
            with undo_new_folders(item.target.parent):  # a failed fetch leaves no empty --dir
                _install(item, token)
        except _FetchError as e:  # one line, then the next asset
            err(_failure_line(name, e.source, e.cause, item.asset.gated))
            result[name] = "failed"
            continue
        except DiffalignError as e:  # its assembly refused what arrived (nothing moved in)
            err(f"{name}: {e}")
            result[name] = "failed"
            continue
        log(f"{name}: done")
        result[name] = "fetched"
    return result


def describe_assets() -> str:
    """`name (repo): description` for every asset, `*` marking the defaults (for --help)."""
    lines = []
    for a in ASSETS.values():
        star = "*" if a.default else " "
        aliases = [k for k, v in ASSET_ALIASES.items() if v == a.name]
        also = f" (also --only {', '.join(aliases)})" if aliases else ""
        lines.append(f"{star} {a.name}: {a.description} [{a.sources[0].repo_id}]{also}")
    return "\n".join(lines)
