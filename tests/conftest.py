"""Shared fixtures: tiny models are built once per session through `diffalign make-tiny`."""

from __future__ import annotations

import os

# The suite checks CPU behaviour (bit-exact resume, CPU reference values), so it runs on the CPU
# on a GPU machine too; DIFFALIGN_TEST_CUDA=1 lets it use the GPU (the device check in
# bench/gpu_rows.sh), where exact-resume tests may differ by float non-determinism.
if os.environ.get("DIFFALIGN_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFALIGN_NO_PROGRESS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# weight digests of the tiny models are cached per test session, not in ~/.cache
os.environ.setdefault(
    "DIFFALIGN_HASH_CACHE",
    os.path.join(__import__("tempfile").mkdtemp(prefix="diffalign-hashes-"), "sha256.json"),
)
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
