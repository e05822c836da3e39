"""engine.lora: a peft U-Net adapter written in diffusers' LoRA layout and read back by diffusers."""

from __future__ import annotations

import torch


def _unet():
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    unet.add_adapter(
        LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k"], init_lora_weights=False),
        adapter_name="align",
    )
    return unet


def test_save_unet_lora_round_trips_through_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from diffalign.engine.io import load_tensors
    from diffalign.engine.lora import LORA_WEIGHTS_FILE, save_unet_lora

    unet = _unet().to(torch.bfloat16)
    path = save_unet_lora(StableDiffusionPipeline, tmp_path, unet, "align", torch.float32)
    assert path == tmp_path / LORA_WEIGHTS_FILE and path.is_file()
    saved, _ = load_tensors(path)
    assert saved and all(k.startswith("unet.") for k in saved)
    assert all(v.dtype == torch.float32 for v in saved.values())
    # diffusers reads it back into the same modules with the same values
    state, _ = StableDiffusionPipeline.lora_state_dict(str(tmp_path))
    ours = get_peft_model_state_dict(unet, adapter_name="align")
    assert len(state) == len(ours)
    key = next(k for k in ours if "lora_A" in k)
    diffusers_key = "unet." + key.replace(".lora_A.", ".lora.down.")
    assert torch.equal(saved[diffusers_key], ours[key].float())
    # without dtype the weights keep their trained dtype
    kept = save_unet_lora(StableDiffusionPipeline, tmp_path / "kept", unet, "align")
    assert all(v.dtype == torch.bfloat16 for v in load_tensors(kept)[0].values())
