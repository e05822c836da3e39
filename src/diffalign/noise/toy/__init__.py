"""Toy branch: one-step class-conditional generators on small real image data (seed 001).

Library entry points (the same names as the `diffalign noise toy` verbs): `train_gan`,
`assign`, `sft`, `direct_sft`, `em`, `evaluate_runs`, `run_demo`; data: `load_dataset`.
Imported lazily so that `diffalign --help` does not load torch.
"""

from __future__ import annotations

_EXPORTS = {
    "train_gan": "diffalign.noise.toy.gan",
    "assign": "diffalign.noise.toy.assignment",
    "assign_noise": "diffalign.noise.toy.assignment",
    "sft": "diffalign.noise.toy.finetune",
    "direct_sft": "diffalign.noise.toy.finetune",
    "em": "diffalign.noise.toy.em_loop",
    "evaluate_runs": "diffalign.noise.toy.evaluate",
    "evaluate_generator": "diffalign.noise.toy.evaluate",
    "frechet_distance": "diffalign.noise.toy.evaluate",
    "run_demo": "diffalign.noise.toy.demo",
    "load_dataset": "diffalign.noise.toy.data",
    "ToyData": "diffalign.noise.toy.data",
    "Generator": "diffalign.noise.toy.models",
    "load_model": "diffalign.noise.toy.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffalign.noise.toy' has no attribute {name!r}")
