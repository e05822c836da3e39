"""CLIP-based rewards: `clip` (image-text cosine), `pickscore` (PickScore_v1 with its logit
scale) and `aesthetic` (LAION MLP over L2-normalised CLIP image embeddings).

Seed 001 `rewards_clip.py` / `rewards_pickscore.py`; ReNO's losses: CLIP `100 - 100 cos`,
PickScore `30 - logit_scale.exp() cos`, aesthetic `10 - mlp`.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.engine.errors import DiffalignError
from diffalign.engine.rewards.base import (
    CLIP_MEAN,
    CLIP_STD,
    Reward,
    clip_preprocess,
    enable_gradient_checkpointing,
    freeze,
)
from diffalign.engine.rewards.files import (
    check_tokenizer_files,
    quiet_hf_progress,
    read_json_config,
    state_dict_of,
)

AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
# the LAION improved-aesthetic-predictor / ImageReward head: Linear, Dropout, Linear, Dropout,
# Linear, Dropout, Linear, Linear (no activations) -> state-dict indices 0, 2, 4, 6, 7
MLP_LINEAR_INDICES = (0, 2, 4, 6, 7)
_MLP_DROPOUT = {1: 0.2, 3: 0.2, 5: 0.1}


def _pooled(out: Any) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features (projection in pooler_output);
    transformers 4 returns the tensor itself."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def build_mlp_head(
    sd: dict[str, torch.Tensor], prefix: str, what: str, path: Path
) -> nn.Sequential:
    """The 5-Linear MLP head from `prefix + layers.{0,2,4,6,7}.{weight,bias}`, sizes from the
    tensors (so the real 768-wide heads and tiny test heads load alike). Any other layout is one
    DiffalignError line."""
    expected = {f"{prefix}layers.{i}.{p}" for i in MLP_LINEAR_INDICES for p in ("weight", "bias")}
    found = {k for k in sd if k.startswith(prefix)}
    if found != expected:
        extra = sorted(found - expected)[:3]
        lacking = sorted(expected - found)[:3]
        raise DiffalignError(
            f"{what} {path}: not the MLP layout {prefix}layers.{{0,2,4,6,7}}.{{weight,bias}} "
            f"(missing: {', '.join(lacking) or 'none'}; unexpected: {', '.join(extra) or 'none'})"
        )
    modules: list[nn.Module] = []
    prev = None
    for i in range(8):
        if i in _MLP_DROPOUT:
            modules.append(nn.Dropout(_MLP_DROPOUT[i]))
            continue
        w, b = sd[f"{prefix}layers.{i}.weight"], sd[f"{prefix}layers.{i}.bias"]
        if w.ndim != 2 or b.shape != (w.shape[0],) or (prev is not None and w.shape[1] != prev):
            raise DiffalignError(
                f"{what} {path}: layer {i} has shape {tuple(w.shape)} after a {prev}-wide layer "
                "(not a chained MLP head)"
            )
        lin = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        modules.append(lin)
        prev = w.shape[0]
    if prev != 1:
        raise DiffalignError(f"{what} {path}: the head ends {prev} wide, expected 1 output")
    return nn.Sequential(*modules)


class MLPHead(nn.Module):
    """`self.layers` as in the LAION predictor / ImageReward (so its state dict keys match)."""

    def __init__(self, layers: nn.Sequential):
        super().__init__()
        self.layers = layers

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_mlp_head(path: Path, what: str, prefix: str = "") -> MLPHead:
    """The aesthetic `.pth` (plain or wrapped in `state_dict`), read with weights_only=True."""
    from diffalign.engine.io import load_pt

    sd = state_dict_of(load_pt(path), path, what)
    return MLPHead(build_mlp_head(sd, prefix, what, path))


class CLIPBundle:
    """A loaded CLIPModel with its tokenizer and image preprocessing (size, mean, std).

    `clean`: a text cleaning applied to each prompt before the tokenizer, where the official
    reward cleans its prompts (HPSv2: open_clip's); None for the HF tokenizers' own (CLIP,
    PickScore: their processors tokenise the raw prompt)."""

    def __init__(
        self,
        model,
        tokenizer,
        size: int,
        mean,
        std,
        source: str,
        clean: Callable[[str], str] | None = None,
    ):
        self.model, self.tokenizer, self.clean = model, tokenizer, clean
        self.size, self.mean, self.std, self.source = size, tuple(mean), tuple(std), source
        # set to a dict by CombinedReward for one call: terms sharing this model (clip +
        # aesthetic in hybrid) then run its image tower once per batch
        self.memo: dict | None = None
        # "reno" (resize shorter side + centre crop) or "official" (HPSv2: resize longer side
        # + zero padding); see rewards.base.GEOMETRIES
        self.geometry = "reno"

    @property
    def projection_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings of [0, 1] images (differentiable)."""
        key = (id(images), images._version)
        if self.memo is not None and key in self.memo:
            return self.memo[key]
        dtype = self.model.visual_projection.weight.dtype
        x = clip_preprocess(images.float(), self.size, self.mean, self.std, self.geometry)
        x = x.to(dtype)
        emb = F.normalize(_pooled(self.model.get_image_features(pixel_values=x)).float(), dim=-1)
        if self.memo is not None:
            self.memo[key] = emb
        return emb

    def tokens(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The text model's input ids and attention mask for `prompts` (cleaned first when the
        reward cleans), padded to the longest and cut at the context length."""
        max_len = int(self.model.config.text_config.max_position_embeddings)
        if self.clean is not None:
            prompts = [self.clean(p) for p in prompts]
        return self.tokenizer(
            prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        )

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings (no gradient: prompts are fixed)."""
        tok = self.tokens(prompts)
        device = self.model.visual_projection.weight.device
        out = self.model.get_text_features(
            input_ids=tok["input_ids"].to(device),
            attention_mask=tok["attention_mask"].to(device),
        )
        return F.normalize(_pooled(out).float(), dim=-1)


def _processor_settings(folders: list[Path], default_size: int) -> tuple[int, tuple, tuple]:
    """Crop size and mean/std from the first `preprocessor_config.json` found (else OpenAI's)."""
    for folder in folders:
        cfg_path = folder / "preprocessor_config.json"
        if cfg_path.is_file():
            cfg = read_json_config(cfg_path, "image processor config")
            mean = tuple(cfg.get("image_mean") or CLIP_MEAN)
            std = tuple(cfg.get("image_std") or CLIP_STD)
            return default_size, mean, std
    return default_size, CLIP_MEAN, CLIP_STD


def load_clip_bundle(
    source: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    processor: str | None = None,
    what: str = "CLIP model",
    download_name: str = "CLIP-ViT-L-14",
    gradient_checkpointing: bool = False,
) -> CLIPBundle:
    """A transformers `CLIPModel` folder (or Hub id) + tokenizer (from `processor` or the model
    folder) + its preprocessing, frozen on `device`. Loads with `from_pretrained` (safetensors,
    or transformers' weights_only reading of `pytorch_model.bin`)."""
    from transformers import AutoTokenizer, CLIPModel

    from diffalign.engine.errors import ModelNotFoundError
    from diffalign.engine.loading import (
        _first_line,
        _hub_errors,
        _tf_dtype_kw,
        damaged_weights,
        hub_offline,
    )

    folder = Path(source)
    if folder.is_dir():
        cfg = read_json_config(folder / "config.json", f"{what} config")
        if cfg.get("model_type") != "clip":
            raise DiffalignError(
                f"{what} {folder}: config.json is a '{cfg.get('model_type')}' model, not a "
                "transformers CLIPModel ('clip')"
            )
    tok_sources = [s for s in (processor, source) if s]
    try:
        tokenizer = None  # first (cheap, and a folder without its vocabulary is refused early)
        errors = []
        for tok_source in tok_sources:
            if Path(tok_source).is_dir():
                check_tokenizer_files(tok_source, "bpe", f"{what} tokenizer folder")
            try:
                tokenizer = AutoTokenizer.from_pretrained(
                    tok_source, local_files_only=hub_offline() or Path(tok_source).is_dir()
                )
                break
            except _hub_errors() as e:  # try the next place
                errors.append(f"{tok_source}: {_first_line(e)}")
        if tokenizer is None:
            raise DiffalignError(
                f"{what}: no tokenizer found ({'; '.join(errors)}); fetch it with "
                f"`diffalign download --only {download_name}`"
            )
        with quiet_hf_progress():
            model = CLIPModel.from_pretrained(
                source, local_files_only=hub_offline() or folder.is_dir(), **_tf_dtype_kw(dtype)
            )
    except DiffalignError:
        raise
    except pickle.UnpicklingError as e:  # a pickled pytorch_model.bin that is not plain tensors
        raise DiffalignError(
            f"{what} {source}: its pickled weights (pytorch_model.bin) hold more than plain "
            f"tensors ({type(e).__name__} under weights_only=True) and are never loaded; "
            "convert them to model.safetensors"
        ) from None
    except _hub_errors() as e:
        damaged = damaged_weights(source, folder, download_name) if folder.is_dir() else None
        if damaged is not None:
            raise damaged from None
        raise ModelNotFoundError(source, download_name, _first_line(e)) from None
    size = int(model.config.vision_config.image_size)
    size, mean, std = _processor_settings([Path(s) for s in tok_sources], size)
    freeze(model)
    model.to(device)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return CLIPBundle(model, tokenizer, size, mean, std, source)


class _TextCache:
    """Prompt -> normalised text embedding, computed once per prompt (prompts are fixed)."""

    def __init__(self, encode):
        self._encode = encode
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo:
            for p, e in zip(todo, self._encode(todo)):
                self._cache[p] = e
        return torch.stack([self._cache[p] for p in prompts])


class CLIPScoreReward(Reward):
    """`scale * cos(image, text)` of a CLIPModel: `clip` (scale 100, loss `100 - 100 cos`,
    ReNO; the seed's `logit_scale.exp() * cos` for OpenAI CLIP) or `pickscore` (scale
    `logit_scale.exp()` of PickScore_v1, loss `30 - score`)."""

    def __init__(self, bundle: CLIPBundle, *, name: str, scale: float, loss_offset: float):
        super().__init__()
        self.bundle = bundle
        self.model = bundle.model  # registered, so .to()/.parameters() see it
        self.name, self.scale, self.loss_offset = name, float(scale), float(loss_offset)
        self.text_cache = _TextCache(bundle.text_embeds)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img = self.bundle.image_embeds(images)
        txt = self.text_cache(prompts).to(img.device)
        return self.scale * (img * txt).sum(-1)


class AestheticReward(Reward):
    """LAION aesthetic score: `mlp(normalize(clip_image_embedding))` (loss `10 - mlp`)."""

    name = "aesthetic"
    loss_offset = 10.0

    def __init__(self, bundle: CLIPBundle, head: MLPHead):
        super().__init__()
        if head.in_features != bundle.projection_dim:
            raise DiffalignError(
                f"aesthetic head expects {head.in_features}-wide CLIP image embeddings but the "
                f"CLIP model {bundle.source} gives {bundle.projection_dim} (the LAION head needs "
                "CLIP ViT-L/14: `diffalign download --only CLIP-ViT-L-14`)"
            )
        self.bundle = bundle
        self.model = bundle.model
        self.head = freeze(head)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        emb = self.bundle.image_embeds(images)
        return self.head(emb.to(self.head.layers[0].weight.dtype)).squeeze(-1)
