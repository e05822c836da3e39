"""U-REPA training data over the preprocessed store (seed 003, sections 3 and 6.2).

`RepaDataset(root, split)` reads `manifest.csv` and yields, per sample, the VAE latent
(`vae_latents.lmdb`, key = id, fp16 decoded without a copy), the teacher tokens
(`dino_tokens.lmdb`, key `{id}_mid`) for the cached teacher or the 512 px image from
`images.zip` for the online teacher, and the class label (the class-prompt embedding is looked up
in the training step, where classifier-free dropout draws from the checkpointed RNG). The LMDB
environments open lazily in each DataLoader worker (`readonly, lock=False, readahead=False`).
Missing keys and shape mismatches are found when the dataset is built, before any step runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from diffalign.engine.errors import DiffalignError
from diffalign.repa.preprocess import CLIP_FILE as CLIP
from diffalign.repa.preprocess import DINO_LMDB as TOKENS
from diffalign.repa.preprocess import IMAGES_ZIP as IMAGES
from diffalign.repa.preprocess import MANIFEST
from diffalign.repa.preprocess import VAE_LMDB as LATENTS
from diffalign.repa.preprocess import dino_key as token_key

__all__ = ["CLIP", "IMAGES", "LATENTS", "MANIFEST", "TOKENS", "RepaDataset", "collate", "token_key"]


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DiffalignError(
            f"{path} not found ({what}); build it with `diffalign repa preprocess` first"
        )
    return path


class RepaDataset(Dataset):
    """Samples of one manifest split: {"index", "label", "latent", "tokens" | "image"}."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        teacher: str = "cached",
        max_samples: int | None = None,
        check_keys: bool = True,
    ) -> None:
        from diffalign.engine.lmdb_store import TensorLMDB
        from diffalign.repa.images import read_manifest

        self.root = Path(root)
        self.split = split
        self.teacher = teacher
        rows = [
            r for r in read_manifest(_need(self.root / MANIFEST, "manifest")) if r["split"] == split
        ]
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
        if check_keys:
            self._check_keys()

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
        return out

    def __getitems__(self, indices: list[int]) -> dict:
        """A whole batch at once (torch's fetcher calls this): one LMDB transaction per store,
        each record copied once from the memory map into the batch tensor."""
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
        return out

    def __getstate__(self) -> dict:  # workers re-open the image zip themselves
        state = dict(self.__dict__)
        state["images"] = None
        return state


def collate(batch):
    """`RepaDataset.__getitems__` already returns a batch; anything else is collated as usual."""
    if isinstance(batch, dict):
        return batch
    from torch.utils.data import default_collate

    return default_collate(batch)
