"""Prompt sets: plain text, jsonl / pairs.jsonl, COCO captions, GenEval metadata, DPG-Bench
prompt folders, by path or by name under a data folder (spec E: Data; formats: FORMATS.md);
T2I-CompBench `<category>_val.txt` files (`load_compbench_prompts`).

`load_prompts("coco,geneval", datadir="/data")` returns one flat list of `PromptRecord`s, the
sources concatenated in the order given. Every problem with the input (unknown name, missing
file, malformed line, empty set) is a one-line `DiffalignError`.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import TEXT_ENCODING, iter_jsonl

DATASET_NAMES = ("coco", "coco2014", "geneval", "dpg")


@dataclass
class PromptRecord:
    """One prompt; `image` is the path of a paired image when the source has one.

    `meta` carries what the source knows beyond the prompt: the full GenEval metadata line,
    COCO `image_id` / `caption_id` / `file_name`, the jsonl record, and always `source`.
    """

    prompt: str
    id: str
    image: str | None = None
    meta: dict | None = None


def load_prompts(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    datadir: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    prompt_field: str = "prompt",
    image_field: str = "image",
    split: str = "val2017",
) -> list[PromptRecord]:
    """Load one or more prompt sets and concatenate them in order; `limit` keeps the first n.

    Each item of `spec` (a list, or one string with comma-separated items) is one of:
    a path to a `.txt` (one prompt a line), a `.jsonl` (`prompt_field`, optional `image_field`
    relative to the file's folder; GenEval metadata is recognised by its `include` and `tag`
    keys),
    a COCO captions `.json`, a DPG-Bench folder (`prompts/` or its parent), a folder holding
    `evaluation_metadata.jsonl` or `annotations/captions_<split>.json`; `txt:PATH`; or a name
    resolved under `datadir`: `coco`, `coco2014`, `geneval`, `dpg`.
    """
    items = _split_spec(spec)
    if not items:
        raise DiffalignError("no prompt set given")
    if limit is not None and limit < 1:
        raise DiffalignError(f"limit must be at least 1 (got {limit})")
    records: list[PromptRecord] = []
    for item in items:
        part = _load_one(item, datadir, prompt_field, image_field, split)
        if not part:
            raise DiffalignError(f"prompt set '{item}' is empty")
        records.extend(part)
        if limit is not None and len(records) >= limit:
            break
    return records[:limit] if limit is not None else records


def prompt_set_paths(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    datadir: str | os.PathLike | None = None,
    *,
    split: str = "val2017",
) -> list[str]:
    """The file or folder each item of `spec` reads (`load_prompts`), resolved (absolute,
    symlinks followed): what a job shows as its dataset's place, not its identity."""
    from diffalign.engine.identity import path_key

    out = []
    for item in _split_spec(spec):
        if item.startswith("txt:"):
            item = item[4:]
        elif item in DATASET_NAMES:
            item = str(_resolve_name(item, datadir, split))
        out.append(path_key(item))
    return out


