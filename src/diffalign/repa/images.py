"""Images for U-REPA: the source layouts, the zip of 512 px crops, the manifest (seed 003 §3.1).

A preprocessed data folder (`--data-dir`) holds `images.zip` (`{id}.jpg` entries, RGB, square,
JPEG q95), `manifest.csv` (`id,wnid,label,split`) and `classes.csv` (`label,wnid,name`: every
class of the source in label order; `name` makes the prompt `a photo of a {name}`).

Sources (FORMATS.md, ImageNet): `train/<wnid>/*.JPEG`; `val/` sorted into `<wnid>/` folders or
flat `ILSVRC2012_val_*.JPEG` with labels from `LOC_val_solution.csv` or Caffe `val.txt`; or any
class-folder tree (`<class>/<image>`). Class order: the lines of `LOC_synset_mapping.txt` /
`synset_words.txt` when one is found (line number = label), else the sorted folder names.
"""

from __future__ import annotations

import csv
import io
import os
import random
import re
import threading
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from diffalign.engine.errors import DiffalignError
from diffalign.engine.pairs import center_crop_resize  # noqa: F401  (the §3.1 transform)

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MANIFEST_COLUMNS = ("id", "wnid", "label", "split")
CLASS_COLUMNS = ("label", "wnid", "name")
SYNSET_FILES = ("LOC_synset_mapping.txt", "synset_words.txt")
VAL_LABEL_FILES = ("LOC_val_solution.csv", "val.txt")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------------------------------------
# Manifest and classes


def check_sample_id(sample_id: str, where: str = "manifest") -> str:
    """A sample id is a file stem we wrote: letters, digits, `._-`, no path parts, no `..`."""
    if not isinstance(sample_id, str) or not _SAFE_ID.match(sample_id) or ".." in sample_id:
        raise DiffalignError(f"{where}: unsafe sample id {sample_id!r} (letters, digits, ._- only)")
    return sample_id


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Rows `{"id", "wnid", "label" (int), "split"}` of a `manifest.csv`, validated."""
    path = Path(path)
    if not path.is_file():
        raise DiffalignError(f"manifest not found: {path} (run `diffalign repa preprocess images`)")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DiffalignError(f"{path}: missing column(s) {', '.join(missing)}")
            rows, seen = [], set()
            for lineno, row in enumerate(reader, 2):
                where = f"{path}:{lineno}"
                sid = check_sample_id(row["id"], where)
                if sid in seen:
                    raise DiffalignError(f"{where}: duplicate id {sid}")
                seen.add(sid)
                try:
                    label = int(row["label"])
                except (TypeError, ValueError):
                    raise DiffalignError(
                        f"{where}: label {row['label']!r} is not an integer"
                    ) from None
                if label < 0 or not row["wnid"] or not row["split"]:
                    raise DiffalignError(f"{where}: needs a wnid, a split and a label >= 0")
                rows.append({"id": sid, "wnid": row["wnid"], "label": label, "split": row["split"]})
    except UnicodeDecodeError:
        raise DiffalignError(f"{path}: not UTF-8 text") from None
    return rows


def write_manifest(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write `manifest.csv` atomically."""
    _write_csv(path, MANIFEST_COLUMNS, rows)


def read_classes(path: str | os.PathLike) -> list[dict]:
    """Rows `{"label", "wnid", "name"}` of a `classes.csv`, in label order 0..C-1."""
    path = Path(path)
    if not path.is_file():
        raise DiffalignError(
            f"class list not found: {path} (run `diffalign repa preprocess images`)"
        )
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not set(CLASS_COLUMNS) <= set(reader.fieldnames or ()):
                raise DiffalignError(
                    f"{path}: not a class list (expected the columns {','.join(CLASS_COLUMNS)})"
                )
            rows = [
                {"label": int(r["label"]), "wnid": r["wnid"], "name": r["name"]} for r in reader
            ]
    except (ValueError, TypeError, UnicodeDecodeError, csv.Error) as e:
        raise DiffalignError(f"{path}: unreadable class list ({str(e)[:120]})") from None
    if not rows:
        raise DiffalignError(f"{path}: no classes (run `diffalign repa preprocess images` again)")
    if any(not r["wnid"] or not r["name"] for r in rows):
        raise DiffalignError(f"{path}: a class without wnid or name")
    if [r["label"] for r in rows] != list(range(len(rows))):
        raise DiffalignError(f"{path}: labels must be 0..{len(rows) - 1} in order")
    return rows


