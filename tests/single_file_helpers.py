"""Original-layout (LDM / SAI) single-file checkpoints written from tiny diffusers models, for
the `--model x.safetensors` tests. Written independently of diffusers' converters (which go the
other way), so loading the result through `from_single_file` checks the whole single-file
path."""

from __future__ import annotations

import json
import os

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _resnet(sd: dict, src: str, dst: str, out: dict) -> None:
    for k, v in sd.items():
        if k.startswith(src + "."):
            first, rest = k[len(src) + 1 :].split(".", 1)
            out[f"{dst}.{_RESNET[first]}.{rest}"] = v


def _same(sd: dict, src: str, dst: str, out: dict) -> None:
    for k, v in sd.items():
        if k.startswith(src + "."):
            out[dst + k[len(src) :]] = v


def unet_to_ldm(sd: dict, config: dict) -> dict:
    """Diffusers `UNet2DConditionModel` weights -> the original SD 1.x single-file layout
    (`model.diffusion_model.input_blocks...`)."""
    out: dict = {}
    layers = config["layers_per_block"]
    blocks = len(config["block_out_channels"])
    _same(sd, "time_embedding.linear_1", "time_embed.0", out)
    _same(sd, "time_embedding.linear_2", "time_embed.2", out)
    _same(sd, "conv_in", "input_blocks.0.0", out)
    for i in range(blocks):
        for j in range(layers):
            n = 1 + i * (layers + 1) + j
            _resnet(sd, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", out)
            _same(sd, f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", out)
        down = f"input_blocks.{(i + 1) * (layers + 1)}.0.op"
        _same(sd, f"down_blocks.{i}.downsamplers.0.conv", down, out)
    _resnet(sd, "mid_block.resnets.0", "middle_block.0", out)
    _same(sd, "mid_block.attentions.0", "middle_block.1", out)
    _resnet(sd, "mid_block.resnets.1", "middle_block.2", out)
    for i in range(blocks):
        attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in sd)
        for j in range(layers + 1):
            n = i * (layers + 1) + j
            _resnet(sd, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", out)
            _same(sd, f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", out)
        last = i * (layers + 1) + layers
        up = f"output_blocks.{last}.{2 if attn else 1}.conv"
        _same(sd, f"up_blocks.{i}.upsamplers.0.conv", up, out)
    _same(sd, "conv_norm_out", "out.0", out)
    _same(sd, "conv_out", "out.2", out)
    placed = {id(v) for v in out.values()}
    assert len(out) == len(sd), sorted(k for k, v in sd.items() if id(v) not in placed)
    return {f"model.diffusion_model.{k}": v for k, v in out.items()}


def write_ldm_unet_file(folder: str, path) -> dict:
    """`path`: the U-Net of the diffusers pipeline `folder` in the original layout; returns the
    diffusers state dict it was made from."""
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "unet", "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    save_file(unet_to_ldm(sd, config), str(path))
    return sd