def load_geneval_metadata(path: str | os.PathLike) -> list[dict]:
    """Read GenEval's `evaluation_metadata.jsonl` (FORMATS.md), one validated dict per line.

    Each line must be a JSON object with a non-empty string `prompt`, a string `tag` and a list
    `include`; the dict is returned unchanged (it is written back verbatim as the output's
    `metadata.jsonl`).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "evaluation_metadata.jsonl"
    if not path.is_file():
        raise DiffalignError(f"GenEval metadata file not found: {path}")
    out = []
    lines = iter_jsonl(path)
    try:
        first = next(lines, None)
    except DiffalignError as e:  # a prompt list (.txt) given for the metadata: say what it needs
        raise DiffalignError(
            f"{e}: not GenEval's evaluation_metadata.jsonl (a JSON object a line with 'prompt',"
            " 'tag' and 'include'); a plain prompt list goes to `textstream generate --prompts`"
        ) from None
    for lineno, obj in itertools.chain([first] if first else [], lines):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise DiffalignError(f"{where}: expected a JSON object, found {type(obj).__name__}")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DiffalignError(f"{where}: GenEval line has no 'prompt' string")
        if not isinstance(obj.get("tag"), str):
            raise DiffalignError(f"{where}: GenEval line has no 'tag' string")
        include = obj.get("include")
        if not isinstance(include, list) or not all(
            isinstance(x, dict) and "class" in x for x in include
        ):
            raise DiffalignError(f"{where}: GenEval 'include' must be a list of {{'class': ...}}")
        out.append(obj)
    if not out:
        raise DiffalignError(f"GenEval metadata file is empty: {path}")
    return out


def load_dpg_prompts(folder: str | os.PathLike) -> list[tuple[str, str]]:
    """Read DPG-Bench prompts: `(id, prompt)` from `prompts/<id>.txt`, sorted by id.

    `folder` is the `prompts/` folder itself or its parent. Ids must not contain dots, since
    the output image is `<id>.png` with no other dot in the name (FORMATS.md).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DiffalignError(f"DPG-Bench prompt folder not found: {folder}")
    if (folder / "prompts").is_dir():
        folder = folder / "prompts"
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".txt")
    if not files:
        raise DiffalignError(f"no DPG-Bench prompt files (<id>.txt) in {folder}")
    out = []
    for p in files:
        pid = p.stem
        if "." in pid or not pid:
            raise DiffalignError(f"{p}: DPG-Bench prompt id must not contain a dot")
        try:
            text = p.read_text(encoding=TEXT_ENCODING).strip()
        except UnicodeDecodeError:
            raise DiffalignError(f"{p}: not UTF-8 text") from None
        if not text:
            raise DiffalignError(f"{p}: empty prompt file")
        out.append((pid, text))
    return sorted(out, key=lambda t: t[0])


COMPBENCH_SUFFIX = "_val.txt"
COMPBENCH_NAME_TAIL = "_000000.png"  # the shortest tail `<prompt>` gets in an image name
_NAME_MAX_BYTES = 255  # a file name's limit on the usual file systems


