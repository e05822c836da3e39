"""U-REPA training data over the preprocessed store (seed 003, sections 3, 3.4 and 6.2).

`RepaDataset(root, split)` reads `manifest.csv` and yields, per sample, the VAE latent
(`vae_latents.lmdb`, key = id, fp16 decoded without a copy), the teacher tokens
(`dino_tokens.lmdb`, key `{id}_mid`) for the cached teacher or the 512 px image from
`images.zip` for the online teacher, and the class embedding (`clip_embeddings.safetensors`, row
`label`), replaced by the empty prompt's (the last row) with probability `cfg_dropout`
(classifier-free dropout, seed 3.4). The dropout draw is a pure function of (seed, epoch, sample
index), so it does not depend on workers, processes or the RNG state, and a resumed run redraws
exactly what the uninterrupted one drew; the training loop tells the dataset its epoch
(`set_epoch`) before the epoch's workers start. The LMDB environments open lazily in each
DataLoader worker (`readonly, lock=False, readahead=False`). Missing keys, shape mismatches and
labels without an embedding are found when the dataset is built, before any step runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from diffalign.engine.buffers import batch_empty
from diffalign.engine.errors import DiffalignError
from diffalign.repa.preprocess import CLIP_FILE as CLIP
from diffalign.repa.preprocess import DINO_LMDB as TOKENS
from diffalign.repa.preprocess import IMAGES_ZIP as IMAGES
from diffalign.repa.preprocess import MANIFEST
from diffalign.repa.preprocess import VAE_LMDB as LATENTS
from diffalign.repa.preprocess import dino_key as token_key

__all__ = [
    "CLIP",
    "IMAGES",
    "LATENTS",
    "MANIFEST",
    "TOKENS",
    "RepaDataset",
    "collate",
    "dropout_uniforms",
    "load_class_table",
    "token_key",
]


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DiffalignError(
            f"{path} not found ({what}); build it with `diffalign repa preprocess` first"
        )
    return path


_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a well-mixed hash."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def dropout_uniforms(seed: int, epoch: int, indices) -> np.ndarray:
    """Uniform [0, 1) numbers, one per sample index, fixed by (seed, epoch, index): the
    classifier-free dropout draw (`u < cfg_dropout` drops the class prompt)."""
    key = _splitmix64(np.array([int(seed) & _MASK64], dtype=np.uint64))
    key = _splitmix64(key ^ np.uint64(int(epoch) & _MASK64))
    z = _splitmix64(key ^ np.asarray(indices, dtype=np.uint64).reshape(-1))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class RepaDataset(Dataset):
    """Samples of one manifest split: {"index", "label", "latent", "tokens" | "image",
    "class_embedding", "cfg_dropped"} (the last two unless `class_embeddings=False`).

    `class_embedding` is the `[77, D]` prompt embedding of the sample's class, or of the empty
    prompt when the classifier-free dropout drew it (`cfg_dropped`); `cfg_dropout` is its
    probability, `seed` and the epoch (`set_epoch`) fix the draws."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        teacher: str = "cached",
        max_samples: int | None = None,
        check_keys: bool = True,
        cfg_dropout: float = 0.0,
        seed: int = 0,
        class_embeddings: bool = True,
    ) -> None:
        from diffalign.engine.lmdb_store import TensorLMDB
        from diffalign.repa.images import read_manifest

        self.root = Path(root)
        self.split = split
        self.teacher = teacher
        manifest = read_manifest(_need(self.root / MANIFEST, "manifest"))
        self.manifest_splits = sorted({str(r["split"]) for r in manifest})
        rows = [r for r in manifest if r["split"] == split]
        if max_samples is not None and int(max_samples) < len(rows):
            # evenly spread over the manifest (which lists classes in order): class-balanced
            n = int(max_samples)
            rows = [rows[(k * len(rows)) // n] for k in range(n)]
        self.ids = [str(r["id"]) for r in rows]
        self.labels = [int(r["label"]) for r in rows]
        self.latents = TensorLMDB(_need(self.root / LATENTS, "VAE latents"))
        self.tokens = None
        self.images = None
        if teacher == "cached":
            self.tokens = TensorLMDB(_need(self.root / TOKENS, "DINOv2 tokens"))
        elif teacher == "online":
            self._images_path = _need(self.root / IMAGES, "images")
        else:
            raise DiffalignError(f"unknown teacher '{teacher}' (choose cached or online)")
        if not 0.0 <= float(cfg_dropout) <= 1.0:
            raise DiffalignError(f"cfg_dropout must be in [0, 1], got {cfg_dropout}")
        self.cfg_dropout = float(cfg_dropout)
        self.seed = int(seed)
        self.epoch = 0
        self.class_table: torch.Tensor | None = None
        if class_embeddings:
            self.class_table = load_class_table(self.root)
            if self.labels and max(self.labels) >= self.null_index:
                raise DiffalignError(
                    f"label {max(self.labels)} has no prompt embedding in {self.root / CLIP} "
                    f"({self.null_index} classes)"
                )
        if check_keys:
            self._check_keys()

    @property
    def null_index(self) -> int:
        """Row of the empty prompt in the class-embedding table (its last)."""
        return self.class_table.shape[0] - 1

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose classifier-free dropout draws the next samples use."""
        self.epoch = int(epoch)

    def _embedding_rows(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.as_tensor([self.labels[i] for i in indices], dtype=torch.long)
        if self.cfg_dropout > 0.0:
            u = dropout_uniforms(self.seed, self.epoch, list(indices))
            drop = torch.from_numpy(u < self.cfg_dropout)
        else:
            drop = torch.zeros(len(labels), dtype=torch.bool)
        return torch.where(drop, torch.full_like(labels, self.null_index), labels), drop

    def _check_keys(self) -> None:
        stores = [(self.latents, lambda i: i, LATENTS)]
        if self.tokens is not None:
            stores.append((self.tokens, token_key, TOKENS))
        else:
            stores.append((None, lambda i: i, IMAGES))
        for store, key_of, name in stores:
            if store is None:  # the online teacher reads the images
                from diffalign.repa.images import ImageZip

                zf = ImageZip(self._images_path)
                present = zf.names()
                zf.close()
            else:
                present = set(store.keys())  # one cursor pass, not a transaction per key
            missing = [i for i in self.ids if key_of(i) not in present]
            if missing:
                raise DiffalignError(
                    f"{self.root / name}: {len(missing)} of {len(self.ids)} '{self.split}' samples "
                    f"have no record (e.g. '{key_of(missing[0])}'); rerun the preprocessing "
                    "step, which fills in missing keys"
                )

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape)

    @property
    def token_shape(self) -> tuple[int, ...] | None:
        return tuple(self.tokens.shape) if self.tokens is not None else None

    def empty_split_error(self) -> DiffalignError:
        """The one-line error for a split the manifest has no samples of, naming the ones it has."""
        have = ", ".join(repr(x) for x in self.manifest_splits) or "none"
        return DiffalignError(
            f"{self.root}: no '{self.split}' samples in the manifest (its splits: {have})"
        )

    def __len__(self) -> int:
        return len(self.ids)

    def _image(self, sample_id: str) -> torch.Tensor:
        if self.images is None:  # opened in the worker that reads it
            from diffalign.repa.images import ImageZip

            self.images = ImageZip(self._images_path)
        img = self.images.read(sample_id)
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def __getitem__(self, i: int) -> dict:
        sample_id = self.ids[i]
        out = {"index": i, "label": self.labels[i], "latent": self.latents.get(sample_id)}
        if self.tokens is not None:
            out["tokens"] = self.tokens.get(token_key(sample_id))
        else:
            out["image"] = self._image(sample_id)
        if self.class_table is not None:
            rows, drop = self._embedding_rows([i])
            out["class_embedding"] = self.class_table[int(rows[0])]
            out["cfg_dropped"] = bool(drop[0])
        return out

    def __getitems__(self, indices: list[int]) -> dict:
        """A whole batch at once (torch's fetcher calls this): one LMDB transaction per store,
        each record copied once from the memory map into the batch tensor; the batch tensors are
        recycled buffers (`engine.buffers.batch_empty`), shared memory in a DataLoader worker."""
        ids = [self.ids[i] for i in indices]
        out = {
            "index": torch.as_tensor(list(indices), dtype=torch.long),
            "label": torch.as_tensor([self.labels[i] for i in indices], dtype=torch.long),
            "latent": self.latents.get_many(ids),
        }
        if self.tokens is not None:
            out["tokens"] = self.tokens.get_many([token_key(i) for i in ids])
        else:
            out["image"] = torch.stack([self._image(i) for i in ids])
        if self.class_table is not None:
            rows, drop = self._embedding_rows(indices)
            table = self.class_table
            emb = batch_empty((len(rows), *table.shape[1:]), table.dtype)
            out["class_embedding"] = torch.index_select(table, 0, rows, out=emb)
            out["cfg_dropped"] = drop
        return out

    def __getstate__(self) -> dict:  # workers re-open the image zip themselves
        state = dict(self.__dict__)
        state["images"] = None
        return state


def load_class_table(root: str | os.PathLike) -> torch.Tensor:
    """The `[classes + 1, 77, D]` prompt embeddings of a data folder (last row: the empty
    prompt), as `repa preprocess clip` wrote them."""
    path = Path(root) / CLIP
    if not path.is_file():
        raise DiffalignError(
            f"{path} not found; build it with `diffalign repa preprocess clip` first"
        )
    from diffalign.repa.preprocess import load_class_embeddings

    table, _ = load_class_embeddings(path)
    if table.dim() != 3 or table.shape[0] < 2:
        raise DiffalignError(
            f"{path}: expected [classes + 1, 77, D] embeddings, got {list(table.shape)}"
        )
    return table.contiguous()


def collate(batch):
    """`RepaDataset.__getitems__` already returns a batch; anything else is collated as usual."""
    if isinstance(batch, dict):
        return batch
    from torch.utils.data import default_collate

    return default_collate(batch)
