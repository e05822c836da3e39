"""The toy GAN generator behind the one-step generator interface, and the toy classifier as a
reward (spec N: Toy branch; the proof of `diffalign noise toy optimize`).

"Prompts" of the toy branch are class labels: ``"3"``, ``"digit 3"`` or, for CIFAR-10, the
class name (``"cat"``). The reward is the classifier's log-probability of the prompt's class,
``log softmax(f(x))[y]`` (higher is better; its ReNO-style loss is ``-log p``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.engine.errors import DiffalignError
from diffalign.engine.rewards import Reward
from diffalign.noise.onestep import OneStepGenerator, PromptEmbeds

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def parse_class_prompt(prompt: str, num_classes: int = 10, dataset: str = "digits") -> int:
    """``"3"`` / ``"digit 3"`` / ``"class 3"`` / a CIFAR-10 class name -> the class index."""
    text = str(prompt).strip().lower()
    if dataset == "cifar10" and text in CIFAR10_CLASSES:
        return CIFAR10_CLASSES.index(text)
    m = re.fullmatch(r"(?:(?:digit|class|label)\s*)?(\d+)", text)
    if m is None or int(m.group(1)) >= num_classes:
        names = "a class name or " if dataset == "cifar10" else ""
        raise DiffalignError(
            f"toy prompt {prompt!r} is not a class: use {names}a label 0..{num_classes - 1} "
            "(e.g. '3' or 'digit 3')"
        )
    return int(m.group(1))


class ToyOneStepGenerator(OneStepGenerator):
    """``G(z, label)`` of the toy branch; images mapped from ``[-1, 1]`` to ``[0, 1]`` and
    grayscale repeated to RGB (``[B, 3, H, W]`` like every generator)."""

    name = "toy"

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.model = generator.eval().requires_grad_(False)
        self.config = generator.config

    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        labels = [
            parse_class_prompt(p, self.config.num_classes, self.config.dataset) for p in prompts
        ]
        return {"labels": torch.tensor(labels, dtype=torch.long, device=self.device)}

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple:
        return tuple(self.config.latent_shape)

    def generate(self, noise: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        return self.decode(self.denoise(noise, embeds))

    # The toy generator has no latent space: its "latent" is its own [-1, 1] output with the
    # dataset's channels, so the latent loss is the toy branch's MSE on the generator output.

    def denoise(self, noise: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        self.check_noise(noise, embeds)
        return self.model(noise.float(), embeds["labels"])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = (latents + 1.0) / 2.0
        if images.shape[1] == 1:  # grayscale digits -> RGB, as every generator returns
            images = images.expand(-1, 3, -1, -1)
        return images

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() * 2.0 - 1.0
        if self.config.image_shape[0] == 1:
            x = x.mean(1, keepdim=True)
        return x

    def image_size(self) -> tuple[int, int]:
        return tuple(self.config.image_shape[1:])

    def preserve_embeds(self, embeds: PromptEmbeds) -> PromptEmbeds:
        """Uniformly drawn labels: the preserve loss covers every class, not the batch's."""
        labels = embeds["labels"]
        return {
            "labels": torch.randint(0, self.config.num_classes, labels.shape, device=labels.device)
        }

    trainable_name = "generator"

    def trainable_module(self) -> nn.Module:
        return self.model

    def frozen_copy(self) -> ToyOneStepGenerator:
        import copy

        return ToyOneStepGenerator(copy.deepcopy(self.model))

    def export_finetuned(self, out_dir, info: dict | None = None) -> None:
        from diffalign.noise.toy.models import save_model

        save_model(self.model, out_dir, info)


class ToyClassifierReward(Reward):
    """Reward ``log p(y | x)`` of the toy evaluation classifier (trained on the real train split)
    for images in ``[0, 1]`` and prompts naming the class ``y``."""

    name = "classifier"

    def __init__(self, classifier: nn.Module, dataset: str | None = None) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_classes = classifier.config.num_classes
        self.dataset = dataset or classifier.config.dataset

    def labels(self, prompts: Sequence[str], device) -> torch.Tensor:
        return torch.tensor(
            [parse_class_prompt(p, self.num_classes, self.dataset) for p in prompts],
            dtype=torch.long,
            device=device,
        )

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = images.float() * 2.0 - 1.0
        if self.classifier.config.image_shape[0] == 1:
            x = x.mean(1, keepdim=True)  # the RGB of a grayscale generator has equal channels
        logits = self.classifier(x.to(next(self.classifier.parameters()).device))
        logp = F.log_softmax(logits, dim=1)
        score = logp.gather(1, self.labels(prompts, logits.device)[:, None]).squeeze(1)
        return score.to(images.device)
