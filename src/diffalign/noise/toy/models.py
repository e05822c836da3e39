"""Small models of the toy branch (spec N: Toy branch; seed 001 MNIST/CIFAR sections).

- `Generator`: one-step class-conditional generator ``G(z, label) -> image in [-1, 1]`` whose
  input ``z`` is a latent noise tensor ``[B, C_z, H_z, W_z]`` (so the patch-wise orthogonal
  transform acts on it exactly as on a diffusion latent).
- `Discriminator`: projection discriminator ``D(x, y) = w.phi(x) + <e_y, phi(x)>``.
- `Classifier`: the evaluation classifier; ``features(x)`` is its penultimate layer (the space of
  the Frechet distance).

No batch normalisation anywhere: the assignment step optimises one noise per item inside a
batch, and batch statistics would couple the items.

Weights are saved as safetensors with the config both in the file's metadata and in a json
beside it (`<kind>.safetensors` + `<kind>.json`); nothing is pickled. A loaded generator is
checked against the dataset the caller expects, so a run folder from another dataset is a
one-line error.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import load_tensors, save_tensors, write_json


def limit_threads() -> None:
    """One intra-op thread unless OMP_NUM_THREADS says otherwise: the toy models are so small
    that extra threads only add synchronisation, and on a busy machine spinning OpenMP threads
    make each step up to 100x slower (measured on 2 shared cores)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


# latent shape per dataset: patch size 2 -> D = 4 * 2 * 2 = 16, patch size 4 -> D = 64
LATENT_SHAPES = {"digits": (4, 4, 4), "mnist": (4, 8, 8), "cifar10": (4, 8, 8)}
IMAGE_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
HIDDEN = {"digits": 256, "mnist": 512, "cifar10": 512}


