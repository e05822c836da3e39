"""Where reward checkpoints live: `models/<download name>/...` (seed 001 layout, `diffalign
download`), the legacy `third_party_weights/`, or an explicit path; a missing file is one line
naming it and the `diffalign download --only NAME` that fetches it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffalign.engine.errors import DiffalignError
from diffalign.engine.loading import (
    LEGACY_MODELS_DIR,
    downloaded_copy,
    hub_offline,
    models_dir,
    resolve_hub_id,
    unused_copy_hint,
)


def quiet_hf_progress():
    """No per-file "Loading weights" bars from transformers while a reward model loads."""
    from diffalign.engine.tiny import _quiet_saving

    return _quiet_saving()


def asset_path(download_name: str, rel: str = "") -> Path:
    """`models/<download_name>/<rel>` if it exists there or in `third_party_weights/`.

    When neither exists the `models/` path is returned (for the error message).
    """
    candidates = [base / download_name / rel for base in (models_dir(), Path(LEGACY_MODELS_DIR))]
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]


def missing(
    what: str, path: str | Path, download_name: str, option: str, download_extra: str = ""
) -> DiffalignError:
    """The one-line error for a reward file that is not there (`download_extra`: options the
    download needs, e.g. `--hps-version v2.0`)."""
    fetch = f"{download_name} {download_extra}".strip()
    return DiffalignError(
        f"{what} not found: {path}; fetch it with `diffalign download --only {fetch}` "
        f"or pass {option}"
    )


def resolve_file(
    value: str | Path | None,
    default_rel: str,
    what: str,
    download_name: str,
    option: str,
    download_extra: str = "",
) -> Path:
    """An explicit file path, or the asset's default file; must exist."""
    path = Path(value).expanduser() if value else asset_path(download_name, default_rel)
    if not path.is_file():
        if path.is_dir() and value:
            raise DiffalignError(f"{what}: {path} is a folder; pass the file itself with {option}")
        raise missing(what, path, download_name, option, download_extra)
    return path


def resolve_folder(
    value: str | Path | None,
    default_rel: str,
    what: str,
    download_name: str,
    option: str,
    marker: str = "config.json",
) -> str:
    """A local folder holding `marker`, a Hub id (offline-aware), or the asset's default folder."""
    if value:
        text = str(value).strip()
        path = Path(text).expanduser()
        if "/" not in text and not path.exists() and (asset_path(text) / marker).is_file():
            path = asset_path(text)  # a download name: models/<name>/
        if path.is_dir():
            return _marked_folder(path, marker, what)
        looks_like_path = text.startswith((".", "/", "~")) or text.count("/") != 1
        if looks_like_path or path.parts[0] in {models_dir().name, "models", LEGACY_MODELS_DIR}:
            raise missing(what, path, download_name, option)
        resolved = resolve_hub_id(text)  # its complete `diffalign download` folder, if any
        if resolved.kind == "folder":
            return _marked_folder(Path(resolved.source), marker, what)
        if hub_offline():
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(text, marker)
            if not isinstance(hit, str):
                note, fix = unused_copy_hint(downloaded_copy(text), option)
                fix = fix or (
                    f"fetch it with `diffalign download --only {download_name}` or pass a "
                    f"local folder with {option}"
                )
                raise DiffalignError(
                    f"{what} '{text}' is not a local folder and not in the Hugging Face cache "
                    f"(HF_HUB_OFFLINE=1){note}; {fix}"
                )
        return text  # a Hub id: from_pretrained fetches or reads the cache
    path = asset_path(download_name, default_rel)
    if not (path / marker).is_file():
        raise missing(what, path / marker, download_name, option)
    return str(path)


def _marked_folder(folder: Path, marker: str, what: str) -> str:
    """`folder` as a string when it holds `marker`, else the one-line refusal."""
    if not (folder / marker).is_file():
        raise DiffalignError(f"{what}: {folder} has no {marker} (not a {what} folder)")
    return str(folder)


# what a tokenizer is built from: the fast tokenizer's file, or the vocabulary files of its kind
TOKENIZER_VOCAB_FILES = {"bpe": ("vocab.json", "merges.txt"), "wordpiece": ("vocab.txt",)}


def check_tokenizer_files(folder: str | Path, kind: str, what: str) -> None:
    """Refuse a local tokenizer folder without its vocabulary (`kind`: "bpe" for CLIP, "wordpiece"
    for BERT): transformers builds an empty tokenizer from it (every CLIP prompt becomes the same
    two tokens, so the score ignores the prompt) or one that maps every word to [UNK]."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return
    vocab = TOKENIZER_VOCAB_FILES[kind]
    lacking = [name for name in vocab if not (folder / name).is_file()]
    if lacking:
        raise DiffalignError(
            f"{what} {folder}: no tokenizer vocabulary, it needs tokenizer.json or "
            f"{' + '.join(vocab)}; missing: {', '.join(['tokenizer.json', *lacking])}"
        )


def read_json_config(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON config file as a dict; unreadable or invalid is one line."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffalignError(f"{what} {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise DiffalignError(f"{what} {path}: expected a JSON object")
    return data


def state_dict_of(obj: Any, path: Path, what: str) -> dict[str, Any]:
    """The tensors of a loaded checkpoint: the object itself, or its `state_dict` / `model`
    entry; `module.` prefixes (DataParallel) removed."""
    import torch

    sd = obj
    if isinstance(sd, dict):
        for key in ("state_dict", "model"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DiffalignError(f"{what} {path}: no tensors found (not a {what} checkpoint)")
    return {
        (k[len("module.") :] if k.startswith("module.") else k): v
        for k, v in sd.items()
        if isinstance(v, torch.Tensor)
    }
