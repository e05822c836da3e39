"""What made a job's output, recorded with it and compared on every re-run and resume (spec E:
Safety).

A job that can be re-run or resumed (a dataset build, a preprocessing store, a training run, an
inference folder) records its *identity*: a JSON dict of every setting that changes the bytes
it writes, and for each model it used :func:`model_identity`. A re-run computes the identity
again and :func:`check_identity` refuses any difference with one line that names the differing
keys and says that ``--overwrite`` starts over (or another ``--output-dir`` keeps both). A
record binds only once output was written under it (``written``): a run that failed before its
first image, record or sample leaves nothing to protect, so the corrected rerun replaces the
record instead of being refused. A job
leaves out, by name, the settings that cannot change its bytes (progress bars, worker counts,
output paths, how often it logs or checkpoints, a batch size where results do not depend on
the batching); a batch size stays in where they do.

A dataset's identity is its content as the job reads it (:func:`samples_sha256`), not the path
it was given by (a resolved path may be recorded beside it for display, as a ``free`` key).

A model's identity:

- a local folder or file: ``path`` (resolved: relative vs absolute and symlinks compare
  equal), ``config`` (sha256 over its config files: ``*.json``, tokenizer texts, ...) and
  ``weights`` (sha256 over the content digests of its weight files), restricted to the
  sub-folders the job loads (``vae/`` for a VAE step, ...);
- a Hub id: ``hub_id`` and ``revision``, the commit of the snapshot in the local Hugging Face
  cache (a snapshot's files are fixed by its commit, so nothing is hashed); None when the
  model is not cached yet (it downloads during the run), and an unknown revision on either
  side is not compared.

Why weight files are hashed whole, with a cache: a digest of size + mtime + a few blocks is
cheap but calls a copied checkpoint (new mtime) another model, and misses a fine-tune that keeps
every shape (same size, same safetensors header) unless the changed bytes happen to lie in a
sampled block. The full sha256 detects every change and lets copies compare equal; it costs one
read of the file (about 1-2 s per GB), once: the digest is cached per file in
``$DIFFALIGN_HASH_CACHE`` (default ``~/.cache/diffalign/weight-sha256.json``) keyed by
(resolved path, size, mtime_ns), so later runs on the same checkpoint cost a ``stat``. A
cache that cannot be read or written only means hashing again. Data files a job identifies by
their bytes (``textstream calibrate --xt-source image``'s images) go through the same cache
(:func:`cached_files_sha256`): a re-run reads only the files whose size or mtime changed, and
an edit (which moves the mtime) is read and compared.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from diffalign.engine.errors import DiffalignError

HASH_CACHE_ENV = "DIFFALIGN_HASH_CACHE"
CONFIG_SUFFIXES = (".json", ".txt", ".yaml", ".yml", ".model", ".tiktoken", ".vocab")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".onnx")
OVERWRITE_HINT = (
    "rerun with the settings it was made with, pass --overwrite to start over, or choose "
    "another --output-dir"
)
_MAX_NAMED = 6


def path_key(path: str | os.PathLike) -> str:
    """A path as compared between runs: absolute, user and symlinks resolved."""
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def _cache_file() -> Path:
    env = os.environ.get(HASH_CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffalign" / "weight-sha256.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def weight_file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a weight file's bytes, cached by (resolved path, size, mtime_ns) (module doc)."""
    return cached_files_sha256([path])[0]


def cached_files_sha256(paths: Sequence[str | os.PathLike]) -> list[str]:
    """sha256 of each file's bytes through the digest cache (module doc): one read of the cache
    and a `stat` per file; only the files whose (resolved path, size, mtime_ns) it lacks are
    read, and the cache is written once, with their digests."""
    keys = []
    for path in paths:
        real = path_key(path)
        st = os.stat(real)
        keys.append((real, f"{real}|{st.st_size}|{st.st_mtime_ns}"))
    cache_path = _cache_file()
    cache = _read_cache(cache_path)
    found = {key: cache[key] for _, key in keys if isinstance(cache.get(key), str)}
    new = {}
    for real, key in keys:
        if key not in found:
            found[key] = new[key] = file_sha256(real)
    if new:
        cache = _read_cache(cache_path)  # another process may have added entries meanwhile
        hashed = tuple(f"{real}|" for real, key in keys if key in new)
        cache = {k: v for k, v in cache.items() if not k.startswith(hashed)}  # older versions
        cache.update(new)
        try:
            from diffalign.engine.io import write_json

            write_json(cache_path, cache, indent=0)
        except (OSError, DiffalignError):
            pass  # an unwritable cache: the next run hashes again
    return [found[key] for _, key in keys]


def _model_files(root: Path, subfolders: Sequence[str] | None) -> list[Path]:
    """The files of a model folder a job reads: every file, or those of `subfolders` (when the
    folder has them: a folder that is itself the component is taken whole)."""
    tops = [root]
    if subfolders:
        present = [root / s for s in subfolders if (root / s).is_dir()]
        if present:
            tops = present
    files: list[Path] = []
    for top in tops:
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return files