@dataclass
class ToyModelConfig:
    """Everything needed to rebuild a toy model; saved next to its weights."""

    kind: str  # "generator" | "discriminator" | "classifier"
    dataset: str
    image_shape: tuple[int, int, int]
    latent_shape: tuple[int, int, int] = (4, 4, 4)
    num_classes: int = 10
    hidden: int = 256
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_dataset(cls, kind: str, dataset: str) -> ToyModelConfig:
        if dataset not in IMAGE_SHAPES:
            raise DiffalignError(f"unknown dataset '{dataset}'")
        return cls(
            kind=kind,
            dataset=dataset,
            image_shape=IMAGE_SHAPES[dataset],
            latent_shape=LATENT_SHAPES[dataset],
            hidden=HIDDEN[dataset],
        )

    @classmethod
    def from_dict(cls, d: dict) -> ToyModelConfig:
        try:
            return cls(
                kind=str(d["kind"]),
                dataset=str(d["dataset"]),
                image_shape=tuple(int(v) for v in d["image_shape"]),
                latent_shape=tuple(int(v) for v in d.get("latent_shape", (4, 4, 4))),
                num_classes=int(d.get("num_classes", 10)),
                hidden=int(d.get("hidden", 256)),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DiffalignError(f"malformed toy model config ({e})") from None


def _is_small(image_shape) -> bool:
    return image_shape[1] <= 8


def _conv_features(image_shape, width: int, out_dim: int) -> nn.Sequential:
    """Strided conv stack down to <= 8x8 spatial, then a linear layer to `out_dim` features."""
    c, h, _ = image_shape
    layers: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1), nn.LeakyReLU(0.2)]
    ch, size = width, h
    while size > 8:
        layers += [nn.Conv2d(ch, ch * 2, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch, size = ch * 2, size // 2
    layers += [nn.Conv2d(ch, ch, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
    size = (size + 1) // 2
    layers += [nn.Flatten(), nn.Linear(ch * size * size, out_dim), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers)


class Generator(nn.Module):
    """One-step class-conditional generator: latent noise + label -> image in [-1, 1]."""

    def __init__(self, config: ToyModelConfig) -> None:
        super().__init__()
        self.config = config
        c, h, w = config.image_shape
        zdim = math.prod(config.latent_shape)
        hid = config.hidden
        self.embed = nn.Embedding(config.num_classes, 32)
        if _is_small(config.image_shape):
            self.net = nn.Sequential(
                nn.Linear(zdim + 32, hid),
                nn.LeakyReLU(0.2),
                nn.Linear(hid, hid),
                nn.LeakyReLU(0.2),
                nn.Linear(hid, hid),
                nn.LeakyReLU(0.2),
                nn.Linear(hid, c * h * w),
            )
            self.head = None
        else:
            # MLP to a 128-channel 4x4 or 7x7 map, then upsample x2 until the image size.
            base = 7 if h % 7 == 0 else 4
            steps = int(round(math.log2(h / base)))
            ch = 128
            self.net = nn.Sequential(
                nn.Linear(zdim + 32, hid), nn.ReLU(), nn.Linear(hid, ch * base * base), nn.ReLU()
            )
            ups: list[nn.Module] = [nn.Unflatten(1, (ch, base, base))]
            for _ in range(steps):
                ups += [
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(ch, ch // 2, 3, padding=1),
                    nn.ReLU(),
                ]
                ch //= 2
            ups += [nn.Conv2d(ch, c, 3, padding=1)]
            self.head = nn.Sequential(*ups)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if tuple(z.shape[1:]) != tuple(self.config.latent_shape):
            raise DiffalignError(
                f"generator expects latents {tuple(self.config.latent_shape)}, got {tuple(z.shape[1:])}"
            )
        x = torch.cat([z.flatten(1), self.embed(labels)], dim=1)
        x = self.net(x)
        if self.head is None:
            x = x.view(-1, *self.config.image_shape)
        else:
            x = self.head(x)
        return torch.tanh(x)

    def sample_noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn((n, *self.config.latent_shape), generator=generator)


class Discriminator(nn.Module):
    """Projection discriminator (Miyato & Koyama 2018): linear head + label-embedding product."""

    def __init__(self, config: ToyModelConfig) -> None:
        super().__init__()
        self.config = config
        hid = config.hidden
        c, h, w = config.image_shape
        if _is_small(config.image_shape):
            self.features = nn.Sequential(
                nn.Flatten(),
                nn.Linear(c * h * w, hid),
                nn.LeakyReLU(0.2),
                nn.Linear(hid, hid),
                nn.LeakyReLU(0.2),
            )
        else:
            self.features = _conv_features(config.image_shape, 32, hid)
        self.head = nn.Linear(hid, 1)
        self.embed = nn.Embedding(config.num_classes, hid)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.head(f).squeeze(1) + (self.embed(labels) * f).sum(1)


class Classifier(nn.Module):
    """Evaluation classifier; `features` (penultimate layer) defines the Frechet distance space."""

    def __init__(self, config: ToyModelConfig) -> None:
        super().__init__()
        self.config = config
        self.body = _conv_features(config.image_shape, 32, config.extra.get("feature_dim", 64))
        self.head = nn.Linear(config.extra.get("feature_dim", 64), config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


_CLASSES = {"generator": Generator, "discriminator": Discriminator, "classifier": Classifier}


def build_model(config: ToyModelConfig) -> nn.Module:
    if config.kind not in _CLASSES:
        raise DiffalignError(f"unknown toy model kind '{config.kind}'")
    return _CLASSES[config.kind](config)


def _config_dict(config: ToyModelConfig) -> dict:
    d = asdict(config)
    d["image_shape"] = list(config.image_shape)
    d["latent_shape"] = list(config.latent_shape)
    return d


def save_model(model: nn.Module, out_dir: str | Path, extra_info: dict | None = None) -> Path:
    """Write `<kind>.safetensors` (config in its metadata) and `<kind>.json` into `out_dir`."""
    config: ToyModelConfig = model.config  # type: ignore[assignment]
    out_dir = Path(out_dir)
    cfg = _config_dict(config)
    if extra_info:
        cfg["info"] = extra_info
    path = out_dir / f"{config.kind}.safetensors"
    save_tensors(path, dict(model.state_dict()), metadata={"config": json.dumps(cfg)})
    write_json(out_dir / f"{config.kind}.json", cfg)
    return path


def generator_run_result(result) -> dict:
    """What a generator-training command returns: the exported weights and the run's record."""
    return {
        "generator": str(Path(result.final_dir) / "generator.safetensors"),
        "output_dir": str(result.output_dir),
        "steps": result.step,
        "history": result.history,
        "summary": result.summary,
    }


def resolve_weights(path: str | Path, kind: str = "generator") -> Path:
    """A run folder (or its export / checkpoint subfolder) or a weights file -> the weights file."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for cand in (
            p / f"{kind}.safetensors",
            p / "export" / f"{kind}.safetensors",
            p / "checkpoint-final" / f"{kind}.safetensors",
        ):
            if cand.is_file():
                return cand
        raise DiffalignError(f"{p}: no {kind}.safetensors in this run folder")
    raise DiffalignError(f"{p}: not found (expected a run folder or a {kind}.safetensors file)")


def load_model(
    path: str | Path, kind: str = "generator", dataset: str | None = None
) -> tuple[nn.Module, ToyModelConfig]:
    """Load a toy model from a run folder or weights file; check it was built for `dataset`."""
    weights = resolve_weights(path, kind)
    tensors, meta = load_tensors(weights)
    cfg_dict = None
    if "config" in meta:
        try:
            cfg_dict = json.loads(meta["config"])
        except json.JSONDecodeError:
            cfg_dict = None
    if cfg_dict is None:
        for cand in (weights.parent / f"{kind}.json", weights.parent.parent / f"{kind}.json"):
            if cand.is_file():
                try:
                    cfg_dict = json.loads(cand.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise DiffalignError(f"{cand}: not valid JSON ({e})") from None
                break
    if cfg_dict is None:
        raise DiffalignError(f"{weights}: no {kind} config (metadata or {kind}.json) found")
    config = ToyModelConfig.from_dict(cfg_dict)
    if config.kind != kind:
        raise DiffalignError(f"{weights}: holds a {config.kind}, expected a {kind}")
    if dataset is not None and config.dataset != dataset:
        raise DiffalignError(
            f"{path}: this {kind} was trained on '{config.dataset}', not on '{dataset}' "
            f"(pass --dataset {config.dataset} or a run folder for {dataset})"
        )
    model = build_model(config)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise DiffalignError(
            f"{weights}: weights do not fit the recorded config ({first})"
        ) from None
    model.eval()
    return model, config
