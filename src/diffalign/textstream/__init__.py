"""T: text-stream residual injection for MMDiT (seeds 002, 000).

Public API (spec T):

    from diffalign.textstream import TextStreamResidual, build_residual, solve_procrustes
    res = TextStreamResidual(origin_layer=0, target_layers=[2, 3], weights=[0.5], mode="ln")
    with res.attach(pipe.transformer):
        images = pipe(prompt).images

Imports are lazy so that `diffalign --help` does not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "TextStreamResidual",
    "build_residual",
    "solve_procrustes",
    "load_rotations",
    "save_rotations",
    "RotationSet",
    "residual_mix",
    "standardize",
]

_WHERE = {
    "TextStreamResidual": "attach",
    "build_residual": "attach",
    "solve_procrustes": "procrustes",
    "load_rotations": "rotations",
    "save_rotations": "rotations",
    "RotationSet": "rotations",
    "residual_mix": "residual",
    "standardize": "residual",
}

if TYPE_CHECKING:
    from diffalign.textstream.attach import TextStreamResidual, build_residual
    from diffalign.textstream.procrustes import solve_procrustes
    from diffalign.textstream.residual import residual_mix, standardize
    from diffalign.textstream.rotations import RotationSet, load_rotations, save_rotations


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        module = importlib.import_module(f"diffalign.textstream.{_WHERE[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'diffalign.textstream' has no attribute {name!r}")
