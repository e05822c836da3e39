"""N: orthogonal-constrained noise (seed 001).

Public API: :class:`PatchOrthogonal` (patch-wise orthogonal map ``z -> Q z``), :func:`patchify` /
:func:`unpatchify`, :func:`orthogonality_error`, the Gaussianity diagnostics
:func:`gaussianity_report` / :func:`write_gaussianity_diagnostics`, the one-step generators
(:class:`OneStepGenerator`, :func:`load_generator`; :func:`generator_recipe` says which
recipe a model runs as) and test-time optimisation
(:func:`optimize_prompts`, :func:`run_optimize`, :class:`OptimizeSettings`), and the methods
on any one-step generator: :func:`assign_noise` / :func:`assign_image` (inversion),
:func:`build_dataset`, :class:`MatchedSftTask` (matched / direct SFT; ``diffalign.noise.sft.sft``)
and :func:`em_cycles` (``diffalign.noise.em.em``).

Names are resolved lazily so that importing the CLI wiring (``diffalign.noise.cli``) does not
import torch: ``diffalign --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "PatchOrthogonal": "orthogonal",
    "apply_patch_orthogonal": "orthogonal",
    "haar_orthogonal": "orthogonal",
    "orthogonality_error": "orthogonal",
    "patchify": "orthogonal",
    "skew_to_orthogonal": "orthogonal",
    "unpatchify": "orthogonal",
    "gaussianity_report": "diagnostics",
    "write_gaussianity_diagnostics": "diagnostics",
    "OneStepGenerator": "onestep",
    "GENERATORS": "generators",
    "load_generator": "generators",
    "generator_recipe": "recipes",
    "OptimizeSettings": "optimize",
    "optimize_prompts": "optimize",
    "run_optimize": "optimize",
    "assign_noise": "assign",
    "assign_image": "assign",
    "build_dataset": "dataset",
    "MatchedSftTask": "sft",
    "em_cycles": "em",
}

__all__ = [
    "GENERATORS",
    "MatchedSftTask",
    "assign_image",
    "assign_noise",
    "build_dataset",
    "em_cycles",
    "OneStepGenerator",
    "OptimizeSettings",
    "PatchOrthogonal",
    "apply_patch_orthogonal",
    "gaussianity_report",
    "generator_recipe",
    "haar_orthogonal",
    "load_generator",
    "optimize_prompts",
    "orthogonality_error",
    "patchify",
    "run_optimize",
    "skew_to_orthogonal",
    "unpatchify",
    "write_gaussianity_diagnostics",
]

if TYPE_CHECKING:
    from diffalign.noise.assign import assign_image, assign_noise
    from diffalign.noise.dataset import build_dataset
    from diffalign.noise.diagnostics import gaussianity_report, write_gaussianity_diagnostics
    from diffalign.noise.em import em_cycles
    from diffalign.noise.generators import GENERATORS, load_generator
    from diffalign.noise.onestep import OneStepGenerator
    from diffalign.noise.optimize import OptimizeSettings, optimize_prompts, run_optimize
    from diffalign.noise.orthogonal import (
        PatchOrthogonal,
        apply_patch_orthogonal,
        haar_orthogonal,
        orthogonality_error,
        patchify,
        skew_to_orthogonal,
        unpatchify,
    )
    from diffalign.noise.recipes import generator_recipe
    from diffalign.noise.sft import MatchedSftTask


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffalign.noise' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"diffalign.noise.{module}"), name)
    globals()[name] = value
    return value
