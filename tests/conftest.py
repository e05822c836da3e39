"""Shared fixtures: tiny models are built once per session through `diffalign make-tiny`."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFALIGN_NO_PROGRESS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: `tiny_model_dir("sd3")` -> path of a tiny model written by `diffalign make-tiny`."""
    from diffalign.cli import main

    cache: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{kind}")
            assert main(["make-tiny", kind, "--out", str(out)]) == 0
            cache[kind] = str(out)
        return cache[kind]

    return get
