"""Saving and loading what FLUX Fill training produces (spec F: Infer, saving).

- `pytorch_lora_weights.safetensors`: the LoRA alone in diffusers' format (keys
  `transformer.<module>.lora_A/B.weight`, peft config in the metadata), written by
  `FluxFillPipeline.save_lora_weights`; a plain `FluxFillPipeline.load_lora_weights(folder)` loads it.
- `semantic_module.safetensors`: the semantic cross-attention weights, its shape (dim, heads,
  layers) and the semantic token layout it was trained with (`layout`) in the metadata.
- `fill_semantic.safetensors`: both in one file (`transformer.*` LoRA keys + `semantic.*`;
  metadata `semantic_dim`, ..., `semantic_layout`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffalign.engine.errors import DiffalignError, library_output_held
from diffalign.engine.io import load_tensors, save_tensors

LORA_FILE = "pytorch_lora_weights.safetensors"
SEMANTIC_FILE = "semantic_module.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for rank/alpha/targets
COMBINED_FILE = "fill_semantic.safetensors"


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft names stripped of the adapter name (diffusers' keys)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(transformer).items()}


def save_lora(out_dir: str | Path, transformer: nn.Module, lora_config: Any) -> Path:
    """Write `pytorch_lora_weights.safetensors` with `FluxFillPipeline.save_lora_weights`
    (its key names) and the metadata diffusers' own writer puts there, written by
    `engine.io.save_tensors` (sorted metadata keys: the same weights give the same bytes)."""
    from diffusers import FluxFillPipeline

    out_dir = Path(out_dir)
    meta = {"format": "pt"}
    if lora_config is not None:
        meta[LORA_METADATA_KEY] = lora_metadata(lora_config)

    def write(tensors: dict[str, torch.Tensor], filename: str) -> None:
        save_tensors(filename, tensors, metadata=meta)

    FluxFillPipeline.save_lora_weights(
        out_dir,
        transformer_lora_layers=lora_state_dict(transformer),
        weight_name=LORA_FILE,
        save_function=write,
    )
    return out_dir / LORA_FILE


def lora_metadata(lora_config: Any) -> str:
    """The peft config as diffusers' writer stores it: keys prefixed `transformer.`, JSON with
    sorted keys (sets as sorted lists)."""
    cfg = json.loads(json.dumps(lora_config.to_dict(), default=_jsonable))
    return json.dumps({f"transformer.{k}": v for k, v in cfg.items()}, indent=2, sort_keys=True)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, set | tuple):
        return sorted(obj) if isinstance(obj, set) else list(obj)
    return str(obj)


def save_semantic(path: str | Path, module: nn.Module, layout: str | None = None) -> None:
    """Write the module with its shape and `layout` in the metadata
    (`fill.attention.save_semantic_module`)."""
    from diffalign.fill.attention import save_semantic_module

    save_semantic_module(path, module, layout)


def save_combined(
    path: str | Path,
    transformer: nn.Module,
    semantic: nn.Module | None,
    lora_config: Any = None,
    layout: str | None = None,
) -> None:
    """LoRA (diffusers keys, `transformer.` prefix) and module (`semantic.` prefix) in one file."""
    tensors = {f"transformer.{k}": v for k, v in lora_state_dict(transformer).items()}
    meta: dict[str, str] = {"format": "diffalign-fill-lora+semantic"}
    if lora_config is not None:
        meta[LORA_METADATA_KEY] = lora_metadata(lora_config)
    if semantic is not None:
        tensors.update({f"semantic.{k}": v.float() for k, v in semantic.state_dict().items()})
        meta.update({f"semantic_{k}": str(v) for k, v in semantic.config().items()})
        if layout is not None:
            meta["semantic_layout"] = str(layout)
    save_tensors(path, tensors, metadata=meta)


def _resolve_file(path: str | Path, default_name: str, what: str) -> Path:
    p = Path(path)
    if p.is_dir():
        for name in (default_name, COMBINED_FILE):
            if (p / name).is_file():
                return p / name
        raise DiffalignError(f"{what}: {p} holds neither {default_name} nor {COMBINED_FILE}")
    if not p.is_file():
        raise DiffalignError(f"{what}: file not found: {p}")
    return p


def read_lora(path: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """(file, LoRA tensors with `transformer.`-prefixed diffusers keys, metadata) of `--lora`:
    a diffusers LoRA file, the combined file, or a folder holding either."""
    file = _resolve_file(path, LORA_FILE, "--lora")
    tensors, meta = load_tensors(file)
    lora = {k: v for k, v in tensors.items() if ".lora_" in k and not k.startswith("semantic.")}
    if not lora:
        raise DiffalignError(f"--lora {file}: no LoRA weights (lora_A / lora_B keys) in it")
    return file, lora, meta


def check_lora_fits(transformer: nn.Module, lora: dict[str, torch.Tensor], source: str) -> None:
    """Every transformer LoRA key must name a Linear of `transformer` with matching in/out
    features (text-encoder keys are left to diffusers)."""
    modules = dict(transformer.named_modules())
    for key, tensor in lora.items():
        if key.startswith(("text_encoder.", "text_encoder_2.")):
            continue
        name = key.removeprefix("transformer.")
        base, _, kind = name.partition(".lora_")
        module = modules.get(base)
        if module is not None and hasattr(module, "base_layer"):
            module = module.base_layer
        if not isinstance(module, nn.Linear):
            raise DiffalignError(
                f"--lora {source} is for another model: '{base}' is no Linear layer of this "
                "FLUX Fill transformer"
            )
        if kind.startswith("A") and tensor.shape[1] != module.in_features:
            raise DiffalignError(
                f"--lora {source} is for another base model: '{key}' expects "
                f"{tensor.shape[1]} inputs, this transformer's '{base}' has {module.in_features}"
            )
        if kind.startswith("B") and tensor.shape[0] != module.out_features:
            raise DiffalignError(
                f"--lora {source} is for another base model: '{key}' has "
                f"{tensor.shape[0]} outputs, this transformer's '{base}' has {module.out_features}"
            )


def load_lora_into_pipeline(pipe: Any, path: str | Path, adapter_name: str = "fill") -> int:
    """Check `path` against `pipe.transformer`, then load it with the pipeline's own
    `load_lora_weights` (rank/alpha from the file's diffusers metadata); returns the number of
    LoRA tensors."""
    import tempfile

    file, lora, meta = read_lora(path)
    check_lora_fits(pipe.transformer, lora, str(path))
    with tempfile.TemporaryDirectory() as tmp:
        if set(lora) != set(load_tensors(file)[0]) or any(
            not k.startswith(("transformer.", "text_encoder")) for k in lora
        ):
            # the combined file or unprefixed keys: hand diffusers a pure LoRA file
            keep = {k: v for k, v in meta.items() if k != "format"}
            save_tensors(
                Path(tmp) / LORA_FILE,
                {
                    k if k.startswith(("transformer.", "text_encoder")) else f"transformer.{k}": v
                    for k, v in lora.items()
                },
                metadata={"format": "pt", **keep},
            )
            file = Path(tmp) / LORA_FILE
        try:
            with library_output_held():  # diffusers logs the failure itself: our line alone
                pipe.load_lora_weights(
                    str(file.parent), weight_name=file.name, adapter_name=adapter_name
                )
        except (ValueError, RuntimeError, KeyError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DiffalignError(f"--lora {path}: cannot be loaded ({first})") from None
    return len(lora)


def build_semantic(dim: int, heads: int, layers: int) -> nn.Module:
    """A fresh `SemanticCrossAttention(dim, heads, layers)` (identity: scales 0)."""
    from diffalign.fill.attention import SemanticCrossAttention

    if dim % heads:
        raise DiffalignError(f"semantic heads ({heads}) must divide the latent width ({dim})")
    return SemanticCrossAttention(dim, heads=heads, layers=layers)


def recorded_semantic_layout(path: str | Path) -> str | None:
    """The semantic layout the module in `path` (a file or a folder, as `load_semantic`) was
    trained with, from the file's metadata alone (no tensor read); None when not recorded (a
    module saved before the layout was recorded) or not a safetensors file."""
    from diffalign.fill.encode import SEMANTIC_LAYOUTS

    file = _resolve_file(path, SEMANTIC_FILE, "--semantic-module")
    if file.suffix != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # corrupt or truncated file
        raise DiffalignError(
            f"--semantic-module {file}: cannot read ({type(e).__name__})"
        ) from None
    layout = meta.get("layout", meta.get("semantic_layout"))
    if layout is not None and layout not in SEMANTIC_LAYOUTS:
        raise DiffalignError(
            f"--semantic-module {file}: records an unknown semantic layout '{layout}' (known: "
            f"{', '.join(SEMANTIC_LAYOUTS)})"
        )
    return layout


def load_semantic(path: str | Path, latent_dim: int) -> nn.Module:
    """The module saved in `path` (semantic_module.safetensors, the combined file or a folder
    holding either); its width must be the model's latent token width, its tensors must fit.
    `module.layout` is the semantic layout it was trained with (None if not recorded)."""
    from diffalign.fill.attention import semantic_module_from_tensors

    file = _resolve_file(path, SEMANTIC_FILE, "--semantic-module")
    tensors, meta = load_tensors(file)
    if any(k.startswith("semantic.") for k in tensors):  # the combined file
        tensors = {
            k[len("semantic.") :]: v for k, v in tensors.items() if k.startswith("semantic.")
        }
        meta = {k[len("semantic_") :]: v for k, v in meta.items() if k.startswith("semantic_")}
    module = semantic_module_from_tensors(
        tensors, meta, f"--semantic-module {file}", expect={"dim": latent_dim}
    )
    module.layout = recorded_semantic_layout(file)
    return module.eval()
