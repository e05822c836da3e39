"""Compiled execution and fast kernels (issue 18): one way to compile a model, pick the AdamW
kernel and lay out convolution weights, shared by the training loop, noise and text stream.

`compile_module(module)` compiles in place (`nn.Module.compile`): the module object, its
parameters and its state-dict keys stay the same (no `_orig_mod.` prefix), so checkpoints written
compiled load eagerly and the other way round. A diffusers model that names its repeated blocks
(`_repeated_blocks`, e.g. the U-Net's `BasicTransformerBlock`, FLUX's transformer blocks) gets
regional compilation (`ModelMixin.compile_repeated_blocks`: each block compiled once and reused,
a fraction of the cold start); any other module is compiled whole. Forward hooks on modules
outside the compiled blocks (U-REPA's feature hooks) keep running eagerly.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from diffalign.engine.errors import DiffalignError


def repeated_block_names(module: nn.Module) -> list[str]:
    """Class names of the repeated blocks a diffusers model declares and actually holds."""
    names = getattr(module, "_repeated_blocks", None) or []
    present = {type(m).__name__ for m in module.modules()}
    return [n for n in names if n in present]


def check_compile_available(device: torch.device | str) -> None:
    """One-line DiffalignError when torch.compile cannot build kernels for `device`: inductor
    needs a C++ compiler on the CPU and Triton on CUDA."""
    kind = torch.device(device).type
    if kind == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise DiffalignError("--compile on the CPU needs a C++ compiler (g++) on PATH")
    if kind == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise DiffalignError("--compile on CUDA needs the triton package") from None


def compile_module(
    module: nn.Module, regional: bool = True, eager_random: bool = False, **compile_kwargs
) -> str:
    """Compile `module` in place; returns "regional" (its repeated blocks) or "whole".
    `compile_kwargs` go to torch.compile (mode, fullgraph, dynamic). `eager_random`: random ops
    inside the graphs (LoRA dropout) draw from torch's generator as eager does (inductor's
    `fallback_random`), so a compiled run draws the eager run's masks; inductor's own generator
    gives other masks."""
    if eager_random:
        options = {**compile_kwargs.get("options", {}), "fallback_random": True}
        compile_kwargs["options"] = options
    if regional and repeated_block_names(module):
        module.compile_repeated_blocks(**compile_kwargs)
        return "regional"
    module.compile(**compile_kwargs)
    return "whole"


def speed_up_modules(
    modules: Mapping[str, nn.Module],
    device: torch.device | str,
    *,
    compile: bool = False,
    channels_last: bool = False,
) -> dict[str, str]:
    """What `TrainConfig(compile=..., channels_last=...)` does to a run's trainable modules, in
    place (the training loop and bench/ call this one function): the weights of modules with
    convolutions in channels_last first, then each module compiled (`compile_module`). Returns
    how each one was compiled ("regional" / "whole"; empty without `compile`). Compiled with
    `eager_random`: dropout masks drawn as in eager, so compiled training is the eager run."""
    if channels_last:
        for m in modules.values():
            to_channels_last(m)
    if not compile:
        return {}
    check_compile_available(device)
    return {name: compile_module(m, eager_random=True) for name, m in modules.items()}


def compile_layers(module: nn.Module, **compile_kwargs) -> int:
    """Regional compilation of a transformers model: each of its layers (the
    `GradientCheckpointingLayer`s: CLIP's, BLIP's encoder layers) compiled in place, one graph
    shared by the layers of one shape; returns how many. A module without such layers is
    compiled whole (returns 0)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]
    for m in layers:
        m.compile(**compile_kwargs)
    if not layers:
        module.compile(**compile_kwargs)
    return len(layers)


def check_cuda_graphs(device: torch.device | str | None) -> None:
    """CUDA graphs replay recorded GPU work: a one-line DiffalignError on any other device
    (`device` None: the default, cuda when available)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if kind != "cuda":
        raise DiffalignError(f"--cuda-graphs needs a CUDA device; this run is on {kind}")


def compile_function(fn: Callable, **compile_kwargs) -> Callable:
    """torch.compile of a pure tensor function (same results, fused kernels)."""
    return torch.compile(fn, **compile_kwargs)


def uses_fused_adamw(params: Iterable[torch.Tensor]) -> bool:
    """Whether AdamW runs its fused kernel: every parameter a floating-point CUDA tensor (the
    CPU keeps the reference for-each kernel, which bit-exact CPU tests are written against)."""
    params = list(params)
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


def has_conv(module: nn.Module) -> bool:
    """Whether `module` holds a 2-D convolution (where channels_last can help)."""
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def to_channels_last(module: nn.Module) -> bool:
    """Put the 4-D weights of a module with convolutions in channels_last (NHWC) layout, which
    the conv kernels of tensor-core GPUs prefer; returns whether anything changed. The values,
    state-dict keys and checkpoints are unchanged (safetensors stores them contiguous)."""
    if not has_conv(module):
        return False
    module.to(memory_format=torch.channels_last)
    return True