def write_classes(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write `classes.csv` atomically."""
    _write_csv(path, CLASS_COLUMNS, rows)


def _write_csv(path, columns: Sequence[str], rows: Iterable[dict]) -> None:
    from diffalign.engine.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


# ---------------------------------------------------------------------------------------------
# The image zip


def zip_entry_name(sample_id: str) -> str:
    return f"{sample_id}.jpg"


class ImageZip:
    """Read-only access to `images.zip`: `.read(id) -> PIL.Image` (RGB).

    The zip is opened lazily and again in every process (a DataLoader worker never shares its
    parent's file handle).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise DiffalignError(
                f"image zip not found: {self.path} (run `diffalign repa preprocess images`)"
            )
        self._zip: zipfile.ZipFile | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def _open(self) -> zipfile.ZipFile:
        zf = self._zip
        if zf is not None and self._pid == os.getpid():
            return zf  # reads of one ZipFile from several threads are serialised by zipfile
        with self._lock:
            if self._zip is not None and self._pid == os.getpid():
                return self._zip
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as e:
                raise DiffalignError(f"{self.path}: not a readable zip ({e})") from None
            self._pid = os.getpid()
        return self._zip

    def __getstate__(self) -> dict:
        return {"path": self.path, "_zip": None, "_pid": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def names(self) -> set[str]:
        """Sample ids held (entry names without `.jpg`)."""
        return {n[:-4] for n in self._open().namelist() if n.endswith(".jpg")}

    def __contains__(self, sample_id: object) -> bool:
        if not isinstance(sample_id, str):
            return False
        try:
            self._open().getinfo(zip_entry_name(sample_id))
        except KeyError:
            return False
        return True

    def __len__(self) -> int:
        return len(self._open().namelist())

    def read_bytes(self, sample_id: str) -> bytes:
        try:
            return self._open().read(zip_entry_name(sample_id))
        except KeyError:
            raise DiffalignError(f"image '{sample_id}' not found in {self.path}") from None

    def read(self, sample_id: str):
        """The image `sample_id` as an RGB `PIL.Image`."""
        from PIL import Image

        data = self.read_bytes(sample_id)
        try:
            with Image.open(io.BytesIO(data)) as img:
                return img.convert("RGB")
        except OSError as e:
            raise DiffalignError(
                f"image '{sample_id}' in {self.path} is unreadable ({e})"
            ) from None

    def close(self) -> None:
        if self._zip is not None and self._pid == os.getpid():
            self._zip.close()
        self._zip = None


# ---------------------------------------------------------------------------------------------
# The §3.1 transform


def encode_jpeg(path: str | os.PathLike, resolution: int, quality: int = 95) -> bytes:
    """Read an image file, apply `center_crop_resize`, return JPEG bytes (quality `quality`)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        out = center_crop_resize(img, resolution)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Source layouts


@dataclass(frozen=True)
class SourceSample:
    """One source image: its file, class folder id (`wnid`), label and sample id."""

    path: Path
    wnid: str
    label: int
    sample_id: str


@dataclass
class SourceSplit:
    """The images of one split of a source and its class list (label order)."""

    split: str
    layout: str  # "imagenet-folders", "imagenet-flat-val" or "class-folders"
    classes: list[dict]  # {"label", "wnid", "name"}
    samples: list[SourceSample]


def _image_files(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted (one `scandir`: no stat per file on most
    filesystems, which matters for ImageNet's 1.28M files)."""
    with os.scandir(folder) as it:
        return sorted(
            Path(e.path)
            for e in it
            if not e.name.startswith(".")
            and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
            and e.is_file()
        )


def _find_file(names: Sequence[str], dirs: Sequence[Path]) -> Path | None:
    for d in dirs:
        for name in names:
            if (d / name).is_file():
                return d / name
    return None


def read_synsets(path: str | os.PathLike) -> list[tuple[str, str]]:
    """`(wnid, first synonym)` per line of `LOC_synset_mapping.txt` / `synset_words.txt`."""
    from diffalign.engine.io import read_text

    path = Path(path)
    out = []
    for lineno, line in enumerate(read_text(path, "class-name file").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        wnid, _, names = line.partition(" ")
        name = names.split(",")[0].strip()
        if not wnid or not name:
            raise DiffalignError(f"{path}:{lineno}: expected '<wnid> <name>[, <synonym>...]'")
        out.append((wnid, name))
    if len({w for w, _ in out}) != len(out):
        raise DiffalignError(f"{path}: repeated class ids")
    return out


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_val_labels(path: Path, wnids: list[str]) -> dict[str, str]:
    """file stem -> wnid from `LOC_val_solution.csv` (`ImageId,PredictionString`) or a Caffe
    `val.txt` (`ILSVRC2012_val_00000001.JPEG 65`, 0-based index into the sorted wnids)."""
    from diffalign.engine.io import read_text

    out: dict[str, str] = {}
    text = read_text(path, "val label file").splitlines()
    if path.suffix.lower() == ".csv":
        for lineno, line in enumerate(text[1:], 2):
            if not line.strip():
                continue
            image_id, _, pred = line.partition(",")
            tokens = pred.split()
            if not tokens:
                raise DiffalignError(f"{path}:{lineno}: empty PredictionString")
            out[image_id.strip()] = tokens[0]
        return out
    ordered = sorted(wnids)
    for lineno, line in enumerate(text, 1):
        parts = line.split()
        if not parts:
            continue
        try:
            name, index = parts[0], int(parts[1])
            out[Path(name).stem] = ordered[index]
        except (IndexError, ValueError):
            raise DiffalignError(
                f"{path}:{lineno}: expected '<file> <class index 0..{len(ordered) - 1}>'"
            ) from None
    return out


def _sanitize(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem).strip("._-") or "img"


def scan_source(
    source: str | os.PathLike,
    split: str = "train",
    *,
    val_labels: str | os.PathLike | None = None,
    class_names: str | os.PathLike | None = None,
) -> SourceSplit:
    """Find the images of `split` in `source` and their classes (FORMATS.md, ImageNet).

    `source` is an ImageNet root (holding `train/`, `val/`), a split folder, or any class-folder
    tree. An empty class folder is an error; so is a flat folder without a label file.
    """
    root = Path(source).expanduser()
    if not root.is_dir():
        raise DiffalignError(f"--source {root}: no such folder")
    folder = root / split if (root / split).is_dir() else root
    # beside the images, or up to three folders above the root: Kaggle's ImageNet keeps
    # LOC_synset_mapping.txt / LOC_val_solution.csv above ILSVRC/Data/CLS-LOC/{train,val}
    search = [folder, folder.parent, folder.parent.parent, root, *list(root.parents)[:3]]
    synset_file = Path(class_names) if class_names else _find_file(SYNSET_FILES, search)
    synsets = read_synsets(synset_file) if synset_file else None

    subdirs = _class_dirs(folder)
    loose = _image_files(folder)
    samples: list[tuple[Path, str]] = []
    if subdirs:
        for d in subdirs:
            files = _image_files(d)
            if not files:
                raise DiffalignError(f"empty class folder: {d} (no images)")
            samples += [(p, d.name) for p in files]
        layout = "class-folders"
        folder_wnids = [d.name for d in subdirs]
    elif loose:
        label_file = Path(val_labels) if val_labels else _find_file(VAL_LABEL_FILES, search)
        if label_file is None or not label_file.is_file():
            raise DiffalignError(
                f"{folder} holds images but no class folders: give their labels with "
                "--val-labels (LOC_val_solution.csv or a Caffe val.txt)"
            )
        if synsets is not None:
            wnids = [w for w, _ in synsets]
        elif (root / "train").is_dir():
            wnids = [d.name for d in _class_dirs(root / "train")]
        else:
            wnids = []
        if label_file.suffix.lower() != ".csv" and not wnids:
            raise DiffalignError(
                f"{label_file}: a Caffe val.txt needs the class list (LOC_synset_mapping.txt "
                "via --class-names, or the train/ folders beside val/)"
            )
        labels = _read_val_labels(label_file, wnids)
        missing = [p.name for p in loose if p.stem not in labels]
        if missing:
            raise DiffalignError(
                f"{label_file} has no label for {len(missing)} image(s), e.g. {missing[0]}"
            )
        samples = [(p, labels[p.stem]) for p in loose]
        layout = "imagenet-flat-val"
        folder_wnids = sorted({w for _, w in samples}) if not wnids else wnids
    else:
        raise DiffalignError(f"no images found in {folder}")

    if synsets is not None:
        classes = [{"label": i, "wnid": w, "name": n} for i, (w, n) in enumerate(synsets)]
    else:
        classes = [
            {"label": i, "wnid": w, "name": w.replace("_", " ")}
            for i, w in enumerate(sorted(folder_wnids))
        ]
    index = {c["wnid"]: c["label"] for c in classes}
    unknown = sorted({w for _, w in samples if w not in index})
    if unknown:
        raise DiffalignError(
            f"class(es) {', '.join(unknown[:5])} of {folder} are not in {synset_file}"
        )
    if layout == "class-folders" and _looks_like_wnid(folder_wnids):
        layout = "imagenet-folders"

    stems = [_sanitize(p.stem) for p, _ in samples]
    if len(set(stems)) != len(stems):  # e.g. img1.jpg in two class folders: prefix the class
        stems = [_sanitize(f"{w}_{p.stem}") for p, w in samples]
    if len(set(stems)) != len(stems):
        seen: dict[str, Path] = {}
        for (p, _), s in zip(samples, stems, strict=True):
            if s in seen:
                raise DiffalignError(f"{seen[s]} and {p} would get the same sample id {s}")
            seen[s] = p
    items = [SourceSample(p, w, index[w], s) for (p, w), s in zip(samples, stems, strict=True)]
    return SourceSplit(split, layout, classes, items)


def _looks_like_wnid(names: Sequence[str]) -> bool:
    return all(re.fullmatch(r"n\d{8}", n) for n in names)


def select_balanced(
    samples: Sequence[SourceSample], num_samples: int | None, seed: int = 0
) -> list[SourceSample]:
    """A deterministic class-balanced subset (Track A): classes take turns, each drawing its
    images in a seeded shuffled order, until `num_samples` are chosen (all when None).

    Returned sorted by (label, id), so the order does not depend on the draw.
    """
    if num_samples is None or num_samples >= len(samples):
        chosen = list(samples)
    else:
        by_class: dict[int, list[SourceSample]] = {}
        for s in sorted(samples, key=lambda s: s.sample_id):
            by_class.setdefault(s.label, []).append(s)
        queues = []
        for label in sorted(by_class):
            items = by_class[label]
            random.Random(f"{seed}:{label}").shuffle(items)
            queues.append(items)
        chosen = []
        depth = 0
        while len(chosen) < num_samples:
            for q in queues:
                if depth < len(q) and len(chosen) < num_samples:
                    chosen.append(q[depth])
            depth += 1
    return sorted(chosen, key=lambda s: (s.label, s.sample_id))