def _digest(entries: Iterable[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, value in entries:
        h.update(f"{name}\0{value}\n".encode())
    return h.hexdigest()


def samples_sha256(samples: Iterable[Any]) -> str:
    """sha256 of a job's input samples in order, each as the job reads it (JSON: a prompt, a
    [prompt, image sha256] pair, ...): a dataset's identity by content, the same whatever path,
    spelling or name it was given by, and another when a sample's text or bytes change."""
    return _digest((str(i), json.dumps(s, sort_keys=True)) for i, s in enumerate(samples))


def hub_revision(repo_id: str) -> str | None:
    """The commit of `repo_id`'s snapshot in the local Hugging Face cache (None if not cached)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        for name in ("model_index.json", "config.json"):
            hit = try_to_load_from_cache(repo_id, name)
            if isinstance(hit, str):
                return Path(hit).parent.name
    except Exception:  # noqa: BLE001 - an unreadable cache is "not cached"
        return None
    return None


def model_identity(
    model: str | os.PathLike | None, subfolders: Sequence[str] | None = None
) -> dict | None:
    """What identifies `model` (module doc): a local folder or file by resolved path, config
    hash and weights hash; a Hub id (or a preset not downloaded) by id and cached revision; a
    name that is neither is the loader's one-line "not found" error. `subfolders`: only these parts of a pipeline folder (e.g. ``("vae",)``)."""
    if model is None:
        return None
    text = os.fspath(model)
    path = Path(text).expanduser()
    if not path.exists():
        from diffalign.engine.loading import resolve_model

        resolved = resolve_model(text)  # a missing path: the loader's "not found" line
        if resolved.kind != "hub":
            return model_identity(resolved.source, subfolders)
        return {"hub_id": resolved.source, "revision": hub_revision(resolved.source)}
    root = Path(path_key(path))
    files = [root] if root.is_file() else _model_files(root, subfolders)
    base = root.parent if root.is_file() else root
    config = [
        (f.relative_to(base).as_posix(), file_sha256(f))
        for f in files
        if f.suffix.lower() in CONFIG_SUFFIXES
    ]
    weight_files = [f for f in files if f.suffix.lower() in WEIGHT_SUFFIXES]
    names = [f.relative_to(base).as_posix() for f in weight_files]
    weights = list(zip(names, cached_files_sha256(weight_files)))  # one cache read and write
    out: dict[str, Any] = {"path": str(root), "config": _digest(config) if config else None}
    out["weights"] = _digest(weights) if weights else None
    if subfolders:
        out["parts"] = list(subfolders)
    return out


# ---------------------------------------------------------------------------------------------
# comparing


def _plain(obj: Any) -> Any:
    """JSON-normalised (tuples are lists, paths strings), so a record read back compares equal."""
    return json.loads(json.dumps(obj, default=str))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _is_free(key: str, free: Iterable[str]) -> bool:
    return any(key == f or key.startswith(f"{f}.") for f in free)


def identity_differences(
    old: Mapping[str, Any], new: Mapping[str, Any], free: Iterable[str] = ()
) -> list[str]:
    """The dotted keys (``models.vae.weights``) whose values differ between two identities, in
    order; a key missing on one side differs; keys in `free` (or under them) are skipped."""
    free = list(free)
    a, b = _flatten(_plain(dict(old))), _flatten(_plain(dict(new)))
    keys = list(a) + [k for k in b if k not in a]
    return [
        k
        for k in keys
        if not _is_free(k, free)
        and a.get(k, _MISSING) != b.get(k, _MISSING)
        and not _unknown_revision(k, a.get(k), b.get(k))
    ]


def _unknown_revision(key: str, a: Any, b: Any) -> bool:
    """A Hub revision not known on one side (the model was not cached yet when that job
    started; it downloads during the run) is not compared."""
    return key.rsplit(".", 1)[-1] == "revision" and (a is None or b is None)


_MISSING = object()


def binding(old: Mapping[str, Any] | None, written: bool) -> Mapping[str, Any] | None:
    """The recorded identity a re-run is held to: `old`, or None when nothing was written
    under it (module doc: a run that failed before its first output binds nothing)."""
    return old if written else None


def check_identity(
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    subject: str,
    *,
    free: Iterable[str] = (),
    hint: str = OVERWRITE_HINT,
    written: bool = True,
) -> None:
    """Refuse (one DiffalignError line) when the recorded identity `old` differs from `new`:
    "<subject> made with other settings (<keys>); <hint>". `old` None, or `written` False
    (no output was written under it: `binding`): nothing to hold the run to."""
    old = binding(old, written)
    if old is None:
        return
    diff = identity_differences(old, new, free)
    if diff:
        named = ", ".join(diff[:_MAX_NAMED])
        if len(diff) > _MAX_NAMED:
            named += f" and {len(diff) - _MAX_NAMED} more"
        raise DiffalignError(f"{subject} made with other settings ({named}); {hint}")


def same_identity(old: Mapping[str, Any] | None, new: Mapping[str, Any], free=()) -> bool:
    """True when `old` is recorded and equals `new` outside `free`."""
    return old is not None and not identity_differences(old, new, free)
