"""Tiny random models in the real on-disk format, built offline (spec E: Tiny offline models).

`make_tiny("sd3", out)` writes a folder that `StableDiffusion3Pipeline.from_pretrained(out)` loads
exactly like a real checkpoint: the same component classes, configs, tokenizer files and
`model_index.json`, only with a few thousand random weights. Tests, smoke runs and benchmarks load
these folders through the same code path as real models (`diffalign.engine.loading`).

Kinds live in a registry (`register_kind`). Every module `diffalign.engine.tiny_<family>.py` is
imported on the first lookup of a kind, so a family registers its kinds in its own file; such modules
keep their top-level imports light (torch, diffusers and transformers inside the builders).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffalign.engine.errors import DiffalignError

# A builder writes the model into an (empty) folder: builder(out_dir, seed, **overrides).
TinyBuilder = Callable[..., None]


@dataclass(frozen=True)
class TinyKind:
    """One registered kind: its builder, a one-line description and the overrides it accepts."""

    name: str
    builder: TinyBuilder
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)  # name -> default value


_KINDS: dict[str, TinyKind] = {}
TINY_KINDS: list[str] = []  # names of the registered kinds, in registration order


def register_kind(
    name: str, description: str, overrides: dict[str, Any] | None = None
) -> Callable[[TinyBuilder], TinyBuilder]:
    """Decorator: register `builder(out_dir, seed, **overrides)` as `diffalign make-tiny NAME`."""

    def deco(builder: TinyBuilder) -> TinyBuilder:
        _KINDS[name] = TinyKind(name, builder, description, dict(overrides or {}))
        if name not in TINY_KINDS:
            TINY_KINDS.append(name)
        return builder

    return deco


def kind_names() -> list[str]:
    """The registered kinds' names, in registration order (every `tiny_*` module imported)."""
    _ensure_discovered()
    return list(TINY_KINDS)


def describe_kinds() -> str:
    """One line per kind: `name: description` (for `--help`)."""
    _ensure_discovered()
    return "; ".join(f"{k.name}: {k.description}" for k in _KINDS.values())


def tiny_kind(name: str) -> TinyKind:
    """The registered kind `name`; an unknown name is a DiffalignError listing the kinds."""
    _ensure_discovered()
    if name not in _KINDS:
        raise DiffalignError(
            f"unknown tiny model kind '{name}'; choose one of: {', '.join(TINY_KINDS)}"
        )
    return _KINDS[name]


def make_tiny(
    kind: str, out: str | os.PathLike, seed: int = 0, overwrite: bool = False, **overrides: Any
) -> Path:
    """Write a tiny random model of `kind` to `out` atomically and return the folder.

    `overrides` are the kind's size options (e.g. `num_layers=24` for sd3); an override the kind
    does not know is a DiffalignError. An existing non-empty `out` is refused unless `overwrite`.
    """
    spec = tiny_kind(kind)
    unknown = sorted(set(overrides) - set(spec.overrides))
    if unknown:
        allowed = ", ".join(sorted(spec.overrides)) or "none"
        raise DiffalignError(
            f"make-tiny {kind}: unknown option(s) {', '.join(unknown)} (this kind accepts: {allowed})"
        )
    overrides = {k: _typed_override(kind, k, v, spec.overrides[k]) for k, v in overrides.items()}
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DiffalignError(f"--output-dir {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DiffalignError(f"--output-dir {out} is not empty; pass --overwrite to replace it")
    from diffalign.engine.io import atomic_dir  # imports torch: keep `--help` fast

    options = {**spec.overrides, **overrides}
    try:
        with atomic_dir(out) as tmp, _quiet_saving():
            spec.builder(tmp, seed, **options)
    except (ValueError, AssertionError, RuntimeError) as e:
        if not overrides:  # the kind's own sizes: our bug, not bad input
            raise
        given = ", ".join(f"{k}={v}" for k, v in sorted(overrides.items()))
        raise DiffalignError(
            f"make-tiny {kind}: the model cannot be built with {given}: {e}".splitlines()[0]
        ) from e
    return out


def _typed_override(kind: str, name: str, value: Any, default: Any) -> Any:
    """`value` as the type of the kind's default: sizes are integers (a list of them where the
    default is a tuple); anything else is a DiffalignError naming the option."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if isinstance(default, tuple):
        items = value if isinstance(value, tuple | list) else (value,)
        if all(is_int(v) for v in items):
            return tuple(items)
        want = "a comma-separated list of integers"
    elif is_int(default):
        if is_int(value):
            return value
        want = "an integer"
    else:
        return value
    raise DiffalignError(f"make-tiny {kind}: {name} must be {want}, got {value!r}")


@contextlib.contextmanager
def _quiet_saving() -> Iterator[None]:
    """Silence transformers' per-file "Writing model shards" bars while a tiny model is saved."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------
# Tokenizers built offline (no Hub): same classes and file formats as the real ones.


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to one printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def tiny_clip_tokenizer(model_max_length: int = 77):
    """A CLIPTokenizer over the 256 byte characters (plus `</w>` forms) and no merges.

    Layout as in OpenAI's vocabulary: bytes, bytes + `</w>`, then `<|startoftext|>` and
    `<|endoftext|>`; so every prompt tokenizes (character by character) and ids differ per prompt.
    """
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A T5Tokenizer (Unigram, the real T5 format) over printable ASCII pieces, no extra ids."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def tiny_t5_encoder(d_model: int):
    """A 2-layer `T5EncoderModel` of width `d_model` (gated-GELU as T5 v1.1, the T5-XXL encoder
    of SD3 and FLUX) over `tiny_t5_tokenizer`'s 256 ids; random weights from torch's RNG."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=256,
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
        )
    ).eval()


def require_positive(**sizes: Any) -> None:
    """Raise `DiffalignError` naming the first of a builder's `sizes` below 1 (make-tiny
    overrides)."""
    for name, value in sizes.items():
        if int(value) < 1:
            raise DiffalignError(f"make-tiny: {name} must be a positive integer, got {value}")


def tiny_latent16_vae(seed: int, *, shift_factor: float, scaling_factor: float):
    """The `AutoencoderKL` of FLUX.1 and SD3.5 in small: four levels (8x downsampling as the real
    VAEs), 16 latent channels, no quant convs, the release's shift/scale; weights from `seed`."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    ).eval()


