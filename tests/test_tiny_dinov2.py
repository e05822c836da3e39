"""make-tiny dinov2 / dinov2-reg: the real facebook/dinov2-large file layout, loadable by
transformers, with the real 37 x 37 patch grid at 518 px."""

from __future__ import annotations

import json

import torch

import diffalign.engine.tiny_dinov2  # noqa: F401  (registers the kinds)
from diffalign.engine.tiny import make_tiny


def test_tiny_dinov2_layouts_load_and_give_a_37x37_grid(tmp_path):
    from transformers import AutoModel, Dinov2Model, Dinov2WithRegistersModel

    for kind, cls, extra in (
        ("dinov2", Dinov2Model, 1),
        ("dinov2-reg", Dinov2WithRegistersModel, 5),
    ):
        out = make_tiny(kind, tmp_path / kind)
        assert {p.name for p in out.iterdir()} == {
            "config.json", "model.safetensors", "preprocessor_config.json"
        }  # fmt: skip
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["patch_size"] == 14 and cfg["image_size"] == 518
        assert json.loads((out / "preprocessor_config.json").read_text())[
            "image_processor_type"
        ] == ("BitImageProcessor")
        model = AutoModel.from_pretrained(out)
        assert type(model) is cls
        with torch.no_grad():
            h = model(pixel_values=torch.randn(1, 3, 518, 518)).last_hidden_state
        assert h.shape == (1, 37 * 37 + extra, model.config.hidden_size)