def load_compbench_prompts(path: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """T2I-CompBench prompts (FORMATS.md): `(category, prompts)` of a `<category>_val.txt`
    file, or of every `*_val.txt` in a folder (or in its `dataset/` subfolder), by category.

    Lines are read as their `GORS_finetune/inference_eval.py` reads them (the text before a
    tab), stripped; blank lines are skipped. Their images are named `<prompt>_<counter>.png`
    and their evaluators read the prompt back up to the first `_`, so a prompt with `_`, `/`,
    a control character, or too long for a file name is a one-line error naming its line.
    """
    path = Path(path)
    if path.is_dir():
        folder = path
        files = sorted(folder.glob(f"*{COMPBENCH_SUFFIX}"))
        if not files and (folder / "dataset").is_dir():
            folder = folder / "dataset"
            files = sorted(folder.glob(f"*{COMPBENCH_SUFFIX}"))
        files = [f for f in files if f.is_file()]
        if not files:
            raise DiffalignError(f"no T2I-CompBench prompt files (<category>_val.txt) in {path}")
    elif path.is_file():
        files = [path]
    else:
        raise DiffalignError(f"T2I-CompBench prompt file not found: {path}")
    return [(compbench_category(f), _compbench_lines(f)) for f in files]


def compbench_category(path: str | os.PathLike) -> str:
    """`color` for `color_val.txt`; the file's stem for another name."""
    name = Path(path).name
    if name.endswith(COMPBENCH_SUFFIX) and len(name) > len(COMPBENCH_SUFFIX):
        return name[: -len(COMPBENCH_SUFFIX)]
    return Path(path).stem


def _compbench_lines(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise DiffalignError(f"{path}: not UTF-8 text") from None
    prompts = []
    for lineno, line in enumerate(lines, 1):
        prompt = line.split("\t")[0].strip()
        if not prompt:
            continue
        problem = _compbench_name_problem(prompt)
        if problem:
            raise DiffalignError(
                f"{path}:{lineno}: prompt {prompt[:60]!r} {problem}, and T2I-CompBench names "
                "each image <prompt>_<counter>.png"
            )
        prompts.append(prompt)
    if not prompts:
        raise DiffalignError(f"T2I-CompBench prompt file has no prompts: {path}")
    return prompts


def _compbench_name_problem(prompt: str) -> str | None:
    """Why `prompt` cannot start a T2I-CompBench image name; None when it can."""
    if "_" in prompt:
        return "holds '_' (the evaluators read the prompt up to the first '_')"
    if "/" in prompt:
        return "holds '/', which no file name can"
    if any(ord(c) < 32 or ord(c) == 127 for c in prompt):
        return "holds a control character"
    size = len((prompt + COMPBENCH_NAME_TAIL).encode("utf-8"))
    if size > _NAME_MAX_BYTES:
        return f"is too long for a file name ({size} bytes with {COMPBENCH_NAME_TAIL})"
    return None


# ------------------------------------------------------------------------------------------------
# resolution of one spec item


def _split_spec(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(spec, str | os.PathLike):
        text = str(spec)
        # a path that really exists is one item even if it contains a comma
        if Path(text).exists():
            return [text]
        return [s.strip() for s in text.split(",") if s.strip()]
    out: list[str] = []
    for s in spec:
        out.extend(_split_spec(s))
    return out


def _load_one(
    item: str, datadir: str | os.PathLike | None, prompt_field: str, image_field: str, split: str
) -> list[PromptRecord]:
    if item.startswith("txt:"):
        return _load_txt(Path(item[4:]))
    if item in DATASET_NAMES:
        return _load_path(_resolve_name(item, datadir, split), prompt_field, image_field, split)
    path = Path(item).expanduser()
    if path.exists():
        return _load_path(path, prompt_field, image_field, split)
    if any(c in item for c in "/\\.:"):
        raise DiffalignError(f"prompt file not found: {item}")
    raise DiffalignError(
        f"unknown dataset '{item}' (expected a path or one of {', '.join(DATASET_NAMES)}, txt:PATH)"
    )


def _resolve_name(name: str, datadir: str | os.PathLike | None, split: str) -> Path:
    if datadir is None:
        raise DiffalignError(f"dataset '{name}' is looked up under --datadir; none was given")
    root = Path(datadir).expanduser()
    if name in ("coco", "coco2014"):
        sp = split.replace("2017", "2014") if name == "coco2014" else split
        fname = f"captions_{sp}.json"
        cands = [root / name / "annotations" / fname, root / "annotations" / fname]
        if name == "coco2014":
            cands.insert(1, root / "coco" / "annotations" / fname)
    elif name == "geneval":
        cands = [root / "geneval" / "evaluation_metadata.jsonl", root / "evaluation_metadata.jsonl"]
    else:  # dpg
        cands = [root / "dpg_bench" / "prompts", root / "dpg" / "prompts", root / "prompts"]
    for c in cands:
        if c.exists():
            return c
    raise DiffalignError(
        f"dataset '{name}' not found under {root} (looked for {', '.join(str(c) for c in cands)})"
    )


def _load_path(path: Path, prompt_field: str, image_field: str, split: str) -> list[PromptRecord]:
    if path.is_dir():
        if (path / "evaluation_metadata.jsonl").is_file():
            return _load_geneval(path / "evaluation_metadata.jsonl")
        ann = coco_captions_file(path, split)
        if ann is not None:
            return _load_coco(ann)
        return [
            PromptRecord(prompt=text, id=pid, meta={"source": "dpg"})
            for pid, text in load_dpg_prompts(path)
        ]
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _load_txt(path)
    if suffix == ".jsonl":
        first = _first_jsonl_object(path)
        # GenEval lines carry both (FORMATS.md); a pairs.jsonl may have a "tag" of its own
        if isinstance(first, dict) and "include" in first and "tag" in first:
            return _load_geneval(path)
        return _load_jsonl(path, prompt_field, image_field)
    if suffix == ".json":
        return _load_coco(path)
    raise DiffalignError(
        f"{path}: unknown prompt file type (expected .txt, .jsonl, COCO .json or a folder)"
    )


def coco_captions_file(folder: Path, split: str = "val2017") -> Path | None:
    """`folder/annotations/captions_<split>.json` of a COCO root, else the 2014 file of the same
    split (FORMATS.md: `captions_{train,val}{2014,2017}.json`); None when neither exists."""
    for sp in dict.fromkeys((split, split.replace("2017", "2014"))):
        ann = Path(folder) / "annotations" / f"captions_{sp}.json"
        if ann.is_file():
            return ann
    return None


def _load_txt(path: Path) -> list[PromptRecord]:
    if not path.is_file():
        raise DiffalignError(f"prompt file not found: {path}")
    try:
        lines = path.read_text(encoding=TEXT_ENCODING).splitlines()
    except UnicodeDecodeError:
        raise DiffalignError(f"{path}: not UTF-8 text") from None
    prompts = [s.strip() for s in lines if s.strip()]
    return [
        PromptRecord(prompt=p, id=f"{i:05d}", meta={"source": str(path)})
        for i, p in enumerate(prompts)
    ]


def _load_jsonl(path: Path, prompt_field: str, image_field: str) -> list[PromptRecord]:
    out = []
    for n, (lineno, obj) in enumerate(iter_jsonl(path)):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise DiffalignError(f"{where}: expected a JSON object, found {type(obj).__name__}")
        prompt = obj.get(prompt_field)
        if not isinstance(prompt, str) or not prompt.strip():
            raise DiffalignError(f"{where}: no '{prompt_field}' string")
        image = obj.get(image_field)
        if image is not None:
            if not isinstance(image, str):
                raise DiffalignError(f"{where}: '{image_field}' must be a path string")
            image = str(path.parent / image)
        rid = obj.get("id", f"{n:05d}")
        meta = dict(obj)
        meta["source"] = str(path)
        out.append(PromptRecord(prompt=prompt.strip(), id=str(rid), image=image, meta=meta))
    return out


def _load_geneval(path: Path) -> list[PromptRecord]:
    return [
        PromptRecord(prompt=obj["prompt"].strip(), id=f"{i:05d}", meta=obj)
        for i, obj in enumerate(load_geneval_metadata(path))
    ]


def _load_coco(path: Path) -> list[PromptRecord]:
    """COCO captions json: one record per caption, in file order (FORMATS.md: COCO captions)."""
    if not path.is_file():
        raise DiffalignError(f"COCO captions file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding=TEXT_ENCODING))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffalignError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DiffalignError(f"{path}: not a COCO captions file (no 'annotations' list)")
    files: dict[Any, str] = {}
    for img in data.get("images") or []:
        if isinstance(img, dict) and "id" in img and "file_name" in img:
            files[img["id"]] = img["file_name"]
    image_dir = _coco_image_dir(path)
    out = []
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
            raise DiffalignError(f"{path}: annotation #{k} has no 'caption' string")
        caption = ann["caption"].strip()
        if not caption:
            continue
        image_id = ann.get("image_id")
        file_name = files.get(image_id)
        image = str(image_dir / file_name) if image_dir is not None and file_name else None
        meta = {
            "source": str(path),
            "image_id": image_id,
            "caption_id": ann.get("id"),
            "file_name": file_name,
        }
        out.append(PromptRecord(prompt=caption, id=str(ann.get("id", k)), image=image, meta=meta))
    return out


def _coco_image_dir(ann_path: Path) -> Path | None:
    """The image folder that belongs to `annotations/captions_<split>.json`, if it exists."""
    stem = ann_path.stem
    split = stem[len("captions_") :] if stem.startswith("captions_") else None
    root = ann_path.parent.parent if ann_path.parent.name == "annotations" else ann_path.parent
    cands = []
    if split:
        cands += [root / split, root / "images" / split]
    cands.append(root / "images")
    for c in cands:
        if c.is_dir():
            return c
    return None


def _first_jsonl_object(path: Path) -> Any:
    for _, obj in iter_jsonl(path):
        return obj
    return None