def tiny_clip_text_config(
    hidden: int,
    *,
    heads: int = 2,
    hidden_act: str = "quick_gelu",
    projection_dim: int | None = None,
):
    """A 2-layer CLIPTextConfig over `tiny_clip_tokenizer`'s 514 ids (bos 512, eos = pad 513)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=514,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection_dim or hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=77,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_act=hidden_act,
    )


# ---------------------------------------------------------------------------------------------
# SD3 / SD3.5


_SD3_OVERRIDES = {
    "num_layers": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "joint_attention_dim": 32,
    "sample_size": 16,
    "patch_size": 2,
}
_CLIP_HIDDEN = (8, 16)  # CLIP-L / CLIP-G stand-ins; their sum (24) is zero-padded to the T5 width


def build_tiny_sd3_pipeline(
    seed: int = 0,
    *,
    num_layers: int = 4,
    num_attention_heads: int = 4,
    attention_head_dim: int = 8,
    joint_attention_dim: int = 32,
    sample_size: int = 16,
    patch_size: int = 2,
    qk_norm: str | None = None,
    dual_attention_layers: tuple[int, ...] = (),
):
    """A tiny random `StableDiffusion3Pipeline` in memory, wired like the real SD3.

    The transformer width `num_attention_heads * attention_head_dim` is also the caption
    projection width; `joint_attention_dim` is the T5 width; the two CLIP hidden sizes sum to
    at most that (the pipeline zero-pads CLIP features to the T5 width) and the pooled projection
    width is the sum of the two CLIP projection widths, as in the real model.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    require_positive(
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        joint_attention_dim=joint_attention_dim,
        sample_size=sample_size,
        patch_size=patch_size,
    )
    if joint_attention_dim < sum(_CLIP_HIDDEN):
        raise DiffalignError(
            f"make-tiny: joint_attention_dim must be >= {sum(_CLIP_HIDDEN)} (the CLIP widths)"
        )
    bad = [i for i in dual_attention_layers if not 0 <= i < num_layers]
    if bad:
        raise DiffalignError(f"make-tiny: dual attention layers {bad} outside 0..{num_layers - 1}")
    if sample_size % patch_size:
        raise DiffalignError("make-tiny: sample_size must be a multiple of patch_size")

    torch.manual_seed(seed)
    width = num_attention_heads * attention_head_dim
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=16,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        caption_projection_dim=width,
        joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=sum(_CLIP_HIDDEN),
        out_channels=16,
        pos_embed_max_size=max(96, sample_size // patch_size),
        qk_norm=qk_norm,
        dual_attention_layers=tuple(dual_attention_layers),
    )

    torch.manual_seed(seed + 1)
    text_encoders = []
    for hidden in _CLIP_HIDDEN:
        cfg = tiny_clip_text_config(hidden, hidden_act="gelu")
        text_encoders.append(CLIPTextModelWithProjection(cfg).eval())

    torch.manual_seed(seed + 2)
    t5 = tiny_t5_encoder(joint_attention_dim)

    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        sample_size=sample_size * 2,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoders[0],
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=text_encoders[1],
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=tiny_t5_tokenizer(),
    )


@register_kind(
    "sd3",
    "StableDiffusion3Pipeline shaped like SD3-medium (MMDiT, 2x CLIP + T5, 16-channel VAE)",
    _SD3_OVERRIDES,
)
def _build_sd3(out: Path, seed: int, **overrides: Any) -> None:
    build_tiny_sd3_pipeline(seed, **overrides).save_pretrained(out)


@register_kind(
    "sd35",
    "SD3 plus the SD3.5 structure: RMS qk-norm and a dual-attention (attn2) layer",
    {**_SD3_OVERRIDES, "dual_attention_layers": (0,)},
)
def _build_sd35(out: Path, seed: int, **overrides: Any) -> None:
    build_tiny_sd3_pipeline(seed, qk_norm="rms_norm", **overrides).save_pretrained(out)


def _discover_kind_modules() -> None:
    """Import every `diffalign.engine.tiny_*` module so its `@register_kind` builders register."""
    import importlib
    import pkgutil

    import diffalign.engine as engine_pkg

    for info in sorted(pkgutil.iter_modules(engine_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("tiny_"):
            importlib.import_module(f"diffalign.engine.{info.name}")


_discovered = False


def _ensure_discovered() -> None:
    """Discover the family modules on first use, not at import: a family module imported first
    (e.g. `diffalign.engine.tiny_flux`, which imports this one) must finish loading before its
    siblings that import it are loaded."""
    global _discovered
    if not _discovered:
        _discover_kind_modules()  # a failed import raises here again at the next lookup
        _discovered = True
